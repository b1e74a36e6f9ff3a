#!/usr/bin/env bash
# Prepares this host (Debian 12, as root) for podfleet: packages, the host fixes from
# shared/host-notes.md where this host needs them, and the locally built images the demo
# and the tests use. Idempotent: a second run changes nothing and builds nothing.
set -euo pipefail

log() { printf 'setup-host: %s\n' "$*"; }
die() { printf 'setup-host: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (it installs packages and configures Podman)"
[ -r /etc/debian_version ] || die "only Debian/Ubuntu hosts are supported by this script"

# Debian 12's Podman networks through CNI: without its dnsname plugin no service is reachable
# by alias on a job's network (Podman itself does not pull it in with --no-install-recommends).
PACKAGES=(podman runc crun uidmap slirp4netns fuse-overlayfs openssh-server mmdebstrap
  busybox-static docker-registry skopeo sshpass procps psmisc iproute2 git ca-certificates curl
  openssl bc python3 python3-venv systemd unzip binutils
  golang-github-containernetworking-plugin-dnsname)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  # docker-registry and ssh start their own services where systemd runs; podfleet starts
  # what it needs itself, so nothing here relies on them running.
fi
# The dial-stdio path (FF_USE_DOCKER_AUTOSCALER_DIAL_STDIO) runs `docker system dial-stdio` on
# the instance: a Docker CLI must exist. Debian ships it in docker.io; never start its daemon.
if ! command -v docker >/dev/null 2>&1; then
  log "installing the docker CLI (docker.io, daemon left stopped)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker.io >/dev/null
  systemctl disable --now docker.service docker.socket >/dev/null 2>&1 || true
fi

# The S3 cache tests run against moto's server mode (PyPI `moto[server]`), kept in its own venv.
if ! command -v moto_server >/dev/null 2>&1; then
  log "installing moto[server] from PyPI into /opt/podfleet-moto (the S3 stand-in for cache tests)"
  python3 -m venv /opt/podfleet-moto
  /opt/podfleet-moto/bin/pip install --quiet 'moto[server]'
  ln -sf /opt/podfleet-moto/bin/moto_server /usr/local/bin/moto_server
fi

# --- Podman quirks, applied only where detected -------------------------------------------
conf=/etc/containers/containers.conf
want_runtime=""
if [ -d /sys/fs/cgroup/unified ] || ! [ -f /sys/fs/cgroup/cgroup.controllers ]; then
  want_runtime="runc" # crun refuses hybrid/v1 cgroups
fi
hard_nofile=$(ulimit -Hn)
want_ulimits=""
if [ "$hard_nofile" != unlimited ] && [ "$hard_nofile" -lt 1048576 ]; then
  soft=$(( hard_nofile < 16384 ? hard_nofile : 16384 ))
  want_ulimits="\"nofile=${soft}:${soft}\", \"nproc=16384:16384\""
fi
if [ -n "$want_runtime$want_ulimits" ]; then
  tmp=$(mktemp)
  {
    echo "# written by podfleet scripts/setup-host.sh: host quirks detected at setup"
    echo "[containers]"
    [ -n "$want_ulimits" ] && echo "default_ulimits = [$want_ulimits]"
    echo "[engine]"
    [ -n "$want_runtime" ] && echo "runtime = \"$want_runtime\""
  } >"$tmp"
  if ! cmp -s "$tmp" "$conf" 2>/dev/null; then
    log "writing $conf (runtime=${want_runtime:-default}, hard nofile=$hard_nofile)"
    mkdir -p /etc/containers && install -m 0644 "$tmp" "$conf"
  fi
  rm -f "$tmp"
fi
# rootless networking (slirp4netns) needs a usable /dev/net/tun
if [ -c /dev/net/tun ] && [ "$(stat -c %a /dev/net/tun)" != 666 ]; then
  log "chmod 0666 /dev/net/tun (rootless slirp4netns)"
  chmod 0666 /dev/net/tun
fi
if [ -c /dev/fuse ] && [ "$(stat -c %a /dev/fuse)" != 666 ]; then
  log "chmod 0666 /dev/fuse (rootless fuse-overlayfs)"
  chmod 0666 /dev/fuse
fi

# --- Images, built locally once ----------------------------------------------------------
CACHE=${PODFLEET_IMAGE_CACHE:-/var/tmp/podfleet-images}
mkdir -p "$CACHE"

image_exists() { podman image exists "$1" 2>/dev/null; }

build_busybox() {
  local name=localhost/podfleet/busybox:latest
  image_exists "$name" && return 0
  log "building $name from busybox-static"
  local root; root=$(mktemp -d)
  mkdir -p "$root/bin" "$root/tmp" "$root/etc" "$root/root"
  cp /bin/busybox "$root/bin/busybox"
  for applet in $("$root/bin/busybox" --list); do
    [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
  done
  chmod 1777 "$root/tmp"
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$root/etc/passwd"
  printf 'root:x:0:\nnobody:x:65534:\n' >"$root/etc/group"
  tar -C "$root" -cf "$CACHE/busybox.tar" .
  rm -rf "$root"
  podman import --quiet --change 'CMD ["/bin/sh"]' --change 'ENV PATH=/bin' "$CACHE/busybox.tar" "$name" >/dev/null
}

# Debian root filesystem with Podman inside, for the privileged Podman-in-Podman runner.
build_pinp() {
  local name=localhost/podfleet/podman:latest
  image_exists "$name" && return 0
  local tarball="$CACHE/podman-rootfs.tar"
  if [ ! -s "$tarball" ]; then
    log "building the Podman-in-Podman root filesystem with mmdebstrap (about a minute)"
    mmdebstrap --quiet --format=tar --variant=minbase \
      --include=podman,crun,runc,uidmap,fuse-overlayfs,ca-certificates,iproute2,busybox-static \
      --customize-hook='mkdir -p "$1/etc/containers"' \
      --customize-hook='printf "[containers]\ncgroups = \"disabled\"\nnetns = \"host\"\ndefault_ulimits = []\n[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\nruntime = \"crun\"\n" > "$1/etc/containers/containers.conf"' \
      --customize-hook='printf "[storage]\ndriver = \"vfs\"\nrunroot = \"/run/containers/storage\"\ngraphroot = \"/var/lib/containers/storage\"\n" > "$1/etc/containers/storage.conf"' \
      --customize-hook='rm -rf "$1/var/cache/apt/archives"/*.deb "$1/var/lib/apt/lists"/*' \
      bookworm "$tarball.part" http://deb.debian.org/debian
    mv "$tarball.part" "$tarball"
  fi
  log "importing $name"
  podman import --quiet --change 'CMD ["/bin/bash"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    "$tarball" "$name" >/dev/null
}

build_busybox
if [ "${PODFLEET_SKIP_PINP_IMAGE:-0}" != 1 ]; then build_pinp; fi
log "host ready"
