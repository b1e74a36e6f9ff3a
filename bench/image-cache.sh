#!/usr/bin/env bash
# image-cache.sh — podfleet's image cache beside its peer (distribution 2.8's proxy mode),
# same image, same machine, same run, over a shaped upstream link.
#
# Everything runs inside a private network namespace ($NSNAME, its own 127.0.0.1) where
# HTB caps traffic *from* the upstream port 5100 at $WAN_RATE (default 100mbit): the
# upstream behaves like a WAN registry, cache -> client stays at loopback speed. Bytes the
# upstream sent are read from the HTB class counter. Servers:
#   127.0.0.1:5100  docker-registry (distribution 2.8) — the upstream, holds library/ptc-test:1
#   127.0.0.1:5101  docker-registry in proxy mode -> 5100 — the peer
#   127.0.0.1:5102  podfleet-cache --docker-hub http://127.0.0.1:5100 — ours (same URL paths)
# Image (as in ../shared/bench/ptc-peer.sh): busybox + a 50 MiB incompressible layer.
# Client: podman with its own store, emptied before every pull (a fresh CI VM), and skopeo.
# Prints figures and ratios; asserts nothing. Run as root:
#   bash bench/image-cache.sh            # build (release), set up, measure, tear down
# Knobs: W (scratch dir), RUNS_COLD, RUNS_WARM, WAN_RATE, BIG_MB, CARGO_TARGET_DIR.
set -euo pipefail

W=${W:-/var/tmp/podfleet-image-cache-bench}
RUNS_COLD=${RUNS_COLD:-3}
RUNS_WARM=${RUNS_WARM:-5}
WAN_RATE=${WAN_RATE:-100mbit}
BIG_MB=${BIG_MB:-50}
NSNAME=pfcache
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
CACHE_BIN=$TARGET/release/podfleet-cache
UP=127.0.0.1:5100 PEER=127.0.0.1:5101 OURS=127.0.0.1:5102
IMG=library/ptc-test:1
X="ip netns exec $NSNAME"
export TMPDIR=$W/tmp
export CONTAINERS_REGISTRIES_CONF=$W/registries.conf
PB="podman --root $W/build-storage --runroot $W/build-run --storage-driver overlay --events-backend none"
PC="$X podman --root $W/client-storage --runroot $W/client-run --storage-driver overlay --events-backend none"
SK="$X skopeo"

log() { printf '%s %s\n' "$(date +%T)" "$*" | tee -a "$W/results.txt" >&2; }
now() { date +%s.%N; }
wan_bytes() { $X tc -s class show dev lo classid 1:20 | awk '/Sent/{print $2; exit}'; }
alive() { local state; state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1; [ -n "$state" ] && [ "$state" != Z ]; }

wait_http() { for _ in $(seq 1 200); do $X curl -sf -o /dev/null "$1" && return 0; sleep 0.05; done; echo "timeout waiting for $1" >&2; return 1; }
ports_free() { for _ in $(seq 1 200); do $X ss -Hltn "( sport = :$1 )" | grep -q . || return 0; sleep 0.05; done; echo "port $1 still busy" >&2; return 1; }

stop_srv() { # name
  local f=$W/pids/$1.pid
  [ -f "$f" ] || return 0
  local pid; pid=$(cat "$f")
  if alive "$pid"; then kill "$pid"; for _ in $(seq 1 100); do alive "$pid" || break; sleep 0.05; done; fi
  rm -f "$f"
}
start_registry() { # name config port
  stop_srv "$1"; ports_free "$3"
  nohup $X docker-registry serve "$2" >>"$W/logs/$1.log" 2>&1 &
  echo $! >"$W/pids/$1.pid"
  wait_http "http://127.0.0.1:$3/v2/"
}
start_ours() {
  stop_srv ours; ports_free 5102
  PODFLEET_LOG=warn nohup $X "$CACHE_BIN" --listen $OURS --storage "$W/ours-data" \
    --docker-hub "http://$UP" --upstream "upstream=http://$UP" >>"$W/logs/ours.log" 2>&1 &
  echo $! >"$W/pids/ours.pid"
  wait_http "http://$OURS/v2/"
}
reset_peer() { stop_srv peer; rm -rf "$W/peer-data"; start_registry peer "$W/peer.yml" 5101; }
reset_ours() { stop_srv ours; rm -rf "$W/ours-data"; start_ours; }
client_reset() { $PC rmi -a -f >/dev/null 2>&1 || true; rm -rf "$W"/dir-*; }

setup() {
  command -v docker-registry skopeo podman tc >/dev/null
  [ -x "$CACHE_BIN" ] || (cd "$ROOT" && CARGO_TARGET_DIR=$TARGET cargo build --release -q -p podfleet-image-cache --bin podfleet-cache)
  rm -rf "$W"; mkdir -p "$W"/{logs,pids,tmp,ctx,rootfs/bin}
  : >"$W/results.txt"
  cat >"$W/upstream.yml" <<EOC
version: 0.1
log: {level: warn, formatter: text}
storage: {filesystem: {rootdirectory: $W/upstream-data}, delete: {enabled: true}}
http: {addr: $UP}
EOC
  cat >"$W/peer.yml" <<EOC
version: 0.1
log: {level: warn, formatter: text}
storage: {filesystem: {rootdirectory: $W/peer-data}, delete: {enabled: true}, cache: {blobdescriptor: inmemory}}
http: {addr: $PEER}
proxy: {remoteurl: http://$UP}
EOC
  printf 'unqualified-search-registries = []\nshort-name-mode = "disabled"\n' >"$W/registries.conf"
  ip netns list | grep -qw "$NSNAME" || ip netns add "$NSNAME"
  $X ip link set lo up
  $X tc qdisc del dev lo root 2>/dev/null || true
  $X tc qdisc add dev lo root handle 1: htb default 10
  $X tc class add dev lo parent 1: classid 1:10 htb rate 40gbit
  $X tc class add dev lo parent 1: classid 1:20 htb rate "$WAN_RATE" ceil "$WAN_RATE"
  $X tc filter add dev lo parent 1: protocol ip prio 1 u32 match ip sport 5100 0xffff flowid 1:20
  start_registry upstream "$W/upstream.yml" 5100
  # The peer's test image: busybox + BIG_MB MiB of AES-CTR pseudo-random data.
  cp /bin/busybox "$W/rootfs/bin/" && ln -sf busybox "$W/rootfs/bin/sh"
  tar -C "$W/rootfs" -cf "$W/ctx/rootfs.tar" .
  $PB import -q --change 'CMD ["/bin/sh"]' "$W/ctx/rootfs.tar" localhost/ptc-base:1 >/dev/null
  (openssl enc -aes-128-ctr -pass pass:ptc -nosalt -pbkdf2 </dev/zero 2>/dev/null || true) | head -c "${BIG_MB}M" >"$W/ctx/random.bin"
  printf 'FROM localhost/ptc-base:1\nCOPY random.bin /data/random.bin\n' >"$W/ctx/Containerfile"
  $PB build -q -t localhost/ptc-test:1 -f "$W/ctx/Containerfile" "$W/ctx" >/dev/null
  $X $PB push -q --tls-verify=false localhost/ptc-test:1 "docker://$UP/$IMG"
  reset_peer; reset_ours
  log "setup: $(docker-registry --version | awk '{print $3}'), $(podman --version), $(skopeo --version), $(nproc) CPUs, upstream shaped to $WAN_RATE"
}

# time_pull NAME PREPARE COMMAND RUNS: prints mean/min/max seconds and mean upstream bytes.
time_runs() {
  local name=$1 prepare=$2 command=$3 runs=$4 times=() bytes=() t0 t1 b0 b1
  for _ in $(seq 1 "$runs"); do
    eval "$prepare"; sleep 0.5; b0=$(wan_bytes)
    t0=$(now); eval "$command" >/dev/null; t1=$(now)
    sleep 1; b1=$(wan_bytes)
    times+=("$(echo "$t1 - $t0" | bc)"); bytes+=("$((b1 - b0))")
  done
  python3 - "$name" "${times[*]}" "${bytes[*]}" <<'PY' | tee -a "$W/results.txt"
import sys, statistics
name, times, bytes_ = sys.argv[1], [float(t) for t in sys.argv[2].split()], [int(b) for b in sys.argv[3].split()]
print(f"RESULT {name}: mean {statistics.mean(times):.3f}s  min {min(times):.3f}s  max {max(times):.3f}s  runs {len(times)}  upstream bytes/run {statistics.mean(bytes_):,.0f}")
PY
}

concurrent() { # name target
  local name=$1 target=$2 t0 t1 b0 b1 pids=() fails=0
  client_reset; sleep 0.5; b0=$(wan_bytes); t0=$(now)
  for i in 1 2 3 4; do mkdir -p "$W/dir-c$i"
    $SK copy -q --src-tls-verify=false "docker://$target/$IMG" "dir:$W/dir-c$i" 2>>"$W/logs/concurrent.err" & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p" || fails=$((fails+1)); done
  t1=$(now); sleep 1; b1=$(wan_bytes)
  log "RESULT $name: 4 concurrent cold skopeo copies $(echo "$t1 - $t0" | bc) s, failed clients $fails, upstream bytes $((b1 - b0))"
}


measure() {
  time_runs direct "client_reset" "$PC pull -q --tls-verify=false $UP/$IMG" "$RUNS_COLD"
  time_runs peer-cold "reset_peer; client_reset" "$PC pull -q --tls-verify=false $PEER/$IMG" "$RUNS_COLD"
  time_runs ours-cold "reset_ours; client_reset" "$PC pull -q --tls-verify=false $OURS/$IMG" "$RUNS_COLD"
  client_reset; $PC pull -q --tls-verify=false "$PEER/$IMG" >/dev/null; sleep 2
  time_runs peer-warm "client_reset" "$PC pull -q --tls-verify=false $PEER/$IMG" "$RUNS_WARM"
  client_reset; $PC pull -q --tls-verify=false "$OURS/$IMG" >/dev/null; sleep 1
  time_runs ours-warm "client_reset" "$PC pull -q --tls-verify=false $OURS/$IMG" "$RUNS_WARM"
  time_runs peer-warm-skopeo "client_reset" "$SK copy -q --src-tls-verify=false docker://$PEER/$IMG dir:$W/dir-out" "$RUNS_WARM"
  time_runs ours-warm-skopeo "client_reset" "$SK copy -q --src-tls-verify=false docker://$OURS/$IMG dir:$W/dir-out" "$RUNS_WARM"
  reset_peer; concurrent peer-concurrent "$PEER"
  reset_ours; concurrent ours-concurrent "$OURS"
  $X curl -sf "http://$OURS/metrics" | grep -E '^podfleet_cache_(misses|coalesced|upstream_bytes|hits)' | tee -a "$W/results.txt"
  log "RSS after the run: ours $(ps -o rss= -p "$(cat "$W/pids/ours.pid")") KiB, peer $(ps -o rss= -p "$(cat "$W/pids/peer.pid")") KiB"
  python3 - "$W/results.txt" <<'PY' | tee -a "$W/results.txt"
import re, sys
text = open(sys.argv[1]).read()
def mean(name): return float(re.search(rf"RESULT {name}: mean ([0-9.]+)s", text).group(1))
def per_run_bytes(name): return float(re.search(rf"RESULT {name}: .*upstream bytes/run ([0-9,]+)", text).group(1).replace(",", ""))
def conc(name):
    m = re.search(rf"RESULT {name}: 4 concurrent cold skopeo copies ([0-9.]+) s, failed clients (\d+), upstream bytes (\d+)", text)
    return float(m.group(1)), int(m.group(2)), int(m.group(3))
image = per_run_bytes("direct")
print("SUMMARY (shaped upstream; lower time is better)")
print(f"  cold pull  / direct:          ours {mean('ours-cold') / mean('direct'):.2f}x   peer {mean('peer-cold') / mean('direct'):.2f}x   (aim ours <= 1.1x)")
print(f"  upstream bytes per cold pull: ours {per_run_bytes('ours-cold') / image:.2f}x image   peer {per_run_bytes('peer-cold') / image:.2f}x image")
print(f"  warm podman pull: peer / ours = {mean('peer-warm') / mean('ours-warm'):.2f}x   (aim >= 2x)")
print(f"  warm skopeo copy: peer / ours = {mean('peer-warm-skopeo') / mean('ours-warm-skopeo'):.2f}x")
for who in ("ours", "peer"):
    t, fails, b = conc(f"{who}-concurrent")
    print(f"  4 concurrent cold clients, {who}: {t:.2f} s, {b / image:.2f}x image bytes from upstream, {fails} failed")
PY
}

teardown() {
  stop_srv ours; stop_srv peer; stop_srv upstream
  ip netns list | grep -qw "$NSNAME" && ip netns del "$NSNAME" || true
  log "teardown: servers stopped, namespace removed (scratch kept in $W)"
}

case "${1:-all}" in
  setup) setup ;;
  measure) measure ;;
  teardown) teardown ;;
  all) trap teardown EXIT; setup; measure ;;
  *) echo "usage: $0 [all|setup|measure|teardown]" >&2; exit 2 ;;
esac
