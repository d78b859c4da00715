//! `meshfed traffic drain | undrain` (file mode): edits `traffic.drains` of a mesh config file.
//!
//! The edited file is validated with the parser `meshfed serve` uses ([`MeshConfig::parse`]) before it
//! is written; a bad edit is refused with that error and the file is left as it was. The file is written
//! atomically (a temporary file in the same directory, renamed over it), so a running meshfed never
//! reads half of it.
//!
//! Only the top-level `traffic:` block is rewritten: the rest of the file (comments included) stays as
//! it was. Comments inside the `traffic:` block are not kept; when the block cannot be told apart from
//! the rest textually, the whole file is rewritten (without comments) and [`Edited::rewritten`] says so.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde_yaml::{Mapping, Value};

use crate::mesh_config::MeshConfig;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a mesh config: {reason}")]
    Yaml { path: PathBuf, reason: String },
    #[error("the edit is refused (the file is unchanged): {0}")]
    Invalid(crate::mesh_config::Error),
    #[error("there is no drain of {0} in the mesh config")]
    NoDrain(String),
    #[error("--expires {value:?}: {reason}")]
    Expires { value: String, reason: String },
}

/// What a drain applies to, as the file names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Cluster(String),
    Region(String),
}

impl Target {
    fn key(&self) -> (&'static str, &str) {
        match self {
            Target::Cluster(c) => ("cluster", c),
            Target::Region(r) => ("region", r),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (k, v) = self.key();
        write!(f, "{k} {v}")
    }
}

/// A drain to set (`meshfed traffic drain`).
#[derive(Clone, Debug)]
pub struct DrainSpec {
    pub target: Target,
    /// percent of the target's normal share (the parser checks 0..100)
    pub capacity: i64,
    /// (step, every): a ramp down to `capacity`
    pub ramp: Option<(i64, String)>,
    /// RFC 3339 (see [`expiry`])
    pub expires: String,
    pub reason: Option<String>,
}

/// `--expires`: an RFC 3339 time, or a duration from `now` (`2h`, `30m`, `7d`), as RFC 3339. A time not
/// after `now` is refused.
pub fn expiry(value: &str, now: SystemTime) -> Result<String, Error> {
    let bad = |reason: String| Error::Expires { value: value.into(), reason };
    let at = if let Ok(t) = value.parse::<jiff::Timestamp>() {
        SystemTime::from(t)
    } else {
        let d = crate::traffic::policy::parse_long_duration(value)
            .ok_or_else(|| bad("neither an RFC 3339 time nor a duration such as 2h or 7d".into()))?;
        now.checked_add(d).ok_or_else(|| bad("too far ahead".into()))?
    };
    if at <= now {
        return Err(bad("not in the future".into()));
    }
    Ok(crate::traffic::decide::time_str(at))
}

/// The result of an edit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Edited {
    pub text: String,
    /// the whole file was re-serialized (its comments are lost), not only the `traffic:` block
    pub rewritten: bool,
}

/// Sets the drain of `spec.target` (replacing the target's drain, if it has one) in the mesh config
/// `text`; `base`: the file's directory.
pub fn drain(text: &str, base: &Path, spec: &DrainSpec) -> Result<Edited, Error> {
    set_drain_in(text, base, spec, |_| {})
}

/// Sets a drill (`meshfed traffic drill`): the drain of `spec` with an explicit `start` (RFC 3339: a
/// restarted meshfed resumes the ramp where it was) and `drill: {abortBelowHealthy: N}` (replacing the
/// target's drain, if it has one).
pub fn drill(
    text: &str,
    base: &Path,
    spec: &DrainSpec,
    start: &str,
    abort_below_healthy: i64,
) -> Result<Edited, Error> {
    set_drain_in(text, base, spec, drill_fields(start, abort_below_healthy))
}

/// The fields that make a drain a drill: an explicit `start` and `drill: {abortBelowHealthy: N}`.
pub fn drill_fields(start: &str, abort_below_healthy: i64) -> impl FnOnce(&mut Mapping) + '_ {
    move |d| {
        d.insert("start".into(), start.into());
        let mut drill = Mapping::new();
        drill.insert("abortBelowHealthy".into(), abort_below_healthy.into());
        d.insert("drill".into(), drill.into());
    }
}

/// Removes the drill of `target` (a drain with `drill:`) from the mesh config `text`: a manual abort.
pub fn abort_drill(text: &str, base: &Path, target: &Target) -> Result<Edited, Error> {
    edit(text, base, |drains| remove_drill(drains, target))
}

/// Removes the drill of `target` (a drain with `drill:`) from a `drains` list; a plain drain of the same
/// target stays.
pub fn remove_drill(drains: &mut Vec<Value>, target: &Target) -> Result<(), Error> {
    let before = drains.len();
    drains.retain(|v| !(is_drain_of(v, target) && v.get("drill").is_some()));
    if drains.len() == before {
        return Err(Error::NoDrain(format!("{target} (a drill)")));
    }
    Ok(())
}

/// Sets the drain of `spec` in the mesh config `text`, `more` adding fields to it.
fn set_drain_in(text: &str, base: &Path, spec: &DrainSpec, more: impl FnOnce(&mut Mapping)) -> Result<Edited, Error> {
    edit(text, base, |drains| {
        set_drain_with(drains, spec, more);
        Ok(())
    })
}

/// Removes the drains of `target` from the mesh config `text`.
pub fn undrain(text: &str, base: &Path, target: &Target) -> Result<Edited, Error> {
    edit(text, base, |drains| remove_drain(drains, target))
}

/// Sets the drain of `spec.target` in a `drains` list (replacing the target's drain, if it has one).
pub fn set_drain(drains: &mut Vec<Value>, spec: &DrainSpec) {
    set_drain_with(drains, spec, |_| {})
}

/// [`set_drain`], `more` adding fields to the drain (a drill's `start` and `drill:`).
pub fn set_drain_with(drains: &mut Vec<Value>, spec: &DrainSpec, more: impl FnOnce(&mut Mapping)) {
    let (key, name) = spec.target.key();
    let mut d = Mapping::new();
    d.insert(key.into(), name.into());
    d.insert("capacity".into(), spec.capacity.into());
    if let Some((step, every)) = &spec.ramp {
        let mut r = Mapping::new();
        r.insert("step".into(), (*step).into());
        r.insert("every".into(), every.as_str().into());
        d.insert("ramp".into(), r.into());
    }
    d.insert("expires".into(), spec.expires.as_str().into());
    if let Some(reason) = &spec.reason {
        d.insert("reason".into(), reason.as_str().into());
    }
    more(&mut d);
    match drains.iter().position(|v| is_drain_of(v, &spec.target)) {
        Some(i) => drains[i] = d.into(),
        None => drains.push(d.into()),
    }
}

/// Removes the drains of `target` from a `drains` list ([`Error::NoDrain`] if it has none).
pub fn remove_drain(drains: &mut Vec<Value>, target: &Target) -> Result<(), Error> {
    let before = drains.len();
    drains.retain(|v| !is_drain_of(v, target));
    if drains.len() == before {
        return Err(Error::NoDrain(target.to_string()));
    }
    Ok(())
}

fn is_drain_of(v: &Value, target: &Target) -> bool {
    let (key, name) = target.key();
    v.get(key).and_then(Value::as_str) == Some(name)
}

fn yaml_err(reason: impl std::fmt::Display) -> Error {
    Error::Yaml { path: PathBuf::from("<mesh config>"), reason: reason.to_string() }
}

/// Applies `f` to the `traffic.drains` of the mesh config `text` (`base`: the file's directory): the
/// edited text, checked with meshfed's parser.
pub fn edit(text: &str, base: &Path, f: impl FnOnce(&mut Vec<Value>) -> Result<(), Error>) -> Result<Edited, Error> {
    let mut doc: Value = serde_yaml::from_str(text).map_err(yaml_err)?;
    let top = doc.as_mapping_mut().ok_or_else(|| yaml_err("the document is not a mapping"))?;
    let traffic = top.entry("traffic".into()).or_insert_with(|| Mapping::new().into());
    edit_drains(traffic, "traffic", f)?;
    let new_traffic = top.get("traffic").cloned().unwrap_or_default();
    let mut block = Mapping::new();
    block.insert("traffic".into(), new_traffic);
    let block = serde_yaml::to_string(&block).map_err(yaml_err)?;
    // the traffic block spliced into the text, if that reads back as the intended document
    let out = match splice(text, &block) {
        Some(spliced) if serde_yaml::from_str::<Value>(&spliced).ok().as_ref() == Some(&doc) => {
            Edited { text: spliced, rewritten: false }
        }
        _ => Edited { text: serde_yaml::to_string(&doc).map_err(yaml_err)?, rewritten: true },
    };
    MeshConfig::parse(&out.text, base).map_err(Error::Invalid)?;
    Ok(out)
}

/// Applies `f` to the `drains` list of a `traffic:` section (`traffic`, named `what` in errors; null: an
/// empty section); a list left empty is removed.
pub fn edit_drains(
    traffic: &mut Value,
    what: &str,
    f: impl FnOnce(&mut Vec<Value>) -> Result<(), Error>,
) -> Result<(), Error> {
    if traffic.is_null() {
        *traffic = Mapping::new().into();
    }
    let traffic = traffic.as_mapping_mut().ok_or_else(|| yaml_err(format!("`{what}` is not a mapping")))?;
    let drains = traffic.entry("drains".into()).or_insert_with(|| Value::Sequence(Vec::new()));
    if drains.is_null() {
        *drains = Value::Sequence(Vec::new());
    }
    let drains = drains.as_sequence_mut().ok_or_else(|| yaml_err(format!("`{what}.drains` is not a list")))?;
    f(drains)?;
    if drains.is_empty() {
        traffic.remove("drains");
    }
    Ok(())
}

/// `text` with its top-level `traffic:` block (the `traffic:` line and the indented lines after it)
/// replaced by `block`, or `block` appended if there is none. None: more than one `traffic:` line.
fn splice(text: &str, block: &str) -> Option<String> {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let starts: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].starts_with("traffic:") || lines[i].starts_with("\"traffic\":"))
        .collect();
    let mut out = String::with_capacity(text.len() + block.len());
    match starts[..] {
        [] => {
            out.push_str(text);
            if !text.is_empty() && !text.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(block);
        }
        [start] => {
            let mut end = start + 1;
            // indented lines (and blank lines between them) belong to the block
            let mut last = start + 1;
            while end < lines.len() {
                let l = lines[end];
                if l.trim().is_empty() {
                    end += 1;
                    continue;
                }
                if l.starts_with(' ') || l.starts_with('\t') {
                    end += 1;
                    last = end;
                    continue;
                }
                break;
            }
            for l in &lines[..start] {
                out.push_str(l);
            }
            out.push_str(block);
            for l in &lines[last..] {
                out.push_str(l);
            }
        }
        _ => return None,
    }
    Some(out)
}

/// Edits the mesh config file at `path` with `f` (given its text and directory) and writes the result
/// atomically. A symbolic link is followed: its target is replaced. Nothing is written when `f` fails.
pub fn edit_file(path: &Path, f: impl FnOnce(&str, &Path) -> Result<Edited, Error>) -> Result<Edited, Error> {
    let target = std::fs::canonicalize(path).map_err(|source| Error::Read { path: path.into(), source })?;
    let text = std::fs::read_to_string(&target).map_err(|source| Error::Read { path: path.into(), source })?;
    let dir = target.parent().unwrap_or(Path::new("."));
    let with_path = |e: Error| match e {
        Error::Yaml { reason, .. } => Error::Yaml { path: path.into(), reason },
        other => other,
    };
    let base = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let edited = f(&text, base).map_err(with_path)?;
    let werr = |source| Error::Write { path: path.into(), source };
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.meshfed-edit-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        file.write_all(edited.text.as_bytes())?;
        if let Ok(meta) = std::fs::metadata(&target) {
            file.set_permissions(meta.permissions())?;
        }
        file.sync_all()?;
        std::fs::rename(&tmp, &target)
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(werr(e));
    }
    Ok(edited)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESH: &str = "# the mesh\nclusters:\n  - {id: aws, network: n1, manifests: aws}   # AWS\n  - {id: azure, network: n2, manifests: azure}\n\ntraffic:\n  # the split\n  policies: [{split: {r1: {aws: 70, azure: 30}}}]\n\n# after traffic\ndebounce: {quiet: 200ms}\n";

    fn now() -> SystemTime {
        SystemTime::now()
    }

    fn spec(capacity: i64) -> DrainSpec {
        DrainSpec {
            target: Target::Cluster("azure".into()),
            capacity,
            ramp: Some((25, "30s".into())),
            expires: expiry("2h", now()).unwrap(),
            reason: Some("DR drill".into()),
        }
    }

    fn load(text: &str) -> MeshConfig {
        MeshConfig::parse(text, Path::new("/m")).unwrap()
    }

    #[test]
    fn a_drill_is_a_drain_with_a_start_and_a_threshold_and_its_abort_removes_only_it() {
        let start = "2026-12-05T00:00:00Z";
        let e = drill(MESH, Path::new("/m"), &spec(0), start, 50).unwrap();
        assert!(!e.rewritten, "{}", e.text);
        let cfg = load(&e.text);
        let d = &cfg.traffic.drains[0];
        assert_eq!(d.drill.as_ref().map(|x| x.abort_below_healthy), Some(50));
        assert_eq!(d.start.map(crate::traffic::decide::time_str).as_deref(), Some(start));
        // a threshold out of range is refused with the parser's field
        match drill(MESH, Path::new("/m"), &spec(0), start, 150) {
            Err(Error::Invalid(e)) => assert!(e.to_string().contains("drill.abortBelowHealthy"), "{e}"),
            other => panic!("{other:?}"),
        }
        // the abort removes the drill, not a plain drain of the same target
        let back = abort_drill(&e.text, Path::new("/m"), &Target::Cluster("azure".into())).unwrap();
        assert_eq!(load(&back.text), load(MESH));
        let plain = drain(MESH, Path::new("/m"), &spec(0)).unwrap();
        assert!(matches!(
            abort_drill(&plain.text, Path::new("/m"), &Target::Cluster("azure".into())),
            Err(Error::NoDrain(_))
        ));
    }

    #[test]
    fn drain_and_undrain_edit_only_the_traffic_block() {
        let e = drain(MESH, Path::new("/m"), &spec(0)).unwrap();
        assert!(!e.rewritten, "{}", e.text);
        // comments outside the traffic block stay; the rest of the file is the same
        assert!(e.text.starts_with("# the mesh\nclusters:\n  - {id: aws, network: n1, manifests: aws}   # AWS\n"));
        assert!(e.text.ends_with("\n# after traffic\ndebounce: {quiet: 200ms}\n"), "{}", e.text);
        let cfg = load(&e.text);
        assert_eq!(cfg.traffic.drains.len(), 1);
        let d = &cfg.traffic.drains[0];
        assert_eq!(d.target, crate::traffic::policy::DrainTarget::Cluster(crate::model::ClusterId::new("azure")));
        assert_eq!((d.capacity, d.ramp.map(|r| r.step), d.reason.as_str()), (0, Some(25), "DR drill"));
        assert_eq!(cfg.traffic.policies, load(MESH).traffic.policies);
        // draining again replaces the drain
        let again = drain(&e.text, Path::new("/m"), &spec(40)).unwrap();
        let cfg = load(&again.text);
        assert_eq!(cfg.traffic.drains.len(), 1);
        assert_eq!(cfg.traffic.drains[0].capacity, 40);
        // undrain: back to the original policy
        let back = undrain(&again.text, Path::new("/m"), &Target::Cluster("azure".into())).unwrap();
        assert_eq!(load(&back.text), load(MESH));
        assert!(matches!(
            undrain(&back.text, Path::new("/m"), &Target::Cluster("azure".into())),
            Err(Error::NoDrain(_))
        ));
        // a file without a traffic block gets one at its end
        let plain = "clusters:\n  - {id: azure, network: n2, manifests: azure}";
        let e = drain(plain, Path::new("/m"), &spec(0)).unwrap();
        assert!(e.text.starts_with(plain) && !e.rewritten);
        assert_eq!(load(&e.text).traffic.drains.len(), 1);
    }

    #[test]
    fn bad_edits_are_refused_with_the_parsers_error() {
        for (s, words) in [
            (DrainSpec { target: Target::Cluster("gcp".into()), ..spec(0) }, "traffic.drains[0].cluster"),
            (spec(-5), "traffic.drains[0].capacity"),
            (DrainSpec { ramp: Some((0, "1s".into())), ..spec(0) }, "traffic.drains[0].ramp.step"),
            (DrainSpec { expires: expiry("30d", now()).unwrap(), ..spec(0) }, "maxDrainDuration"),
        ] {
            let e = drain(MESH, Path::new("/m"), &s).unwrap_err();
            assert!(matches!(e, Error::Invalid(_)) && e.to_string().contains(words), "{e}");
        }
        assert!(expiry("yesterday", now()).is_err());
        assert!(expiry("2020-01-01T00:00:00Z", now()).unwrap_err().to_string().contains("not in the future"));
        assert!(expiry("2999-01-01T00:00:00Z", now()).is_ok());
    }

    #[test]
    fn the_file_is_replaced_atomically_or_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, MESH).unwrap();
        let e = edit_file(&path, |t, b| drain(t, b, &spec(0))).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), e.text);
        let before = e.text;
        let err = edit_file(&path, |t, b| drain(t, b, &spec(101))).unwrap_err();
        assert!(err.to_string().contains("traffic.drains[0].capacity"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), before);
        // no temporary file left behind
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("mesh.yaml")]);
    }
}
