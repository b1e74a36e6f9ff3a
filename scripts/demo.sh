#!/usr/bin/env bash
# Sets up this host and runs the demo pipeline (examples/demo/.gitlab-ci.yml) on the
# embedded default: the local provider with the report's two runners. As root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-host.sh
cargo build --quiet -p podfleet
exec target/debug/podfleet pipeline --file examples/demo/.gitlab-ci.yml --report target/demo-report.json "$@"
