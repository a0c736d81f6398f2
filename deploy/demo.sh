#!/usr/bin/env bash
# zkroute demo: a local ZooKeeper, two backends registered in it, a routing rule, zkroute, and
# requests through it. Installs ZooKeeper from Debian if missing. Everything listens on
# 127.0.0.1 and is stopped when the script ends.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { # wait_for DESCRIPTION COMMAND...: poll up to 20 s
    local what=$1; shift
    for _ in $(seq 200); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "timed out waiting for $what" >&2; exit 1
}

if [ ! -f /usr/share/java/zookeeper.jar ]; then
    say "installing ZooKeeper (Debian package zookeeper)"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q zookeeper
fi
say "building zkroute"
cargo build --release --quiet
ZKROUTE=$PWD/target/release/zkroute

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
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
zkcli() { /usr/share/zookeeper/bin/zkCli.sh -server "127.0.0.1:$zk_port" >/dev/null 2>&1; }

say "starting two backends (blue and green)"
ports=()
for name in blue green; do
    port=$(free_port)
    mkdir -p "$work/$name"
    echo "hello from $name (127.0.0.1:$port)" > "$work/$name/index.html"
    python3 -m http.server "$port" --bind 127.0.0.1 --directory "$work/$name" >/dev/null 2>&1 &
    pids+=($!)
    ports+=("$port")
done
for p in "${ports[@]}"; do wait_for "backend $p" curl -sf "http://127.0.0.1:$p/"; done

say "registering them in ZooKeeper (Curator and plain formats) and writing a rule"
# Registries write ephemeral nodes that live as long as their session; zkCli's session ends with
# this command, so the demo writes persistent ones.
zkcli <<CMDS
create /zkroute ""
create /zkroute/services ""
create /zkroute/services/web ""
create /zkroute/rules ""
create /zkroute/services/web/blue {"name":"web","id":"blue","address":"127.0.0.1","port":${ports[0]},"payload":{"metadata":{"color":"blue"}},"serviceType":"DYNAMIC"}
create /zkroute/services/web/green 127.0.0.1:${ports[1]}
create /zkroute/rules/web {"listener":"http","backends":[{"service":"web"}],"timeout":"2s"}
quit
CMDS
echo "  /zkroute/services/web/blue   Curator document for 127.0.0.1:${ports[0]}"
echo "  /zkroute/services/web/green  127.0.0.1:${ports[1]}"
echo "  /zkroute/rules/web           {\"listener\":\"http\",\"backends\":[{\"service\":\"web\"}]}"

say "starting zkroute"
admin=$(free_port); http=$(free_port)
cat > "$work/zkroute.toml" <<CFG
[zookeeper]
connect = "127.0.0.1:$zk_port"
session_timeout = "4s"
[admin]
bind = "127.0.0.1:$admin"
[[listener]]
name = "http"
bind = "127.0.0.1:$http"
CFG
RUST_LOG=info "$ZKROUTE" --config "$work/zkroute.toml" 2>"$work/zkroute.log" &
pids+=($!)
wait_for "zkroute /ready" curl -sf "http://127.0.0.1:$admin/ready"
echo "  listener http on 127.0.0.1:$http, admin on 127.0.0.1:$admin"

say "six requests through zkroute (p2c balancing over both instances)"
for _ in 1 2 3 4 5 6; do
    printf '  curl http://127.0.0.1:%s/  ->  %s\n' "$http" "$(curl -s "http://127.0.0.1:$http/")"
done

say "the routing table, as GET /config shows it (services and routes)"
curl -s "http://127.0.0.1:$admin/config" | python3 -c '
import json, sys
c = json.load(sys.stdin)
print("  table version %s, from %s" % (c["version"], c["source"]))
for name, s in c["services"].items():
    for i in s["instances"]:
        print("  service %s: %-6s %-16s %-9s %s  (mzxid %s)" % (name, i["id"], i["address"], i["format"], i["health"]["state"], i["origin"]["mzxid"]))
for l in c["listeners"]:
    for r in l["routes"]:
        print("  listener %s: rule %s -> %s" % (l["name"], r["id"], [t.get("service") for t in r["targets"]]))
'

say "the rule now matches /web/ only: other paths are answered by zkroute itself"
zkcli <<CMDS
set /zkroute/rules/web {"listener":"http","match":{"path_prefix":"/web/"},"backends":[{"service":"web"}]}
quit
CMDS
wait_for "the rule change" sh -c "curl -s http://127.0.0.1:$admin/config | grep -q path_prefix"
curl -s -D - -o "$work/body" "http://127.0.0.1:$http/other" | grep -iE '^(HTTP|x-zkroute-error)' | sed 's/^/  /'
printf '  body: %s' "$(cat "$work/body")"; echo

say "done: metrics at http://127.0.0.1:$admin/metrics, table at /config (stopping everything now)"
