#!/usr/bin/env python3
"""Hostile-client figures for docs/RELIABILITY.md: 10,000 idle connections and a flood of
50,000 connection attempts against the release server, while a real Deno client reads and
writes; reports the Deno client's latency (p50/p99/max, errors) before and during, and the
server's memory.

    loadtest/flood-report.py                      # measure, rewrite the section in RELIABILITY.md
    loadtest/flood-report.py --out /tmp/f.md      # somewhere else

The idle connections each send one HTTP/1.1 request and then stay open, idle (keep-alive),
from 20 loopback source addresses (127.0.0.2-21, 500 each: under the per-address cap); the
flood opens and closes 50,000 connections as fast as 256 concurrent openers can, from
127.0.0.100 (one address: past --max-connections-per-ip its connections are closed at
accept). The Deno client (`Deno.openKv` over h2, the CLI the e2e tests install) runs a
set-then-get loop on one key space throughout. Needs the release binary
($CARGO_TARGET_DIR/release/denokv; `cargo build --release -p denokv`) and the e2e suite's Deno
(tests/e2e/run.sh installs it). Loopback only; the server is stopped at the end.
"""

import argparse
import asyncio
import json
import os
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from reportlib import ROOT, find_deno, free_port, log, raise_open_files, release_binary, rss_kib, write_section

TOKEN = "flood-report-token-0123456789"
BEGIN, END = "<!-- flood-report:begin -->", "<!-- flood-report:end -->"
IDLE_SOURCES = [f"127.0.0.{i}" for i in range(2, 22)]
FLOOD_SOURCE = "127.0.0.100"

DENO_CLIENT = r"""
const [url, seconds, stopFile] = [Deno.args[0], Number(Deno.args[1]), Deno.args[2]];
const stopped = () => { try { Deno.statSync(stopFile); return true; } catch { return false; } };
const kv = await Deno.openKv(url);
const lat = [];
let errors = 0;
const end = Date.now() + seconds * 1000;
let i = 0;
while (stopFile ? !stopped() : Date.now() < end) {
  const t0 = performance.now();
  try {
    await kv.set(["k", i % 1000], i);
    await kv.get(["k", (i * 7) % 1000]);
    lat.push(performance.now() - t0);
  } catch (_) {
    errors++;
  }
  i++;
}
kv.close();
lat.sort((a, b) => a - b);
const q = (p) => lat.length ? lat[Math.min(lat.length - 1, Math.round(p / 100 * (lat.length - 1)))] : 0;
console.log(JSON.stringify({ n: lat.length, errors, p50: q(50), p99: q(99), max: lat.at(-1) ?? 0 }));
"""










class Idle(threading.Thread):
    """Holds `n` keep-alive connections, each after one answered request."""

    def __init__(self, port, n):
        super().__init__(daemon=True)
        self.port, self.n = port, n
        self.held = 0
        self.ready = threading.Event()
        self.release = threading.Event()
        self.socks = []

    def run(self):
        per = self.n // len(IDLE_SOURCES)
        req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        for src in IDLE_SOURCES:
            for _ in range(per):
                s = socket.socket()
                s.bind((src, 0))
                s.connect(("127.0.0.1", self.port))
                s.sendall(req)
                self.socks.append(s)
        for s in self.socks:
            s.settimeout(20)
            try:
                if s.recv(4096):
                    self.held += 1
            except OSError:
                pass
        self.ready.set()
        self.release.wait()
        still = 0
        for s in self.socks:
            # An idle connection still open answers another request.
            try:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                if s.recv(4096):
                    still += 1
            except OSError:
                pass
            s.close()
        self.still_open = still


async def flood(port, attempts, concurrency):
    done = {"opened": 0, "failed": 0}
    queue = iter(range(attempts))

    async def opener():
        for _ in queue:
            try:
                r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(FLOOD_SOURCE, 0))
                w.close()
                done["opened"] += 1
            except OSError:
                done["failed"] += 1

    t0 = time.time()
    await asyncio.gather(*(opener() for _ in range(concurrency)))
    return {**done, "seconds": time.time() - t0}


def deno_phase(deno, url, seconds, env, stop_file=""):
    with tempfile.NamedTemporaryFile("w", suffix=".ts", delete=False) as f:
        f.write(DENO_CLIENT)
        script = f.name
    p = subprocess.Popen([deno, "run", "-A", "--unstable-kv", script, url, str(seconds), stop_file],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return p, script


def finish(p, script):
    out, err = p.communicate(timeout=300)
    os.unlink(script)
    if p.returncode != 0:
        raise SystemExit(f"the Deno client failed: {err}")
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--idle", type=int, default=10_000)
    ap.add_argument("--attempts", type=int, default=50_000)
    ap.add_argument("--seconds", type=int, default=15, help="each Deno client phase")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/RELIABILITY.md")
    args = ap.parse_args()
    raise_open_files(args.idle + 1000)
    binary = release_binary()
    deno = find_deno()
    work = Path(tempfile.mkdtemp(prefix="denokv-flood-"))
    port = free_port()
    server = subprocess.Popen(
        [str(binary), "--sqlite-path", str(work / "db.sqlite"), "serve", "--addr", f"127.0.0.1:{port}",
         "--metrics-addr", "off", "--max-connections", str(args.idle + 1000),
         # The flood takes about two minutes here: longer than the default idle timeout
         # (120 s), which would close the idle connections on purpose.
         "--idle-timeout", "600"],
        env={**os.environ, "DENO_KV_ACCESS_TOKEN": TOKEN, "RUST_LOG": "warn"},
        stdout=subprocess.DEVNULL, stderr=open(work / "log", "w"))
    try:
        deadline = time.time() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise SystemExit("the server did not start")
                time.sleep(0.1)
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "DENO_KV_ACCESS_TOKEN": TOKEN, "NO_COLOR": "1",
               "DENO_DIR": str(Path.home() / ".cache/denokv/e2e/deno_dir")}
        rss0 = rss_kib(server.pid) / 1024
        log("baseline: the Deno client alone")
        base = finish(*deno_phase(deno, url, args.seconds, env))
        log(f"opening {args.idle} idle connections")
        idle = Idle(port, args.idle)
        idle.start()
        idle.ready.wait()
        rss_idle = rss_kib(server.pid) / 1024
        log(f"{idle.held} idle connections held; flooding with {args.attempts} attempts under the Deno client")
        # The client runs for exactly as long as the flood.
        stop_file = work / "stop"
        p, script = deno_phase(deno, url, args.seconds, env, str(stop_file))
        time.sleep(1)
        fl = asyncio.run(flood(port, args.attempts, 256))
        stop_file.touch()
        during = finish(p, script)
        rss_after = rss_kib(server.pid) / 1024
        idle.release.set()
        idle.join()
        alive = server.poll() is None
    finally:
        server.terminate()
        server.wait(timeout=30)
    rows = [
        f"Measured by `loadtest/flood-report.py --idle {args.idle} --attempts {args.attempts} "
        f"--seconds {args.seconds}` on {time.strftime('%Y-%m-%d')} ({os.cpu_count()} CPUs, release "
        "build, everything on loopback). The Deno client (`Deno.openKv` over h2) runs a set-then-get "
        "loop; each row is one phase of it (the second lasts as long as the flood).",
        "",
        "| phase | Deno set+get pairs | errors | p50 | p99 | max | server RSS |",
        "|---|---|---|---|---|---|---|",
        f"| alone | {base['n']:,} | {base['errors']} | {base['p50']:.2f} ms | {base['p99']:.2f} ms | "
        f"{base['max']:.1f} ms | {rss0:.1f} MiB before |",
        f"| {idle.held:,} idle connections held + a flood of {args.attempts:,} connection attempts "
        f"({fl['opened']:,} opened, {fl['failed']:,} failed, in {fl['seconds']:.1f} s) | "
        f"{during['n']:,} | {during['errors']} | {during['p50']:.2f} ms | {during['p99']:.2f} ms | "
        f"{during['max']:.1f} ms | {rss_idle:.1f} MiB with the idle connections, {rss_after:.1f} MiB after the flood |",
        "",
        f"After the flood {idle.still_open:,} of the {idle.held:,} idle connections still answered a "
        f"request (the server ran with `--idle-timeout 600`: the flood outlasts the default 120 s); "
        f"the server {'was still up' if alive else 'HAD EXITED'}. The flood's connections "
        "past the per-address cap were closed at accept "
        "(`denokv_connections_refused_total{reason=\"max_connections_per_ip\"}`).",
    ]
    text = "\n".join(rows)
    print(text)
    write_section(args.out, BEGIN, END, "Idle connections and a connection flood", text)


if __name__ == "__main__":
    main()
