#!/usr/bin/env python3
"""Crash test at scale: SIGKILL the real server under a mixed write load, restart it on the same
database, check that nothing acknowledged was lost or applied twice; N cycles.

    tests/crash/sigkill-cycles.py [--cycles N] [--seed S] [--bin PATH] [-- SERVER ARGS...]
    tests/crash/sigkill-cycles.py --cycles 100 -- --wal-writes io-uring

Each cycle: `denokv-loadtest crash-mix --stop-when-down` writes (plain sets, LE64 sums on a few
shared counters, versionstamped sets each with an enqueue) and logs every outcome in an ack log;
after a seeded random delay the server gets SIGKILL, and the load generator stops at the failure
of its requests in flight. The server is restarted on the same database either immediately (a
millisecond after the kill) or, in "image" cycles, once the load generator has stopped and the
database files as the crash left them are copied and checked with SQLite (`PRAGMA
integrity_check`, the global version, the enqueues in table `queue`); `--restart` picks one kind
or, by default, a seeded mix. A failed bind is retried for up to 5 s and counted. Then
`denokv-loadtest verify` checks every acknowledged write and every counter against the restarted
server. After the last cycle a short load runs on the restarted server, the server is stopped
with SIGTERM and the database file is checked once more (every check of the image included).

What counts as a failure:
  lost        an acknowledged set missing or older; a counter below the sum of its acknowledged
              addends; an acknowledged enqueue missing from `queue`
  duplicated  a counter above acknowledged + uncertain addends (a sum without an answer, or
              answered with an error, may or may not have committed); an enqueue stored twice
  integrity   `PRAGMA integrity_check` not ok; the global version (`data_version`) going
              backwards or below an acknowledged versionstamp; a row newer than it; an
              acknowledged versionstamp after a restart not above every earlier one
A restart that needed bind retries is reported, not failed (a known issue: the port is
sometimes still taken right after the crash).

Python 3.11 standard library only. The last line is `N passed, M failed` (cycles); the exit
status is 1 if any cycle failed, 2 if the test could not run.
"""

import argparse
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

TOKEN = "crash-cycles-token-0123456789"
# How long a restart may keep failing to bind before the cycle fails.
BIND_RETRY_SECONDS = 5.0
BIND_RETRY_PAUSE = 0.05
# The load runs until the kill; this only bounds it if the kill never comes.
LOAD_DURATION = "120s"

# Every process this script started and has not reaped yet: killed on any exit.
LIVE: list[subprocess.Popen] = []


def log(text: str) -> None:
    print(text, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(cmd: list[str], **kw) -> subprocess.Popen:
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, **kw)
    LIVE.append(p)
    return p


def reap(p: subprocess.Popen, timeout: float | None = None) -> int:
    rc = p.wait(timeout)
    if p in LIVE:
        LIVE.remove(p)
    return rc


def kill_all() -> None:
    for p in list(LIVE):
        if p.poll() is None:
            p.kill()
        reap(p)


def version_of(vs: int) -> int:
    """The commit version of a versionstamp: its first 8 bytes (SPEC §2.6)."""
    return vs >> 16


@dataclass
class AckLog:
    """What one ack log holds, as far as the checks made here need it."""

    versionstamps: list[int] = field(default_factory=list)
    sets: int = 0
    sums: int = 0
    enqueues: int = 0
    uncertain_sums: int = 0
    acked_payloads: set[str] = field(default_factory=set)
    uncertain_payloads: set[str] = field(default_factory=set)

    @property
    def acked(self) -> int:
        return self.sets + self.sums + self.enqueues

    def add(self, other: "AckLog") -> None:
        self.versionstamps += other.versionstamps
        self.sets += other.sets
        self.sums += other.sums
        self.enqueues += other.enqueues
        self.uncertain_sums += other.uncertain_sums
        self.acked_payloads |= other.acked_payloads
        self.uncertain_payloads |= other.uncertain_payloads


def read_ack_log(path: Path) -> AckLog:
    """Parses the records of loadtest/src/acklog.rs."""
    out = AckLog()
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        f = line.split()
        if not f or f[0].startswith("#"):
            continue
        if f[0] == "sum":
            out.sums += 1
            out.versionstamps.append(int(f[3], 16))
        elif f[0] == "sum?":
            out.uncertain_sums += 1
        elif f[0] == "enq":
            out.enqueues += 1
            out.acked_payloads.add(f[1])
            out.versionstamps.append(int(f[2], 16))
        elif f[0] == "enq?":
            out.uncertain_payloads.add(f[1])
        else:
            out.sets += 1
            out.versionstamps.append(int(f[1], 16))
    return out


@dataclass
class DbState:
    integrity: list[str]
    version: int
    max_row_version: int
    # Enqueue payload (hex) -> rows holding it, in `queue` and `queue_running`.
    payloads: dict[str, int]


def read_db(path: Path) -> DbState:
    con = sqlite3.connect(f"file:{path}?mode=rw", uri=True)
    try:
        integrity = [r[0] for r in con.execute("PRAGMA integrity_check")]
        version = con.execute("SELECT version FROM data_version WHERE k = 0").fetchone()[0]
        max_row = con.execute("SELECT coalesce(max(version), 0) FROM kv").fetchone()[0]
        payloads = dict(
            con.execute(
                "SELECT hex(data), count(*) FROM"
                " (SELECT data FROM queue UNION ALL SELECT data FROM queue_running)"
                " GROUP BY data"
            )
        )
        return DbState(integrity, version, max_row, {k.lower(): n for k, n in payloads.items()})
    finally:
        con.close()


def crash_image(db: Path, into: Path) -> Path:
    """Copies the database and its WAL as the crash left them (not the shared-memory index,
    which SQLite rebuilds from the WAL, as the restarted server does)."""
    if into.exists():
        shutil.rmtree(into)
    into.mkdir()
    for suffix in ("", "-wal"):
        src = Path(f"{db}{suffix}")
        if src.exists():
            shutil.copyfile(src, into / f"db.sqlite{suffix}")
    return into / "db.sqlite"


def error_kind(label: str) -> str:
    """A load error label in short: `HTTP 503`, `transport (connect)`, `protocol`."""
    head, _, rest = label.partition(":")
    if head == "transport":
        return f"transport ({rest.strip().partition(':')[0]})"
    return head


class Problems:
    """The failures of one cycle, by kind, with a line each."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.lost = 0
        self.duplicated = 0
        self.integrity = 0
        self.other = 0

    def add(self, kind: str, count: int, text: str) -> None:
        if count <= 0:
            return
        setattr(self, kind, getattr(self, kind) + count)
        self.lines.append(f"{kind}: {text}")

    def __bool__(self) -> bool:
        return bool(self.lines)


class Run:
    def __init__(self, args: argparse.Namespace, server_args: list[str], work: Path) -> None:
        self.args = args
        self.server_args = server_args
        self.work = work
        self.db = work / "db.sqlite"
        self.all_log = work / "all-acks.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.rng = random.Random(args.seed)
        self.server: subprocess.Popen | None = None
        self.starts = 0
        self.bind_retries = 0
        # Restarts, and those that needed bind retries, by kind (immediate, image).
        self.restarts = {"immediate": 0, "image": 0}
        self.restarts_retried = {"immediate": 0, "image": 0}
        self.bind_errors: set[str] = set()
        self.acks = AckLog()
        self.max_vs = 0
        self.last_version = 0
        self.load_errors: dict[str, int] = {}
        self.verified = {}

    # --- the server -----------------------------------------------------------------------

    def start_server(self) -> tuple[int, float]:
        """Starts the server and waits until it listens; returns (bind retries, seconds)."""
        started = time.monotonic()
        retries = 0
        while True:
            self.starts += 1
            err_path = self.work / f"server-{self.starts}.log"
            cmd = [
                self.args.bin, "--sqlite-path", str(self.db), "serve",
                "--access-token", TOKEN, "--addr", f"127.0.0.1:{self.port}",
                "--metrics-addr", "off", *self.server_args,
            ]
            with open(err_path, "wb") as err:
                proc = spawn(cmd, stdout=subprocess.DEVNULL, stderr=err)
            state = self.wait_listening(proc, err_path)
            if state == "up":
                self.server = proc
                return retries, time.monotonic() - started
            text = err_path.read_text(errors="replace")
            bind_failed = "Failed to start server" in text or "in use" in text
            if bind_failed and time.monotonic() - started < BIND_RETRY_SECONDS:
                retries += 1
                self.bind_retries += 1
                self.bind_errors.add(text.strip().splitlines()[-1][:200])
                time.sleep(BIND_RETRY_PAUSE)
                continue
            raise Fatal(f"the server did not start ({state}):\n{text[-2000:]}")

    def wait_listening(self, proc: subprocess.Popen, err_path: Path) -> str:
        deadline = time.monotonic() + 30
        want = f"Listening on http://127.0.0.1:{self.port}"
        while time.monotonic() < deadline:
            if want in err_path.read_text(errors="replace"):
                return "up"
            if proc.poll() is not None:
                reap(proc)
                return f"exit {proc.returncode}"
            time.sleep(0.005)
        proc.kill()
        reap(proc)
        return "not listening after 30 s"

    def kill_server(self) -> None:
        assert self.server is not None
        self.server.send_signal(signal.SIGKILL)
        reap(self.server)
        self.server = None

    def stop_server(self) -> int:
        assert self.server is not None
        self.server.send_signal(signal.SIGTERM)
        rc = reap(self.server, timeout=30)
        self.server = None
        return rc

    # --- the load generator ---------------------------------------------------------------

    def loadtest(self, *extra: str) -> list[str]:
        return [
            self.args.loadtest, *extra, "--url", self.url, "--token", TOKEN,
            "--timeout", "5s",
        ]

    def start_load(self, name: str, proto: str, duration: str) -> tuple[subprocess.Popen, Path]:
        ack_log = self.work / f"{name}.log"
        cmd = self.loadtest(
            "crash-mix", "--proto", proto, "--concurrency", str(self.args.concurrency),
            "--keys", str(self.args.keys), "--hot-keys", str(self.args.hot_keys),
            "--value-size", "64", "--duration", duration, "--warmup", "0s",
            "--seed", str(self.rng.randrange(1 << 48)), "--ack-log", str(ack_log),
            "--stop-when-down", "--format", "json", "--json", str(self.work / f"{name}.json"),
        )
        out = open(self.work / f"{name}.out", "wb")
        p = spawn(cmd, stdout=out, stderr=subprocess.STDOUT)
        out.close()
        return p, ack_log

    def finish_load(self, p: subprocess.Popen, name: str, problems: Problems) -> None:
        try:
            rc = reap(p, timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            reap(p)
            problems.add("other", 1, f"{name}: the load generator did not stop")
            return
        report = self.work / f"{name}.json"
        if rc == 2 or not report.exists():
            text = (self.work / f"{name}.out").read_text(errors="replace")
            problems.add("other", 1, f"{name}: the load generator failed (exit {rc}): {text[-500:]}")
            return
        for label, n in json.loads(report.read_text()).get("errors", {}).items():
            kind = error_kind(label)
            self.load_errors[kind] = self.load_errors.get(kind, 0) + n

    def take_log(self, ack_log: Path, problems: Problems, after_version: int) -> AckLog:
        """Adds a load's ack log to the cumulative one and checks that its versionstamps lie
        above everything acknowledged before and above the version the last crash left."""
        acks = read_ack_log(ack_log)
        if ack_log.exists():
            with open(self.all_log, "ab") as out, open(ack_log, "rb") as src:
                shutil.copyfileobj(src, out)
        if acks.versionstamps:
            low = min(acks.versionstamps)
            if low <= self.max_vs:
                problems.add(
                    "integrity", 1,
                    f"versionstamp {low:020x} acknowledged after a restart is not above"
                    f" {self.max_vs:020x} acknowledged before it",
                )
            if version_of(low) <= after_version:
                problems.add(
                    "integrity", 1,
                    f"versionstamp {low:020x} acknowledged after a restart is not above the"
                    f" version {after_version} the crash left",
                )
            self.max_vs = max(self.max_vs, max(acks.versionstamps))
        self.acks.add(acks)
        return acks

    def verify(self, problems: Problems) -> None:
        out = subprocess.run(
            self.loadtest("verify", "--ack-log", str(self.all_log), "--format", "json"),
            capture_output=True, text=True, timeout=600,
        )
        if out.returncode not in (0, 1):
            problems.add("other", 1, f"verify could not run: {out.stderr.strip()[-500:]}")
            return
        r = json.loads(out.stdout)
        self.verified = r
        lost = r["missing"] + r["older"] + r["wrong_value"]
        problems.add("lost", lost, f"{lost} acknowledged sets lost: {r['problems'][:5]}")
        short = [p for p in r["problems"] if p.startswith("lost acknowledged sums")]
        problems.add("lost", r["counters_short"], f"counters short: {short[:5]}")
        twice = [p for p in r["problems"] if p.startswith("a sum applied twice")]
        problems.add("duplicated", r["counters_excess"], f"counters in excess: {twice[:5]}")

    # --- the database file ----------------------------------------------------------------

    def check_db(self, path: Path, problems: Problems, what: str) -> int:
        """Checks a database image against everything acknowledged so far; returns its
        global version."""
        try:
            state = read_db(path)
        except sqlite3.Error as e:
            problems.add("integrity", 1, f"{what}: SQLite cannot read it: {e}")
            return self.last_version
        if state.integrity != ["ok"]:
            problems.add("integrity", 1, f"{what}: integrity_check: {state.integrity[:5]}")
        if state.version < self.last_version:
            problems.add(
                "integrity", 1,
                f"{what}: the global version went back from {self.last_version} to {state.version}",
            )
        if state.version < version_of(self.max_vs):
            problems.add(
                "lost", 1,
                f"{what}: the global version {state.version} is below acknowledged"
                f" versionstamp {self.max_vs:020x}",
            )
        if state.max_row_version > state.version:
            problems.add(
                "integrity", 1,
                f"{what}: a row has version {state.max_row_version}, above the global"
                f" {state.version}",
            )
        acked, uncertain = self.acks.acked_payloads, self.acks.uncertain_payloads
        missing = [p for p in acked if state.payloads.get(p, 0) == 0]
        twice = [p for p, n in state.payloads.items() if n > 1]
        unknown = [p for p in state.payloads if p not in acked and p not in uncertain]
        problems.add("lost", len(missing), f"{what}: acknowledged enqueues missing: {missing[:5]}")
        problems.add("duplicated", len(twice), f"{what}: enqueues stored twice: {twice[:5]}")
        problems.add("integrity", len(unknown), f"{what}: enqueues never sent: {unknown[:5]}")
        self.last_version = max(self.last_version, state.version)
        return state.version

    # --- the cycles -----------------------------------------------------------------------

    def cycle(self, n: int) -> Problems:
        problems = Problems()
        proto = self.args.proto if self.args.proto != "mixed" else self.rng.choice(["h1", "h2"])
        delay = self.rng.uniform(self.args.min_delay, self.args.max_delay)
        restart = self.args.restart
        if restart == "mixed":
            restart = self.rng.choice(["immediate", "image"])
        name = f"cycle-{n:04d}"
        load, ack_log = self.start_load(name, proto, LOAD_DURATION)
        time.sleep(delay)
        if load.poll() is not None:
            problems.add("other", 1, f"the load generator ended before the kill (exit {load.returncode})")
        self.kill_server()
        killed = time.monotonic()
        image = None
        if restart == "image":
            # The load generator's log must be complete before the image is judged by it.
            self.finish_load(load, name, problems)
            image = crash_image(self.db, self.work / "crash-image")
        gap = time.monotonic() - killed
        retries, took = self.start_server()
        self.restarts[restart] += 1
        if retries:
            self.restarts_retried[restart] += 1
        if restart == "immediate":
            self.finish_load(load, name, problems)
        acks = self.take_log(ack_log, problems, self.last_version)
        state = ""
        if image is not None:
            state = f", version {self.check_db(image, problems, 'crash image')} in the image"
        if n % self.args.verify_every == 0 or n == self.args.cycles:
            self.verify(problems)
        log(
            f"cycle {n}/{self.args.cycles}: {proto}, SIGKILL at {delay:.2f} s after"
            f" {acks.acked} acks (sets {acks.sets}, sums {acks.sums}, enqueues {acks.enqueues};"
            f" uncertain {acks.uncertain_sums} sums, {len(acks.uncertain_payloads)} enqueues)"
            f"{state}; restarted {gap * 1000:.0f} ms after the kill ({restart}), up in {took:.2f} s"
            f"{f', {retries} bind retries' if retries else ''}"
            f" — {'FAIL' if problems else 'ok'}"
        )
        for line in problems.lines:
            log(f"    {line}")
        return problems

    def finale(self) -> Problems:
        """A short load on the last restarted server, a clean stop, a check of the file."""
        problems = Problems()
        load, ack_log = self.start_load("final", "h2", "500ms")
        self.finish_load(load, "final", problems)
        self.take_log(ack_log, problems, self.last_version)
        self.verify(problems)
        rc = self.stop_server()
        if rc != 0:
            problems.add("other", 1, f"the server exited {rc} on SIGTERM")
        self.check_db(self.db, problems, "final database")
        log(f"final: load after the last restart, verify, SIGTERM, check — {'FAIL' if problems else 'ok'}")
        for line in problems.lines:
            log(f"    {line}")
        return problems


class Fatal(Exception):
    pass


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    argv = sys.argv[1:]
    server_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, server_args = argv[:i], argv[i + 1:]
    target = Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache/denokv/target"))
    p = argparse.ArgumentParser(
        description="SIGKILL the server under load N times; check nothing acknowledged is lost"
        " or applied twice. Arguments after -- go to `denokv serve` (e.g. -- --wal-writes io-uring).",
    )
    p.add_argument("--cycles", type=int, default=5, help="kill/restart cycles (default 5)")
    p.add_argument("--seed", type=int, default=None, help="seed of every random choice (default: random, printed)")
    p.add_argument("--bin", default=os.environ.get("DENOKV_BIN", str(target / "debug/denokv")),
                   help="the server binary (default $DENOKV_BIN or $CARGO_TARGET_DIR/debug/denokv)")
    p.add_argument("--loadtest", default=os.environ.get("DENOKV_LOADTEST_BIN", str(target / "debug/denokv-loadtest")),
                   help="the load generator (default $DENOKV_LOADTEST_BIN or $CARGO_TARGET_DIR/debug/denokv-loadtest)")
    p.add_argument("--min-delay", type=float, default=0.2, help="earliest kill, s into the load")
    p.add_argument("--max-delay", type=float, default=1.5, help="latest kill, s into the load")
    p.add_argument("--proto", choices=["h1", "h2", "mixed"], default="mixed",
                   help="load protocol (mixed: chosen per cycle)")
    p.add_argument("--restart", choices=["immediate", "image", "mixed"], default="mixed",
                   help="immediate: restart right after the kill; image: first let the load stop and"
                   " copy the crashed database for the file checks; mixed: chosen per cycle")
    p.add_argument("--concurrency", type=int, default=16, help="load generator clients")
    p.add_argument("--keys", type=int, default=2000, help="key space of the plain sets")
    p.add_argument("--hot-keys", type=int, default=16, help="sum counters")
    p.add_argument("--verify-every", type=int, default=1, help="verify after every Nth restart (and the last)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (kept anyway on failure)")
    args = p.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 32)
    if args.cycles < 1 or args.verify_every < 1 or not 0 < args.min_delay <= args.max_delay:
        p.error("need --cycles >= 1, --verify-every >= 1, 0 < --min-delay <= --max-delay")
    return args, server_args


def main() -> int:
    args, server_args = parse_args()
    for b in (args.bin, args.loadtest):
        if not os.access(b, os.X_OK):
            log(f"sigkill-cycles: {b} is missing; build it: cargo build -p denokv -p denokv-loadtest")
            return 2
    # SIGTERM (CI's timeout) unwinds like an exception, so the servers are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="denokv-crash-"))
    log(
        f"sigkill-cycles: {args.cycles} cycles, seed {args.seed}, server args {server_args or 'none'},"
        f" work dir {work}"
    )
    run = Run(args, server_args, work)
    results: list[Problems] = []
    started = time.monotonic()
    try:
        run.start_server()
        for n in range(1, args.cycles + 1):
            try:
                results.append(run.cycle(n))
            except Fatal as e:
                # The server cannot be restarted: this cycle failed and the run ends here.
                log(f"cycle {n}/{args.cycles}: FAIL: {e}")
                dead = Problems()
                dead.add("other", 1, str(e))
                results.append(dead)
                break
        else:
            final = run.finale()
            # A loss found at the end happened in some cycle; it is the last one's to report.
            results[-1].lines += final.lines
            for kind in ("lost", "duplicated", "integrity", "other"):
                setattr(results[-1], kind, getattr(results[-1], kind) + getattr(final, kind))
    except Fatal as e:
        log(f"sigkill-cycles: {e}")
        log(f"work dir kept: {work}")
        return 2
    finally:
        kill_all()

    failed = sum(1 for r in results if r)
    passed = len(results) - failed
    a, v = run.acks, run.verified
    errors = ", ".join(f"{k} {n}" for k, n in sorted(run.load_errors.items())) or "none"
    log("")
    log(f"seed {args.seed}, server args {' '.join(server_args) or 'none'}, {time.monotonic() - started:.0f} s")
    log(f"cycles:                      {len(results)}")
    log(f"acknowledged writes checked: {a.acked} (sets {a.sets} on {v.get('keys', 0)} keys,"
        f" sums {a.sums} on {v.get('counters', 0)} counters, enqueues {a.enqueues})")
    log(f"uncertain (no answer/error): {a.uncertain_sums} sums (up to {v.get('sum_uncertain', 0)} in"
        f" total; stored {v.get('sum_stored', 0)} = acknowledged {v.get('sum_acked', 0)}"
        f" + {v.get('sum_stored', 0) - v.get('sum_acked', 0)}), {len(a.uncertain_payloads)} enqueues")
    log(f"load errors:                 {errors}")
    log(f"lost:                        {sum(r.lost for r in results)}")
    log(f"duplicated:                  {sum(r.duplicated for r in results)}")
    log(f"integrity errors:            {sum(r.integrity for r in results)}")
    log(f"other failures:              {sum(r.other for r in results)}")
    by_kind = ", ".join(
        f"{run.restarts_retried[k]} of {run.restarts[k]} {k}" for k in ("immediate", "image")
    )
    log(f"restart bind retries:        {run.bind_retries} (restarts that retried: {by_kind})")
    for text in sorted(run.bind_errors):
        log(f"    {text}")
    if failed or args.keep:
        log(f"work dir kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    log(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
