#!/usr/bin/env bash
# Checks the units in systemd/ offline, in a second or two:
#   systemd-analyze verify     denokv.service and denokv.socket parse, and pair up
#   systemd-analyze security   the service's exposure is at most 2.0 ("OK")
#   systemd-sysusers, systemd-tmpfiles   the snippets create the user and the directories
# (in a scratch root). Needs the Debian package `systemd`; runs without systemd as PID 1.
# ExecStart must name an existing executable for verify: the built binary ($DENOKV_BIN, else
# $CARGO_TARGET_DIR/debug/denokv; a debug build is enough). Without one the check fails: build
# first (cargo build -p denokv).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
UNITS="$ROOT/systemd"
MAX_EXPOSURE=20 # systemd-analyze counts tenths: 20 is an exposure of 2.0

for tool in systemd-analyze systemd-sysusers systemd-tmpfiles; do
  command -v "$tool" >/dev/null || { echo "check-units: $tool is missing (apt-get install systemd)" >&2; exit 1; }
done

bin="${DENOKV_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/denokv/target}/debug/denokv}"
[ -x "$bin" ] || { echo "check-units: no server binary at $bin (cargo build -p denokv, or set DENOKV_BIN)" >&2; exit 1; }

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
cp "$UNITS/denokv.service" "$UNITS/denokv.socket" "$scratch/"
sed -i "s#^ExecStart=/usr/bin/denokv #ExecStart=$bin #" "$scratch/denokv.service"
grep -q "^ExecStart=$bin " "$scratch/denokv.service" || { echo "check-units: ExecStart is not /usr/bin/denokv ..." >&2; exit 1; }

echo "check-units: systemd-analyze verify"
# verify prints problems but may still exit 0 for some of them: any output fails.
out="$(systemd-analyze verify --man=no "$scratch/denokv.service" "$scratch/denokv.socket" 2>&1)" || { echo "$out" >&2; exit 1; }
if [ -n "$out" ]; then echo "$out" >&2; exit 1; fi

echo "check-units: systemd-analyze security (offline)"
security="$(systemd-analyze security --offline=true --threshold="$MAX_EXPOSURE" "$scratch/denokv.service" 2>&1)" || {
  echo "$security" >&2
  echo "check-units: the exposure of denokv.service is over $((MAX_EXPOSURE / 10)).$((MAX_EXPOSURE % 10))" >&2
  exit 1
}
echo "$security" | grep "Overall exposure level"

# Settings the daemon relies on, which verify cannot know about.
# shellcheck disable=SC2016 # $MAINPID is systemd's, not the shell's
for setting in 'Type=notify' 'NotifyAccess=main' 'WatchdogSec=' 'ExecReload=/bin/kill -HUP $MAINPID' \
  'LoadCredential=access-token:/etc/denokv/access-token' 'StateDirectory=denokv' \
  'LoadCredential=aws-credentials:/etc/denokv/aws-credentials' \
  'SystemCallFilter=io_uring_setup io_uring_enter io_uring_register sched_setaffinity'; do
  grep -qF "$setting" "$UNITS/denokv.service" || { echo "check-units: denokv.service lacks $setting" >&2; exit 1; }
done
grep -qx 'ListenStream=4512' "$UNITS/denokv.socket" || { echo "check-units: denokv.socket does not listen on 4512" >&2; exit 1; }

echo "check-units: sysusers.d and tmpfiles.d in a scratch root"
root="$scratch/root"
mkdir -p "$root/etc" "$root/var/lib"
systemd-sysusers --root="$root" "$ROOT/systemd/sysusers.d/denokv.conf"
grep -q '^denokv:x:[0-9]*:[0-9]*:.*:/var/lib/denokv:/usr/sbin/nologin$' "$root/etc/passwd" \
  || { echo "check-units: sysusers did not create the denokv user:" >&2; cat "$root/etc/passwd" >&2; exit 1; }
systemd-tmpfiles --root="$root" --create "$ROOT/systemd/tmpfiles.d/denokv.conf"
uid="$(awk -F: '$1 == "denokv" { print $3 }' "$root/etc/passwd")"
[ "$(stat -c '%a %u' "$root/var/lib/denokv")" = "700 $uid" ] \
  || { echo "check-units: /var/lib/denokv is $(stat -c '%a %u' "$root/var/lib/denokv"), want 700 $uid" >&2; exit 1; }
[ -d "$root/etc/denokv" ] || { echo "check-units: tmpfiles did not create /etc/denokv" >&2; exit 1; }
# The unit's aws-credentials credential must exist, or systemd does not start the service.
[ "$(stat -c '%a %u %s' "$root/etc/denokv/aws-credentials" 2>&1)" = "600 0 0" ] \
  || { echo "check-units: /etc/denokv/aws-credentials: $(stat -c '%a %u %s' "$root/etc/denokv/aws-credentials" 2>&1), want an empty 600 root file" >&2; exit 1; }

echo "check-units: ok"
