#!/usr/bin/env bash
# Sets everything up from nothing, then runs the demo: a private Redis and worker,
# real operations with live progress; it leaves nothing running.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/vmtask demo "$@"
