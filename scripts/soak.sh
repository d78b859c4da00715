#!/usr/bin/env bash
# Soak: tests/soak.rs for a long run (default 10 minutes; CI runs the same test for 60 s).
#
#   bash scripts/soak.sh [SECONDS]
#
# Endpoint churn plus ADS clients connecting and reconnecting against the meshfed binary (release build);
# at the end meshfed's connections, file descriptors and resident memory must be back at their baseline
# (memory within 10 %), with no client error and no NACK. Progress and the figures go to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
export MESHFED_SOAK_SECS="${1:-${MESHFED_SOAK_SECS:-600}}"
cargo test --release --test soak -- --nocapture
