#!/usr/bin/env bash
# zkroute demo: a local ZooKeeper; two backends ("blue" and "green"), each registered in it by a
# zkroute of its own ([[register]], the naming service); a rule written with `zkroute ctl`; a
# client-side zkroute routing requests to them; then one backend leaves and traffic moves within
# the same second. Installs ZooKeeper from Debian if missing. Everything listens on 127.0.0.1 and
# stops when the script ends. It checks its own output and exits non-zero if anything is off.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
fail() { echo "demo: FAILED: $*" >&2; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { # wait_for DESCRIPTION COMMAND...: poll up to 20 s
    local what=$1; shift
    for _ in $(seq 200); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    fail "timed out waiting for $what"
}
now_ms() { date +%s%3N; }

if [ ! -f /usr/share/java/zookeeper.jar ]; then
    say "installing ZooKeeper (Debian package zookeeper)"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q zookeeper
fi
# The debug build: the one `cargo test` makes too, and quicker to compile than the release one.
# Nothing here measures speed.
say "building zkroute"
cargo build --quiet
ZKROUTE=$PWD/target/debug/zkroute

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ -n "${KEEP:-}" ]; then echo "demo: kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

say "starting ZooKeeper"
zk_port=$(free_port)
mkdir -p "$work/zk"
cat > "$work/zk/zoo.cfg" <<CFG
tickTime=500
dataDir=$work/zk/data
clientPort=$zk_port
clientPortAddress=127.0.0.1
admin.enableServer=false
4lw.commands.whitelist=*
CFG
java -Xmx256m -cp /usr/share/java/zookeeper.jar:/usr/share/java/slf4j-simple.jar \
    org.apache.zookeeper.server.ZooKeeperServerMain "$work/zk/zoo.cfg" >"$work/zk/log" 2>&1 &
pids+=($!)
wait_for "ZooKeeper" sh -c "echo ruok | timeout 1 bash -c 'exec 3<>/dev/tcp/127.0.0.1/$zk_port; cat >&3; cat <&3' | grep -q imok"
ZK="--zookeeper-connect 127.0.0.1:$zk_port --zookeeper-session-timeout 4s"

say "starting two backends, each registered in ZooKeeper by a zkroute of its own"
declare -A backend_port registrar_pid
for name in blue green; do
    port=$(free_port)
    mkdir -p "$work/$name"
    echo "hello from $name" > "$work/$name/index.html"
    python3 -m http.server "$port" --bind 127.0.0.1 --directory "$work/$name" >/dev/null 2>&1 &
    pids+=($!)
    backend_port[$name]=$port
    wait_for "backend $name" curl -sf "http://127.0.0.1:$port/"
    # A register-only zkroute: no listeners; the app is registered while /index.html answers 2xx.
    RUST_LOG=warn $ZKROUTE $ZK --admin-bind "127.0.0.1:0" \
        --register "{service=\"web\", address=\"127.0.0.1\", port=$port, id=\"$name\", health_check={kind=\"http\", url=\"http://127.0.0.1:$port/index.html\", interval=\"500ms\", rise=1, fall=1}, payload={metadata={color=\"$name\"}}}" \
        2>"$work/register-$name.log" &
    registrar_pid[$name]=$!
    pids+=($!)
done
wait_for "both registrations" sh -c "$ZKROUTE $ZK ctl --json instances web 2>/dev/null | grep -c '\"format\"' | grep -q 2"
$ZKROUTE $ZK ctl instances web | sed 's/^/  /'

say "writing a rule with zkroute ctl (validated, compare-and-set)"
echo '{"listener":"http","match":{"path_prefix":"/"},"backends":[{"service":"web"}],"timeout":"2s","retries":1}' > "$work/rule.json"
$ZKROUTE $ZK ctl put rule web "$work/rule.json" | sed 's/^/  /'
if echo '{"listener":"http","backends":[]}' | $ZKROUTE $ZK ctl put rule web - 2>"$work/refused"; then
    fail "an invalid rule was accepted"
fi
echo "  an invalid version is refused: $(cat "$work/refused")"

say "starting the client-side zkroute"
admin=$(free_port); http=$(free_port)
RUST_LOG=info $ZKROUTE $ZK --admin-bind "127.0.0.1:$admin" \
    --listener "{name=\"http\", bind=\"127.0.0.1:$http\"}" 2>"$work/zkroute.log" &
pids+=($!)
wait_for "zkroute /ready" curl -sf "http://127.0.0.1:$admin/ready"
echo "  listener http on 127.0.0.1:$http, admin on 127.0.0.1:$admin"

say "ten requests through zkroute (p2c over both instances)"
seen=""
for _ in $(seq 10); do
    answer=$(curl -s "http://127.0.0.1:$http/")
    printf '  curl http://127.0.0.1:%s/  ->  %s\n' "$http" "$answer"
    seen="$seen $answer"
done
for name in blue green; do
    echo "$seen" | grep -q "$name" || fail "no request reached $name"
done

say "the routing table, as GET /config shows it"
curl -s "http://127.0.0.1:$admin/config" | python3 -c '
import json, sys
c = json.load(sys.stdin)
print("  table version %s, from %s" % (c["version"], c["source"]))
for name, s in c["services"].items():
    for i in s["instances"]:
        print("  service %s: %-6s %-16s %-8s %s  (%s, mzxid %s)" % (name, i["id"], i["address"], i["format"], i["health"]["state"], i["origin"]["path"], i["origin"]["mzxid"]))
for l in c["listeners"]:
    for r in l["routes"]:
        print("  listener %s: rule %s -> %s" % (l["name"], r["id"], [t.get("service") for t in r["targets"]]))
'

say "blue shuts down: its zkroute deregisters it, and traffic moves"
t0=$(now_ms)
kill -TERM "${registrar_pid[blue]}"
moved=""
for _ in $(seq 200); do
    answers=""
    for _ in 1 2 3 4 5; do answers="$answers $(curl -s "http://127.0.0.1:$http/")"; done
    if ! echo "$answers" | grep -q blue; then moved=$(( $(now_ms) - t0 )); break; fi
done
[ -n "$moved" ] || fail "traffic still reaches blue"
[ "$moved" -lt 1000 ] || fail "traffic took ${moved} ms to move"
echo "  all requests answered by green ${moved} ms after blue's SIGTERM"
for _ in 1 2 3; do printf '  curl  ->  %s\n' "$(curl -s "http://127.0.0.1:$http/")"; done

say "answers zkroute makes itself carry x-zkroute-error"
curl -s -D - -o "$work/body" "http://127.0.0.1:$http/" -X CONNECT --request-target "127.0.0.1:1" \
    | grep -iE '^(HTTP|x-zkroute-error)' | sed 's/^/  /' || true
printf '  body: %s\n' "$(cat "$work/body")"

say "where to look"
# Read whole first: grep -q stops reading at the match, and pipefail would count curl's SIGPIPE.
dashboard=$(curl -s "http://127.0.0.1:$admin/")
grep -q '<title>zkroute</title>' <<<"$dashboard" || fail "the dashboard at / did not render"
echo "  http://127.0.0.1:$admin/                the dashboard, in a browser"
echo "  curl http://127.0.0.1:$admin/config     the table: services, instances and their health, rules"
echo "  curl http://127.0.0.1:$admin/metrics    Prometheus metrics, e.g.:"
curl -s "http://127.0.0.1:$admin/metrics" | grep -E '^zkroute_(http_requests_total|table_version|zk_connected)' | sed 's/^/    /'
echo
echo "demo: OK"
