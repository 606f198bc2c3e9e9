#!/usr/bin/env bash
# Makes the Python the OTLP receiver of daemon/tests/traces.rs runs on: a venv in
# ~/.cache/denokv/otlp-venv with the official opentelemetry-proto package from PyPI (and the
# protobuf runtime it depends on). Does nothing when it is already there.
set -euo pipefail
VENV="${DENOKV_OTLP_VENV:-$HOME/.cache/denokv/otlp-venv}"
if "$VENV/bin/python" -c 'import opentelemetry.proto.collector.trace.v1.trace_service_pb2' 2>/dev/null; then
  exit 0
fi
echo "installing opentelemetry-proto from PyPI into $VENV"
if ! python3 -m venv "$VENV" 2>/dev/null; then
  # Debian's python3 needs the venv module from its own package.
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq python3-venv >/dev/null
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --disable-pip-version-check 'opentelemetry-proto>=1.20'
"$VENV/bin/python" -c 'import opentelemetry.proto.collector.trace.v1.trace_service_pb2'
