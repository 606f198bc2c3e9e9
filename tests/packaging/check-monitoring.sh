#!/usr/bin/env bash
# Checks the shipped monitoring files: the alert rules load in Prometheus (promtool), the
# Grafana dashboard is valid JSON, and every denokv_* metric either of them names is one a
# running server exports (the families in a scrape of the built binary's /metrics), so a
# renamed metric cannot silently empty a panel or an alert.
# Needs the built server: $DENOKV_BIN, else $CARGO_TARGET_DIR/debug/denokv (cargo build -p denokv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
command -v promtool >/dev/null || { echo "check-monitoring: promtool missing (apt-get install prometheus)"; exit 1; }
bin="${DENOKV_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/denokv/target}/debug/denokv}"
[ -x "$bin" ] || { echo "check-monitoring: no server binary at $bin (cargo build -p denokv, or set DENOKV_BIN)" >&2; exit 1; }
promtool check rules packaging/prometheus/denokv-alerts.yml

scratch="$(mktemp -d)"
server=""
replica=""
cleanup() {
  if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
  if [ -n "$replica" ]; then kill "$replica" 2>/dev/null || true; wait "$replica" 2>/dev/null || true; fi
  rm -rf "$scratch"
}
trap cleanup EXIT
# With the backup on (to an address where nothing listens: its metrics exist all the same).
AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=x AWS_REGION=us-east-1 \
RUST_LOG=info "$bin" --sqlite-path "$scratch/db.sqlite" serve --access-token check-monitoring-token \
  --addr 127.0.0.1:0 --metrics-addr 127.0.0.1:0 --threads 1 \
  --backup-to-s3 --s3-bucket check --s3-endpoint http://127.0.0.1:9 2>"$scratch/log" &
server=$!
# A replica (--sync-from-s3) serves its metrics while it waits for S3, which never answers here.
AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=x AWS_REGION=us-east-1 \
RUST_LOG=info "$bin" --sqlite-path "$scratch/replica.sqlite" serve --access-token check-monitoring-token \
  --addr 127.0.0.1:0 --metrics-addr 127.0.0.1:0 --threads 1 \
  --sync-from-s3 --s3-bucket check --s3-endpoint http://127.0.0.1:9 2>"$scratch/replica-log" &
replica=$!

python3 - "$scratch/log" "$server" "$scratch/replica-log" <<'PY'
import json, os, re, sys, time, urllib.error, urllib.request
log_path, pid = sys.argv[1], int(sys.argv[2])
deadline = time.time() + 30
metrics = serving = None
while time.time() < deadline and not (metrics and serving):
    log = open(log_path).read()
    metrics = re.search(r"Metrics on http://(\S+)/metrics", log)
    serving = re.search(r"Listening on http://(\S+)", log)
    if not os.path.exists(f"/proc/{pid}"):
        break
    time.sleep(0.1)
if not (metrics and serving):
    sys.exit("check-monitoring: the server logged no metrics or serving address:\n" + open(log_path).read())
# Labelled families show once they have a child: answer one request first.
try:
    urllib.request.urlopen(f"http://{serving.group(1)}/nope", timeout=10)
except urllib.error.HTTPError:
    pass
scrape = urllib.request.urlopen(f"http://{metrics.group(1)}/metrics", timeout=10).read().decode()
exported = set(re.findall(r"^# TYPE (denokv_[a-z0-9_]+) ", scrape, re.M))
replica_metrics = None
while time.time() < deadline and not replica_metrics:
    replica_metrics = re.search(r"Metrics on http://(\S+)/metrics", open(sys.argv[3]).read())
    time.sleep(0.1)
if not replica_metrics:
    sys.exit("check-monitoring: the replica logged no metrics address:\n" + open(sys.argv[3]).read())
replica_scrape = urllib.request.urlopen(f"http://{replica_metrics.group(1)}/metrics", timeout=10).read().decode()
exported |= set(re.findall(r"^# TYPE (denokv_[a-z0-9_]+) ", replica_scrape, re.M))
if not exported:
    sys.exit("check-monitoring: the scrape has no denokv_* family:\n" + scrape)
dash = json.load(open("packaging/grafana/denokv-dashboard.json"))
used = set()
for text in [json.dumps(dash), open("packaging/prometheus/denokv-alerts.yml").read()]:
    used |= {re.sub(r'_(bucket|sum|count)$', '', m) for m in re.findall(r'denokv_[a-z0-9_]+', text)}
used.discard("denokv_")
missing = sorted(m for m in used if m not in exported)
if missing:
    sys.exit(f"check-monitoring: metrics used but not in a scrape of the server: {missing}")
print(f"check-monitoring: dashboard has {len(dash['panels'])} panels; {len(used)} metrics used, "
      f"all in a scrape of the running server ({len(exported)} denokv_* families)")
PY
