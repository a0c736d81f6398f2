#!/usr/bin/env bash
# Instructions per small TCP echo and per new TCP connection through zkroute's TCP relay, under
# callgrind: an A/B of builds without timed runs.
#
#   benches/callgrind_tcp.sh [--echoes N] [--conns N] [--seconds S] [--size BYTES] [BINARY...]
#
# Each BINARY (default: this checkout's target/release/zkroute, which it does not build) runs
# three times under `valgrind --tool=callgrind`, with `workers = 1` and a static file routing one
# TCP listener to a local echo backend (benches/tcp_echo.py, Python):
# - idle: start, wait, stop;
# - echo: --echoes round trips (default 20,000) of --size bytes (64) over one connection, one at a
#   time;
# - conns: --conns connections (default 2,000) one after another, one round trip each.
# Every run, the idle one too, starts with one round trip on a connection of its own, and is
# stopped (SIGTERM, so valgrind writes its totals) --seconds (default 20) after zkroute is ready,
# so that start-up, work done once on the first connection and wake-ups on timers cancel out in
# (Ir loaded - Ir idle) / N. Instructions are user space only. Two builds of one commit
# measured 1 instruction apart per echo and 170 (0.9%) per connection.
#
# Pinning as in compare.sh: zkroute on cpu1, the backend and the client on cpu0. With QUIET_FILE
# set, each run waits first while that file exists (a machine whose users mark timed runs so).
# Prints a Markdown table; the callgrind profiles stay in the work directory with KEEP_WORK=1.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ECHOES=20000
CONNS=2000
SECONDS_PER_RUN=20
SIZE=64
LOAD_CPU=0
PROXY_CPU=1
QUIET_FILE=${QUIET_FILE:-}

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; }

BINARIES=()
while [ $# -gt 0 ]; do
    case $1 in
        --echoes) ECHOES=$2; shift 2 ;;
        --conns) CONNS=$2; shift 2 ;;
        --seconds) SECONDS_PER_RUN=$2; shift 2 ;;
        --size) SIZE=$2; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        -*) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
        *) BINARIES+=("$(realpath "$1")"); shift ;;
    esac
done
[ ${#BINARIES[@]} -gt 0 ] || BINARIES=("$REPO/target/release/zkroute")

say() { printf '%s\n' "$*" >&2; }
die() { say "callgrind_tcp.sh: $*"; exit 1; }

for b in "${BINARIES[@]}"; do [ -x "$b" ] || die "no such binary: $b"; done
command -v valgrind >/dev/null || die "valgrind is missing (apt-get install valgrind)"

# Flags and ZKROUTE_* variables override the config file; start from a clean slate.
while read -r v; do unset "$v"; done < <(compgen -e | grep '^ZKROUTE_' || true)

WORK=$(mktemp -d /tmp/zkroute-callgrind-tcp.XXXXXX)
BACKEND_PID="" ZKROUTE_PID="" # ended by cleanup, by these ids only
cleanup() {
    local rc=$? p
    trap - EXIT INT TERM
    for p in $BACKEND_PID $ZKROUTE_PID; do kill -TERM "$p" 2>/dev/null || true; done
    for p in $BACKEND_PID $ZKROUTE_PID; do wait "$p" 2>/dev/null || true; done
    if [ -n "${KEEP_WORK:-}" ]; then say "work files kept in $WORK"; else rm -rf "$WORK"; fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# The echo backend, for every run.
taskset -c $LOAD_CPU python3 "$REPO/benches/tcp_echo.py" serve "$WORK/backend.port" >"$WORK/backend.log" 2>&1 &
BACKEND_PID=$!
for _ in $(seq 100); do [ -s "$WORK/backend.port" ] && break; sleep 0.1; done
[ -s "$WORK/backend.port" ] || die "the echo backend did not start: $(cat "$WORK/backend.log")"
BACKEND_PORT=$(cat "$WORK/backend.port")

# run BINARY MODE: sets IR, the run's total instructions.
run() {
    local bin=$1 mode=$2 dir
    dir=$WORK/$(basename "$bin")-$mode
    mkdir -p "$dir"
    local tcp admin
    tcp=$(free_port) admin=$(free_port)
    printf '[services.echo]\na = "127.0.0.1:%s"\n' "$BACKEND_PORT" >"$dir/routes.toml"
    cat >"$dir/zkroute.toml" <<EOF
[static]
file = "$dir/routes.toml"

[admin]
bind = "127.0.0.1:$admin"

[proxy]
workers = 1

[[listener]]
name = "tcp"
bind = "127.0.0.1:$tcp"
protocol = "tcp"
service = "echo"
EOF
    while [ -n "$QUIET_FILE" ] && [ -e "$QUIET_FILE" ]; do sleep 10; done
    taskset -c $PROXY_CPU env RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.out" \
        --log-file="$dir/valgrind.log" "$bin" --config "$dir/zkroute.toml" >"$dir/zkroute.log" 2>&1 &
    ZKROUTE_PID=$!
    local pid=$ZKROUTE_PID
    local deadline=$((SECONDS + 120))
    until [ "$(curl -s -o /dev/null -m 2 -w '%{http_code}' "http://127.0.0.1:$admin/ready" || true)" = 200 ]; do
        kill -0 "$pid" 2>/dev/null || die "zkroute exited: $(tail -5 "$dir/zkroute.log" "$dir/valgrind.log")"
        [ $SECONDS -lt $deadline ] || die "zkroute was not ready in 120 s"
        sleep 0.2
    done
    local start=$SECONDS stop_at=$((SECONDS + SECONDS_PER_RUN))
    taskset -c $LOAD_CPU python3 "$REPO/benches/tcp_echo.py" conns "$tcp" 1 "$SIZE"
    case $mode in
        idle) ;;
        echo) taskset -c $LOAD_CPU python3 "$REPO/benches/tcp_echo.py" echo "$tcp" "$ECHOES" "$SIZE" ;;
        conns) taskset -c $LOAD_CPU python3 "$REPO/benches/tcp_echo.py" conns "$tcp" "$CONNS" "$SIZE" ;;
    esac
    [ $SECONDS -lt $stop_at ] || die "$mode took longer than --seconds $SECONDS_PER_RUN: raise it"
    [ "$mode" = idle ] || say "   $mode: $((SECONDS - start)) s of load"
    sleep $((stop_at - SECONDS))
    kill -TERM "$pid"
    wait "$pid" || true
    ZKROUTE_PID=""
    IR=$(awk '/Collected :/ {print $4}' "$dir/valgrind.log")
    [ -n "$IR" ] || die "no callgrind total for $bin $mode: $(tail -5 "$dir/valgrind.log")"
}

echo "| binary | Ir idle | Ir echo | per echo | Ir conns | per connection |"
echo "|---|---|---|---|---|---|"
for bin in "${BINARIES[@]}"; do
    say "== $bin: idle, $ECHOES echoes, $CONNS connections (${SECONDS_PER_RUN}s each under callgrind)"
    run "$bin" idle
    idle=$IR
    run "$bin" echo
    echo_ir=$IR
    run "$bin" conns
    conns_ir=$IR
    printf '| %s | %s | %s | %s | %s | %s |\n' "$bin" "$idle" "$echo_ir" $(((echo_ir - idle) / ECHOES)) \
        "$conns_ir" $(((conns_ir - idle) / CONNS))
done
echo
echo "Command: \`benches/callgrind_tcp.sh --echoes $ECHOES --conns $CONNS --seconds $SECONDS_PER_RUN --size $SIZE ${BINARIES[*]}\`"
