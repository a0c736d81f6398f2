"""A gRPC server and client from Python's grpcio, with raw-bytes methods (no generated code),
for tests/grpc.rs.

  grpc_peer.py serve NAME        serves test.Echo on 127.0.0.1; prints "port N", then one line per
                                 event ("cancelled", "metadata K=V", "health SERVICE"); "stop" on
                                 stdin stops it gracefully (GOAWAY, in-flight calls finish), "sick"
                                 and "well" switch grpc.health.v1.Health/Check between NOT_SERVING
                                 and SERVING, EOF stops it at once
  grpc_peer.py call ADDR WHAT N  runs one client scenario through ADDR, prints one JSON line
"""

import json
import sys
import threading
import time
from concurrent import futures

import grpc

SERVICE = "test.Echo"


def serve(name):
    out_lock = threading.Lock()

    def say(line):
        with out_lock:
            print(line, flush=True)

    def who(request, context):
        for k, v in context.invocation_metadata():
            if k.startswith("x-test-") or k.startswith("x-forwarded-"):
                say(f"metadata {k}={v}")
        context.set_trailing_metadata((("x-served-by", name),))
        return name.encode()

    def fail(request, context):
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "precondition failed: caf\u00e9 50% off")

    def slow(request, context):
        time.sleep(int(request or b"0") / 1000)
        return name.encode()

    def hang(request, context):
        done = threading.Event()

        def on_done():
            if not context.is_active():
                say("cancelled")
            done.set()

        context.add_callback(on_done)
        say("hanging")
        done.wait(30)
        return b"late"

    def count(request, context):
        for i in range(int(request)):
            yield b"%d" % i

    def total(requests, context):
        return b"%d" % sum(len(r) for r in requests)

    def echo(requests, context):
        for r in requests:
            yield name.encode() + b":" + r

    handlers = {
        "Who": grpc.unary_unary_rpc_method_handler(who),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "Slow": grpc.unary_unary_rpc_method_handler(slow),
        "Hang": grpc.unary_unary_rpc_method_handler(hang),
        "Count": grpc.unary_stream_rpc_method_handler(count),
        "Total": grpc.stream_unary_rpc_method_handler(total),
        "Echo": grpc.stream_stream_rpc_method_handler(echo),
    }
    sick = threading.Event()

    def health_check(request, context):
        # HealthCheckRequest { string service = 1 } in, HealthCheckResponse { status = 1 } out,
        # encoded by hand: SERVING is 1, NOT_SERVING 2.
        say(f"health {request[2:].decode()}")
        return b"\x08\x02" if sick.is_set() else b"\x08\x01"

    health = {"Check": grpc.unary_unary_rpc_method_handler(health_check)}
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(SERVICE, handlers),
            grpc.method_handlers_generic_handler("grpc.health.v1.Health", health),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    say(f"port {port}")
    for line in sys.stdin:
        if line.strip() == "sick":
            sick.set()
        elif line.strip() == "well":
            sick.clear()
        elif line.strip() == "stop":
            say("stopping")
            server.stop(grace=10).wait()
            say("stopped")
            return
    server.stop(0)


def call(addr, what, n):
    channel = grpc.insecure_channel(addr)
    m = lambda kind, method: getattr(channel, kind)(f"/{SERVICE}/{method}")
    out = {}
    try:
        if what == "unary":
            answers, trailers = [], []
            for _ in range(n):
                resp, c = m("unary_unary", "Who").with_call(b"x", metadata=(("x-test-hello", "world"),), timeout=10)
                answers.append(resp.decode())
                trailers.append(dict(c.trailing_metadata()).get("x-served-by"))
            out = {"answers": answers, "trailers": trailers}
        elif what == "until_error":
            # up to n calls; the first failure's status
            out = {"code": "OK"}
            for _ in range(n):
                try:
                    m("unary_unary", "Who")(b"x", timeout=10)
                except grpc.RpcError as e:
                    out = {"code": e.code().name, "details": e.details()}
                    break
        elif what == "server_stream":
            got = 0
            last = None
            for msg in m("unary_stream", "Count")(b"%d" % n, timeout=60):
                got += 1
                last = msg.decode()
            out = {"count": got, "last": last}
        elif what == "client_stream":
            resp = m("stream_unary", "Total")((b"ab" for _ in range(n)), timeout=30)
            out = {"total": int(resp)}
        elif what == "bidi":
            resp = m("stream_stream", "Echo")((b"%d" % i for i in range(n)), timeout=30)
            out = {"echoed": [r.decode() for r in resp]}
        elif what in ("fail", "unavailable", "unimplemented"):
            method = {"fail": "Fail", "unavailable": "Who", "unimplemented": "Who"}[what]
            try:
                m("unary_unary", method)(b"x", timeout=10)
                out = {"code": "OK"}
            except grpc.RpcError as e:
                out = {"code": e.code().name, "details": e.details()}
        elif what == "deadline":
            try:
                m("unary_unary", "Slow")(b"3000", timeout=n / 1000)
                out = {"code": "OK"}
            except grpc.RpcError as e:
                out = {"code": e.code().name, "details": e.details()}
        elif what == "cancel":
            f = m("unary_unary", "Hang").future(b"x", timeout=30)
            time.sleep(n / 1000)
            f.cancel()
            out = {"cancelled": f.cancelled()}
        elif what == "load":
            # n calls from 8 threads on one channel; every failure is reported.
            errors, answers = [], {}
            lock = threading.Lock()

            def one(_):
                try:
                    r = m("unary_unary", "Slow")(b"5", timeout=20).decode()
                    with lock:
                        answers[r] = answers.get(r, 0) + 1
                except grpc.RpcError as e:
                    with lock:
                        errors.append(f"{e.code().name}: {e.details()}")

            with futures.ThreadPoolExecutor(8) as pool:
                list(pool.map(one, range(n)))
            out = {"answers": answers, "errors": errors}
        else:
            raise SystemExit(f"unknown scenario {what}")
    finally:
        channel.close()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        call(sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 1)
