//! EndpointSlice manifests of a copied demo, edited the way tests change endpoints: [`SliceDocs`] holds a
//! file's YAML documents and finds a service's slice or an endpoint by address; [`SlicesFile`] keeps a
//! file's original text and writes every edit atomically (see [`write_atomically`]), so the file source
//! never reads a partial file.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, anyhow, ensure};
use serde_yaml::{Mapping, Value};

use crate::process::write_atomically;

/// The YAML documents of a manifests file (EndpointSlices, as `kubectl get -o yaml` lists them one a
/// document).
#[derive(Clone, Debug, PartialEq)]
pub struct SliceDocs(pub Vec<Value>);

impl SliceDocs {
    /// Parses every document of `text`.
    pub fn parse(text: &str) -> Result<SliceDocs> {
        let mut docs = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(text) {
            docs.push(<Value as serde::Deserialize>::deserialize(doc)?);
        }
        Ok(SliceDocs(docs))
    }

    /// The documents as one YAML text (separated by `---`).
    pub fn to_yaml(&self) -> Result<String> {
        Ok(self.0.iter().map(serde_yaml::to_string).collect::<Result<Vec<_>, _>>()?.join("---\n"))
    }

    /// The (first) EndpointSlice of `service` (label `kubernetes.io/service-name`).
    pub fn slice_mut(&mut self, service: &str) -> Result<&mut Value> {
        self.0
            .iter_mut()
            .find(|d| d["metadata"]["labels"]["kubernetes.io/service-name"].as_str() == Some(service))
            .ok_or_else(|| anyhow!("no {service} EndpointSlice"))
    }

    /// The endpoints of `service`'s slice.
    pub fn endpoints_mut(&mut self, service: &str) -> Result<&mut Vec<Value>> {
        self.slice_mut(service)?["endpoints"].as_sequence_mut().ok_or_else(|| anyhow!("{service} slice: no endpoints"))
    }

    /// The endpoint whose first address is `ip`, in whichever slice.
    pub fn endpoint_at_mut(&mut self, ip: IpAddr) -> Result<&mut Value> {
        let ip_text = ip.to_string();
        self.0
            .iter_mut()
            .filter_map(|d| d["endpoints"].as_sequence_mut())
            .flatten()
            .find(|ep| ep["addresses"][0].as_str() == Some(&ip_text))
            .ok_or_else(|| anyhow!("no endpoint {ip}"))
    }

    /// Sets the readiness ([`set_ready`]) of the endpoints of `service` whose address `pick` selects;
    /// returns how many there were.
    pub fn set_ready_where(&mut self, service: &str, ready: bool, pick: impl Fn(IpAddr) -> bool) -> Result<usize> {
        let mut marked = 0;
        for ep in self.endpoints_mut(service)?.iter_mut() {
            let ip: IpAddr = ep["addresses"][0]
                .as_str()
                .ok_or_else(|| anyhow!("endpoint without address"))?
                .parse()
                .context("endpoint address")?;
            if pick(ip) {
                set_ready(ep, ready);
                marked += 1;
            }
        }
        Ok(marked)
    }

    /// Adds a ready endpoint `ip` on node `node_name` in `zone` to `service`'s slice.
    pub fn add_endpoint(&mut self, service: &str, ip: IpAddr, node_name: &str, zone: &str) -> Result<()> {
        let mut ep = Mapping::new();
        ep.insert("addresses".into(), Value::Sequence(vec![ip.to_string().into()]));
        ep.insert("conditions".into(), conditions(true));
        ep.insert("nodeName".into(), node_name.into());
        ep.insert("zone".into(), zone.into());
        self.endpoints_mut(service)?.push(Value::Mapping(ep));
        Ok(())
    }
}

/// An endpoint's `conditions`: `ready` and `serving` as given, not terminating.
pub fn conditions(ready: bool) -> Value {
    let mut c = Mapping::new();
    c.insert("ready".into(), ready.into());
    c.insert("serving".into(), ready.into());
    c.insert("terminating".into(), false.into());
    Value::Mapping(c)
}

/// Sets an endpoint's `ready` and `serving` conditions (a pod becoming ready, or no longer).
pub fn set_ready(endpoint: &mut Value, ready: bool) {
    endpoint["conditions"]["ready"] = ready.into();
    endpoint["conditions"]["serving"] = ready.into();
}

/// A manifests file of a copied demo and its original text.
#[derive(Clone, Debug)]
pub struct SlicesFile {
    pub path: PathBuf,
    pub original: String,
}

impl SlicesFile {
    /// The file at `path`, as it is now.
    pub fn open(path: &Path) -> Result<SlicesFile> {
        let original = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Ok(SlicesFile { path: path.to_path_buf(), original })
    }

    /// `<dir>/<cluster>/endpointslices.yaml` of a demo copied to `dir` (see [`crate::demo::copy_demo`]).
    pub fn of_cluster(dir: &Path, cluster: &str) -> Result<SlicesFile> {
        SlicesFile::open(&dir.join(cluster).join("endpointslices.yaml"))
    }

    /// Writes the original after `edit` (atomically).
    pub fn rewrite(&self, edit: impl FnOnce(&mut SliceDocs) -> Result<()>) -> Result<()> {
        self.edit_text(&self.original, edit)
    }

    /// Writes the file as it is now after `edit` (atomically).
    pub fn edit(&self, edit: impl FnOnce(&mut SliceDocs) -> Result<()>) -> Result<()> {
        let now = std::fs::read_to_string(&self.path).with_context(|| format!("reading {}", self.path.display()))?;
        self.edit_text(&now, edit)
    }

    fn edit_text(&self, text: &str, edit: impl FnOnce(&mut SliceDocs) -> Result<()>) -> Result<()> {
        let mut docs = SliceDocs::parse(text).with_context(|| format!("parsing {}", self.path.display()))?;
        edit(&mut docs).with_context(|| format!("editing {}", self.path.display()))?;
        ensure!(!docs.0.is_empty(), "{}: no documents left", self.path.display());
        self.write(&docs.to_yaml()?)
    }

    /// Writes `text` (atomically), whatever it is (e.g. half a file).
    pub fn write(&self, text: &str) -> Result<()> {
        write_atomically(&self.path, text)
    }

    /// Writes the original back (atomically).
    pub fn restore(&self) -> Result<()> {
        self.write(&self.original)
    }
}
