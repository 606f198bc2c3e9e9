#!/usr/bin/env bash
# End-to-end tests of the denokv server driven by real clients:
#   1. the Deno CLI (`deno test -A --unstable-kv tests/e2e/deno/`), KV Connect over h2c
#   2. the npm client @deno/kv under Node (`node --test tests/e2e/node/`), over HTTP/1.1
#
# Needs: Node >= 20 with npm (the npm registry is the only network access used).
# Installs the Deno CLI and @deno/kv from npm into $E2E_CACHE (kept between runs).
#
# Environment:
#   DENOKV_BIN     server binary (default ${CARGO_TARGET_DIR:-$HOME/.cache/denokv/target}/debug/denokv)
#   E2E_CACHE      install cache (default $HOME/.cache/denokv/e2e)
#   E2E_TARGET     "server" (default) or "local": run the Deno suite against Deno's own
#                  local KV (no server needed; server-only tests are skipped; Node suite skipped)
#   E2E_SUITES     "deno node" (default), or just one of them
#   E2E_DENO_VERSION / E2E_DENO_KV_VERSION   npm versions to install (defaults below)
# Extra arguments are passed to `deno test` (e.g. --filter watch).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
E2E_CACHE="${E2E_CACHE:-$HOME/.cache/denokv/e2e}"
DENO_VERSION="${E2E_DENO_VERSION:-2.9.6}"
DENO_KV_VERSION="${E2E_DENO_KV_VERSION:-0.14.0}"
DENOKV_BIN="${DENOKV_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/denokv/target}/debug/denokv}"
E2E_TARGET="${E2E_TARGET:-server}"
E2E_SUITES="${E2E_SUITES:-deno node}"

log() { printf '[e2e] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 2; }

command -v node >/dev/null || die "node is not installed (need Node >= 20 with npm)"
command -v npm >/dev/null || die "npm is not installed"
node_major="$(node -p 'process.versions.node.split(".")[0]')"
[ "$node_major" -ge 20 ] || die "Node >= 20 required, found $(node --version)"

# --- install the Deno CLI and @deno/kv from npm (cached) -------------------------
mkdir -p "$E2E_CACHE"
want_pkg="{\"name\":\"denokv-e2e-deps\",\"private\":true,\"dependencies\":{\"deno\":\"$DENO_VERSION\",\"@deno/kv\":\"$DENO_KV_VERSION\"}}"
stamp="$E2E_CACHE/.installed"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want_pkg" ] || [ ! -d "$E2E_CACHE/node_modules/@deno/kv" ]; then
  log "installing deno@$DENO_VERSION and @deno/kv@$DENO_KV_VERSION from npm into $E2E_CACHE"
  printf '%s\n' "$want_pkg" > "$E2E_CACHE/package.json"
  rm -f "$stamp"
  (cd "$E2E_CACHE" && npm install --no-audit --no-fund --loglevel=error) >&2 \
    || die "npm install failed"
  printf '%s' "$want_pkg" > "$stamp"
fi

find_deno() {
  local c
  # the platform package carries the binary; the wrapper package may hold a copy
  for c in "$E2E_CACHE"/node_modules/@deno/linux-*/deno "$E2E_CACHE/node_modules/deno/deno"; do
    if [ -x "$c" ] && "$c" --version >/dev/null 2>&1; then echo "$c"; return 0; fi
  done
  # last resort: the npm wrapper (runs its own install step on first use)
  if [ -f "$E2E_CACHE/node_modules/deno/bin.cjs" ]; then
    node "$E2E_CACHE/node_modules/deno/bin.cjs" --version >/dev/null 2>&1 || true
    c="$E2E_CACHE/node_modules/deno/deno"
    if [ -x "$c" ] && "$c" --version >/dev/null 2>&1; then echo "$c"; return 0; fi
  fi
  return 1
}
DENO="$(find_deno)" || die "no working deno binary under $E2E_CACHE/node_modules (delete $E2E_CACHE and retry)"
log "deno: $DENO ($("$DENO" --version | head -1))"

export DENO_DIR="$E2E_CACHE/deno_dir"
export DENO_NO_UPDATE_CHECK=1
export DENO_NO_PROMPT=1
export NO_COLOR=1
export E2E_TARGET
export E2E_NODE_MODULES="$E2E_CACHE/node_modules"
export E2E_DENO="$DENO"
export PATH="$(dirname "$DENO"):$PATH"

if [ "$E2E_TARGET" = "server" ]; then
  [ -x "$DENOKV_BIN" ] || die "server binary not found at $DENOKV_BIN (cargo build, or set DENOKV_BIN)"
  DENOKV_BIN="$(cd "$(dirname "$DENOKV_BIN")" && pwd)/$(basename "$DENOKV_BIN")"
  export DENOKV_BIN
  log "server: $DENOKV_BIN"
fi

# Every server a test starts is recorded here, so none outlives this script even if
# a test runner is killed by the time limits below.
export E2E_PID_FILE="$(mktemp "${TMPDIR:-/tmp}/denokv-e2e-pids.XXXXXX")"
cleanup() {
  local pid
  if [ -f "$E2E_PID_FILE" ]; then
    while read -r pid; do
      [ -n "$pid" ] || continue
      if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q -- "--sqlite-path"; then
        log "killing leftover server pid $pid"
        kill -KILL "$pid" 2>/dev/null || true
      fi
    done < "$E2E_PID_FILE"
    rm -f "$E2E_PID_FILE"
  fi
}
trap cleanup EXIT

cd "$ROOT"
deno_rc=skipped
node_rc=skipped

out_dir="$(mktemp -d "${TMPDIR:-/tmp}/denokv-e2e-out.XXXXXX")"
# count WORD LINE: the number before WORD in LINE, or 0
count() { local n; n="$(sed -nE "s/.* ([0-9]+) $1.*/\\1/p" <<<"$2" | head -1)"; echo "${n:-0}"; }
passed=0 failed=0 skipped=0

if [[ " $E2E_SUITES " == *" deno "* ]]; then
  log "running Deno suite (target: $E2E_TARGET)"
  set +e
  timeout -k 10 900 "$DENO" test -A --unstable-kv "$@" tests/e2e/deno/ 2>&1 | tee "$out_dir/deno.log"
  deno_rc=${PIPESTATUS[0]}
  set -e
  # closing line: "ok | 47 passed | 0 failed | 3 ignored (14s)"
  line="$(grep -E '^(ok|FAILED) \| [0-9]+ passed' "$out_dir/deno.log" | tail -1 || true)"
  passed=$((passed + $(count passed "$line")))
  failed=$((failed + $(count failed "$line")))
  skipped=$((skipped + $(count ignored "$line")))
  if [ "$deno_rc" != 0 ] && [ -z "$line" ]; then failed=$((failed + 1)); fi
fi

if [[ " $E2E_SUITES " == *" node "* ]]; then
  if [ "$E2E_TARGET" = "server" ]; then
    log "running Node suite (@deno/kv)"
    set +e
    timeout -k 10 600 node --test tests/e2e/node/ 2>&1 | tee "$out_dir/node.log"
    node_rc=${PIPESTATUS[0]}
    set -e
    n_pass="$(sed -nE 's/^# pass ([0-9]+)$/\1/p' "$out_dir/node.log" | tail -1)"
    n_fail="$(sed -nE 's/^# fail ([0-9]+)$/\1/p' "$out_dir/node.log" | tail -1)"
    n_skip="$(sed -nE 's/^# skipped ([0-9]+)$/\1/p' "$out_dir/node.log" | tail -1)"
    passed=$((passed + ${n_pass:-0}))
    failed=$((failed + ${n_fail:-0}))
    skipped=$((skipped + ${n_skip:-0}))
    if [ "$node_rc" != 0 ] && [ -z "$n_fail" ]; then failed=$((failed + 1)); fi
  else
    log "Node suite needs the server: skipped with E2E_TARGET=$E2E_TARGET"
  fi
fi
rm -rf "$out_dir"

log "deno suite: exit $deno_rc; node suite: exit $node_rc"
echo "e2e: $passed passed, $failed failed, $skipped skipped"
for rc in "$deno_rc" "$node_rc"; do
  if [ "$rc" != skipped ] && [ "$rc" != 0 ]; then exit 1; fi
done
exit 0
