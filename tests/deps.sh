#!/usr/bin/env bash
# What the test suite needs beyond Rust, installed where missing. The one place both the README's
# test command (`cargo test`, through `tests/support/deps.rs`) and `.ci/run` go through, so that
# either passes on a fresh Debian machine. Cheap when everything is present (a few lookups).
# Concurrent callers (test binaries run in parallel) take turns on a lock.
#
#   tests/deps.sh            install what is missing
#   tests/deps.sh --check    exit 1 if something is missing, installing nothing
set -euo pipefail

# Debian packages: "probe package", where the probe is a command on PATH or an absolute path.
DEBIAN=(
    "/usr/share/java/zookeeper.jar zookeeper"
    "/usr/share/java/netty-codec.jar libnetty-java" # ZooKeeper's Netty TLS (tests/support/zk.rs)
    "java default-jre-headless"
    "ss iproute2"
    "promtool prometheus"
    "curl curl"
    "openssl openssl"
    "chromium chromium"
    "javac default-jdk-headless"
    "/usr/share/java/curator-x-discovery.jar libcurator-discovery-java"
)

# PyPI packages: "module package==version" (the module is what `python3 -c 'import M'` loads).
PYPI=(
    "dubbo.registry.zookeeper.kazoo_transport apache-dubbo[zookeeper]==3.0.0b1"
    "grpc grpcio==1.85.0"
)

present() {
    case $1 in
        /*) [ -e "$1" ] ;;
        *) command -v "$1" >/dev/null 2>&1 ;;
    esac
}

missing_debian() {
    local entry
    for entry in "${DEBIAN[@]}"; do
        set -- $entry
        present "$1" || echo "$2"
    done
}

missing_pypi() {
    local entry
    for entry in "${PYPI[@]+"${PYPI[@]}"}"; do
        set -- $entry
        python3 -c "import $1" >/dev/null 2>&1 || echo "$2"
    done
}

if [ "${1:-}" = --check ]; then
    [ -z "$(missing_debian)$(missing_pypi)" ]
    exit
fi

exec 9>"${TMPDIR:-/tmp}/zkroute-test-deps.lock"
flock 9

debian=$(missing_debian | tr '\n' ' ')
if [ -n "${debian// /}" ]; then
    echo "tests/deps.sh: installing from Debian: $debian" >&2
    apt-get update -q >&2
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $debian >&2
fi
pypi=$(missing_pypi | tr '\n' ' ')
if [ -n "${pypi// /}" ]; then
    echo "tests/deps.sh: installing from PyPI: $pypi" >&2
    # shellcheck disable=SC2086
    python3 -m pip install -q --disable-pip-version-check $pypi >&2
fi
if [ -n "$(missing_debian)$(missing_pypi)" ]; then
    echo "tests/deps.sh: still missing after installing: $(missing_debian) $(missing_pypi)" >&2
    exit 1
fi
