#!/usr/bin/env bash
# Coverage-guided fuzzing of meshfed with libFuzzer, on stable Rust (no cargo-fuzz, no nightly needed).
#
#   bash scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# Builds fuzz/ (libfuzzer-sys; release, or $MESHFED_FUZZ_PROFILE) with SanitizerCoverage instrumentation (the stable codegen
# options cargo-fuzz passes, minus -Zsanitizer=address, which needs nightly; meshfed has no unsafe code),
# seeds each corpus from meshfed_testkit::fuzz::seeds, then runs every target for SECONDS_PER_TARGET (default:
# $MESHFED_FUZZ_SECS, else 60). Corpora grow in fuzz/corpus/TARGET, crashes land in
# fuzz/artifacts/TARGET/. Exits non-zero on the first target that finds a crash.
# With a nightly toolchain and cargo-fuzz, `cd fuzz && cargo fuzz run TARGET` works on the same crate.
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-${MESHFED_FUZZ_SECS:-60}}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(node mesh_config topology destination_rule kube_object xds_sotw xds_delta grpc_connection)
fi

export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
# an explicit --target keeps the instrumentation off build scripts and proc macros (as cargo-fuzz does);
# MESHFED_FUZZ_PROFILE=ci builds unoptimised, for short runs (CI)
host="$(rustc -vV | sed -n 's/^host: //p')"
profile="${MESHFED_FUZZ_PROFILE:-release}"
cargo build --locked --profile "$profile" --manifest-path fuzz/Cargo.toml --bins --target "$host"
unset RUSTFLAGS
# cargo honours $CARGO_TARGET_DIR (relative to this directory) over fuzz/target
bin_dir="${CARGO_TARGET_DIR:-fuzz/target}/$host/$profile"
[ "$profile" = dev ] && bin_dir="${CARGO_TARGET_DIR:-fuzz/target}/$host/debug"

# seeds (idempotent: libFuzzer keeps whatever the corpus already holds)
MESHFED_FUZZ_SEEDS_DIR="$PWD/fuzz/corpus" cargo test -q --test fuzz_smoke write_seeds_if_asked >/dev/null

for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  echo "== fuzzing $t for ${secs}s"
  # -rss_limit_mb: the xDS targets run meshfed's push loop; -timeout: one input (a whole stream) per 10 s
  "$bin_dir/$t" "fuzz/corpus/$t" \
    -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -max_len=65536 \
    -artifact_prefix="fuzz/artifacts/$t/" -print_final_stats=1 >"fuzz/artifacts/$t/last-run.log" 2>&1 || {
    tail -n 60 "fuzz/artifacts/$t/last-run.log"
    echo "error: fuzz target $t failed; the input is in fuzz/artifacts/$t/" >&2
    exit 1
  }
  grep -E '^(Done|stat::new_units_added|stat::average_exec_per_sec)' "fuzz/artifacts/$t/last-run.log" | tr '\n' ' '
  echo
done
