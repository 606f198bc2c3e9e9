#!/usr/bin/env bash
# The file system's own tests (pytest), after setup.sh. Needs root and /dev/fuse.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="$("$here/setup.sh")"
set +e
"$python" -m pytest -q -p no:cacheprovider "$here/test_powerfs.py" "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit "$rc"
