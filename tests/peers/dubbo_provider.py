"""A Triple provider of Apache Dubbo's Python implementation (PyPI apache-dubbo), registered in
ZooKeeper by Dubbo's own registry code, for zkroute's tests.

    python3 tests/peers/dubbo_provider.py --zookeeper 127.0.0.1:2181 --root dubbo \
        --service org.apache.dubbo.samples.Greeter --port 50071 --name a

Registers tri://127.0.0.1:PORT?service=SERVICE under /ROOT/SERVICE/providers (an ephemeral node
of its own session) and answers the unary method `sayHi` with `NAME:` and the request bytes.
Runs until killed; the test polls ZooKeeper for the node rather than reading this output.
"""

import argparse
import signal
import sys
import threading

import dubbo
from dubbo.configs import RegistryConfig, ServiceConfig
from dubbo.proxy.handlers import RpcMethodHandler, RpcServiceHandler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zookeeper", required=True, help="host:port")
    parser.add_argument("--root", default="dubbo", help="the registry's root node, without '/'")
    parser.add_argument("--service", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True, help="what answers say")
    args = parser.parse_args()

    def say_hi(request: bytes) -> bytes:
        return args.name.encode() + b":" + request

    handler = RpcServiceHandler(
        service_name=args.service,
        method_handlers=[RpcMethodHandler.unary(say_hi, method_name="sayHi")],
    )
    registry = RegistryConfig.from_url(f"zookeeper://{args.zookeeper}?group={args.root}")
    server = dubbo.Dubbo(registry_config=registry).create_server(
        ServiceConfig(handler, host="127.0.0.1", port=args.port)
    )
    server.start()
    print(f"provider {args.name} serving {args.service} on 127.0.0.1:{args.port}", flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    sys.exit(0)


if __name__ == "__main__":
    main()
