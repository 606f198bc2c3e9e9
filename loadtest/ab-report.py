#!/usr/bin/env python3
"""Interleaved A/B runs of denokv builds and flags on this machine, for changes whose effect is
smaller than the noise of a shared machine: every round runs every variant on every load, in
alternating order, and the table gives the median of the rounds with their range.

    loadtest/ab-report.py --variant before=/path/denokv --variant 'after=/path/denokv' \\
        --load one-conn-t1 --load one-conn-t2 --rounds 5

A variant is LABEL=BINARY[ ARGS...] (extra server arguments after the binary);
--upstream LABEL=BINARY adds the upstream server as a variant (its own defaults; no metrics,
so it takes no h2load loads and shows no share handed over). The loads are
denokv-loadtest runs (its CPU accounting: server and client µs per operation), plus h2load
(nghttp2-client; apt-get install nghttp2-client) for one connection's point reads with a client
that costs little CPU: there the server's CPU per request is also given per thread, which shows
what the connection's core spends. Every server runs on a copy of one `gen-db` database of
10,000 keys, on loopback, and is stopped after its load.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

from reportlib import (LONE_WRITER, free_port, gen_db, interleaved, log, median_of, summary,
                       wait_port)

TOKEN = "ab-report-token-0123456789"
KEYS = 10_000
ONE_CONN = ["--proto", "h2", "--concurrency", "64", "--connections", "1"]
# name: (--threads, loadtest arguments, or "h2load" and its connections x streams)
LOADS = {
    "one-conn-t1": (1, ["read"] + ONE_CONN),
    "one-conn-t2": (2, ["read"] + ONE_CONN),
    "two-conn-t2": (2, ["read", "--proto", "h2", "--concurrency", "64", "--connections", "2"]),
    "h2load-one-conn-t1": (1, ("h2load", 1, 64)),
    "h2load-one-conn-t2": (2, ("h2load", 1, 64)),
    "h2load-two-conn-t2": (2, ("h2load", 2, 32)),
    "h1-read-64": (2, ["read", "--proto", "h1", "--concurrency", "64"]),
    "h2-read-64-conns": (2, ["read", "--proto", "h2", "--concurrency", "64", "--connections", "64"]),
    "h1-write-64": (2, ["write", "--proto", "h1", "--concurrency", "64"]),
    "h2-write-64": (2, ["write"] + ONE_CONN),
    "h1-read-1": (2, ["read", "--proto", "h1", "--concurrency", "1"]),
    "h2-read-1": (2, ["read", "--proto", "h2", "--concurrency", "1"]),
    "h1-write-1": (2, LONE_WRITER["h1"]),
    "h2-write-1": (2, LONE_WRITER["h2"]),
}


def point_read_body():
    """A SnapshotRead of the load generator's key 5 (protobuf written by hand)."""
    key = b"\x02denokv-loadtest\x00\x02kv\x00\x15\x05"

    def field(tag, b):
        return bytes([tag << 3 | 2, len(b)]) + b

    rng = field(1, key) + field(2, key + b"\x00") + bytes([3 << 3, 1])
    return field(1, rng)


def scrape(port):
    """Successful snapshot reads and reads handed over, from /metrics (none without)."""
    if port is None:
        return {"reads": 0.0, "handed": 0.0}
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {"reads": 0.0, "handed": 0.0}
    for line in body.splitlines():
        if line.startswith('denokv_http_requests_total{route="snapshot_read",status="200"}'):
            out["reads"] = float(line.split()[-1])
        elif line.startswith("denokv_reads_handed_over_total "):
            out["handed"] = float(line.split()[-1])
    return out


def thread_cpu(pid):
    """CPU seconds by thread name (io_uring workers summed)."""
    out = defaultdict(float)
    tick = os.sysconf("SC_CLK_TCK")
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            st = Path(f"/proc/{pid}/task/{t}/stat").read_text()
        except OSError:
            continue
        name = st[st.index("(") + 1:st.rindex(")")]
        f = st[st.rindex(")") + 2:].split()
        out["iou-wrk" if name.startswith("iou-wrk") else name] += (int(f[11]) + int(f[12])) / tick
    return out


class Runner:
    def __init__(self, a, work):
        self.a, self.work, self.n = a, work, 0
        self.db = work / "base.sqlite"
        gen_db(a.loadtest, self.db, KEYS)
        self.body = work / "read.bin"
        self.body.write_bytes(point_read_body())

    def run(self, argv, threads, load, upstream=False):
        if upstream and isinstance(load, tuple):
            return None
        self.n += 1
        d = self.work / f"run{self.n}"
        d.mkdir()
        shutil.copy(self.db, d / "db.sqlite")
        port, mport = free_port(), None if upstream else free_port()
        cmd = [argv[0], "--sqlite-path", str(d / "db.sqlite"), "serve", "--access-token", TOKEN,
               "--addr", f"127.0.0.1:{port}"]
        if not upstream:
            cmd += ["--metrics-addr", f"127.0.0.1:{mport}", "--threads", str(threads)]
        cmd += argv[1:]
        with open(d / "server.log", "wb") as logf:
            srv = subprocess.Popen(cmd, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL)
            try:
                wait_port(port)
                if isinstance(load, tuple):
                    return self.h2load(srv.pid, port, mport, load[1], load[2])
                return self.loadtest(d, srv.pid, port, mport, load)
            finally:
                srv.send_signal(signal.SIGTERM)
                srv.wait(timeout=30)

    def loadtest(self, d, pid, port, mport, args):
        out = d / "report.json"
        before = scrape(mport)
        p = subprocess.run([self.a.loadtest] + args + [
            "--url", f"http://127.0.0.1:{port}", "--token", TOKEN, "--keys", str(KEYS),
            "--duration", self.a.duration, "--warmup", "1s", "--server-pid", str(pid),
            "--json", str(out), "--format", "json"], stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True)
        after = scrape(mport)
        if p.returncode != 0 or not out.exists():
            log(f"denokv-loadtest failed: {p.stderr[-300:]}")
            return None
        reads = after["reads"] - before["reads"]
        return {**summary(json.loads(out.read_text())),
                "handed": (after["handed"] - before["handed"]) / reads if reads else 0.0}

    def h2load(self, pid, port, mport, conns, streams):
        secs = int(self.a.duration.rstrip("s"))
        h2 = subprocess.Popen(
            ["h2load", f"-c{conns}", f"-m{streams}", "-D", str(secs + 1), "-d", str(self.body),
             "-H", f"Authorization: Bearer {TOKEN}", "-H", "x-denokv-version: 3",
             "-H", "x-denokv-database-id: 00000000-0000-0000-0000-000000000000",
             f"http://127.0.0.1:{port}/v2/snapshot_read"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(1)
        c0, m0 = thread_cpu(pid), scrape(mport)
        time.sleep(secs)
        c1, m1 = thread_cpu(pid), scrape(mport)
        out = h2.communicate()[0]
        reads = m1["reads"] - m0["reads"]
        if not reads:
            log(f"h2load got no answers: {out[-300:]}")
            return None
        per = sorted(((c1[k] - c0.get(k, 0)) / reads * 1e6 for k in c1), reverse=True)
        return {"ops": reads / secs, "server": sum(per), "threads": [round(x, 1) for x in per if x >= 0.05],
                "handed": (m1["handed"] - m0["handed"]) / reads, "errors": 0}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", default=[], help="LABEL=BINARY[ ARGS...]")
    ap.add_argument("--upstream", action="append", default=[], help="LABEL=BINARY of upstream")
    ap.add_argument("--load", action="append", required=True, choices=sorted(LOADS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", default="3s", help="measured whole seconds of each load (e.g. 3s)")
    ap.add_argument("--loadtest", default=str(Path(os.environ.get(
        "CARGO_TARGET_DIR", Path.home() / ".cache/denokv/target")) / "release/denokv-loadtest"))
    ap.add_argument("--json", help="also write every run here")
    a = ap.parse_args()
    if any(isinstance(LOADS[x][1], tuple) for x in a.load) and not shutil.which("h2load"):
        sys.exit("h2load is missing: apt-get install nghttp2-client")
    variants = []
    for v, upstream in [(v, False) for v in a.variant] + [(v, True) for v in a.upstream]:
        label, rest = v.split("=", 1)
        variants.append((label, rest.split(), upstream))
    if not variants:
        sys.exit("no variant: give --variant or --upstream")
    results = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="ab-report-") as tmp:
        runner = Runner(a, Path(tmp))
        for r, (label, argv, upstream) in interleaved(a.rounds, variants):
            for load in a.load:
                threads, spec = LOADS[load]
                res = runner.run(argv, threads, spec, upstream)
                if res is None:
                    continue
                res["load_avg"] = os.getloadavg()[0]
                results[(load, label)].append(res)
                log(f"round {r + 1} {label} {load}: {res['ops']:,.0f}/s, server "
                    f"{res['server'] or 0:.1f} µs/op, handed over {res['handed']:.0%}")
    print(f"{a.rounds} rounds, {a.duration} each, load average at the end "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| load | variant | ops/s, median (range) | p50 / p99 ms | server µs/op | by thread | "
          "client µs/op | handed over | errors |")
    print("|---|---|---:|---:|---:|---|---:|---:|---:|")
    for load in a.load:
        for label, *_ in variants:
            rows = results.get((load, label))
            if not rows:
                continue
            med = lambda k: median_of(rows, k)
            f = lambda v, d=1: "–" if v is None else f"{v:,.{d}f}"
            ops = [x["ops"] for x in rows]
            mid = sorted(rows, key=lambda x: x["ops"])[len(rows) // 2]
            print(f"| {load} | {label} | {med('ops'):,.0f} ({min(ops):,.0f}–{max(ops):,.0f}) | "
                  f"{f(med('p50'), 2)} / {f(med('p99'), 2)} | {f(med('server'))} | "
                  f"{' + '.join(map(str, mid.get('threads', []))) or '–'} | {f(med('client'))} | "
                  f"{med('handed'):.0%} | {sum(x['errors'] for x in rows)} |")
    if a.json:
        Path(a.json).write_text(json.dumps({f"{k[0]} {k[1]}": v for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
