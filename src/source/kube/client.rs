//! How a cluster's API server is reached: where its configuration comes from ([`ClientSpec`]: a
//! kubeconfig file, the pod's service account, or a kubeconfig held in memory from a remote secret),
//! what a kubeconfig may not do ([`check_kubeconfig`]: users that run commands or auth plugins are
//! refused unless allowed, and a remote secret's kubeconfig may not name local files), and the client
//! itself ([`build_client`]: a connect timeout, no retries of its own, and every watch request through
//! the [watch guard](super::watch_guard)).
//!
//! Uses the watch guard; used by the cluster loop and the remote-secret watcher.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};

use super::watch_guard::{WatchCuts, WatchGuardLayer};
use crate::mesh_config::ClusterSource;

/// Connect timeout of the clients (an unreachable address fails in this time rather than the OS's).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A kubeconfig file cannot be read or parsed.
    #[error("cannot read kubeconfig {}: {source}", .path.display())]
    ReadKubeconfig { path: PathBuf, source: kube::config::KubeconfigError },
    /// A kubeconfig cannot be parsed or used (no such context, bad certificate data...).
    #[error("invalid kubeconfig: {0}")]
    Kubeconfig(#[source] kube::config::KubeconfigError),
    /// A kubeconfig user runs a command or an auth plugin, which is refused unless allowed.
    #[error(
        "kubeconfig user {user:?} authenticates with {mechanism}, which meshfed refuses by default (as Istio does): \
         use a service account token instead, or allow it with `allowExecAuth: true` in the mesh config or --allow-exec-auth"
    )]
    ExecAuth { user: String, mechanism: &'static str },
    /// A kubeconfig from a remote secret names a file on meshfed's file system.
    #[error(
        "kubeconfig {what} {name:?} refers to a local file ({field}), which a remote secret may not do: embed the data instead"
    )]
    FileReference { what: &'static str, name: String, field: &'static str },
    /// The in-cluster configuration (service account token, KUBERNETES_SERVICE_HOST) is not available.
    #[error("in-cluster config: {0}")]
    InCluster(#[source] kube::config::InClusterError),
    /// The client cannot be built from the configuration.
    #[error("cannot create a Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// How to reach one cluster's API server.
#[derive(Clone, Debug)]
pub enum ClientSpec {
    /// a kubeconfig file (read when the cluster starts, and again after a failure)
    File { path: PathBuf, context: Option<String> },
    /// the pod's service account
    InCluster,
    /// a kubeconfig held in memory (a remote secret): no exec or auth-provider unless allowed, and no
    /// references to local files
    Inline { kubeconfig: Box<Kubeconfig>, context: Option<String> },
}

impl ClientSpec {
    pub fn from_source(source: &ClusterSource) -> Option<ClientSpec> {
        match source {
            ClusterSource::Manifests(_) => None,
            ClusterSource::Kubeconfig { path, context } => {
                Some(ClientSpec::File { path: path.clone(), context: context.clone() })
            }
            ClusterSource::InCluster => Some(ClientSpec::InCluster),
        }
    }

    /// Whether a failure to build a client may go away by itself (a file being fixed).
    pub(super) fn retryable(&self) -> bool {
        !matches!(self, ClientSpec::Inline { .. })
    }
}

/// Refuses kubeconfigs whose users run commands (`exec`) or auth plugins (`auth-provider`) unless
/// `allow_exec`, and (with `allow_files: false`, for remote secrets) any reference to a local file.
pub fn check_kubeconfig(kc: &Kubeconfig, allow_exec: bool, allow_files: bool) -> Result<(), Error> {
    for user in &kc.auth_infos {
        let Some(a) = &user.auth_info else { continue };
        if !allow_exec {
            if a.exec.is_some() {
                return Err(Error::ExecAuth { user: user.name.clone(), mechanism: "exec (a command)" });
            }
            if a.auth_provider.is_some() {
                return Err(Error::ExecAuth { user: user.name.clone(), mechanism: "an auth-provider plugin" });
            }
        }
        if !allow_files {
            for (field, set) in [
                ("tokenFile", a.token_file.is_some()),
                ("client-certificate", a.client_certificate.is_some()),
                ("client-key", a.client_key.is_some()),
            ] {
                if set {
                    return Err(Error::FileReference { what: "user", name: user.name.clone(), field });
                }
            }
        }
    }
    if !allow_files {
        for c in &kc.clusters {
            if c.cluster.as_ref().is_some_and(|c| c.certificate_authority.is_some()) {
                return Err(Error::FileReference {
                    what: "cluster",
                    name: c.name.clone(),
                    field: "certificate-authority",
                });
            }
        }
    }
    Ok(())
}

/// Builds a client for `spec` (see [`check_kubeconfig`] for what is refused).
pub async fn build_client(spec: &ClientSpec, allow_exec: bool) -> Result<kube::Client, Error> {
    build_guarded_client(spec, allow_exec, WatchCuts::new()).await
}

/// [`build_client`], with its watch requests going through `cuts` (see [`WatchCuts`]).
pub(super) async fn build_guarded_client(
    spec: &ClientSpec,
    allow_exec: bool,
    cuts: Arc<WatchCuts>,
) -> Result<kube::Client, Error> {
    let mut config = match spec {
        ClientSpec::File { path, context } => {
            let kc =
                Kubeconfig::read_from(path).map_err(|source| Error::ReadKubeconfig { path: path.clone(), source })?;
            check_kubeconfig(&kc, allow_exec, true)?;
            let options = KubeConfigOptions { context: context.clone(), ..Default::default() };
            kube::Config::from_custom_kubeconfig(kc, &options).await.map_err(Error::Kubeconfig)?
        }
        ClientSpec::InCluster => kube::Config::incluster().map_err(Error::InCluster)?,
        ClientSpec::Inline { kubeconfig, context } => {
            check_kubeconfig(kubeconfig, allow_exec, false)?;
            let options = KubeConfigOptions { context: context.clone(), ..Default::default() };
            kube::Config::from_custom_kubeconfig((**kubeconfig).clone(), &options).await.map_err(Error::Kubeconfig)?
        }
    };
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    // retries are ours (capped, jittered backoff; see the source's module doc), not the client's per request
    config.default_retry = false;
    let builder = kube::client::ClientBuilder::try_from(config).map_err(Error::Client)?;
    Ok(builder.with_layer(&WatchGuardLayer { cuts }).build())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kubeconfig(user: &str) -> Kubeconfig {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://example.invalid\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\nusers:\n- name: u\n  user:\n{user}"
        );
        Kubeconfig::from_yaml(&text).expect("valid kubeconfig")
    }

    #[test]
    fn exec_and_auth_provider_users_are_refused_unless_allowed() {
        let eks = kubeconfig(
            "    exec:\n      apiVersion: client.authentication.k8s.io/v1beta1\n      command: aws\n      args: [eks, get-token, --cluster-name, prod]\n",
        );
        let e = check_kubeconfig(&eks, false, true).unwrap_err().to_string();
        assert!(e.contains("user \"u\" authenticates with exec"), "{e}");
        assert!(e.contains("allowExecAuth"), "{e}");
        assert!(check_kubeconfig(&eks, true, true).is_ok());
        let gcp = kubeconfig("    auth-provider:\n      name: gcp\n");
        assert!(check_kubeconfig(&gcp, false, true).unwrap_err().to_string().contains("auth-provider"));
        let token = kubeconfig("    token: abc\n");
        assert!(check_kubeconfig(&token, false, false).is_ok());
    }

    #[test]
    fn remote_secret_kubeconfigs_may_not_name_local_files() {
        let file = kubeconfig("    tokenFile: /var/run/secrets/token\n");
        let e = check_kubeconfig(&file, false, false).unwrap_err().to_string();
        assert!(e.contains("tokenFile"), "{e}");
        assert!(check_kubeconfig(&file, false, true).is_ok());
    }
}
