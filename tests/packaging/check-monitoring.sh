#!/usr/bin/env bash
# Checks the shipped monitoring files: the alert rules load in Prometheus (promtool), the
# Grafana dashboard is valid JSON, and every denokv_* metric either of them names is one the
# server exports (daemon/src/metrics.rs), so a renamed metric cannot silently empty a panel.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
command -v promtool >/dev/null || { echo "check-monitoring: promtool missing (apt-get install prometheus)"; exit 1; }
promtool check rules packaging/prometheus/denokv-alerts.yml
python3 - <<'PY'
import json, re, sys
exported = set(re.findall(r'"(denokv_[a-z_]+)"', open("daemon/src/metrics.rs").read()))
dash = json.load(open("packaging/grafana/denokv-dashboard.json"))
used = set()
for text in [json.dumps(dash), open("packaging/prometheus/denokv-alerts.yml").read()]:
    used |= {re.sub(r'_(bucket|sum|count)$', '', m) for m in re.findall(r'denokv_[a-z_]+', text)}
used.discard("denokv_")
missing = sorted(m for m in used if m not in exported)
if missing:
    sys.exit(f"check-monitoring: metrics used but not exported: {missing}")
print(f"check-monitoring: dashboard has {len(dash['panels'])} panels; {len(used)} metrics used, all exported")
PY
