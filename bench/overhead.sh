#!/usr/bin/env bash
# Per-job overhead of podfleet's whole path against a raw `podman run` of the same image by
# the same instance user. Not a test: it prints figures.
#
#   bench/overhead.sh [N]      (default N = 10; as root, after scripts/setup-host.sh)
#
# podfleet side: a pipeline of N+1 sequential jobs (`true` in busybox) on one local instance
# (max_use_count unlimited), timed by the embedded coordinator from job start to final
# update (the report's started_at/finished_at): poll, accept, acquire, SSH, Docker API,
# per-build network, volume, container, trace upload, cleanup. The first job also waits for
# the instance to be created and is reported apart.
# Peer: `podman run --rm IMAGE true` run N times as that instance user, wall time each.
set -euo pipefail
N=${1:-10}
cd "$(dirname "$0")/.."
cargo build --quiet --release -p podfleet
BIN=${CARGO_TARGET_DIR:-target}/release/podfleet
IMAGE=localhost/podfleet/busybox:latest
mkdir -p /var/lib/podfleet && WORK=$(mktemp -d /var/lib/podfleet/bench.XXXXXX) && chmod 0755 "$WORK"
trap 'rm -rf "$WORK"' EXIT

config() { # $1 = delete_instances_on_shutdown
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
environment = ["FF_NETWORK_PER_BUILD=1", "FF_USE_DOCKER_AUTOSCALER_DIAL_STDIO=false"]
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
config false >"$WORK/keep.toml"
config true >"$WORK/clean.toml"
{
  for i in $(seq 0 "$N"); do echo "job-$i: { stage: s$i, script: [\"true\"] }"; done
  printf 'stages: ['; for i in $(seq 0 "$N"); do printf 's%s, ' "$i"; done; echo ']'
  # `true` needs no sources: compare the path itself with a raw `podman run`.
  echo 'variables: { GIT_STRATEGY: none }'
} >"$WORK/project/pipeline.yml"

echo "podfleet: $((N + 1)) jobs through the whole path..."
"$BIN" pipeline --file "$WORK/project/pipeline.yml" --config "$WORK/keep.toml" --report "$WORK/report.json" >"$WORK/pipeline.log" 2>&1 \
  || { tail -30 "$WORK/pipeline.log"; exit 1; }
USER_NAME=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["jobs"][0]["instance"])' "$WORK/report.json")
UID_NUM=$(id -u "$USER_NAME")

echo "peer: podman run --rm $IMAGE true as $USER_NAME, $N times..."
: >"$WORK/raw.txt"
for _ in $(seq 1 "$N"); do
  start=$(date +%s%N)
  runuser -u "$USER_NAME" -- env -i HOME="/home/$USER_NAME" PATH=/usr/bin:/bin \
    XDG_RUNTIME_DIR="/run/user/$UID_NUM" sh -c "cd; podman run --rm $IMAGE true" >/dev/null 2>&1
  echo $(( ($(date +%s%N) - start) / 1000 )) >>"$WORK/raw.txt"
done

# Removing the kept instance uses the manager's own start-up reconciliation: an instance it
# has no record of is deleted; then the one-job cleanup pipeline deletes its own on exit.
printf 'variables: { GIT_STRATEGY: none }\njob-0: { script: ["true"] }\n' >"$WORK/project/one.yml"
"$BIN" pipeline --file "$WORK/project/one.yml" --config "$WORK/clean.toml" >>"$WORK/pipeline.log" 2>&1 || true

python3 - "$WORK/report.json" "$WORK/raw.txt" <<'PY'
import json, statistics, sys
from datetime import datetime
jobs = json.load(open(sys.argv[1]))["jobs"]
def secs(job):
    return (datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])).total_seconds()
first, rest = secs(jobs[0]), [secs(j) for j in jobs[1:]]
raw = [int(l) / 1e6 for l in open(sys.argv[2]) if l.strip()]
med_pf, med_raw = statistics.median(rest), statistics.median(raw)
print(f"first job (includes creating the instance): {first:.3f} s")
print(f"podfleet whole path, warm instance: median {med_pf:.3f} s over {len(rest)} jobs (min {min(rest):.3f}, max {max(rest):.3f})")
print(f"raw podman run, same user and image:  median {med_raw:.3f} s over {len(raw)} runs (min {min(raw):.3f}, max {max(raw):.3f})")
print(f"per-job overhead: {med_pf - med_raw:+.3f} s; ratio podfleet/raw = {med_pf / med_raw:.2f}")
PY
