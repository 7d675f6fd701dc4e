#!/usr/bin/env bash
# Sets everything up from nothing, then runs the whole test suite (lint, types, tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check api workers tests bench
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"
