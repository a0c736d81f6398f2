"""A consumer of Apache Dubbo's Python implementation (PyPI apache-dubbo) calling a Triple
service straight at an address (a provider, or zkroute's listener), for zkroute's tests.

    python3 tests/peers/dubbo_consumer.py --url tri://127.0.0.1:15001/org.apache.dubbo.samples.Greeter \
        --method sayHi --calls 20

Prints one line per call: the answer as text, or `error: ...`. Exits 1 if any call failed.
"""

import argparse
import sys

import dubbo
from dubbo.configs import ReferenceConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True, help="tri://host:port/service")
    parser.add_argument("--method", default="sayHi")
    parser.add_argument("--calls", type=int, default=1)
    args = parser.parse_args()

    client = dubbo.Dubbo().create_client(ReferenceConfig.from_url(args.url))
    call = client.unary(method_name=args.method)
    failed = False
    for i in range(args.calls):
        try:
            print(call(f"call {i}".encode()).decode(errors="replace"), flush=True)
        except Exception as e:  # every failure is reported, none ends the run
            print(f"error: {e}", flush=True)
            failed = True
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
