#!/usr/bin/env bash
# Installs what the power-loss test needs on Debian 12, and does nothing when it is there:
# libfuse2 (the C library fusepy binds with ctypes; as root it mounts without fusermount) and a
# venv in ~/.cache/denokv/powerloss-venv with fusepy (pure Python, no compiler needed) and
# pytest. Prints the venv's python.
set -euo pipefail
VENV="${DENOKV_POWERLOSS_VENV:-$HOME/.cache/denokv/powerloss-venv}"
have_libfuse() {
  local f
  for f in /usr/lib/*/libfuse.so.2 /lib/*/libfuse.so.2; do
    [ -e "$f" ] && return 0
  done
  return 1
}
updated=
apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  if [ -z "$updated" ]; then
    apt-get update -qq
    updated=1
  fi
  apt-get install -y -qq "$@" >/dev/null
}
if ! have_libfuse; then
  echo "installing libfuse2 (apt)" >&2
  apt_install libfuse2
fi
if [ ! -e /dev/fuse ]; then
  echo "no /dev/fuse: this machine cannot mount FUSE file systems" >&2
  exit 1
fi
if ! "$VENV/bin/python" -c 'import fuse, pytest' 2>/dev/null; then
  echo "installing fusepy and pytest from PyPI into $VENV" >&2
  if ! python3 -m venv "$VENV" 2>/dev/null; then
    # Debian's python3 needs the venv module from its own package.
    apt_install python3-venv
    python3 -m venv "$VENV"
  fi
  "$VENV/bin/pip" install -q --disable-pip-version-check 'fusepy==3.0.1' 'pytest>=7'
  "$VENV/bin/python" -c 'import fuse, pytest'
fi
echo "$VENV/bin/python"
