"""Test backend for tests/grpc_proxyless.rs: answers the raw-bytes unary method
/meshfed.test.Echo/Who with the address (ADDR:PORT) the request arrived on.

Usage: backend.py ADDR:PORT [ADDR:PORT ...]

One gRPC server per address, so each one knows its own address. Prints "READY" once every
address is serving, then runs until stdin closes, SIGTERM or SIGINT.
"""

import signal
import sys
import threading
from concurrent import futures

import grpc

SERVICE = "meshfed.test.Echo"
METHOD = "Who"


def _identity(b):
    return b


def _serve(address, executor):
    reply = address.encode()

    def who(_request, _context):
        return reply

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {METHOD: grpc.unary_unary_rpc_method_handler(who, request_deserializer=_identity, response_serializer=_identity)},
    )
    server = grpc.server(executor, handlers=(handler,), options=[("grpc.so_reuseport", 0)])
    if server.add_insecure_port(address) == 0:
        raise RuntimeError(f"cannot listen on {address}")
    server.start()
    return server


def main():
    addresses = sys.argv[1:]
    if not addresses:
        print("usage: backend.py ADDR:PORT [ADDR:PORT ...]", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    def watch_stdin():
        try:
            while sys.stdin.buffer.read(4096):
                pass
        finally:
            stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()

    executor = futures.ThreadPoolExecutor(max_workers=8)
    try:
        servers = [_serve(a, executor) for a in addresses]
    except Exception as e:  # noqa: BLE001 - reported to the test
        print(f"backend: {e}", file=sys.stderr, flush=True)
        return 1
    print("READY", flush=True)
    # A timeout keeps the main thread responsive to signals.
    while not stop.wait(0.5):
        pass
    for s in servers:
        s.stop(grace=None)
    executor.shutdown(wait=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
