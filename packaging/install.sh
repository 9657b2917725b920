#!/usr/bin/env bash
# Set up cloudmon from a checkout on Debian/Ubuntu with Python 3.11+:
#   - system libraries Qt needs (and, with --test, the servers and tools the
#     tests start), installed with apt-get only when missing;
#   - a virtual environment in .venv with cloudmon, cloudmon-agent and the
#     desktop extras (with --test: the test tools too).
# Safe to run again: it installs only what is missing.
#
#   bash packaging/install.sh           # to run the console: .venv/bin/cloudmon
#   bash packaging/install.sh --test    # to run the tests:   .venv/bin/python -m pytest
set -euo pipefail

cd "$(dirname "$0")/.."
mode=run
case "${1:-}" in
  "") ;;
  --test) mode=test ;;
  *) echo "usage: bash packaging/install.sh [--test]" >&2; exit 2 ;;
esac

PY=${PYTHON:-python3}
say() { printf '==> %s\n' "$*"; }

if ! command -v "$PY" >/dev/null 2>&1; then
  echo "install.sh: $PY not found. Install Python 3.11 or newer (apt-get install python3) or set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "install.sh: $("$PY" -V 2>&1) is too old; cloudmon needs Python 3.11 or newer (set PYTHON=...)" >&2
  exit 1
fi

# Qt's xcb platform plugin and its GL/font dependencies.
pkgs=(libegl1 libgl1 libfontconfig1 libfreetype6 libxkbcommon0 libxkbcommon-x11-0 libdbus-1-3
      libglib2.0-0 libx11-6 libx11-xcb1 libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1 libxcb-image0
      libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-xinerama0 libxcb-xkb1 libgssapi-krb5-2)
if ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  pyver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  pkgs+=("python${pyver}-venv")
fi
if [ "$mode" = test ]; then
  # Xvfb for the real-window screenshot test, ImageMagick to inspect screenshots,
  # wrk for the collector benchmark.
  pkgs+=(xvfb xauth imagemagick wrk)
  # libvirt (test:/// driver, and real QEMU guests under a libvirtd the tests
  # start), libvirt-python's build deps, Redis for the store/queue tests, and
  # node_exporter as the agent benchmark's reference peer.
  pkgs+=(libvirt-daemon libvirt-daemon-driver-qemu qemu-system-x86 qemu-utils libvirt-clients libvirt-dev pkg-config
         gcc python3-dev redis-server prometheus-node-exporter iproute2)
  # HAProxy for the load-balancer tests (started by the tests through its runtime API).
  pkgs+=(haproxy)
fi

if command -v dpkg-query >/dev/null 2>&1; then
  missing=()
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
      if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
        echo "install.sh: missing system packages: ${missing[*]}; run as root or install sudo" >&2; exit 1
      fi
    fi
    say "installing system packages: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
else
  echo "install.sh: not a Debian/Ubuntu system; make sure Qt's runtime libraries are installed" >&2
fi

if [ ! -x .venv/bin/python ]; then
  say "creating virtual environment .venv"
  "$PY" -m venv .venv
fi
say "installing Python packages into .venv"
.venv/bin/python -m pip install --quiet --upgrade pip
extras="desktop"
[ "$mode" = test ] && extras="desktop,test"
agent_extras=""
[ "$mode" = test ] && agent_extras="[libvirt,gpu]"
.venv/bin/python -m pip install --quiet --progress-bar off -e "./agents$agent_extras" -e ".[$extras]"
say "done: $(.venv/bin/cloudmon --version)"
