#!/usr/bin/env python3
"""Re-runs every performance measurement of denokv and writes docs/PERFORMANCE.md.

    loadtest/perf-report.py                 # the full run (about 20 minutes on 2 cores; the
                                            # first time add the build and gen-db's 10M keys)
    loadtest/perf-report.py --quick         # a short smoke run of the same steps
    loadtest/perf-report.py --out /tmp/p.md # somewhere else
    loadtest/perf-report.py --no-build      # with the binaries already built

It builds the release binaries (into $CARGO_TARGET_DIR, default ~/.cache/denokv/target, where it
also reads them from), then measures in one sitting on this machine: the ceilings
(a trivial HTTP server, fdatasync/s, SQLite commits/s), this server and the upstream `denokv`
side by side (write, read, mixed, cas, list, sum at 1/16/64/256 clients over HTTP/1.1 and h2),
a lone writer (one client's writes, h1 and h2, ours and upstream taking turns over 3 rounds),
cost as the database grows (10 thousand to 10 million keys, ours and upstream on the same
files), memory with idle connections and watch streams, our variants (--threads, --io-driver
epoll beside the default io_uring, --read-sharing, --sync-mode, --wal-writes; writes at 1 and
64 clients, point reads at 1 and 64), the committer batch benchmark, and a CPU profile of the
write load. Its "Targets" table is issue 15's, each target computed from this run's numbers.
Every number in the document comes from this run; raw JSON reports stay in
$CARGO_TARGET_DIR/perf-report/.

The upstream server is taken from $UPSTREAM_DENOKV, else ~/.cache/denokv/upstream/bin/denokv,
else installed there with `cargo install denokv --locked` (about 20 minutes); --no-upstream
skips it. Servers and load generator share the machine's cores; every server started is
stopped, and everything listens on loopback only.

Two more sections: the real Deno client (`loadtest/deno/kvload.ts`, run by the Deno CLI that
tests/e2e/run.sh installs, or $DENO) against ours and upstream, and Redis from Debian with
every write fsynced (`redis-server --appendonly yes --appendfsync always`, installed with
apt-get when missing) measured with its own `redis-benchmark`, as a yardstick. Either is
skipped with a note in the document when its tool cannot be found or installed.

    loadtest/perf-report.py --only deno,redis --no-build   # just these two sections,
                                                            # replaced in --out in place
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from reportlib import (LONE_WRITER, ROOT, free_port, gen_db, interleaved, log, median_of,
                       summary)

TOKEN = "perf-report-token-0123456789"
TRIVIAL_TOKEN = "trivial-server-token"
WORKLOADS = ["write", "read", "mixed", "cas", "list", "sum"]
PRELOADED = {"read", "mixed", "list"}
KEYS = 10_000
# Real Deno client loads (loadtest/deno/kvload.ts): (mix, processes, concurrent ops each).
DENO_LOADS = [("reads", 1, 64), ("rw", 1, 64), ("writes", 1, 64), ("app", 4, 32)]
DENO_MIXES = {"reads": "point reads (kv.get)", "rw": "80% kv.get, 20% kv.set",
              "writes": "kv.set", "app": "80% kv.get, 15% kv.set, 5% get + atomic check+set"}
OURS_T1 = "ours --threads 1"
OURS_DEFAULT = "ours, default threads"
# The lone writer: rounds of ours and upstream taking turns.
LONE_ROUNDS = 3
# The variants table's default row (--threads 2 is what every other load here runs).
DEFAULT_VARIANT = "--threads 2 (default here)"


def seconds(d):
    """'3s', '500ms' or '0.5' as seconds."""
    d = str(d)
    if d.endswith("ms"):
        return float(d[:-2]) / 1000
    return float(d.rstrip("s"))


def warm(db):
    """Reads the database file and its WAL through once, into the kernel's page cache."""
    for path in [db, Path(f"{db}-wal")]:
        with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def cpu_ticks(pid):
    """User+system CPU clock ticks of a process so far, or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        f = stat[stat.rindex(")") + 2:].split()
        return int(f[11]) + int(f[12])
    except (OSError, ValueError):
        return None


def median_run(reports):
    """The report of the median run by ops/s (lower median), with the errors of all the runs
    and every run's ops/s in `ops_per_sec_rounds`."""
    chosen = dict(sorted(reports, key=lambda r: r.get("ops_per_sec") or 0)[(len(reports) - 1) // 2])
    chosen["ops_per_sec_rounds"] = [r.get("ops_per_sec") or 0 for r in reports]
    chosen["error_total"] = sum(r.get("error_total", 0) for r in reports)
    return chosen


def rounds_note(rep):
    n = rep.args.rounds
    return (f"; each figure is the median of {n} rounds by ops/s (their range in brackets; "
            "errors: all rounds)" if n > 1 else "")


def ops_cell(r):
    """ops/s, with the range over the rounds when there were several."""
    rounds = r.get("ops_per_sec_rounds") or []
    spread = f" ({fmt(min(rounds))}–{fmt(max(rounds))})" if len(rounds) > 1 else ""
    return fmt(r.get("ops_per_sec")) + spread






def lift_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Server:
    """A server process on a loopback port, stopped on exit from the `with` block."""

    def __init__(self, name, argv, port, logfile):
        self.name, self.argv, self.port, self.logfile = name, argv, port, logfile
        self.proc = None

    def __enter__(self):
        self.log = open(self.logfile, "ab")
        self.log_start = self.log.tell()
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
            preexec_fn=lift_nofile,
        )
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start; see {self.logfile}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not listen on {self.port}; see {self.logfile}")

    def output(self):
        """What this server has written to its log so far."""
        with open(self.logfile, "rb") as f:
            f.seek(self.log_start)
            return f.read().decode(errors="replace")

    @property
    def pid(self):
        return self.proc.pid

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def __exit__(self, *exc):
        self.stop()


class Report:
    def __init__(self, args):
        self.args = args
        target = Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache/denokv/target"))
        self.target = target
        self.bin = target / "release"
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.work = target / "perf-report" / stamp
        self.work.mkdir(parents=True, exist_ok=True)
        self.dbs = target / "perf-report" / "dbs"
        self.dbs.mkdir(parents=True, exist_ok=True)
        self.runs = 0
        self.errors = []
        self.deno_skipped = None
        self.redis_skipped = None
        self.loadavg_start = open("/proc/loadavg").read().split(" ", 3)[:3]
        q = args.quick
        self.duration = "0.5s" if q else args.duration
        self.warmup = "0.2s" if q else "1s"
        self.clients = [1, 64] if q else [1, 16, 64, 256]
        self.scale_keys = [10_000, 100_000] if q else [10_000, 1_000_000, 10_000_000]
        self.idle_conns = 1000 if q else 10_000
        self.watchers = 100 if q else 1000

    # ---- processes -------------------------------------------------------------------------

    def ours(self, db, extra=(), default_threads=False):
        port = free_port()
        argv = [str(self.bin / "denokv"), "--sqlite-path", str(db), "serve",
                "--access-token", TOKEN, "--addr", f"127.0.0.1:{port}", "--metrics-addr", "off"]
        argv += list(extra)
        if "--threads" not in extra and not default_threads:
            argv += ["--threads", "2"]
        return Server("ours", argv, port, self.work / "ours.log")

    def upstream(self, db):
        port = free_port()
        argv = [str(self.upstream_bin), "--sqlite-path", str(db), "serve",
                "--access-token", TOKEN, "--addr", f"127.0.0.1:{port}"]
        return Server("upstream", argv, port, self.work / "upstream.log")

    def fresh_db(self, label):
        d = self.work / "db" / f"{label}-{self.runs}"
        d.mkdir(parents=True, exist_ok=True)
        self.runs += 1
        return d / "db.sqlite"

    def loadtest(self, command, server, *extra, token=TOKEN, pid=True):
        """Runs the load generator; returns its JSON report (with `exit` added). `pid`: a
        measured run (warm-up, duration, the server's CPU and memory)."""
        self.runs += 1
        out = self.work / f"run-{self.runs:04d}-{command}.json"
        argv = [str(self.bin / "denokv-loadtest"), command, "--url", server.url,
                "--token", token, "--json", str(out), "--format", "json"]
        if pid and command != "idle":
            argv += ["--duration", self.duration, "--warmup", self.warmup]
        if pid:
            argv += ["--server-pid", str(server.pid)]
        argv += [str(a) for a in extra]
        p = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           preexec_fn=lift_nofile, timeout=900)
        try:
            report = json.loads(out.read_text())
        except (OSError, ValueError):
            report = {"ops_per_sec": 0, "error_total": 1, "errors": {p.stderr.strip(): 1}}
        report["exit"] = p.returncode
        if p.returncode != 0:
            self.errors.append(f"`{' '.join(argv[1:2] + argv[6:])}` against {server.name} "
                               f"exited {p.returncode}: {p.stderr.strip()[-300:]}")
        return report

    def preload(self, server):
        self.loadtest("read", server, "--preload", "--keys", KEYS, "--concurrency", 16,
                      "--duration", "0.1s", "--warmup", "0s", pid=False)

    # ---- steps -----------------------------------------------------------------------------

    def cargo_env(self):
        # Build where the binaries are read from (cargo alone would use ROOT/target).
        return {**os.environ, "CARGO_TARGET_DIR": str(self.target)}

    def build(self, names):
        """Builds the release binaries, or with --no-build checks that `names` exist."""
        if self.args.no_build:
            missing = [n for n in names if not (self.bin / n).is_file()]
            if missing:
                sys.exit(f"--no-build: {', '.join(missing)} not found in {self.bin}")
            for n in names:
                mtime = datetime.datetime.fromtimestamp((self.bin / n).stat().st_mtime)
                log(f"using {self.bin / n} (built {mtime:%Y-%m-%d %H:%M})")
            return
        log("building release binaries")
        subprocess.run(["cargo", "build", "--release", "--locked", "-p", "denokv",
                        "-p", "denokv-loadtest"], cwd=ROOT, check=True, env=self.cargo_env())

    def binaries_note(self):
        """With --no-build, which binary ran (it need not be built from this commit)."""
        if not self.args.no_build:
            return ""
        t = datetime.datetime.fromtimestamp((self.bin / "denokv").stat().st_mtime)
        return (f", with `--no-build`: the `denokv` already in {self.bin} (built "
                f"{t:%Y-%m-%d %H:%M}, not necessarily from that commit)")

    def find_upstream(self):
        if self.args.no_upstream:
            self.upstream_bin = None
            return
        candidates = [os.environ.get("UPSTREAM_DENOKV"),
                      str(Path.home() / ".cache/denokv/upstream/bin/denokv")]
        for c in candidates:
            if c and Path(c).is_file():
                self.upstream_bin = Path(c)
                return
        log("installing upstream denokv (cargo install denokv --locked), ~20 min")
        root = Path.home() / ".cache/denokv/upstream"
        subprocess.run(["cargo", "install", "denokv", "--locked", "--root", str(root)],
                       check=True, env={**os.environ,
                                        "CARGO_TARGET_DIR": str(Path.home() / ".cache/denokv/upstream-target")})
        self.upstream_bin = root / "bin/denokv"

    def ceilings(self):
        log("ceilings: trivial HTTP server, disk")
        res = {}
        port = free_port()
        trivial = Server("trivial", [str(self.bin / "denokv-trivial-server"), "--addr",
                                     f"127.0.0.1:{port}", "--threads", "2"], port,
                         self.work / "trivial.log")
        with trivial:
            for proto in ["h1", "h2"]:
                r = self.loadtest("read", trivial, "--proto", proto, "--concurrency", 64,
                                  token=TRIVIAL_TOKEN)
                res[f"trivial_{proto}"] = r
        disk = self.work / "disk.json"
        subprocess.run([str(self.bin / "denokv-loadtest"), "disk", "--dir", str(self.work),
                        "--duration", "1s" if self.args.quick else "3s", "--json", str(disk)],
                       check=True, stdout=subprocess.DEVNULL)
        res["disk"] = json.loads(disk.read_text())
        return res

    def matrix(self, which):
        log(f"side by side: {which}")
        out = {}
        for w in WORKLOADS:
            db = self.fresh_db(f"{which}-{w}")
            srv = self.ours(db) if which == "ours" else self.upstream(db)
            with srv:
                if w in PRELOADED:
                    self.preload(srv)
                for proto in ["h1", "h2"]:
                    for c in self.clients:
                        log(f"  {which} {w} {proto} {c}")
                        out[(w, proto, c)] = self.loadtest(w, srv, "--proto", proto,
                                                           "--concurrency", c, "--keys", KEYS)
        return out

    def scaling(self):
        log("scaling with the number of keys")
        out = {}
        for n in self.scale_keys:
            db = self.dbs / f"keys-{n}.sqlite"
            if not db.exists():
                log(f"  generating {n} keys")
                tmp = self.dbs / f"keys-{n}.tmp.sqlite"
                for f in self.dbs.glob(f"keys-{n}.tmp.sqlite*"):
                    f.unlink()
                t0 = time.time()
                gen_db(self.bin / "denokv-loadtest", tmp, n)
                tmp.rename(db)
                out[("gen", n)] = time.time() - t0
            size = db.stat().st_size
            # This machine's kernel reclaims idle page cache (DAMON): a file left alone for
            # minutes is read from the disk again, and its first run measured the disk (a run
            # of 2026-11-29 got 224 reads/s at 1M keys). Each server starts on a file read
            # through once.
            warm(db)
            with self.ours(db) as srv:
                for w in ["read", "write"]:
                    log(f"  {n} keys {w}")
                    out[(w, n)] = self.loadtest(w, srv, "--proto", "h2", "--concurrency", 64,
                                                "--keys", n)
            if self.upstream_bin:
                # The same file: gen-db writes the SQLite format upstream reads.
                warm(db)
                with self.upstream(db) as srv:
                    for w in ["read", "write"]:
                        log(f"  {n} keys {w}, upstream")
                        out[("upstream", w, n)] = self.loadtest(
                            w, srv, "--proto", "h2", "--concurrency", 64, "--keys", n)
            out[("size", n)] = size
        return out

    def lone_writer(self):
        """A lone client's writes (denokv-loadtest write --concurrency 1, ab-report.py's
        h1-write-1 and h2-write-1 loads), ours and upstream taking turns over LONE_ROUNDS
        rounds, each round in the reverse order of the one before; every run is a fresh server
        on a copy of one gen-db database of KEYS keys. {(server, proto): [summary per round]}."""
        log("a lone writer, ours and upstream taking turns")
        base = self.work / "lone-writer-base.sqlite"
        gen_db(self.bin / "denokv-loadtest", base, KEYS)
        servers = [("ours", self.ours)]
        if self.upstream_bin:
            servers.append(("upstream", self.upstream))
        turns = [(proto, name, mk) for proto in ["h1", "h2"] for name, mk in servers]
        out = {}
        for rnd, (proto, name, mk) in interleaved(LONE_ROUNDS, turns):
            db = self.fresh_db(f"lone-{name}")
            shutil.copy(base, db)
            with mk(db) as srv:
                log(f"  round {rnd + 1}: {name} {proto}")
                load = LONE_WRITER[proto]
                r = self.loadtest(load[0], srv, *load[1:], "--keys", KEYS)
            out.setdefault((name, proto), []).append(summary(r))
        return out

    def memory(self, which):
        log(f"memory: {which}")
        out = {}
        mk = self.ours if which == "ours" else self.upstream
        # Every idle connection comes from 127.0.0.1: past our caps (1,000 per address, 10,000
        # in all) the rest would be closed at accept.
        caps = ["--max-connections-per-ip", str(2 * self.idle_conns),
                "--max-connections", str(2 * self.idle_conns)]
        for proto in ["h1", "h2"]:
            with (self.ours(self.fresh_db(f"mem-{which}"), caps) if which == "ours" else
                  mk(self.fresh_db(f"mem-{which}"))) as srv:
                time.sleep(0.5)
                out[("idle", proto)] = self.loadtest(
                    "idle", srv, "--proto", proto, "--concurrency", self.idle_conns,
                    "--duration", "2s" if self.args.quick else "5s", "--timeout", "30s")
        with mk(self.fresh_db(f"watch-{which}")) as srv:
            out["watch"] = self.loadtest("watch", srv, "--proto", "h2", "--connections", 10,
                                         "--watchers", self.watchers, "--hot-keys", 10,
                                         "--write-interval", "10ms", "--timeout", "30s")
        return out

    def variants(self):
        log("our variants")
        out = {}
        variants = [
            ("--threads 1", ["--threads", "1"]),
            (DEFAULT_VARIANT, ["--threads", "2"]),
            ("--io-driver epoll", ["--io-driver", "epoll"]),
            ("--read-sharing on", ["--read-sharing", "on"]),
            ("--sync-mode normal", ["--sync-mode", "normal"]),
            ("--wal-writes pwrite (default)", ["--wal-writes", "pwrite"]),
            ("--wal-writes io-uring", ["--wal-writes", "io-uring"]),
        ]
        for label, extra in variants:
            with self.ours(self.fresh_db("variant"), extra) as srv:
                self.preload(srv)
                for w, c in [("write", 1), ("write", 64), ("read", 1), ("read", 64)]:
                    log(f"  {label} {w} {c}")
                    out[(label, w, c)] = self.loadtest(w, srv, "--proto", "h2",
                                                       "--concurrency", c, "--keys", KEYS)
                # The io driver the cores ran on, from the server's "N cores on DRIVER" line.
                drivers = re.findall(r"\d+ cores on (\w+)", srv.output())
                out[(label, "driver")] = drivers[-1] if drivers else None
        return out

    def batch_bench(self):
        log("criterion: committer batches")
        argv = ["cargo", "bench", "--locked", "-p", "denokv-benches", "--bench", "hot_paths",
                "--", "--warm-up-time", "1", "--measurement-time", "1" if self.args.quick else "3",
                "commit_batch"]
        started = time.time()
        subprocess.run(argv, cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, env=self.cargo_env())
        out = {}
        base = self.target / "criterion"
        for group in sorted(base.glob("commit_batch_*")):
            for n in [1, 8, 64, 512]:
                est = group / f"{n}_writes" / "new" / "estimates.json"
                # Only this run's results (criterion keeps old groups around).
                if est.exists() and est.stat().st_mtime >= started:
                    ns = json.loads(est.read_text())["mean"]["point_estimate"]
                    out[(group.name, n)] = n / (ns * 1e-9)
        return out

    def find_deno(self):
        """The Deno CLI the e2e tests install (tests/e2e/run.sh), installing it if missing."""
        cache = Path(os.environ.get("E2E_CACHE", Path.home() / ".cache/denokv/e2e"))

        def candidates():
            yield os.environ.get("DENO")
            yield from sorted(str(p) for p in cache.glob("node_modules/@deno/linux-*/deno"))
            yield str(cache / "node_modules/deno/deno")
            yield shutil.which("deno")

        def find():
            for c in candidates():
                if c and Path(c).is_file():
                    p = subprocess.run([c, "--version"], capture_output=True, text=True)
                    if p.returncode == 0:
                        return c, p.stdout.split("\n")[0]
            return None

        found = find()
        if not found:
            log("installing the Deno CLI with tests/e2e/run.sh (E2E_TARGET=local E2E_SUITES=none)")
            p = subprocess.run([str(ROOT / "tests/e2e/run.sh")], cwd=ROOT,
                               env={**os.environ, "E2E_TARGET": "local", "E2E_SUITES": "none"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            found = find()
            if not found:
                self.deno_skipped = ("no Deno CLI: not found (set $DENO) and tests/e2e/run.sh "
                                     f"did not install one: {p.stderr.strip()[-300:]}")
                log(f"!!! SKIPPING the real Deno client loads: {self.deno_skipped}")
                return None
        self.deno_bin, self.deno_version = found
        self.deno_env = {**os.environ, "DENO_NO_UPDATE_CHECK": "1", "DENO_NO_PROMPT": "1",
                         "NO_COLOR": "1",
                         "DENO_DIR": os.environ.get("DENO_DIR", str(cache / "deno_dir"))}
        log(f"deno: {self.deno_bin} ({self.deno_version})")
        return self.deno_bin

    def kvload(self, server, mix, processes, concurrency, preload=False):
        """Runs loadtest/deno/kvload.ts against a server; returns its JSON report."""
        self.runs += 1
        out = self.work / f"run-{self.runs:04d}-kvload-{mix}.json"
        argv = [self.deno_bin, "run", "-A", "--unstable-kv", "--no-config",
                str(ROOT / "loadtest/deno/kvload.ts"), "--url", server.url, "--token", TOKEN,
                "--processes", processes, "--concurrency", concurrency, "--mix", mix,
                "--keys", KEYS, "--duration", seconds(self.duration),
                "--warmup", seconds(self.warmup), "--server-pid", server.pid, "--json", out]
        if preload:
            argv.append("--preload")
        argv = [str(a) for a in argv]
        try:
            p = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env=self.deno_env, preexec_fn=lift_nofile, timeout=300)
            rc, stderr = p.returncode, p.stderr
        except subprocess.TimeoutExpired:
            rc, stderr = "timeout", "did not finish in 300 s"
        try:
            report = json.loads(out.read_text())
        except (OSError, ValueError):
            report = {"ops_per_sec": 0, "error_total": 1, "errors": {stderr.strip(): 1}}
        report["exit"] = rc
        if rc != 0:
            errs = "; ".join(f"{n}× {m}" for m, n in report.get("errors", {}).items())
            self.errors.append(f"`kvload.ts --mix {mix} --processes {processes} --concurrency "
                               f"{concurrency}` against {server.name} exited {rc}: "
                               f"{(errs or stderr.strip())[-300:]}")
        return report

    def deno_clients(self):
        """The real Deno client (loadtest/deno/kvload.ts) against ours and upstream. All the
        servers run at once, idle but for the one under load, and take turns on each load, so
        that other work on the machine falls on all of them alike; --rounds N repeats that."""
        if not self.find_deno():
            return None
        log("real Deno clients")
        servers = [(OURS_T1, lambda db: self.ours(db, ["--threads", "1"])),
                   (OURS_DEFAULT, lambda db: self.ours(db, default_threads=True))]
        if self.upstream_bin:
            servers.append(("upstream", self.upstream))
        runs = {}
        with contextlib.ExitStack() as stack:
            started = [(label, stack.enter_context(mk(self.fresh_db("deno"))))
                       for label, mk in servers]
            for rnd in range(self.args.rounds):
                for i, (mix, procs, conc) in enumerate(DENO_LOADS):
                    for label, srv in started:
                        log(f"  round {rnd + 1}: {label}: {mix} {procs}×{conc}")
                        runs.setdefault((label, mix, procs, conc), []).append(
                            self.kvload(srv, mix, procs, conc, preload=rnd == 0 and i == 0))
        return {k: median_run(v) for k, v in runs.items()}

    def find_redis(self):
        """redis-server and redis-benchmark, installed from Debian when missing."""
        names = ["redis-server", "redis-benchmark", "redis-cli"]
        if all(shutil.which(n) for n in names):
            return True
        if shutil.which("apt-get") and os.geteuid() == 0:
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            install = ["apt-get", "install", "-y", "-q", "redis-server", "redis-tools"]
            log("installing Redis: " + " ".join(install))
            p = subprocess.run(install, env=env, capture_output=True, text=True)
            if p.returncode != 0:
                log("apt-get install failed; apt-get update, then again")
                subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
                p = subprocess.run(install, env=env, capture_output=True, text=True)
            if all(shutil.which(n) for n in names):
                return True
            why = f"`{' '.join(install)}` failed: {(p.stderr or p.stdout).strip()[-300:]}"
        else:
            why = "not installed, and apt-get as root is not available to install it"
        self.redis_skipped = (f"Redis ({', '.join(names)}) {why}; install `redis-server` "
                              "and `redis-tools` and re-run")
        log(f"!!! SKIPPING the Redis anchor: {self.redis_skipped}")
        return False

    def redis_benchmark(self, srv, label, *args):
        """One redis-benchmark run (one test): its CSV row, with server and client CPU."""
        argv = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(srv.port), "-d", "100",
                "-r", "100000", "-e", "--csv", *[str(a) for a in args]]
        before = cpu_ticks(srv.pid)
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        p = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        ru2 = resource.getrusage(resource.RUSAGE_CHILDREN)
        after = cpu_ticks(srv.pid)
        rows, other = [], []
        for line in p.stdout.splitlines():
            f = [x.strip('"') for x in line.split('","')]
            if len(f) >= 8 and f[0] != "test":
                rows.append(f)
            elif line.strip() and not line.startswith('"test"'):
                other.append(line.strip())
        shown = [a for a in argv[:1] + argv[5:] if a not in ("-e", "--csv")]
        r = {"command": " ".join(shown), "exit": p.returncode,
             "error_total": len(other) + (p.returncode != 0), "errors": other[:5]}
        if rows:
            f = rows[-1]
            r["test"] = f[0]
            r["ops_per_sec"] = float(f[1])
            r["latency_ms"] = {"all": {"mean": float(f[2]), "p50": float(f[4]),
                                       "p95": float(f[5]), "p99": float(f[6]),
                                       "max": float(f[7])}}
            n = int(args[args.index("-n") + 1])
            hz = os.sysconf("SC_CLK_TCK")
            if before is not None and after is not None:
                r["server_cpu_ms_per_1k_ops"] = (after - before) / hz * 1e6 / n
            client = (ru2.ru_utime + ru2.ru_stime) - (ru.ru_utime + ru.ru_stime)
            r["client_cpu_ms_per_1k_ops"] = client * 1e6 / n
        else:
            r["error_total"] += 1
        if r["error_total"]:
            self.errors.append(f"`{r['command']}` ({label}) exited {p.returncode}: "
                               f"{'; '.join(other[:3]) or p.stderr.strip()[-300:]}")
        return r

    def redis(self):
        """The Redis anchor: Redis from Debian, AOF fsynced always, with its own client."""
        if not self.find_redis():
            return None
        log("Redis anchor (redis-benchmark)")
        d = self.work / "db" / f"redis-{self.runs}"
        d.mkdir(parents=True)
        self.runs += 1
        port = free_port()
        argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d),
                "--appendonly", "yes", "--appendfsync", "always", "--save", "",
                "--daemonize", "no"]
        out = {"argv": shlex.join(argv[:5] + ["--dir", "<fresh dir>"] + argv[7:])}
        version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
        out["version"] = version.stdout.strip()
        dur = seconds(self.duration)
        n64 = max(10_000, int(40_000 * dur))
        n1 = max(1_000, int(2_000 * dur))
        with Server("redis", argv, port, self.work / "redis.log") as srv:
            conf = {}
            for k in ["appendonly", "appendfsync", "save"]:
                p = subprocess.run(["redis-cli", "-p", str(port), "config", "get", k],
                                   capture_output=True, text=True)
                v = p.stdout.split("\n")
                conf[k] = v[1] if len(v) > 1 else "?"
            out["config"] = conf
            runs = {}
            for rnd in range(self.args.rounds):
                for test, c, n in [("set", 64, n64), ("get", 64, n64), ("set", 1, n1)]:
                    log(f"  round {rnd + 1}: redis {test} {c} clients, {n:,} requests")
                    runs.setdefault((test, c), []).append(self.redis_benchmark(
                        srv, f"{test} {c}", "-t", test, "-c", c, "-n", n))
        out.update({k: median_run(v) for k, v in runs.items()})
        return out

    def profile(self):
        if not shutil.which("perf"):
            return None
        log("profile of the write load (perf, cpu-clock)")
        data = self.work / "perf.data"
        with self.ours(self.fresh_db("profile")) as srv:
            rec = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", "999", "-g",
                                    "-o", str(data), "-p", str(srv.pid)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            r = self.loadtest("write", srv, "--proto", "h1", "--concurrency", 64, "--keys", KEYS)
            rec.send_signal(signal.SIGINT)
            rec.wait(timeout=60)
        def report(*a):
            p = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children",
                                "-g", "none", "--percent-limit", "1.5", *a],
                               capture_output=True, text=True)
            return "\n".join(l for l in p.stdout.splitlines() if l and not l.startswith("#"))
        return {
            "run": r,
            "threads": report("--sort", "comm"),
            "committer": report("--comm", "committer", "--sort", "dso,sym"),
            "cores": report("--comm", "core-0,core-1", "--sort", "dso,sym"),
        }


# ---- the document ---------------------------------------------------------------------------

def lat(r, kind=None):
    lm = r.get("latency_ms", {})
    k = kind or ("all" if "all" in lm else next(iter(lm), None))
    return lm.get(k, {}) if k else {}


def fmt(v, digits=0):
    if v is None:
        return "–"
    return f"{v:,.{digits}f}"


def ratio(a, b, digits=1):
    return f"{a / b:.{digits}f}×" if a and b else "–"


def cpu(r):
    return fmt(r.get("server_cpu_ms_per_1k_ops"), 1)


def client_cpu(r):
    return fmt(r.get("client_cpu_ms_per_1k_ops"), 1)


def machine():
    cpu_model = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} CPUs ({cpu_model}), {mem:.0f} GiB, Linux {platform.release()}"


def git_rev():
    p = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                       text=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return p.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


def deno_app(deno):
    """The app mix, 4 Deno processes × 32: ours (default threads) and upstream's ops/s, and
    whether ours ≥ 3× upstream's without errors."""
    o, u = (deno.get((OURS_DEFAULT, "app", 4, 32), {}), deno.get(("upstream", "app", 4, 32), {}))
    oo, uu = o.get("ops_per_sec"), u.get("ops_per_sec")
    return oo, uu, bool(oo and uu and not o.get("error_total")) and oo >= 3 * uu


def render_deno(rep, deno):
    """The "Real Deno clients" section."""
    L = []
    w = L.append
    w("## Real Deno clients\n")
    if deno is None:
        w(f"**Not measured: {rep.deno_skipped}**\n")
        return L
    threads = len(os.sched_getaffinity(0))
    w(f"`loadtest/deno/kvload.ts` under {rep.deno_version}: the real client, `Deno.openKv(url)`. "
      "Each process is a Deno subprocess with its own `Deno.openKv`, so its own h2 connection, "
      "as each app server process has; each keeps C operations in flight (closed loop). "
      f"{rep.warmup} warm-up, {rep.duration} measured; {KEYS:,} preloaded keys, 100-byte "
      "values. `cas` is what an app does for a checked update: `kv.get`, then "
      "`kv.atomic().check({ key, versionstamp }).set(...).commit()` (two requests, timed "
      "together); a check that fails because another writer got there first is counted apart, "
      "not in ops/s and not as an error. Errors: every operation that threw, returned a wrong "
      "or missing value, or had no answer 10 s after the window. CPU µs/op: the server's and the "
      "Deno processes' own user+system time over the window (both share the same cores). "
      f"Ours: `--threads 1`, and the default (one serving thread per CPU: {threads} here); "
      "upstream: its defaults. The three servers run at once, idle but for the one under "
      "load, and take turns on each load, so other work on the machine falls on all alike"
      + rounds_note(rep) + ".\n")
    w("| load | processes × ops in flight | server | ops/s | errors | failed checks | "
      "server CPU µs/op | client CPU µs/op | ÷ upstream |")
    w("|---|---|---|---:|---:|---:|---:|---:|---:|")
    labels = list(dict.fromkeys(k[0] for k in deno))
    for mix, procs, conc in DENO_LOADS:
        u = deno.get(("upstream", mix, procs, conc), {})
        for label in labels:
            r = deno.get((label, mix, procs, conc), {})
            w(f"| {DENO_MIXES[mix]} | {procs} × {conc} | {label} | {ops_cell(r)} | "
              f"{r.get('error_total', '–')} | {r.get('check_failed', '–')} | {cpu(r)} | "
              f"{client_cpu(r)} | "
              f"{ratio(r.get('ops_per_sec'), u.get('ops_per_sec')) if label != 'upstream' else ''} |")
    w("")
    oo, uu, met = deno_app(deno)
    w(f"- Target, 4 Deno processes × 32 on the app mix, ours ≥ 3× upstream: "
      f"{fmt(oo)} ÷ {fmt(uu)} = {ratio(oo, uu)}: {'met' if met else '**not met**'}.")
    a, b = (deno.get((OURS_DEFAULT, "reads", 1, 64), {}).get("ops_per_sec"),
            deno.get((OURS_T1, "reads", 1, 64), {}).get("ops_per_sec"))
    w(f"- One Deno app (1 process × 64 point reads): default threads ÷ `--threads 1` = "
      f"{fmt(a)} ÷ {fmt(b)} = {ratio(a, b)} (the issue's aim for one h2 connection: ≥ 1.5×).\n")
    w("Latency per operation (ms; percentiles from 1%-wide buckets):\n")
    w("| load | server | operation | count | p50 | p90 | p99 | max |")
    w("|---|---|---|---:|---:|---:|---:|---:|")
    for mix, procs, conc in DENO_LOADS:
        for label in labels:
            r = deno.get((label, mix, procs, conc), {})
            for op in r.get("per_op", {}):
                l_ = lat(r, op) or {}
                w(f"| {mix} {procs} × {conc} | {label} | {op} | {fmt(l_.get('count'))} | "
                  f"{fmt(l_.get('p50'), 2)} | {fmt(l_.get('p90'), 2)} | {fmt(l_.get('p99'), 2)} | "
                  f"{fmt(l_.get('max'), 2)} |")
    w("")
    return L


def lone_cell(rows, key, digits):
    """The median of `key` over the rounds, each round's in brackets."""
    each = ", ".join(fmt(x.get(key), digits) for x in rows)
    return f"{fmt(median_of(rows, key), digits)} ({each})" if rows else "–"


def render_lone(rep, lone):
    """The "A lone writer" section."""
    L = []
    w = L.append
    w("## A lone writer\n")
    w("One client with one write in flight (`denokv-loadtest write --concurrency 1 --keys "
      f"{KEYS}`, the h1-write-1 and h2-write-1 loads of `loadtest/ab-report.py`), ours and "
      f"upstream taking turns: {LONE_ROUNDS} rounds, in each every server runs each protocol "
      "once, the order reversed every other round; every run is a fresh server on a copy of "
      f"one `gen-db` database of {KEYS:,} keys (the writes overwrite existing keys). "
      f"{rep.warmup} warm-up, {rep.duration} measured. Each cell is the median across the "
      "rounds, each round's figure in brackets; the targets use the medians.\n")
    w("| proto | server | writes/s | p50 ms | p99 ms | server CPU µs/write | errors |")
    w("|---|---|---:|---:|---:|---:|---:|")
    for proto in ["h1", "h2"]:
        o, u = lone.get(("ours", proto), []), lone.get(("upstream", proto), [])
        for name, rows in [("ours", o), ("upstream", u)]:
            if rows:
                w(f"| {proto} | {name} | {lone_cell(rows, 'ops', 0)} | {lone_cell(rows, 'p50', 2)} | "
                  f"{lone_cell(rows, 'p99', 2)} | {lone_cell(rows, 'server', 1)} | "
                  f"{sum(x['errors'] for x in rows)} |")
        if o and u:
            m = lambda rows, k: median_of(rows, k)
            w(f"| {proto} | ours ÷ upstream | {ratio(m(o, 'ops'), m(u, 'ops'), 2)} | "
              f"{ratio(m(o, 'p50'), m(u, 'p50'), 2)} | {ratio(m(o, 'p99'), m(u, 'p99'), 2)} | "
              f"{ratio(m(o, 'server'), m(u, 'server'), 2)} | |")
    w("")
    return L


def render_redis(rep, redis, ours, up, deno):
    """The Redis anchor, with the loads of ours and upstream closest to it beside it."""
    L = []
    w = L.append
    w("## Redis, for scale (its own client, not our protocol)\n")
    if redis is None:
        w(f"**Not measured: {rep.redis_skipped}**\n")
        return L
    c = redis["config"]
    w(f"{redis['version']} from Debian, started as `{redis['argv']}` in a fresh directory on "
      f"the same disk as our databases (read back with CONFIG GET: appendonly {c['appendonly']}, "
      f"appendfsync {c['appendfsync']}, save '{c['save']}'), so every write is in the "
      "append-only file and fsynced before Redis answers; it fsyncs once per event-loop pass "
      "for all the clients served in it, a group commit like ours. Measured with Redis's own "
      "client, `redis-benchmark -d 100 -r 100000` (RESP, a connection per client, one request "
      "in flight each, no pipelining), once per row below; GET runs after SET and asks for a random "
      "one of the same 100,000 keys (one that SET has not written answers nil). It is a yardstick, not a comparison "
      "of like with like: RESP is a far lighter protocol than HTTP with protobuf, a SET is not "
      "an atomic KV Connect commit with a versionstamp, and redis-benchmark is not our load "
      "generator. The rows after Redis's are ours and upstream's closest loads from this "
      "report, each with its own client as named" + rounds_note(rep) + ".\n")
    w("| server | client | load | ops/s | p50 ms | p99 ms | server CPU µs/op | "
      "client CPU µs/op | errors |")
    w("|---|---|---|---:|---:|---:|---:|---:|---:|")

    def row(server, client, load, r):
        if not r:
            return
        l_ = lat(r) or {}
        w(f"| {server} | {client} | {load} | {ops_cell(r)} | "
          f"{fmt(l_.get('p50'), 2)} | {fmt(l_.get('p99'), 2)} | {cpu(r)} | {client_cpu(r)} | "
          f"{r.get('error_total', '–')} |")

    for (test, c), label in [(("set", 64), "SET, 64 clients"), (("get", 64), "GET, 64 clients"),
                             (("set", 1), "SET, 1 client")]:
        row("Redis", "redis-benchmark", label, redis.get((test, c), {}))
    for name, table in [("ours", ours), ("upstream", up)]:
        for (wl, c), label in [(("write", 64), "write, 64 clients"),
                               (("read", 64), "point read, 64 clients"),
                               (("write", 1), "write, 1 client")]:
            row(name, "denokv-loadtest, HTTP/1.1", label, table.get((wl, "h1", c)))
    for label in [OURS_DEFAULT, "upstream"]:
        for mix, text in [("writes", "kv.set, 1 process × 64"),
                          ("reads", "kv.get, 1 process × 64")]:
            row(label, "Deno.openKv, h2", text, (deno or {}).get((label, mix, 1, 64)))
    w("")
    w("Redis's rows, in order: " + "; ".join(
        f"`{redis[k]['command']}`" for k in [("set", 64), ("get", 64), ("set", 1)] if k in redis)
      + " (with `-e --csv`: server errors printed and counted, CSV output; the p50/p99 are "
      "redis-benchmark's own). Its server CPU is the redis-server process's over the whole "
      "run, its client CPU redis-benchmark's.\n")
    return L


def render(rep, started, ceil, ours, up, lone, scale, mem_ours, mem_up, variants, bench, prof,
           deno, redis):
    L = []
    w = L.append
    elapsed = (time.time() - started) / 60
    w("# Performance\n")
    w(f"Produced by `loadtest/perf-report.py{' --quick' if rep.args.quick else ''}` on "
      f"{datetime.date.today().isoformat()} at commit {git_rev()}{rep.binaries_note()}, in one "
      f"sitting of "
      f"{elapsed:.0f} minutes. Re-run it to check any number here; raw JSON reports are kept in "
      f"`$CARGO_TARGET_DIR/perf-report/`.\n")
    w(f"- Machine: {machine()}. Servers and the load generator share these cores, so every "
      "number includes the client's own CPU use. Load average (1/5/15 min) at the start: "
      f"{rep.loadavg_start}; at the end: {open('/proc/loadavg').read().split(' ', 3)[:3]}.")
    w(f"- Each load: {rep.warmup} warm-up, then {rep.duration} measured; closed loop (each "
      "client has one request in flight). HTTP/1.1: a connection per client; h2: all clients "
      "as streams on one connection, as the Deno CLI does. Keys: 10,000 (read, mixed and list "
      "on a preloaded database), 100-byte values.")
    driver = variants.get((DEFAULT_VARIANT, "driver")) or "–"
    w("- Ours: `denokv --threads 2` (its defaults otherwise: `--sync-mode full`, `--wal-writes "
      "pwrite`, `--io-driver auto`, i.e. io_uring where the kernel allows it, else epoll: "
      f"{driver} here, `--read-sharing off`)." + (
          " Upstream: `denokv` from `cargo install denokv --locked`, its defaults."
          if rep.upstream_bin else " Upstream: not measured (--no-upstream)."))
    w("- CPU ms/1k ops: the server's user+system CPU time over the measured window per 1,000 "
      "operations (= µs per operation); \"client\": the load generator's own, which competes "
      "with the server for the same cores.\n")

    w("## Ceilings of this machine\n")
    d = ceil["disk"]
    w("| what | value |\n|---|---|")
    for proto in ["h1", "h2"]:
        r = ceil[f"trivial_{proto}"]
        w(f"| trivial HTTP server, {proto}, 64 clients | {fmt(r.get('ops_per_sec'))} req/s |")
    w(f"| fdatasync of 4 KiB | {fmt(d['fdatasync_per_sec'])}/s |")
    w(f"| SQLite one-row commits, WAL, synchronous=FULL | {fmt(d['sqlite_full_commits_per_sec'])}/s |")
    w(f"| SQLite one-row commits, WAL, synchronous=NORMAL | {fmt(d['sqlite_normal_commits_per_sec'])}/s |\n")

    w("## Targets\n")
    w("The targets of issue 15, each from this run's measurements.\n")
    tgt = []
    for proto in ["h1", "h2"]:
        o, u = ours.get(("write", proto, 64), {}), up.get(("write", proto, 64), {})
        tgt.append((f"writes/s at 64 clients, {proto}: ours ÷ upstream ≥ 10×",
                    f"{fmt(o.get('ops_per_sec'))} ÷ {fmt(u.get('ops_per_sec'))} = "
                    f"{ratio(o.get('ops_per_sec'), u.get('ops_per_sec'))}",
                    bool(u) and o.get("ops_per_sec", 0) >= 10 * u.get("ops_per_sec", 1)))
    for wl, noun, limit in [("write", "write", 25), ("read", "point read", 12)]:
        for proto in ["h1", "h2"]:
            o = ours.get((wl, proto, 64), {}).get("server_cpu_ms_per_1k_ops")
            u = up.get((wl, proto, 64), {}).get("server_cpu_ms_per_1k_ops")
            tgt.append((f"server CPU per {noun} at 64 clients, {proto}: ≤ {limit} µs",
                        f"{fmt(o, 1)} µs (upstream {fmt(u, 1)} µs, {ratio(u, o)} ours)",
                        o is not None and o <= limit))
    for proto in ["h1", "h2"]:
        o, u = lone.get(("ours", proto), []), lone.get(("upstream", proto), [])
        o50, u50, o99, u99 = (median_of(o, "p50"), median_of(u, "p50"), median_of(o, "p99"),
                              median_of(u, "p99"))
        tgt.append((f"a lone client's write, {proto}: p50 ≤ 0.75× upstream's and p99 ≤ 1.0× "
                    f"(medians of {LONE_ROUNDS} rounds, \"A lone writer\")",
                    f"p50 {fmt(o50, 2)} vs {fmt(u50, 2)} ms = {ratio(o50, u50, 2)}; "
                    f"p99 {fmt(o99, 2)} vs {fmt(u99, 2)} ms = {ratio(o99, u99, 2)}",
                    bool(o50 and u50 and o99 and u99) and o50 <= 0.75 * u50 and o99 <= u99))
    for proto in ["h1", "h2"]:
        o = ours.get(("read", proto, 64), {}).get("ops_per_sec")
        u = up.get(("read", proto, 64), {}).get("ops_per_sec")
        t = ceil[f"trivial_{proto}"].get("ops_per_sec")
        tgt.append((f"point reads/s at 64 clients, {proto}: ≥ 70% of the trivial server",
                    (f"{fmt(o)} vs {fmt(t)} = {100 * o / t:.0f}% of trivial" if o and t else "–")
                    + f"; {ratio(o, u)} upstream",
                    bool(o and t) and o >= 0.7 * t))
    # One h2 connection, as every Deno app has: the variants table's 64 streams on one connection.
    r1 = variants.get(("--threads 1", "read", 64), {}).get("ops_per_sec")
    for label in [DEFAULT_VARIANT, "--read-sharing on"]:
        r2 = variants.get((label, "read", 64), {}).get("ops_per_sec")
        tgt.append((f"point reads/s, 64 streams on one h2 connection: {label} ≥ 1.5× --threads 1",
                    f"{fmt(r2)} vs {fmt(r1)} = {ratio(r2, r1)}", bool(r1 and r2) and r2 >= 1.5 * r1))
    if deno is None:
        tgt.append(("4 Deno processes × 32 on the app mix: ours ≥ 3× upstream",
                    f"not measured: {rep.deno_skipped}", False))
    else:
        oo, uu, met = deno_app(deno)
        tgt.append(("4 Deno processes × 32 on the app mix (\"Real Deno clients\"): ours ≥ 3× "
                    "upstream", f"{fmt(oo)} ÷ {fmt(uu)} = {ratio(oo, uu)}", met))
    small, big = rep.scale_keys[0], rep.scale_keys[-1]
    for wl in ["read", "write"]:
        a, b = scale.get((wl, small), {}).get("ops_per_sec"), scale.get((wl, big), {}).get("ops_per_sec")
        u = scale.get(("upstream", wl, big), {}).get("ops_per_sec")
        tgt.append((f"{wl}s/s at {big:,} keys ≥ 70% of {small:,} keys and ≥ 3× upstream at "
                    f"{big:,}",
                    (f"{fmt(b)} vs {fmt(a)} = {100 * b / a:.0f}%" if a and b else "–")
                    + f"; upstream {fmt(u)}, ours {ratio(b, u)}",
                    bool(a and b and u) and b >= 0.7 * a and b >= 3 * u))
    wr = mem_ours.get("watch", {})
    wp99 = lat(wr, "notify").get("p99")
    tgt.append((f"watch delivery p99 < 5 ms at {rep.watchers:,} watchers", f"{fmt(wp99, 2)} ms",
                wp99 is not None and wp99 < 5))
    errs = sum(r.get("error_total", 0) for r in ours.values())
    tgt.append(("no errors under any load (ours, all runs above)", f"{errs} errors", errs == 0))
    w("| target | measured | met |\n|---|---|---|")
    for name, val, ok in tgt:
        w(f"| {name} | {val} | {'yes' if ok else '**no**'} |")
    w("")

    w("### Where the write throughput goes\n")
    w("Closed-loop clients on a machine whose cores the server shares with the load generator: "
      "throughput is bounded by the CPU both spend per operation, and the mean latency of C "
      "clients is C ÷ throughput (Little's law), so the p99 at 64 clients cannot approach the "
      "1-client p99 unless throughput reaches about 64 ÷ (2 × p99 at 1 client).\n")
    w("| load | ops/s | server CPU µs/op | client CPU µs/op | cores busy (of "
      f"{os.cpu_count()}) | mean latency ms | 64 ÷ ops/s ms |")
    w("|---|---:|---:|---:|---:|---:|---:|")
    for who, table in [("ours", ours), ("upstream", up)]:
        for proto in ["h1", "h2"]:
            r = table.get(("write", proto, 64))
            if not r:
                continue
            ops, sc, cc = (r.get("ops_per_sec") or 0, r.get("server_cpu_ms_per_1k_ops"),
                           r.get("client_cpu_ms_per_1k_ops"))
            busy = (sc + cc) * ops / 1e6 if sc is not None and cc is not None else None
            w(f"| {who} write, {proto}, 64 clients | {fmt(ops)} | {fmt(sc, 1)} | {fmt(cc, 1)} | "
              f"{fmt(busy, 2)} | {fmt(lat(r).get('mean'), 2)} | {fmt(64e3 / ops if ops else None, 2)} |")
    w("")

    w("## Ours and upstream, side by side\n")
    for wl in WORKLOADS:
        w(f"### {wl}\n")
        w("| proto | clients | ours ops/s | p50 ms | p99 ms | errors | CPU ms/1k ops (client) | "
          "upstream ops/s | p50 ms | p99 ms | errors | CPU ms/1k ops (client) | ours ÷ upstream |")
        w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for proto in ["h1", "h2"]:
            for c in rep.clients:
                o, u = ours.get((wl, proto, c), {}), up.get((wl, proto, c), {})
                lo, lu = lat(o), lat(u)
                extra = ""
                if wl == "cas":
                    extra = f" (+{o.get('conflicts', 0)} conflicts)"
                w(f"| {proto} | {c} | {fmt(o.get('ops_per_sec'))}{extra} | {fmt(lo.get('p50'), 2)} | "
                  f"{fmt(lo.get('p99'), 2)} | {o.get('error_total', '–')} | {cpu(o)} ({client_cpu(o)}) | "
                  f"{fmt(u.get('ops_per_sec'))} | {fmt(lu.get('p50'), 2)} | {fmt(lu.get('p99'), 2)} | "
                  f"{u.get('error_total', '–')} | {cpu(u)} ({client_cpu(u)}) | "
                  f"{ratio(o.get('ops_per_sec'), u.get('ops_per_sec'))} |")
        w("")
    w("cas: ops/s counts committed increments; conflicts (check failures, expected on 10 hot "
      "keys) are counted apart. sum and cas verify afterwards that the counters equal the "
      "acknowledged operations; a failed check would show as an error below.\n")

    L += render_lone(rep, lone)
    L += render_deno(rep, deno)
    L += render_redis(rep, redis, ours, up, deno)

    w("## Cost as the database grows (ours and upstream, h2, 64 clients)\n")
    w("| keys | file size | reads/s | read p99 ms | server CPU µs/read | writes/s | write p99 ms | "
      "server CPU µs/write | upstream reads/s (ours ÷) | server CPU µs/read | "
      "upstream writes/s (ours ÷) | server CPU µs/write |")
    w("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in rep.scale_keys:
        r, wr_ = scale.get(("read", n), {}), scale.get(("write", n), {})
        ur, uw = scale.get(("upstream", "read", n), {}), scale.get(("upstream", "write", n), {})
        size = scale.get(("size", n), 0) / 2**20
        w(f"| {n:,} | {size:,.0f} MiB | {fmt(r.get('ops_per_sec'))} | {fmt(lat(r).get('p99'), 2)} | {cpu(r)} | "
          f"{fmt(wr_.get('ops_per_sec'))} | {fmt(lat(wr_).get('p99'), 2)} | {cpu(wr_)} | "
          f"{fmt(ur.get('ops_per_sec'))} ({ratio(r.get('ops_per_sec'), ur.get('ops_per_sec'))}) | "
          f"{cpu(ur)} | {fmt(uw.get('ops_per_sec'))} "
          f"({ratio(wr_.get('ops_per_sec'), uw.get('ops_per_sec'))}) | {cpu(uw)} |")
    w("\nThe databases are written by `denokv-loadtest gen-db` (the same keys and bytes as a "
      "preload over HTTP); each is read through once before each server starts on it, so that it is in the page cache (this machine's kernel reclaims page cache left idle). Upstream serves the "
      "same file (gen-db writes the SQLite format both servers read) right after ours.\n")

    w("## Memory\n")
    w(f"Every idle connection comes from 127.0.0.1, so ours runs with "
      f"`--max-connections-per-ip {2 * rep.idle_conns}` and `--max-connections "
      f"{2 * rep.idle_conns}` here (its defaults, 1,000 and 10,000, would close the rest at "
      "accept).\n")
    w("| | ours | upstream |\n|---|---:|---:|")
    for proto in ["h1", "h2"]:
        o, u = mem_ours.get(("idle", proto), {}), mem_up.get(("idle", proto), {})
        for key, label in [("server_rss_mib_before", "RSS before"),
                           ("server_rss_mib_with_connections", f"RSS with {rep.idle_conns:,} idle {proto} connections"),
                           ("server_kib_per_connection", "KiB per connection")]:
            w(f"| {label} | {fmt(o.get(key), 1)} | {fmt(u.get(key), 1)} |")
        w(f"| {proto} connections still usable after the hold | {o.get('alive_after_hold', '–')} | "
          f"{u.get('alive_after_hold', '–')} |")
    wo, wu = mem_ours.get("watch", {}), mem_up.get("watch", {})
    so, su = wo.get("server") or {}, wu.get("server") or {}
    w(f"| RSS with {rep.watchers:,} watch streams (h2, 10 connections) | {fmt(so.get('rss_mib_end'), 1)} | "
      f"{fmt(su.get('rss_mib_end'), 1)} |")
    w(f"| watch delivery p50 / p99 ms (one writer, 10 ms between writes) | {fmt(lat(wo, 'notify').get('p50'), 2)} / "
      f"{fmt(lat(wo, 'notify').get('p99'), 2)} | {fmt(lat(wu, 'notify').get('p50'), 2)} / "
      f"{fmt(lat(wu, 'notify').get('p99'), 2)} |")
    w(f"| watch: writes/s, errors | {fmt(wo.get('ops_per_sec'))}, {wo.get('error_total', '–')} | "
      f"{fmt(wu.get('ops_per_sec'))}, {wu.get('error_total', '–')} |\n")

    w("## Our variants (h2)\n")
    w("All clients of a load are streams on one h2 connection, as in a Deno app.\n")
    w("The default row runs `--io-driver auto` (io_uring where the kernel allows it, else "
      "epoll); the `--io-driver epoll` row is the same server "
      "with its cores waiting for their sockets with epoll. The io driver column is what each "
      "server logged it ran its cores on.\n")
    w("| variant | writes/s, 1 client | p50 / p99 ms | writes/s, 64 clients | p50 / p99 ms | "
      "reads/s, 1 client | server CPU µs per read, 1 client | "
      "reads/s, 64 clients | server / client CPU µs per read | io driver |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for label in dict.fromkeys(k[0] for k in variants):
        a, b, c = (variants.get((label, "write", 1), {}), variants.get((label, "write", 64), {}),
                   variants.get((label, "read", 64), {}))
        r1 = variants.get((label, "read", 1), {})
        w(f"| {label} | {fmt(a.get('ops_per_sec'))} | {fmt(lat(a).get('p50'), 2)} / {fmt(lat(a).get('p99'), 2)} | "
          f"{fmt(b.get('ops_per_sec'))} | {fmt(lat(b).get('p50'), 2)} / {fmt(lat(b).get('p99'), 2)} | "
          f"{fmt(r1.get('ops_per_sec'))} | {cpu(r1)} | "
          f"{fmt(c.get('ops_per_sec'))} | {fmt(c.get('server_cpu_ms_per_1k_ops'), 1)} / "
          f"{fmt(c.get('client_cpu_ms_per_1k_ops'), 1)} | {variants.get((label, 'driver')) or '–'} |")
    w("")

    w("## The committer alone (criterion, `benches/`)\n")
    w("Writes/s of one batch of N single-key sets committed straight into SQLite (no HTTP), "
      "10,000 keys, 100-byte values; `cargo bench -p denokv-benches --bench hot_paths -- commit_batch`.\n")
    groups = sorted({g for g, _ in bench})
    w("| batch | " + " | ".join(groups) + " |")
    w("|---:|" + "---:|" * len(groups))
    for n in [1, 8, 64, 512]:
        w(f"| {n} | " + " | ".join(fmt(bench.get((g, n))) for g in groups) + " |")
    w("")

    if prof:
        r = prof["run"]
        w("## Where the write time goes (perf, 64 clients, h1)\n")
        w(f"`perf record -e cpu-clock -g` on our server during a write load of "
          f"{fmt(r.get('ops_per_sec'))} writes/s. On-CPU samples by thread:\n")
        w("```\n" + prof["threads"] + "\n```\n")
        w("(`iou-wrk-N` is a kernel io_uring worker thread of our process: it runs the operations "
          "of the cores' rings that cannot complete inline, and with `--wal-writes io-uring` the "
          "committer's linked fdatasync.)\n")
        w("The committer thread, by function (≥ 1.5% of all samples):\n")
        w("```\n" + prof["committer"] + "\n```\n")
        w("The serving cores, by function:\n")
        w("```\n" + prof["cores"] + "\n```\n")

    if rep.errors:
        w("## Runs that did not pass\n")
        for e in rep.errors:
            w(f"- {e}")
        w("")
    notes = ROOT / "loadtest" / "perf-notes.md"
    if notes.exists():
        w(notes.read_text())
    return "\n".join(L) + "\n"


SECTIONS = {"deno": "## Real Deno clients", "redis": "## Redis"}


def splice(doc, sections):
    """`doc` with each (heading prefix, markdown) of `sections` in place of its `## ` section
    with that heading, or, if it has none, inserted before the scaling section (else at the
    end)."""
    trailing = doc[len(doc.rstrip("\n")):] or "\n"
    lines = doc.rstrip("\n").split("\n")
    for prefix, text in sections:
        new = text.rstrip("\n").split("\n") + [""]
        start = next((i for i, l in enumerate(lines) if l.startswith(prefix)), None)
        if start is not None:
            end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                       len(lines))
        else:
            start = end = next((i for i, l in enumerate(lines) if l.startswith(
                "## Cost as the database grows")), len(lines))
            if start == len(lines):
                new = [""] + new
        lines[start:end] = new
    return "\n".join(lines).rstrip("\n") + trailing


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short loads, fewer sizes: a smoke run")
    ap.add_argument("--no-upstream", action="store_true", help="do not measure upstream denokv")
    ap.add_argument("--no-build", action="store_true",
                    help="use the release binaries already in $CARGO_TARGET_DIR/release "
                    "(the criterion step still runs cargo bench)")
    ap.add_argument("--only", metavar="SECTIONS",
                    help="run only these sections (comma-separated: " + ", ".join(SECTIONS) +
                    ") and replace just them in --out, which keeps the rest")
    ap.add_argument("--duration", default="3s", help="measured time of each load (default 3s)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="Deno and Redis sections: run every load N times, servers taking "
                    "turns, and report the median run by ops/s (default 1)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "PERFORMANCE.md"))
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    only = None
    if args.only is not None:
        only = [x.strip() for x in args.only.split(",") if x.strip()]
        bad = [x for x in only if x not in SECTIONS]
        if bad or not only:
            ap.error(f"--only: unknown section {', '.join(bad)} (known: {', '.join(SECTIONS)})")
        only = [x for x in SECTIONS if x in only]  # deno first: the Redis table quotes it
    started = time.time()
    rep = Report(args)
    if only is not None:
        rep.build(["denokv"])
        rep.find_upstream()
        sections = []
        deno = None
        for name in only:
            before = len(rep.errors)
            if name == "deno":
                deno = rep.deno_clients()
                L = render_deno(rep, deno)
            else:
                L = render_redis(rep, rep.redis(), {}, {}, deno)
            flags = " ".join([f"--only {','.join(only)}"] + (["--quick"] if args.quick else []) +
                             ([f"--duration {args.duration}"] if not args.quick else []) +
                             ([f"--rounds {args.rounds}"] if args.rounds != 1 else []) +
                             (["--no-upstream"] if args.no_upstream else []))
            L.insert(1, f"*Measured apart from the rest of this document: "
                        f"`loadtest/perf-report.py {flags}` on "
                        f"{datetime.date.today().isoformat()} at commit {git_rev()}"
                        f"{rep.binaries_note()}; "
                        f"{machine()}; load average (1/5/15 min) at the start "
                        f"{rep.loadavg_start}, at the end "
                        f"{open('/proc/loadavg').read().split(' ', 3)[:3]}.*\n")
            if len(rep.errors) > before:
                L.append("Runs of this section that did not pass:\n")
                L += [f"- {e}" for e in rep.errors[before:]] + [""]
            sections.append((SECTIONS[name], "\n".join(L)))
        out = Path(args.out)
        doc = out.read_text() if out.exists() else "# Performance\n"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(splice(doc, sections))
        shutil.rmtree(rep.work / "db", ignore_errors=True)
        log(f"wrote {', '.join(only)} into {args.out} ({len(rep.errors)} runs did not pass)")
        return
    rep.build(["denokv", "denokv-loadtest", "denokv-trivial-server"])
    rep.find_upstream()
    ceil = rep.ceilings()
    ours = rep.matrix("ours")
    up = rep.matrix("upstream") if rep.upstream_bin else {}
    lone = rep.lone_writer()
    deno = rep.deno_clients()
    redis = rep.redis()
    scale = rep.scaling()
    mem_ours = rep.memory("ours")
    mem_up = rep.memory("upstream") if rep.upstream_bin else {}
    variants = rep.variants()
    bench = rep.batch_bench()
    prof = rep.profile()
    text = render(rep, started, ceil, ours, up, lone, scale, mem_ours, mem_up, variants, bench,
                  prof, deno, redis)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    shutil.rmtree(rep.work / "db", ignore_errors=True)
    log(f"wrote {args.out} ({len(rep.errors)} runs did not pass)")


if __name__ == "__main__":
    main()
