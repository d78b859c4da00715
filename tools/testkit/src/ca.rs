//! A mesh CA made by the test ([`TestCa`], rcgen): SPIFFE workload certificates and server certificates
//! as PEM files ([`MeshIdentity`]).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Result;

/// PEM files of one workload's mesh identity: its certificate, its key, and the mesh root.
#[derive(Clone, Debug)]
pub struct MeshIdentity {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub root: PathBuf,
}

/// A mesh CA made by the test (what istiod's CA is in a mesh): a self-signed root that issues workload
/// certificates with a SPIFFE URI SAN (`spiffe://cluster.local/ns/NS/sa/SA`), usable for both client
/// and server authentication, as Istio's workload certificates are. Files go to the given directory.
pub struct TestCa {
    dir: PathBuf,
    root: PathBuf,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    /// A new root CA; its certificate is written to `<dir>/root-cert.pem`.
    pub fn new(dir: &Path) -> Result<TestCa> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        std::fs::create_dir_all(dir)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::OrganizationName, "meshfed test mesh");
        params.distinguished_name.push(DnType::CommonName, "meshfed test root CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key)?;
        let root = dir.join("root-cert.pem");
        std::fs::write(&root, cert.pem())?;
        Ok(TestCa { dir: dir.to_path_buf(), root, issuer: rcgen::Issuer::new(params, key) })
    }

    /// The root certificate (PEM file).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Issues a workload certificate whose only SAN is the URI `spiffe_id`; writes
    /// `<dir>/<name>-cert.pem` and `<dir>/<name>-key.pem`.
    pub fn issue(&self, name: &str, spiffe_id: &str) -> Result<MeshIdentity> {
        use rcgen::{DnType, ExtendedKeyUsagePurpose, SanType};
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::OrganizationName, "meshfed test mesh");
        params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into()?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(name, params)
    }

    /// Issues a server certificate for the given DNS names and IP addresses (meshfed's xDS or debug
    /// server); writes `<dir>/<name>-cert.pem` and `<dir>/<name>-key.pem`.
    pub fn issue_server(&self, name: &str, dns: &[&str], ips: &[IpAddr]) -> Result<MeshIdentity> {
        use rcgen::{DnType, ExtendedKeyUsagePurpose, SanType};
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.subject_alt_names = dns.iter().map(|d| Ok(SanType::DnsName((*d).try_into()?))).collect::<Result<_>>()?;
        params.subject_alt_names.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(name, params)
    }

    /// Signs `params` (a leaf: digital signature and key encipherment, with the CA's key identifier) for
    /// a new key; writes `<dir>/<name>-cert.pem` and `<dir>/<name>-key.pem`.
    fn sign(&self, name: &str, mut params: rcgen::CertificateParams) -> Result<MeshIdentity> {
        use rcgen::KeyUsagePurpose;
        let key = rcgen::KeyPair::generate()?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        let identity = MeshIdentity {
            cert: self.dir.join(format!("{name}-cert.pem")),
            key: self.dir.join(format!("{name}-key.pem")),
            root: self.root.clone(),
        };
        std::fs::write(&identity.cert, cert.pem())?;
        std::fs::write(&identity.key, key.serialize_pem())?;
        Ok(identity)
    }
}
