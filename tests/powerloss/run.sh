#!/usr/bin/env bash
# Power-loss cycles of the real server on powerfs: see run.py --help. Needs root, /dev/fuse and
# the debug builds (cargo build -p denokv -p denokv-loadtest), or DENOKV_BIN/DENOKV_LOADTEST_BIN.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="$("$here/setup.sh")"
exec "$python" "$here/run.py" "$@"
