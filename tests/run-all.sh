#!/usr/bin/env bash
# Runs every test of denokv on a fresh Debian machine with Rust:
#   formatting and lints, the Rust unit and integration tests (against the real binary),
#   SIGKILL crash cycles under load (tests/crash/sigkill-cycles.py), power cuts simulated by a
#   FUSE layer (tests/powerloss/; needs root and /dev/fuse), 30 s of mutated HTTP requests against
#   the running server (denokv-loadtest http-fuzz), a bounded run of every fuzz target
#   (tests/fuzz/run.sh, nightly toolchain; installs cargo-fuzz),
#   the end-to-end suites driven by the Deno CLI and the npm @deno/kv client, and the Debian
#   package installed in a booted Debian container (tests/packaging/deb-e2e.sh; needs root).
# Installs what it needs (strace, systemd and prometheus's promtool from Debian; Deno and @deno/kv from npm;
# opentelemetry-proto from PyPI, in a venv under ~/.cache/denokv, for the OTLP receiver of the traces test;
# moto[server] from PyPI, in a venv under ~/.cache/denokv, as the S3 of the backup tests;
# deb-e2e.sh installs debootstrap, systemd-container, lintian and cargo-deb; tests/powerloss/setup.sh
# installs libfuse2 from Debian and fusepy and pytest from PyPI, in a venv under ~/.cache/denokv).
# The build cache lives outside the clone: $CARGO_TARGET_DIR, default ~/.cache/denokv/target.
# DENOKV_SKIP_DEB_E2E=1 skips the package test (it needs root and adds a release build).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/denokv/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

step() { printf '\n=== %s\n' "$*"; }

need_apt=()
command -v strace >/dev/null || need_apt+=(strace)
# openssl makes the test CA and certificates of the TLS tests (daemon/tests/tls.rs, e2e tls_test.ts).
command -v openssl >/dev/null || need_apt+=(openssl)
# systemd-socket-activate (socket activation tests), systemd-analyze (unit checks).
command -v systemd-socket-activate >/dev/null && command -v systemd-analyze >/dev/null || need_apt+=(systemd)
# promtool (package prometheus) checks a /metrics scrape (daemon/tests/metrics.rs).
command -v promtool >/dev/null || need_apt+=(prometheus)
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then need_apt+=(nodejs npm); fi
if [ ${#need_apt[@]} -gt 0 ]; then
  step "installing ${need_apt[*]} from Debian"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# The OTLP receiver that daemon/tests/traces.rs starts runs on this venv.
step "Python venv for the OTLP receiver (opentelemetry-proto)"
tests/otlp/setup.sh

# The S3-compatible server the backup tests (daemon/tests/backup.rs) start: moto, in a venv.
step "Python venv for the S3 server of the backup tests (moto[server])"
tests/s3/setup.sh

# The upstream server, a black box for the file-compatibility and replica tests (cached).
UPSTREAM_ROOT="$HOME/.cache/denokv/upstream"
if [ ! -x "$UPSTREAM_ROOT/bin/denokv" ]; then
  step "installing the upstream denokv server (cargo install denokv --locked)"
  CARGO_TARGET_DIR="$HOME/.cache/denokv/target-upstream" cargo install denokv --locked --root "$UPSTREAM_ROOT"
fi
export DENOKV_UPSTREAM_BIN="$UPSTREAM_ROOT/bin/denokv"

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

# The unit check verifies ExecStart against the built binary, and the monitoring check scrapes a
# running server: build it first.
step "cargo build (the server, for the unit and monitoring checks)"
cargo build -p denokv --bins --locked

step "systemd units: verify, security exposure, sysusers and tmpfiles"
tests/systemd/check-units.sh

step "monitoring: alert rules (promtool) and the Grafana dashboard"
tests/packaging/check-monitoring.sh

step "cargo test"
cargo test --workspace --locked

# cargo test --workspace has just built both binaries (the integration tests run them); they are
# built here only if missing.
step "crash cycles: SIGKILL under load, restart, verify (--wal-writes pwrite and io-uring)"
if [ ! -x "$CARGO_TARGET_DIR/debug/denokv" ] || [ ! -x "$CARGO_TARGET_DIR/debug/denokv-loadtest" ]; then
  cargo build -p denokv -p denokv-loadtest --bins --locked
fi
for wal in pwrite io-uring; do
  python3 tests/crash/sigkill-cycles.py --cycles 5 -- --wal-writes "$wal"
done

step "power cuts: the FUSE layer's own tests, 3 cycles per WAL flavour, the negative control"
tests/powerloss/run-tests.sh
for wal in pwrite io-uring; do
  tests/powerloss/run.sh --cycles 3 --wal-writes "$wal"
done
# Without an fsync per commit, acknowledged writes must be lost: proves the test can fail.
tests/powerloss/run.sh --cycles 3 --sync-mode normal --cut drop --expect-loss

# Mutated requests against the real server (the debug binaries cargo test built): 30 s, exit 1 on a
# 5xx, a hang, a crash, a changed sentinel key or a failed integrity check. The seed changes daily
# (DENOKV_HTTPFUZZ_SEED to repeat one); what it found is saved for `http-fuzz --replay FILE`.
step "http-fuzz: mutated HTTP/1.1, h2 and raw h2 frame requests against a running server for 30 s"
HTTPFUZZ_SEED="${DENOKV_HTTPFUZZ_SEED:-$(( $(date +%s) / 86400 ))}"
"$CARGO_TARGET_DIR/debug/denokv-loadtest" http-fuzz --duration 30s --seed "$HTTPFUZZ_SEED" \
  --server-bin "$CARGO_TARGET_DIR/debug/denokv" --findings "$CARGO_TARGET_DIR/httpfuzz-findings"

# A bounded run (10 s a target); by hand, longer: tests/fuzz/run.sh 600. Its own target dir:
# nightly and sanitizer builds.
step "fuzz: every cargo-fuzz target for 10 s"
CARGO_TARGET_DIR="$HOME/.cache/denokv/target-fuzz" tests/fuzz/run.sh 10

# It adds a release build (fat LTO) and, on an empty cache, cargo-deb and a debootstrap; about a
# minute when ~/.cache/denokv is warm (see the README, "The package test"). Before the e2e suites,
# whose summary line stays the last one printed.
if [ "${DENOKV_SKIP_DEB_E2E:-0}" = 1 ]; then
  step "Debian package in a booted container: skipped (DENOKV_SKIP_DEB_E2E=1)"
else
  step "Debian package: cargo deb, lintian, install/upgrade/purge under systemd in a container"
  tests/packaging/deb-e2e.sh
fi

step "end-to-end: Deno CLI and @deno/kv against the built server"
DENOKV_BIN="$CARGO_TARGET_DIR/debug/denokv" tests/e2e/run.sh
