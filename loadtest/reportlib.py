"""What the report scripts of loadtest/ share: logging, ports, a server's memory, the e2e
suite's Deno CLI, rewriting one marked section of a document, and interleaved rounds of
denokv-loadtest runs (ab-report.py, perf-report.py's lone writer)."""

import glob
import os
import re
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# A lone client's writes, one in flight (denokv-loadtest arguments), by protocol: ab-report.py's
# h1-write-1 and h2-write-1 loads and perf-report.py's lone writer.
LONE_WRITER = {proto: ["write", "--proto", proto, "--concurrency", "1"] for proto in ["h1", "h2"]}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, limit=30):
    deadline = time.time() + limit
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on {port}")


def rss_kib(pid):
    """The resident memory of process `pid`, in KiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1))


def find_deno():
    """The Deno CLI tests/e2e/run.sh installed (from npm, into $E2E_CACHE)."""
    cache = Path(os.environ.get("E2E_CACHE", Path.home() / ".cache/denokv/e2e"))
    for c in glob.glob(str(cache / "node_modules/@deno/linux-*/deno")) + [str(cache / "node_modules/deno/deno")]:
        if os.access(c, os.X_OK):
            return c
    raise SystemExit("no Deno: run tests/e2e/run.sh once (it installs Deno from npm)")


def write_section(path, begin, end, title, text):
    """Replaces what lies between the markers `begin` and `end` in the document at `path` with
    `text`; a document without them gets a new section `title` at its end."""
    doc = path.read_text() if path.exists() else ""
    if begin not in doc:
        doc += f"\n## {title}\n\n{begin}\n{end}\n"
    doc = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: f"{begin}\n{text}\n{end}", doc, flags=re.S)
    path.write_text(doc)


def raise_open_files(need):
    """Lifts the soft open-files limit to the hard one; exits when that is below `need`."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < need:
        raise SystemExit(f"the open files limit ({hard}) is below {need}")


def release_binary():
    """The release server in $CARGO_TARGET_DIR (default ~/.cache/denokv/target)."""
    target = Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache/denokv/target"))
    return target / "release/denokv"


def gen_db(loadtest, path, keys):
    """Writes `keys` keys of the load generator's key space into a new database at `path` with
    `denokv-loadtest gen-db` (the binary `loadtest`)."""
    subprocess.run([str(loadtest), "gen-db", "--path", str(path), "--keys", str(keys)],
                   check=True, stdout=subprocess.DEVNULL)


def interleaved(rounds, variants):
    """(round, variant) for `rounds` rounds of every one of `variants`, each round in the
    reverse order of the round before (A B, B A, A B, ...), so that drift in the machine's
    other work falls on every variant alike."""
    for r in range(rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            yield r, v


def summary(report):
    """ops/s, p50 and p99 ms, server and client CPU µs per operation and errors of a
    denokv-loadtest JSON report (its `all` latencies, else its first kind)."""
    lm = report.get("latency_ms") or {}
    lat = lm.get("all") or next(iter(lm.values()), {})
    return {"ops": report.get("ops_per_sec"), "p50": lat.get("p50"), "p99": lat.get("p99"),
            "server": report.get("server_cpu_ms_per_1k_ops"),
            "client": report.get("client_cpu_ms_per_1k_ops"),
            "errors": report.get("error_total", 0)}


def median_of(rows, key):
    """The median of `key` over the dicts in `rows` that have it, or None."""
    vals = [x[key] for x in rows if x.get(key) is not None]
    return statistics.median(vals) if vals else None
