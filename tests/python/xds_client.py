"""Proxyless gRPC client for tests/grpc_proxyless.rs.

Usage: xds_client.py TARGET [--count N] [--deadline SECONDS] [--ready-timeout SECONDS] [--interactive]

The xDS bootstrap comes from the environment (GRPC_XDS_BOOTSTRAP_CONFIG or GRPC_XDS_BOOTSTRAP).
Calls the raw-bytes unary method /meshfed.test.Echo/Who on TARGET (an xds:/// URI); backends
answer with their own address.

One-shot mode (default): makes COUNT calls and prints {backend address: calls it answered} as JSON
on stdout. The first call waits for the channel to become ready (bounded by --ready-timeout), the
others must succeed within --deadline. Exits 1 with a message on stderr on the first failure.

--interactive: keeps one channel (and so one xDS subscription) open. For every line N read from
stdin it makes N calls (wait_for_ready, each bounded by --deadline) and prints one JSON line
{"answers": {address: count}, "errors": {status code: count}}. Exits 0 when stdin closes.
"""

import argparse
import json
import os
import sys
import time

import grpc

METHOD = "/meshfed.test.Echo/Who"


def _identity(b):
    return b


def one_shot(who, args):
    counts = {}
    start = time.monotonic()
    for i in range(args.count):
        first = i == 0
        try:
            reply = who(
                b"who",
                timeout=args.ready_timeout if first else args.deadline,
                wait_for_ready=True if first else None,
            )
        except grpc.RpcError as e:
            print(
                f"xds_client: RPC {i + 1}/{args.count} to {args.target} failed after "
                f"{time.monotonic() - start:.1f}s: {e.code()}: {e.details()}; answers so far: {counts}",
                file=sys.stderr,
                flush=True,
            )
            return 1
        addr = reply.decode()
        counts[addr] = counts.get(addr, 0) + 1
    print(json.dumps(counts, sort_keys=True), flush=True)
    return 0


def interactive(who, args):
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        answers, errors = {}, {}
        for _ in range(int(line)):
            try:
                addr = who(b"who", timeout=args.deadline, wait_for_ready=True).decode()
                answers[addr] = answers.get(addr, 0) + 1
            except grpc.RpcError as e:
                key = f"{e.code().name}: {e.details()}"
                errors[key] = errors.get(key, 0) + 1
        print(json.dumps({"answers": answers, "errors": errors}, sort_keys=True), flush=True)
    return 0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("target")
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--deadline", type=float, default=5.0, help="per-RPC deadline, seconds")
    parser.add_argument("--ready-timeout", type=float, default=20.0, help="bound for the first RPC, seconds")
    parser.add_argument("--interactive", action="store_true")
    args = parser.parse_args()

    if not (os.environ.get("GRPC_XDS_BOOTSTRAP_CONFIG") or os.environ.get("GRPC_XDS_BOOTSTRAP")):
        print("xds_client: neither GRPC_XDS_BOOTSTRAP_CONFIG nor GRPC_XDS_BOOTSTRAP is set", file=sys.stderr)
        return 2

    with grpc.insecure_channel(args.target) as channel:
        who = channel.unary_unary(METHOD, request_serializer=_identity, response_deserializer=_identity)
        return interactive(who, args) if args.interactive else one_shot(who, args)


if __name__ == "__main__":
    sys.exit(main())
