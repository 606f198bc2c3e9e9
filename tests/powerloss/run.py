#!/usr/bin/env python3
"""Power-loss cycles of the real server on powerfs (run it through run.sh, as root).

Each cycle: start denokv on a database inside a powerfs mount, run `denokv-loadtest write`
with an ack log, SIGKILL the server at a random moment, cut the power (powerfs drops or tears
every byte not yet fsynced), restart the server on the mount, and check with
`denokv-loadtest verify` that every acknowledged write of that cycle is there, and with
`PRAGMA integrity_check` that the database is sound. After the last cycle every write
acknowledged in any cycle is checked once more.

With --expect-loss (the negative control, e.g. --sync-mode normal --cut drop), losses are
expected: a cycle passes when the database is sound, and the run fails unless some cycle
lost acknowledged writes (otherwise this test could not tell a missing fsync).

Ends with `N passed, M failed`; exit 1 on any failure.
"""

import argparse
import json
import os
import random
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time

import powerfs

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, check, timeout, proc=None):
    deadline = time.monotonic() + timeout
    while not check():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {timeout} s")
        time.sleep(0.05)


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Run:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.work = tempfile.mkdtemp(prefix="denokv-powerloss-")
        self.backing = os.path.join(self.work, "backing")
        self.mnt = os.path.join(self.work, "mnt")
        self.ctl = os.path.join(self.work, "powerfs.sock")
        os.makedirs(self.backing)
        os.makedirs(self.mnt)
        self.db = os.path.join(self.mnt, "kv.sqlite3")
        self.all_acks = os.path.join(self.work, "acks-all.log")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = secrets.token_hex(16)
        self.fs = None
        self.server = None
        self.server_log = None
        self.passed = 0
        self.failed = 0
        self.totals = {"checked": 0, "lost": 0, "integrity_errors": 0}

    # --- processes -------------------------------------------------------------------------

    def mount(self):
        with open(os.path.join(self.work, "powerfs.log"), "ab") as log:
            self.fs = subprocess.Popen(  # pylint: disable=consider-using-with
                [sys.executable, os.path.join(HERE, "powerfs.py"), "mount", self.backing,
                 self.mnt, "--control", self.ctl, "--seed", str(self.args.seed),
                 "--mode", self.args.cut, "--keep", str(self.args.keep)],
                stdout=log, stderr=log)

        def mounted():
            try:
                up = powerfs.control(self.ctl, {"cmd": "ping"})["mounted"]
                return up and os.path.ismount(self.mnt)
            except OSError:
                return False

        wait_for("powerfs", mounted, 15, self.fs)

    def unmount(self):
        if self.fs is None:
            return
        self.fs.send_signal(signal.SIGTERM)
        try:
            self.fs.wait(15)
        except subprocess.TimeoutExpired:
            self.fs.kill()
            self.fs.wait()
        if os.path.ismount(self.mnt):
            subprocess.run(["umount", "-l", self.mnt], check=False)
        self.fs = None

    def start_server(self, cycle):
        a = self.args
        self.server_log = os.path.join(self.work, f"server-{cycle}.log")
        with open(self.server_log, "wb") as log:
            self.server = subprocess.Popen(  # pylint: disable=consider-using-with
                [a.bin, "--sqlite-path", self.db, "serve", "--addr", f"127.0.0.1:{self.port}",
                 "--metrics-addr", "off", "--sync-mode", a.sync_mode, "--wal-writes", a.wal_writes,
                 "--access-token", self.token],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "RUST_LOG": "info"})
        wait_for("denokv", lambda: port_open(self.port), 60, self.server)
        with open(self.server_log, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if a.wal_writes == "io-uring" and a.sync_mode == "full" and (
                "WAL writes: io_uring" not in text or "fall back to pwrite" in text):
            raise RuntimeError(f"the server's WAL writes are not io_uring: {self.server_log}")

    def kill_server(self):
        self.server.send_signal(signal.SIGKILL)
        self.server.wait()
        self.server = None

    def stop_server(self):
        if self.server is not None:
            self.server.send_signal(signal.SIGTERM)
            try:
                self.server.wait(30)
            except subprocess.TimeoutExpired:
                self.kill_server()
            self.server = None

    def loadtest(self, *argv):
        return [self.args.loadtest, *argv, "--url", self.url, "--token", self.token]

    # --- one cycle -------------------------------------------------------------------------

    def load_and_kill(self, cycle, acks):
        a = self.args
        kill_after = self.rng.uniform(a.kill_min, a.kill_max)
        out = os.path.join(self.work, f"load-{cycle}.json")
        with open(os.path.join(self.work, f"load-{cycle}.log"), "wb") as log:
            load = subprocess.Popen(  # pylint: disable=consider-using-with
                self.loadtest("write", "--duration", f"{a.kill_max + 0.5}s", "--warmup", "0s",
                              "--keys", str(a.keys), "--value-size", str(a.value_size),
                              "--concurrency", str(a.concurrency), "--timeout", "2s",
                              "--seed", str(self.rng.randrange(1 << 32)), "--ack-log", acks,
                              "--json", out, "--format", "json"),
                stdout=log, stderr=subprocess.STDOUT)
            time.sleep(kill_after)
            self.kill_server()
            try:
                load.wait(a.kill_max + 60)
            except subprocess.TimeoutExpired:
                load.kill()
                load.wait()
                raise RuntimeError("the load generator did not stop")  # pylint: disable=raise-missing-from
        ops = errors = "?"
        if os.path.exists(out):
            with open(out, encoding="utf-8") as f:
                rep = json.load(f)
            ops, errors = rep.get("ops", "?"), rep.get("error_total", "?")
        return kill_after, ops, errors

    def verify(self, acks):
        out = os.path.join(self.work, "verify.json")
        if os.path.exists(out):
            os.unlink(out)
        subprocess.run(self.loadtest("verify", "--ack-log", acks, "--json", out, "--show", "0",
                                     "--format", "json"),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        if not os.path.exists(out):
            raise RuntimeError(f"denokv-loadtest verify wrote no report for {acks}")
        with open(out, encoding="utf-8") as f:
            rep = json.load(f)
        lost = rep["missing"] + rep["older"] + rep["wrong_value"]
        return rep, lost

    def integrity(self):
        """PRAGMA integrity_check through a read-only connection beside the running server."""
        try:
            db = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)
            try:
                rows = [r[0] for r in db.execute("PRAGMA integrity_check")]
            finally:
                db.close()
        except sqlite3.DatabaseError as e:  # e.g. "database disk image is malformed"
            return [f"{type(e).__name__}: {e}"]
        return [] if rows == ["ok"] else rows

    def judge(self, label, rep, lost, errors, ops=None, count=True):
        a = self.args
        if count:
            self.totals["checked"] += rep["keys"]
            self.totals["lost"] += lost
            self.totals["integrity_errors"] += len(errors)
        ok = not errors and (a.expect_loss or lost == 0)
        # The ack log must hold every write the load generator counted, and some: a cycle
        # that acknowledged nothing tested nothing.
        if isinstance(ops, int) and not 0 < ops <= rep["records"]:
            print(f"  {label}: the ack log has {rep['records']} records for {ops} acknowledged "
                  "writes: FAIL")
            ok = False
        print(f"  {label}: checked {rep['keys']} keys ({rep['records']} acknowledged writes): "
              f"intact {rep['intact']}, newer {rep['newer']}, lost {lost} "
              f"(missing {rep['missing']}, older {rep['older']}, "
              f"wrong value {rep['wrong_value']}); "
              f"integrity {'ok' if not errors else errors[:3]} -> {'PASS' if ok else 'FAIL'}",
              flush=True)
        if ok:
            self.passed += 1
        else:
            self.failed += 1

    def run(self):
        a = self.args
        print(f"powerloss: wal-writes={a.wal_writes} sync-mode={a.sync_mode} cut={a.cut}"
              f"{f' keep={a.keep}' if a.cut == 'tear' else ''} cycles={a.cycles} seed={a.seed}"
              f"{' expect-loss' if a.expect_loss else ''} work={self.work}", flush=True)
        started = time.monotonic()
        cycles_with_loss = done = 0
        try:
            self.mount()
            self.start_server(0)
            for cycle in range(1, a.cycles + 1):
                acks = os.path.join(self.work, f"acks-{cycle}.log")
                kill_after, ops, errors = self.load_and_kill(cycle, acks)
                with open(acks, "rb") as src, open(self.all_acks, "ab") as dst:
                    shutil.copyfileobj(src, dst)
                report = self.fs_cut(cycle)
                pending = ", ".join(f"{f['path']} {f['kept_sectors']}/{f['pending_sectors']}"
                                    for f in report["files"] if f["pending_sectors"]) or "none"
                print(f"cycle {cycle}/{a.cycles}: killed after {kill_after:.2f} s "
                      f"({ops} writes acknowledged, {errors} errors); cut {report['mode']}: "
                      f"unsynced sectors kept/pending: {pending}", flush=True)
                self.start_server(cycle)
                rep, lost = self.verify(acks)
                if lost:
                    cycles_with_loss += 1
                self.judge(f"cycle {cycle}", rep, lost, self.integrity(), ops)
                done = cycle
            rep, lost = self.verify(self.all_acks)
            # Counted per cycle already: only judged here.
            self.judge("all cycles", rep, lost, self.integrity(), count=False)
        except (RuntimeError, OSError, subprocess.SubprocessError, ValueError, KeyError) as e:
            # A server that does not come back up after a cut is a failure too.
            print(f"powerloss: error in cycle {done + 1}: {type(e).__name__}: {e}")
            self.failed += 1
        finally:
            self.stop_server()
            self.unmount()
        if a.expect_loss and done == a.cycles:
            shown = "acknowledged writes lost in " + f"{cycles_with_loss} of {a.cycles} cycles"
            if cycles_with_loss:
                print(f"expect-loss: {shown}, as expected without fsyncs: the test can fail")
                self.passed += 1
            else:
                print(f"expect-loss: FAIL: {shown}: this setup cannot detect a missing fsync")
                self.failed += 1
        t = self.totals
        print(f"run: {done} cycles in {time.monotonic() - started:.0f} s, "
              f"{t['checked']} acknowledged keys checked, {t['lost']} lost, "
              f"{t['integrity_errors']} integrity errors")
        if self.failed == 0 and not a.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)
        else:
            print(f"logs and database kept in {self.work}")
        print(f"{self.passed} passed, {self.failed} failed")
        return 0 if self.failed == 0 else 1

    def fs_cut(self, cycle):
        req = {"cmd": "cut", "seed": f"{self.args.seed}/{cycle}"}
        report = powerfs.control(self.ctl, req)
        if report["open_handles"]:
            raise RuntimeError(f"{report['open_handles']} files still open on powerfs at the cut")
        return report


def main():
    target = os.environ.get(
        "CARGO_TARGET_DIR", os.path.join(os.path.expanduser("~"), ".cache", "denokv", "target"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    ap.add_argument("--wal-writes", choices=("pwrite", "io-uring"), default="pwrite")
    ap.add_argument("--sync-mode", choices=("full", "normal"), default="full")
    ap.add_argument("--cut", choices=("tear", "drop"), default="tear",
                    help="what a power cut does to unsynced data (powerfs --mode)")
    ap.add_argument("--keep", type=float, default=0.5,
                    help="tear: probability that an unsynced sector survives")
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--expect-loss", action="store_true",
                    help="negative control: losses are expected, and required at least once")
    ap.add_argument("--kill-min", type=float, default=0.5, help="earliest SIGKILL (s)")
    ap.add_argument("--kill-max", type=float, default=2.5, help="latest SIGKILL (s)")
    ap.add_argument("--keys", type=int, default=5000)
    ap.add_argument("--value-size", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--keep-work", action="store_true", help="keep the temp dir even on success")
    ap.add_argument("--bin", default=os.environ.get(
        "DENOKV_BIN", os.path.join(target, "debug", "denokv")))
    ap.add_argument("--loadtest", default=os.environ.get(
        "DENOKV_LOADTEST_BIN", os.path.join(target, "debug", "denokv-loadtest")))
    args = ap.parse_args()
    if args.cycles < 1 or not 0 < args.kill_min <= args.kill_max:
        ap.error("need --cycles >= 1 and 0 < --kill-min <= --kill-max")
    for path in (args.bin, args.loadtest):
        if not os.access(path, os.X_OK):
            ap.error(f"{path} is not built (cargo build -p denokv -p denokv-loadtest)")
    return Run(args).run()


if __name__ == "__main__":
    sys.exit(main())
