#!/usr/bin/env bash
# Per-job overhead of podfleet's whole path against raw `podman run` of the same image by the
# same instance user. Not a test: it prints figures.
#
#   bench/overhead.sh [N]      (default N = 10; as root, after scripts/setup-host.sh)
#
# podfleet side: a pipeline of N+1 sequential jobs (`true` in busybox, GIT_STRATEGY none) on
# one local instance (max_use_count unlimited), timed by the embedded coordinator from job
# start to final update (the report's started_at/finished_at): accept, acquire, SSH, Docker
# API, volume, container, trace upload, cleanup. The first job also waits for the instance to
# be created and is reported apart. Two runs: without and with FF_NETWORK_PER_BUILD=1 (the
# report's config and podfleet's embedded default). A job without services runs on its own
# slirp4netns stack either way (podfleet creates the per-build network only for jobs with
# services), which is what `podman run` does for an instance user by default.
# Peer, N times as that instance user, wall time each: `podman run --rm IMAGE true`.
set -euo pipefail
N=${1:-10}
cd "$(dirname "$0")/.."
cargo build --quiet --release -p podfleet
BIN=${CARGO_TARGET_DIR:-target}/release/podfleet
IMAGE=localhost/podfleet/busybox:latest
mkdir -p /var/lib/podfleet && WORK=$(mktemp -d /var/lib/podfleet/bench.XXXXXX) && chmod 0755 "$WORK"
trap 'rm -rf "$WORK"' EXIT

config() { # $1 = delete_instances_on_shutdown, $2 = FF_NETWORK_PER_BUILD
  cat <<TOML
concurrent = 1
check_interval = 1
[[runners]]
name = "bench"
url = "http://127.0.0.1/"
token = "glrt-bench-token"
executor = "docker-autoscaler"
shell = "sh"
run_untagged = true
environment = ["FF_NETWORK_PER_BUILD=$2", "FF_USE_DOCKER_AUTOSCALER_DIAL_STDIO=false"]
[runners.docker]
image = "$IMAGE"
pull_policy = "if-not-present"
[runners.autoscaler]
plugin = "local"
max_instances = 1
delete_instances_on_shutdown = $1
update_interval_when_expecting = "200ms"
[runners.autoscaler.plugin_config]
name = "bench"
state_dir = "$WORK/state"
images = ["$IMAGE"]
[[runners.autoscaler.policy]]
idle_time = "30m0s"
TOML
}
mkdir -p "$WORK/project"
config false false >"$WORK/default.toml"
config false true >"$WORK/per-build.toml"
config true false >"$WORK/clean.toml"
{
  for i in $(seq 0 "$N"); do echo "job-$i: { stage: s$i, script: [\"true\"] }"; done
  printf 'stages: ['; for i in $(seq 0 "$N"); do printf 's%s, ' "$i"; done; echo ']'
  # `true` needs no sources: compare the path itself with a raw `podman run`.
  echo 'variables: { GIT_STRATEGY: none }'
} >"$WORK/project/pipeline.yml"

for mode in default per-build; do
  echo "podfleet ($mode network): $((N + 1)) jobs through the whole path..."
  "$BIN" pipeline --file "$WORK/project/pipeline.yml" --config "$WORK/$mode.toml" \
    --report "$WORK/$mode.json" >>"$WORK/pipeline.log" 2>&1 || { tail -30 "$WORK/pipeline.log"; exit 1; }
done
USER_NAME=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["jobs"][0]["instance"])' "$WORK/default.json")
UID_NUM=$(id -u "$USER_NAME")

as_instance() {
  runuser -u "$USER_NAME" -- env -i HOME="/home/$USER_NAME" PATH=/usr/bin:/bin \
    XDG_RUNTIME_DIR="/run/user/$UID_NUM" sh -c "cd; $1" >/dev/null 2>&1
}
peer() { # $1 = output file, $2 = command
  : >"$1"
  for _ in $(seq 1 "$N"); do
    start=$(date +%s%N)
    as_instance "$2"
    echo $(( ($(date +%s%N) - start) / 1000 )) >>"$1"
  done
}
echo "peers: raw podman as $USER_NAME, $N times each..."
peer "$WORK/raw.txt" "podman run --rm $IMAGE true"

# Removing the kept instance uses the manager's own start-up reconciliation: an instance it
# has no record of is deleted; then the one-job cleanup pipeline deletes its own on exit.
printf 'variables: { GIT_STRATEGY: none }\njob-0: { script: ["true"] }\n' >"$WORK/project/one.yml"
"$BIN" pipeline --file "$WORK/project/one.yml" --config "$WORK/clean.toml" >>"$WORK/pipeline.log" 2>&1 || true

python3 - "$WORK" <<'PY'
import json, statistics, sys
from datetime import datetime
work = sys.argv[1]
def secs(job):
    return (datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])).total_seconds()
raw = [int(l) / 1e6 for l in open(f"{work}/raw.txt") if l.strip()]
for mode, peer in (("default", "podman run --rm"), ("per-build", "podman run --rm")):
    jobs = json.load(open(f"{work}/{mode}.json"))["jobs"]
    first, rest = secs(jobs[0]), [secs(j) for j in jobs[1:]]
    med_pf, med_raw = statistics.median(rest), statistics.median(raw)
    print(f"\n{'FF_NETWORK_PER_BUILD=1' if mode == 'per-build' else 'default'}:")
    print(f"  first job (includes creating or adopting the instance): {first:.3f} s")
    print(f"  podfleet whole path, warm instance: median {med_pf:.3f} s over {len(rest)} jobs (min {min(rest):.3f}, max {max(rest):.3f})")
    print(f"  raw {peer}: median {med_raw:.3f} s over {len(raw)} runs (min {min(raw):.3f}, max {max(raw):.3f})")
    print(f"  per-job overhead: {med_pf - med_raw:+.3f} s; ratio podfleet/raw = {med_pf / med_raw:.2f}")
PY
