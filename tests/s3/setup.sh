#!/usr/bin/env bash
# Makes the S3-compatible server the backup and replica tests run against: moto's server mode
# (`moto[server]` from PyPI) in a venv in ~/.cache/denokv/s3-venv. Does nothing when it is
# already there. The tests start it on a free loopback port (daemon/tests/common/moto.rs).
set -euo pipefail
VENV="${DENOKV_S3_VENV:-$HOME/.cache/denokv/s3-venv}"
if [ -x "$VENV/bin/moto_server" ] && "$VENV/bin/python" -c 'import moto.server, flask' 2>/dev/null; then
  exit 0
fi
echo "installing moto[server] from PyPI into $VENV"
if ! python3 -m venv "$VENV" 2>/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq python3-venv >/dev/null
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --disable-pip-version-check 'moto[server]>=5,<6'
"$VENV/bin/python" -c 'import moto.server, flask'
