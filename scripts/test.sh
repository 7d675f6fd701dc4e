#!/usr/bin/env bash
# Sets everything up from nothing, then runs the whole test suite (lint, types, the docs, tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check api workers tests bench
.venv/bin/mypy
# The documentation site, built outside the tree: --strict fails on a broken link.
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet --site-dir "$site"
rm -rf "$site"
trap - EXIT
# Two processes: the modules start their own redis-servers and workers on free ports,
# so they share nothing.  "-m 'not slow'" gives the quick subset while working.
# --dist loadgroup: tests marked xdist_group(NAME) run on one process (the real
# Docker engine of tests/deployment/test_stack*.py); the rest are spread as usual.
exec .venv/bin/python -m pytest -q -n 2 --dist loadgroup "$@"
