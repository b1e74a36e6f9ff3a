#!/usr/bin/env bash
# Runs podfleet's whole test suite on this host: prepares the host (packages, Podman quirks,
# locally built images), then every unit, integration and end-to-end test. As root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-host.sh
command -v cargo >/dev/null || { echo "test: cargo is missing: install a Rust toolchain (1.89 or newer)" >&2; exit 1; }
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Each test binary runs its tests two at a time (end-to-end tests create users and sshds).
status=0
cargo test --workspace --all-targets --no-fail-fast -- --test-threads=2 2>&1 | tee "$log" || status=$?
# One closing line over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "%d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"
