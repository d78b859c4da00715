#!/usr/bin/env bash
# Runs meshfed's benchmarks (rows a1..f2 of BENCHMARKS.md) with meshfed-load, each bounded in time.
#
#   bash scripts/bench.sh            every scenario, release build (~40 min on 2 cores); results in
#                                    target/bench/results.jsonl, logs in target/bench/*.log
#   bash scripts/bench.sh --smoke    tiny sizes, debug build, < ~60 s: proves the harness works and every
#                                    step produces its numbers; asserts nothing about time (CI runs this)
#   bash scripts/bench.sh --only b1  one scenario of the full run (ids as in the table below; `soak`: the
#                                    10-minute soak); a row name runs every scenario of the row (`--only f1`:
#                                    f1, its Delta, floor and ADS runs); a comma-separated list runs several
#   bash scripts/bench.sh --skip soak,envoy   the full run without these scenarios
#
# All traffic stays on loopback. The load client shares the 2 cores with the server: the results report
# the server's CPU and memory (from /proc of the server process) and the client's CPU separately.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=full
only=""
skip=","
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) mode=smoke ;;
    --only) only=",$2,"; shift ;;
    --skip) skip=",$2,"; shift ;;
    *) echo "usage: $0 [--smoke] [--only ID] [--skip ID,ID...]" >&2; exit 2 ;;
  esac
  shift
done

out=target/bench
[ "$mode" = smoke ] && out=target/bench-smoke
mkdir -p "$out"
results="$out/results.jsonl"
: > "$results"

# MESHFED_BENCH_NO_BUILD=1: use the binaries already built (e.g. while others edit the sources)
tdir="${CARGO_TARGET_DIR:-target}"
if [ "$mode" = smoke ]; then
  [ -n "${MESHFED_BENCH_NO_BUILD:-}" ] || cargo build -q --workspace --bins
  bin="$tdir/debug/meshfed-load"
else
  [ -n "${MESHFED_BENCH_NO_BUILD:-}" ] || cargo build -q --release --workspace --bins
  bin="$tdir/release/meshfed-load"
fi
# 10,000 streams need 10,000 descriptors in each process
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# run ID TIMEOUT_S ARGS...: one meshfed-load bench invocation; its RESULT lines go to $results.
# `--only` selects it by its id, or by the row it belongs to ($row, set before a row's scenarios).
row=""
run() {
  local id="$1" limit="$2"; shift 2
  if [ -n "$only" ]; then
    case "$only" in *",$id,"*) ;; *) [ -n "$row" ] && [[ "$only" == *",$row,"* ]] || return 0 ;; esac
  fi
  case "$skip" in *",$id,"*) return 0 ;; esac
  echo "== $id: meshfed-load bench $*" >&2
  local start=$SECONDS
  if ! timeout --kill-after=10 "$limit" "$bin" bench --label "$id" "$@" > "$out/$id.log" 2>&1; then
    echo "!! $id failed or timed out after $((SECONDS - start)) s; see $out/$id.log" >&2
    tail -5 "$out/$id.log" >&2
    echo "{\"label\":\"$id\",\"step\":\"failed\"}" >> "$results"
    return 0
  fi
  grep '^RESULT ' "$out/$id.log" | sed 's/^RESULT //' >> "$results"
  echo "   done in $((SECONDS - start)) s" >&2
}

if [ "$mode" = smoke ]; then
  small=(--size 40x4 --proxies 20 --iterations 5 --duration 2 --rollout-pods 20 --flood-endpoints 100 --storm-proxies 20 --ready-timeout 60)
  run smoke-meshfed 120 "${small[@]}" --steps flaps,rollout,nack,churn,flood,storm,cold,hold,drain
  run smoke-floor 60 "${small[@]}" --server floor --steps flaps,cold
  run smoke-files 60 "${small[@]}" --server files --debounce-quiet 0ms --steps flaps
  # the per-type EDS mode (rows f1, f2): one connection per proxy, one EDS stream per service on it
  eds=(--size 8x4 --proxies 20 --eds-streams 8 --iterations 5 --duration 2 --ready-timeout 60)
  run smoke-eds 60 "${eds[@]}" --server-limits default --steps flaps,hold,cold
  run smoke-eds-floor 60 "${eds[@]}" --server floor-zero-copy --steps flaps
  if [ -x .venv/bin/envoy ] || [ -n "${MESHFED_ENVOY:-}" ]; then
    run smoke-envoy 90 --size 40x4 --proxies 0 --iterations 3 --envoys 2 --steps envoy
  fi
  # every step produced its numbers, without client errors
  python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
want = {
    "smoke-meshfed": ["connect", "flaps", "rollout", "nack", "churn", "flood", "storm", "cold", "hold"],
    "smoke-floor": ["connect", "flaps", "cold"],
    "smoke-files": ["connect", "flaps"],
    "smoke-eds": ["connect", "flaps", "hold", "cold"],
    "smoke-eds-floor": ["connect", "flaps"],
}
if any(r.get("label") == "smoke-envoy" or r.get("base", {}).get("label") == "smoke-envoy" for r in rows):
    want["smoke-envoy"] = ["connect", "envoy"]
bad = []
for label, steps in want.items():
    got = [r for r in rows if r.get("base", {}).get("label") == label]
    for s in steps:
        r = next((r for r in got if r.get("step") == s), None)
        if r is None:
            bad.append(f"{label}: no {s} result")
        elif r.get("errors", 0) != 0:
            bad.append(f"{label}/{s}: {r['errors']} client errors")
    flaps = next((r for r in got if r.get("step") == "flaps"), None)
    if flaps and (flaps.get("change_to_ack_ms_per_proxy") is None or flaps.get("missing_acks") != 0):
        bad.append(f"{label}/flaps: changes not measured at every proxy")
    # per-type EDS: every stream open, memory measured per stream
    for r in got:
        streams = r.get("base", {}).get("streams")
        if streams is None:
            continue
        if r.get("step") in ("connect", "hold") and r.get("open_streams") != streams:
            bad.append(f"{label}/{r['step']}: {r.get('open_streams')} of {streams} EDS streams open")
        if r.get("step") == "connect" and r.get("server_kb_per_stream") is None:
            bad.append(f"{label}/connect: no memory per stream")
if bad:
    print("bench smoke: FAILED\n  " + "\n  ".join(bad))
    sys.exit(1)
print(f"bench smoke: ok ({len(rows)} results, every step measured; no timing checked)")
PY
  exit 0
fi

# ---- the full run (ids as in BENCHMARKS.md) ----
S=(--size S --proxies 1000)
# a1 b1 b5 c1(S) e1 d1(mix): 1,000 proxies, half SotW half Delta, no debounce
run S1000 900 "${S[@]}" --steps flaps,nack,cold,hold --iterations 100 --duration 10
run S1000-floor 900 "${S[@]}" --server floor --steps flaps,cold --iterations 100
run S1000-floor-zc 900 "${S[@]}" --server floor-zero-copy --steps flaps,cold --iterations 100
# d1 per flavor, meshfed and floor
run d1-sotw 900 "${S[@]}" --delta 0 --steps flaps --iterations 100
run d1-delta 900 "${S[@]}" --delta 1 --steps flaps --iterations 100
run d1-sotw-floor 900 "${S[@]}" --delta 0 --server floor --steps flaps --iterations 100
run d1-delta-floor 900 "${S[@]}" --delta 1 --server floor --steps flaps --iterations 100
run d1-sotw-floor-zc 900 "${S[@]}" --delta 0 --server floor-zero-copy --steps flaps --iterations 100
run d1-delta-floor-zc 900 "${S[@]}" --delta 1 --server floor-zero-copy --steps flaps --iterations 100
# e1 without the NACK racing the next push
run e1-settled 900 "${S[@]}" --steps nack --nack-settle-ms 500
# t1, t2: traffic control: a drain step (the second cloud's capacity 100 -> 75 -> 50 -> 25 -> 0, every
# service split 50/50) -> each proxy's ACK, at 1,000 and 10,000 proxies (an EDS-only change of every
# covered service: all 1,000 of S; t1-one, t2-one: a policy covering one service)
row=t1
run t1 900 "${S[@]}" --steps drain --iterations 20
run t1-one 900 "${S[@]}" --steps drain --iterations 20 --drain-services 1
# the floor of the same step (every service covered): the decision, one translation, the bytes written
run t1-floor-zc 900 "${S[@]}" --server floor-zero-copy --steps drain --iterations 20
# how a step's cost grows with the services the policy covers (and the floor of each)
for n in 50 100 200; do
  run t1-$n 900 "${S[@]}" --steps drain --iterations 20 --drain-services $n
done
for n in 50 100; do
  run t1-$n-floor-zc 900 "${S[@]}" --server floor-zero-copy --steps drain --iterations 20 --drain-services $n
done
row=t2
# every service at 10,000: ~6.5 GB per step, decoded by a load client on the same 2 cores, which falls
# behind by more than the 10 s a keepalive PING gets (istiod's and meshfed's default) -- a fleet of
# proxies on their own machines does not: the step gets 60 s, the PING 120 s, here only
T2=(--size S --proxies 10000 --connect-parallel 512 --steps drain --iterations 10 --step-wait 60 --server-keepalive-timeout 120)
run t2 1800 "${T2[@]}"
run t2-floor-zc 1800 "${T2[@]}" --server floor-zero-copy
run t2-one 1800 --size S --proxies 10000 --connect-parallel 512 --steps drain --iterations 20 --drain-services 1
row=""
# b3: 5,000 proxies
run b3 1500 --size S --proxies 5000 --steps flaps --iterations 50
run b3-floor 1500 --size S --proxies 5000 --server floor --steps flaps --iterations 50
# a3: 10,000 streams held
run a3 1800 --size S --proxies 10000 --connect-parallel 512 --steps hold,flaps --duration 30 --iterations 20
# c2: 5,000 connect at once while 1,000 are connected
# (an endpoint flap every second during the storm; c2-b2b: flaps back to back, 100 ms after the last ACK)
run c2 1800 "${S[@]}" --steps storm --storm-proxies 5000
run c2-b2b 1800 "${S[@]}" --steps storm --storm-proxies 5000 --storm-flap-interval-ms 0
# e2: churn soak
run e2 900 "${S[@]}" --steps churn --duration 60
# the 10-minute soak (issue 8): churn and reconnects against the meshfed binary; memory, tasks, descriptors
# back at their baseline, no errors (tests/soak.rs; CI runs it for 60 s)
if { [ -z "$only" ] || [[ "$only" == *",soak,"* ]]; } && [[ "$skip" != *",soak,"* ]]; then
  echo "== soak: scripts/soak.sh 600" >&2
  if bash scripts/soak.sh 600 > "$out/soak.log" 2>&1; then echo "   soak passed" >&2; else echo "!! soak failed; see $out/soak.log" >&2; fi
fi
# e3: one cluster floods 10k endpoints in 60 s
run e3 900 "${S[@]}" --steps flood --duration 60 --flood-endpoints 10000
# c1 on a server with no other proxy. c1-S: the proxy reconnects 50 ms after it left (its scopes linger);
# c1-S-cold: 11 s after (past SCOPE_LINGER), so every scope of the proxy is translated for it
run c1-S 300 --size S --proxies 0 --steps cold --iterations 30
run c1-S-cold 600 --size S --proxies 0 --steps cold --iterations 10 --cold-pause-ms 11000
run c1-S-floor 300 --size S --proxies 0 --server floor-zero-copy --steps cold --iterations 30
# L: a2 memory per proxy, b2, b4 rollout at 1,000 proxies; c1(L) and the same at 200 proxies
run L1000 2400 --size L --proxies 1000 --steps flaps,rollout --iterations 100 --rollout-pods 500
run L1000-floor-zc 2400 --size L --proxies 1000 --server floor-zero-copy --steps flaps --iterations 100
run c1-L 600 --size L --proxies 0 --steps cold --iterations 10
run c1-L-cold 600 --size L --proxies 0 --steps cold --iterations 5 --cold-pause-ms 11000
run L 2400 --size L --proxies 200 --steps flaps,rollout,cold --iterations 30 --rollout-pods 500
# f1, f2: the per-type EDS mode beside istiod: each proxy one connection and one StreamEndpoints (SotW) or
# DeltaEndpoints (Delta) stream per federated service; the topology holds the federated services only.
# meshfed with `meshfed serve`'s default limits (1,000 streams per connection, request rate per stream);
# the zero-copy floor on the same client; the same proxies over ADS (SotW) for comparison
row=f1
F1=(--size 50x10 --proxies 1000 --eds-streams 50 --steps flaps,hold,cold --iterations 100 --duration 10)
run f1 900 "${F1[@]}" --delta 0 --server-limits default
run f1-floor-zc 900 "${F1[@]}" --delta 0 --server floor-zero-copy
run f1-delta 900 "${F1[@]}" --delta 1 --server-limits default
run f1-delta-floor-zc 900 "${F1[@]}" --delta 1 --server floor-zero-copy
run f1-ads 900 --size 50x10 --proxies 1000 --delta 0 --steps flaps --iterations 100
# the same 1,000 proxies with 10 and 20 federated services: how the costs grow with services per proxy
run f1-n10 900 --size 10x10 --proxies 1000 --eds-streams 10 --steps flaps --iterations 100 --delta 0 --server-limits default
run f1-n20 900 --size 20x10 --proxies 1000 --eds-streams 20 --steps flaps --iterations 100 --delta 0 --server-limits default
row=f2
F2=(--size 5x10 --proxies 10000 --eds-streams 5 --connect-parallel 512 --steps flaps,hold,cold --iterations 50 --duration 10)
run f2 1500 "${F2[@]}" --delta 0 --server-limits default
run f2-floor-zc 1500 "${F2[@]}" --delta 0 --server floor-zero-copy
run f2-delta 1500 "${F2[@]}" --delta 1 --server-limits default
run f2-delta-floor-zc 1500 "${F2[@]}" --delta 1 --server floor-zero-copy
run f2-ads 1500 --size 5x10 --proxies 10000 --connect-parallel 512 --delta 0 --steps flaps --iterations 50
row=""
# files: meshfed serve on a file topology (the file source's own delay included)
run S1000-files 900 "${S[@]}" --server files --steps flaps --iterations 50
# real Envoys
run envoy 600 --size S --proxies 0 --envoys 3 --steps envoy --iterations 30
run envoy-100 600 --size 100x10 --proxies 0 --envoys 3 --steps envoy --iterations 30

python3 - "$results" <<'PY'
import json, sys
for l in open(sys.argv[1]):
    r = json.loads(l)
    label = r.get("base", {}).get("label", r.get("label"))
    keys = [k for k in ("change_to_last_ack_ms_per_change", "change_to_ack_ms_per_proxy", "server_kb_per_proxy",
            "server_kb_per_stream", "server_kb_per_stream_marginal", "open_streams", "server_cpu_ms_per_change",
            "server_cpu_us_per_update", "full_config_acked_ms", "final_ack_after_last_event_ms", "rejected_version_resent",
            "all_ready_s", "connected_proxies_change_to_last_ack_ms_per_change", "server_kernel_cpu_share", "rss_after_vs_baseline", "during_flood_last_ack_ms", "change_to_envoy_admin_ms_per_envoy", "errors") if k in r]
    print(label, r.get("step"), {k: r[k] for k in keys})
PY
