//! Embeds the built-in demo (examples/two-clouds) so that `meshfed serve` works without a checkout.

use std::path::Path;

fn collect(dir: &Path, base: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            collect(&p, base, out);
        } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            let rel = p.strip_prefix(base).expect("under base").to_string_lossy().replace('\\', "/");
            out.push(format!(
                "({rel:?}, include_str!({:?})),",
                p.canonicalize().expect("exists").display().to_string()
            ));
        }
    }
}

fn main() {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/two-clouds");
    println!("cargo:rerun-if-changed={}", base.display());
    let mut entries = Vec::new();
    collect(&base, &base, &mut entries);
    let code = format!(
        "/// The built-in demo's files (path relative to the demo directory, content).\npub const DEMO_FILES: &[(&str, &str)] = &[\n{}\n];\n",
        entries.join("\n")
    );
    let out = Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR")).join("demo_files.rs");
    std::fs::write(out, code).expect("write demo_files.rs");
}
