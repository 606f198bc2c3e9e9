#!/usr/bin/env python3
"""Measures the S3 backup under a steady write load and writes the figures into docs/BACKUP.md.

    loadtest/backup-report.py              # build release binaries, measure, rewrite the section
    loadtest/backup-report.py --no-build --rounds 1 --duration 5s --out /tmp/b.md

For each load level (64 and 4 concurrent h2 clients of `denokv-loadtest write`, 100k keys,
100-byte values) it runs the release server on a fresh database with the backup off and on,
alternating, `--rounds` times each, against moto (an S3-compatible server on loopback, from
tests/s3/setup.sh's venv). With the backup on it samples `denokv_backup_lag_seconds` (the age
of the oldest committed write not yet in S3: what a lost disk would lose) every 100 ms during
the measured run, and counts the S3 PUTs. Reported: write throughput off/on, the lag's p50 /
p99 / max, and S3 requests per hour at that write rate. Every server and moto are stopped.
Loopback only; the servers, the load generator and moto share this machine's cores.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

from reportlib import ROOT, free_port, log, wait_port

TOKEN = "backup-report-token-0123456789"
BUCKET = "backup-report"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_REGION": "us-east-1"}
BEGIN, END = "<!-- backup-report:begin -->", "<!-- backup-report:end -->"








def scrape(port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def cpu_seconds(pid):
    """User and system CPU time of a process so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else 0.0


class Run:
    def __init__(self, args):
        self.args = args
        target = Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache/denokv/target"))
        self.bin = target / "release"
        self.work = target / "backup-report"
        self.work.mkdir(parents=True, exist_ok=True)
        self.procs = []

    def moto(self):
        venv = Path(os.environ.get("DENOKV_S3_VENV", Path.home() / ".cache/denokv/s3-venv"))
        if not (venv / "bin/moto_server").exists():
            subprocess.run([ROOT / "tests/s3/setup.sh"], check=True)
        port = free_port()
        p = subprocess.Popen([venv / "bin/moto_server", "-H", "127.0.0.1", "-p", str(port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(p)
        self.moto_pid = p.pid
        wait_port(port)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/{BUCKET}", method="PUT")
        urllib.request.urlopen(req, timeout=10).read()
        return f"http://127.0.0.1:{port}"

    def server(self, label, backup, endpoint):
        d = self.work / label
        subprocess.run(["rm", "-rf", str(d)], check=True)
        d.mkdir(parents=True)
        port, mport = free_port(), free_port()
        argv = [str(self.bin / "denokv"), "--sqlite-path", str(d / "db.sqlite"), "serve",
                "--access-token", TOKEN, "--addr", f"127.0.0.1:{port}",
                "--metrics-addr", f"127.0.0.1:{mport}"]
        if backup:
            argv += ["--backup-to-s3", "--s3-bucket", BUCKET, "--s3-prefix", f"{label}/",
                     "--s3-endpoint", endpoint]
        p = subprocess.Popen(argv, env={**os.environ, **S3_ENV, "RUST_LOG": "warn"},
                             stdout=subprocess.DEVNULL, stderr=open(d / "log", "w"))
        self.procs.append(p)
        wait_port(port)
        wait_port(mport)
        if backup:
            # The first snapshot (of an empty database) before the load starts.
            deadline = time.time() + 30
            while scrape(mport).get("denokv_backup_last_snapshot_timestamp_seconds", 0) == 0:
                if time.time() > deadline:
                    raise SystemExit(f"no first snapshot; see {d / 'log'}")
                time.sleep(0.1)
        return p, port, mport

    def stop(self, p):
        p.terminate()
        p.wait(timeout=30)
        self.procs.remove(p)

    def measure(self, clients, backup, endpoint, round_):
        label = f"c{clients}-{'on' if backup else 'off'}-{round_}"
        p, port, mport = self.server(label, backup, endpoint)
        out = self.work / f"{label}.json"
        samples, stop = [], threading.Event()

        def sample():
            while not stop.is_set():
                try:
                    samples.append(scrape(mport).get("denokv_backup_lag_seconds", 0.0))
                except OSError:
                    pass
                stop.wait(0.1)

        before = scrape(mport)
        t = threading.Thread(target=sample)
        argv = [str(self.bin / "denokv-loadtest"), "write", "--url", f"http://127.0.0.1:{port}",
                "--token", TOKEN, "--proto", "h2", "--connections", "4",
                "--concurrency", str(clients), "--keys", "100000", "--value-size", "100",
                "--duration", self.args.duration, "--warmup", "0s",
                "--json", str(out), "--format", "json", "--server-pid", str(p.pid)]
        moto_cpu = cpu_seconds(self.moto_pid)
        t.start()
        started = time.time()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        elapsed = time.time() - started
        stop.set()
        t.join()
        after = scrape(mport)
        self.stop(p)
        report = json.loads(out.read_text())
        put = 'denokv_s3_requests_total{operation="put"}'
        puts = after.get(put, 0) - before.get(put, 0)
        return {"ops": report["ops_per_sec"], "lag": samples, "puts_per_hour": puts / elapsed * 3600,
                "cpu": report.get("server_cpu_ms_per_1k_ops") or 0.0,
                "moto_cpu": (cpu_seconds(self.moto_pid) - moto_cpu) / elapsed,
                "objects": after.get("denokv_backup_log_objects_total", 0)}

    def main(self):
        if not self.args.no_build:
            log("building release binaries")
            subprocess.run(["cargo", "build", "--release", "--locked", "-p", "denokv",
                            "-p", "denokv-loadtest"], cwd=ROOT, check=True)
        endpoint = self.moto()
        rows = []
        for clients in (64, 4):
            off, on = [], []
            for r in range(self.args.rounds):
                for backup in (False, True):
                    log(f"{clients} clients, backup {'on' if backup else 'off'}, round {r + 1}")
                    (on if backup else off).append(self.measure(clients, backup, endpoint, r))
            lag = [x for m in on for x in m["lag"]]
            rows.append({
                "clients": clients,
                "off": statistics.median(m["ops"] for m in off),
                "on": statistics.median(m["ops"] for m in on),
                "lag50": percentile(lag, 50), "lag99": percentile(lag, 99), "lagmax": max(lag),
                "samples": len(lag),
                "puts": statistics.median(m["puts_per_hour"] for m in on),
                "cpu_off": statistics.median(m["cpu"] for m in off),
                "cpu_on": statistics.median(m["cpu"] for m in on),
                "moto": statistics.median(m["moto_cpu"] for m in on),
            })
        return rows

    def cleanup(self):
        for p in self.procs:
            p.kill()
            p.wait()


def render(rows, args):
    cpu = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    lines = [
        f"Measured by `loadtest/backup-report.py --rounds {args.rounds} --duration {args.duration}` "
        f"on {time.strftime('%Y-%m-%d')} ({cpu} CPUs; release build; moto on loopback as S3; "
        "`denokv-loadtest write`, h2 over 4 connections, 100k keys, 100-byte values; the median "
        "of the rounds; the lag sampled every 100 ms during every run with backup on).",
        "",
        "| clients | writes/s backup off | writes/s backup on | on/off | server CPU µs/write off | on | moto CPU (cores) | lag p50 | lag p99 | lag max | S3 PUTs per hour |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['clients']} | {r['off']:,.0f} | {r['on']:,.0f} | {r['on'] / r['off']:.2f} | "
            f"{r['cpu_off']:.1f} | {r['cpu_on']:.1f} | {r['moto']:.2f} | "
            f"{r['lag50']:.2f} s | {r['lag99']:.2f} s | {r['lagmax']:.2f} s | {r['puts']:,.0f} |")
    lines += ["", "The lag is the recovery point: the age of the oldest committed write not yet in "
              "S3, i.e. what losing the primary's disk at that moment would lose. moto (the S3 "
              "server, Python) runs on the same two cores as the server and the load generator: "
              "its CPU is taken from the server's share, which a real S3 would not."]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", default="10s")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/BACKUP.md",
                    help="the document whose backup-report section is rewritten")
    args = ap.parse_args()
    run = Run(args)
    try:
        rows = run.main()
    finally:
        run.cleanup()
    text = render(rows, args)
    print(text)
    doc = args.out.read_text() if args.out.exists() else f"{BEGIN}\n{END}\n"
    if BEGIN not in doc:
        doc += f"\n## Measured\n\n{BEGIN}\n{END}\n"
    doc = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), f"{BEGIN}\n{text}\n{END}", doc, flags=re.S)
    args.out.write_text(doc)


if __name__ == "__main__":
    main()
