//! The fuzz targets of `fuzz/` (meshfed_testkit::fuzz) on stable Rust, as CI runs them: each target gets its seed
//! inputs and a bounded number of deterministic mutations of them (bit flips, insertions of YAML/JSON
//! tokens, truncations, splices), from a fixed PRNG seed, so every run checks the same inputs.
//!
//! This is not coverage-guided; the real fuzzing is `scripts/fuzz.sh` (libFuzzer), see SECURITY.md.
//! `MESHFED_FUZZ_ITERS` sets the mutations per target (default 1500; the xDS targets run a fifth as
//! many, each being a whole stream), `MESHFED_FUZZ_SEED` the PRNG seed. A failing input is written to
//! `target/fuzz-smoke-failures/TARGET-N` (replay it with `cargo run --release --manifest-path
//! fuzz/Cargo.toml --bin TARGET -- FILE` or through [`meshfed_testkit::fuzz::run_target`]).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;

use meshfed_testkit::fuzz::{XdsHarness, run_target, seeds};

/// splitmix64: small, deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.next() % n as u64) as usize }
    }
}

/// Tokens that mean something to YAML, JSON, protobuf or meshfed's own formats.
const TOKENS: &[&[u8]] = &[
    b": ",
    b"\n- ",
    b"\n  ",
    b"---\n",
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b"'",
    b"~",
    b"*",
    b"&a ",
    b"*a",
    b"!!binary ",
    b"<<: *a\n",
    b"null",
    b"true",
    b"-1",
    b"0",
    b"65536",
    b"4294967296",
    b"1e309",
    b"NaN",
    b".inf",
    b"0x10",
    b"10s",
    b"-5s",
    b"999999999h",
    b"kind: List\nitems:\n",
    b"\xff\xfe",
    b"\0",
    b"\xe2\x80\xae",
    b"sidecar~",
    b"spiffe://",
    b"/ns/",
    b"outbound|9080||",
    b"\x0a\x80\x80\x80\x80\x10",
];

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut data = if seeds.is_empty() { Vec::new() } else { seeds[rng.below(seeds.len())].clone() };
    for _ in 0..1 + rng.below(4) {
        let len = data.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = rng.next() as u8;
            }
            2 => {
                let t = TOKENS[rng.below(TOKENS.len())];
                let i = rng.below(len + 1);
                data.splice(i..i, t.iter().copied());
            }
            3 if len > 0 => {
                let cut = rng.below(len);
                data.truncate(cut);
            }
            4 if len > 0 => {
                let i = rng.below(len);
                let n = rng.below((len - i).min(64) + 1);
                data.drain(i..i + n);
            }
            5 if len > 0 => {
                // duplicate a chunk (deeper nesting, repeated keys)
                let i = rng.below(len);
                let n = rng.below((len - i).min(256) + 1);
                let chunk: Vec<u8> = data[i..i + n].to_vec();
                data.splice(i..i, chunk);
            }
            6 if !seeds.is_empty() => {
                // splice in part of another seed
                let other = &seeds[rng.below(seeds.len())];
                if !other.is_empty() {
                    let i = rng.below(other.len());
                    let n = rng.below(other.len() - i + 1);
                    let at = rng.below(len + 1);
                    data.splice(at..at, other[i..i + n].iter().copied());
                }
            }
            _ => {
                let n = rng.below(32);
                let at = rng.below(len + 1);
                let random: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                data.splice(at..at, random);
            }
        }
    }
    data.truncate(64 * 1024);
    data
}

fn iterations(target: &str) -> usize {
    let base = std::env::var("MESHFED_FUZZ_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(1500usize);
    if target.starts_with("xds_") || target == "grpc_connection" { (base / 5).max(1) } else { base }
}

fn failure_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-smoke-failures")
}

fn smoke(target: &str) {
    let seed =
        std::env::var("MESHFED_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x006d_6573_6866_6564_u64);
    let mut rng = Rng(seed ^ target.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b))));
    let seeds = seeds(target);
    assert!(!seeds.is_empty(), "{target}: no seeds");
    let harness = XdsHarness::new();
    let inputs = seeds.iter().cloned().chain((0..iterations(target)).map(|_| mutate(&mut rng, &seeds)));
    // quiet panics: a failure is reported once, with its input
    for (n, data) in inputs.enumerate() {
        let outcome = catch_unwind(AssertUnwindSafe(|| run_target(target, &data, &harness)));
        match outcome {
            Ok(Some(())) => {}
            Ok(None) => panic!("no fuzz target {target}"),
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                let dir = failure_dir();
                let _ = std::fs::create_dir_all(&dir);
                let file = dir.join(format!("{target}-{n}"));
                let _ = std::fs::write(&file, &data);
                panic!(
                    "fuzz target {target} failed on input {n} ({} bytes, saved to {}): {msg}\ninput (lossy): {:?}",
                    data.len(),
                    file.display(),
                    String::from_utf8_lossy(&data[..data.len().min(2048)])
                );
            }
        }
    }
    if target.starts_with("xds_") {
        // the harness really drives the protocol: streams get responses, and some are refused
        let responses = harness.responses.load(std::sync::atomic::Ordering::Relaxed);
        let refused = harness.refused.load(std::sync::atomic::Ordering::Relaxed);
        eprintln!("{target}: {responses} responses checked, {refused} streams refused");
        assert!(responses > 0 && refused > 0, "{target}: {responses} responses, {refused} refusals");
    }
}

#[test]
fn node() {
    smoke("node");
}

#[test]
fn mesh_config() {
    smoke("mesh_config");
}

#[test]
fn topology() {
    smoke("topology");
}

#[test]
fn destination_rule() {
    smoke("destination_rule");
}

#[test]
fn kube_object() {
    smoke("kube_object");
}

#[test]
fn xds_sotw() {
    smoke("xds_sotw");
}

#[test]
fn xds_delta() {
    smoke("xds_delta");
}

#[test]
fn grpc_connection() {
    smoke("grpc_connection");
}

#[test]
fn every_target_is_run_here() {
    for t in meshfed_testkit::fuzz::TARGETS {
        assert!(
            [
                "node",
                "mesh_config",
                "topology",
                "destination_rule",
                "kube_object",
                "xds_sotw",
                "xds_delta",
                "grpc_connection"
            ]
            .contains(t),
            "fuzz target {t} has no smoke test"
        );
    }
}

/// With `MESHFED_FUZZ_SEEDS_DIR=DIR`: writes every target's seeds into DIR/TARGET/ (scripts/fuzz.sh starts
/// libFuzzer's corpora from them). Otherwise does nothing.
#[test]
fn write_seeds_if_asked() {
    let Some(dir) = std::env::var_os("MESHFED_FUZZ_SEEDS_DIR") else { return };
    for target in meshfed_testkit::fuzz::TARGETS {
        let d = PathBuf::from(&dir).join(target);
        std::fs::create_dir_all(&d).expect("create the corpus directory");
        for (i, seed) in seeds(target).iter().enumerate() {
            std::fs::write(d.join(format!("seed-{i}")), seed).expect("write a seed");
        }
    }
}
