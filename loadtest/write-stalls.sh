#!/bin/bash
# Write stalls and WAL growth on a large database: builds take turns, each serving DB under
# `denokv-loadtest write --proto h2 --concurrency 64` while the WAL file's size is sampled
# every 20 ms. Prints writes/s, server CPU per 1k writes, latency percentiles and the largest
# WAL file per run.
#
#   loadtest/write-stalls.sh DB ROUNDS NAME=BINARY...
#
# KEYS (default 10000000): the key space written. DB: a database file of that many keys (perf-report.py leaves keys-10000000.sqlite under
# $CARGO_TARGET_DIR/perf-report/dbs). It is written to; it is read through first so that the
# runs measure the page cache, not the disk.
set -euo pipefail
DB=$1 ROUNDS=$2
shift 2
LT=${CARGO_TARGET_DIR:-$HOME/.cache/denokv/target}/release/denokv-loadtest
KEYS=${KEYS:-10000000}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
cat "$DB" >/dev/null
for r in $(seq 1 "$ROUNDS"); do
  for variant in "$@"; do
    name=${variant%%=*} bin=${variant#*=}
    DENO_KV_ACCESS_TOKEN=tok0123456789abcdef "$bin" --sqlite-path "$DB" serve \
      --addr 127.0.0.1:4601 --metrics-addr off --threads 2 >"$OUT/log" 2>&1 &
    pid=$!
    sleep 1
    (
      largest=0
      while kill -0 $pid 2>/dev/null; do
        size=$(stat -c %s "$DB-wal" 2>/dev/null || echo 0)
        if [ "$size" -gt "$largest" ]; then largest=$size; echo $largest >"$OUT/wal"; fi
        sleep 0.02
      done
    ) &
    sampler=$!
    "$LT" write --url http://127.0.0.1:4601 --token tok0123456789abcdef --proto h2 \
      --concurrency 64 --keys "$KEYS" --duration 8s --warmup 1s --server-pid $pid \
      --format json --json "$OUT/run.json" >/dev/null 2>&1 || true
    kill -TERM $pid
    wait $pid || true
    wait $sampler || true
    python3 - "$OUT" "$r" "$name" <<'PY'
import json, sys
out, r, name = sys.argv[1:]
d = json.load(open(f"{out}/run.json"))
l = d["latency_ms"]["write"]
wal = int(open(f"{out}/wal").read()) / 2**20
print(f"round {r} {name}: {d['ops_per_sec']:.0f} writes/s, "
      f"{d['server_cpu_ms_per_1k_ops']:.1f} ms CPU per 1k, p50 {l['p50']} p99 {l['p99']} "
      f"p99.9 {l['p999']} max {l['max']} ms, largest WAL {wal:.0f} MiB")
PY
  done
done
