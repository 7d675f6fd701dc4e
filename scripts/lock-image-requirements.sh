#!/bin/sh
# Regenerates deploy/requirements.lock: every package the worker image installs
# (pyproject's dependencies with the worker, flower and exporter extras), pinned, with the
# hashes of their files, which the Dockerfile's pip install requires.  Run it after
# changing a dependency in pyproject.toml, with pip-tools installed
# (pip install pip-tools), then commit the lock file.  Use Debian bookworm's
# python3 (3.11.2, the oldest 3.11 the image may be built on): pip-compile drops
# the environment markers, so a dependency only older 3.11s need (redis-py's
# async-timeout, for Python < 3.11.3) is in the lock only when it is made there.
set -eu
cd "$(dirname "$0")/.."
CUSTOM_COMPILE_COMMAND="scripts/lock-image-requirements.sh" exec pip-compile --quiet \
    --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
    --extra worker --extra flower --extra exporter --output-file deploy/requirements.lock pyproject.toml
