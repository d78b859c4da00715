//! The built-in two-clouds demo, compiled into the binary (see examples/two-clouds).

use std::path::{Path, PathBuf};

include!(concat!(env!("OUT_DIR"), "/demo_files.rs"));

/// The demo's mesh config: the repository's copy when meshfed runs from a checkout, else the
/// compiled-in copy written under `dir` (so it can still be edited live).
pub fn mesh_config_path(dir: &Path) -> std::io::Result<PathBuf> {
    let in_repo = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/two-clouds/mesh.yaml"));
    if in_repo.exists() {
        return Ok(in_repo);
    }
    write_to(dir)?;
    Ok(dir.join("mesh.yaml"))
}

/// Writes the demo's files under `dir`.
pub fn write_to(dir: &Path) -> std::io::Result<()> {
    for (path, text) in DEMO_FILES {
        let p = dir.join(path);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&p, text)?;
    }
    Ok(())
}
