#!/usr/bin/env bash
# Runs podfleet's whole test suite on this host: prepares the host (packages, Podman quirks,
# locally built images), then every unit, integration and end-to-end test. As root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-host.sh
command -v cargo >/dev/null || { echo "test: cargo is missing: install a Rust toolchain (1.89 or newer)" >&2; exit 1; }
# End-to-end tests create instance users and sshds; run them one at a time beside the rest.
cargo test --workspace --no-fail-fast -- --test-threads=2
