#!/usr/bin/env bash
# `podfleet pipeline` against gitlab-ci-local, side by side, on the same pipeline, the same
# repository and the same image. Not a test: it prints figures.
#
#   bench/pipeline-vs-gitlab-ci-local.sh [ROUNDS]    (default 3; as root, after scripts/setup-host.sh)
#
# Both run cold: podfleet with its embedded default config (a fresh local instance is created
# for the pipeline and deleted after it), gitlab-ci-local with a fresh `.gitlab-ci-local` dir.
# Rounds alternate the two tools; each prints its wall time; medians and the ratio come last.
#
# Peer set-up (done here once, cached under /var/cache/podfleet-bench): npm
# gitlab-ci-local@4.65.1 (later versions need Node 22; Debian 12 has Node 20), rsync, and its
# utility image imported as docker.io/firecow/gitlab-ci-local-util:latest (a Debian root
# filesystem with git and rsync built by mmdebstrap), used with `--container-executable podman`.
set -euo pipefail
ROUNDS=${1:-3}
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=/var/cache/podfleet-bench
IMAGE=localhost/podfleet/busybox:latest
mkdir -p "$CACHE"

command -v rsync >/dev/null || apt-get install -y -qq rsync >/dev/null
GCL=$CACHE/gcl/node_modules/.bin/gitlab-ci-local
if [ ! -x "$GCL" ]; then
  echo "installing gitlab-ci-local@4.65.1 from npm..."
  mkdir -p "$CACHE/gcl"
  (cd "$CACHE/gcl" && npm install --silent --no-audit --no-fund gitlab-ci-local@4.65.1)
fi
if ! podman image exists docker.io/firecow/gitlab-ci-local-util:latest; then
  if [ ! -f "$CACHE/gcl-util.tar" ]; then
    echo "building gitlab-ci-local's utility image with mmdebstrap (about a minute)..."
    mmdebstrap --quiet --format=tar --variant=minbase --include=git,ca-certificates,rsync \
      --customize-hook='rm -rf "$1/var/cache/apt/archives"/*.deb "$1/var/lib/apt/lists"/*' \
      bookworm "$CACHE/gcl-util.tar.part" http://deb.debian.org/debian
    mv "$CACHE/gcl-util.tar.part" "$CACHE/gcl-util.tar"
  fi
  podman import -q "$CACHE/gcl-util.tar" docker.io/firecow/gitlab-ci-local-util:latest >/dev/null
fi

cargo build --quiet --release -p podfleet
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/podfleet

WORK=$(mktemp -d /tmp/podfleet-bench-gcl.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
REPO=$WORK/repo
mkdir -p "$REPO/src"
cd "$REPO"
git init -q -b main
git remote add origin https://gitlab.example.com/bench/pipeline.git
for i in $(seq 1 50); do echo "line $i" >"src/file-$i.txt"; done
cat >.gitlab-ci.yml <<YAML
# A small, typical pipeline: build an artifact, test it twice in parallel, then package.
stages: [build, test, package]
default:
  image: $IMAGE
variables:
  GREETING: hello
build:
  stage: build
  script:
    - mkdir -p out
    - cat src/*.txt > out/all.txt
    - echo "\$GREETING from \$CI_JOB_NAME" >> out/all.txt
  artifacts:
    paths: [out/]
unit:
  stage: test
  script:
    - grep -c line out/all.txt
lint:
  stage: test
  script:
    - test "\$(ls src | wc -l)" -eq 50
package:
  stage: package
  script:
    - tar -cf out/package.tar out/all.txt
    - ls -l out
YAML
git add -A
git -c user.email=bench@example.com -c user.name=bench commit -qm "bench pipeline"

seconds() { python3 -c 'import sys,time; print(f"{time.monotonic():.6f}")'; }
run_podfleet() {
  local start end
  start=$(seconds)
  "$BIN" pipeline </dev/null >"$WORK/podfleet.log" 2>&1 || { tail -40 "$WORK/podfleet.log"; exit 1; }
  end=$(seconds)
  echo "$end - $start" | bc
}
run_gcl() {
  local start end
  rm -rf .gitlab-ci-local
  start=$(seconds)
  "$GCL" --container-executable podman </dev/null >"$WORK/gcl.log" 2>&1 || { tail -40 "$WORK/gcl.log"; exit 1; }
  end=$(seconds)
  echo "$end - $start" | bc
}

podfleet_times=()
gcl_times=()
for round in $(seq 1 "$ROUNDS"); do
  p=$(run_podfleet)
  g=$(run_gcl)
  podfleet_times+=("$p")
  gcl_times+=("$g")
  printf 'round %d: podfleet %6.2f s   gitlab-ci-local %6.2f s\n' "$round" "$p" "$g"
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
mp=$(median "${podfleet_times[@]}")
mg=$(median "${gcl_times[@]}")
echo
echo "4 jobs in 3 stages, image $IMAGE, $ROUNDS rounds, cold start each round:"
printf 'podfleet pipeline  median %6.2f s\n' "$mp"
printf 'gitlab-ci-local    median %6.2f s\n' "$mg"
printf 'ratio (gitlab-ci-local / podfleet): %.2fx\n' "$(echo "$mg / $mp" | bc -l)"
