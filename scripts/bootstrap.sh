#!/usr/bin/env bash
# Installs everything vmtask needs on a Debian machine, from nothing:
# Debian's redis-server, qemu-utils, qemu-system-x86, docker-compose, docker.io and
# debootstrap when missing, then a virtualenv (.venv) with the Python dependencies.  Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v qemu-img >/dev/null 2>&1 || missing+=(qemu-utils)
# qemu-system-x86 also brings every library Debian's qemu-ga needs: the tests' tiny
# guest copies them from here (workers/devtools/tinyguest.py, which fetches the
# qemu-guest-agent package itself with apt-get download, so no agent service is
# installed on the host).
command -v qemu-system-x86_64 >/dev/null 2>&1 || missing+=(qemu-system-x86)
command -v ldd >/dev/null 2>&1 || missing+=(libc-bin)
command -v dpkg-deb >/dev/null 2>&1 || missing+=(dpkg)
# Compose v1 and Debian's Docker engine, and debootstrap: tests/deployment checks the
# compose files with `docker-compose config`, and test_stack*.py run them under a
# dockerd of their own (as root) with images built from a debootstrap of bookworm.
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
[ -x /usr/sbin/dockerd ] || missing+=(docker.io)
[ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)
# Tools the tests use: pgrep, openssl (test CAs, the VNC handshake), ip (a host bridge).
command -v pgrep >/dev/null 2>&1 || missing+=(procps)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
python3 -c "import ensurepip, venv" >/dev/null 2>&1 || missing+=(python3-venv)
if ((${#missing[@]})); then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "bootstrap: installing ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e '.[test,docs]'
