"""Tests of powerfs.py: run as root with `python3 -m pytest tests/powerloss` (see run-tests.sh)."""

import mmap
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

import powerfs

HERE = os.path.dirname(os.path.abspath(__file__))

SECTOR = powerfs.SECTOR


class Mount:
    """A powerfs daemon serving `<tmp>/backing` at `<tmp>/mnt`."""

    def __init__(self, tmp, seed="1", mode="tear", keep=0.5):
        self.backing = os.path.join(tmp, "backing")
        self.mnt = os.path.join(tmp, "mnt")
        self.ctl = os.path.join(tmp, "control.sock")
        os.makedirs(self.backing, exist_ok=True)
        os.makedirs(self.mnt, exist_ok=True)
        with open(os.path.join(tmp, "powerfs.log"), "ab") as log:
            self.proc = subprocess.Popen(  # pylint: disable=consider-using-with
                [sys.executable, os.path.join(HERE, "powerfs.py"), "mount", self.backing,
                 self.mnt, "--control", self.ctl, "--seed", seed, "--mode", mode,
                 "--keep", str(keep)],
                stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while True:
            try:
                up = powerfs.control(self.ctl, {"cmd": "ping"})["mounted"]
                if up and os.path.ismount(self.mnt):
                    break
            except OSError:
                pass
            assert self.proc.poll() is None, "powerfs exited"
            assert time.monotonic() < deadline, "powerfs did not mount"
            time.sleep(0.05)

    def path(self, name):
        return os.path.join(self.mnt, name)

    def cut(self, **req):
        return powerfs.control(self.ctl, {"cmd": "cut", **req})

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if os.path.ismount(self.mnt):
            subprocess.run(["umount", "-l", self.mnt], check=False)


@pytest.fixture(name="fs")
def fixture_fs(tmp_path):
    m = Mount(str(tmp_path))
    yield m
    m.stop()


def write_file(path, data, offset=0, sync=False):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, offset)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


# (a) ------------------------------------------------------------------------------------------

def test_drop_loses_unsynced_and_keeps_synced(fs):
    write_file(fs.path("unsynced"), b"u" * 5000)
    write_file(fs.path("synced"), b"s" * 3000, sync=True)
    write_file(fs.path("synced"), b"x" * 2000, offset=1000)  # after the fsync: unsynced
    write_file(fs.path("synced"), b"y" * 100, offset=6000)  # grows it, unsynced
    fd = os.open(fs.path("datasync"), os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"d" * 777)
    os.fdatasync(fd)
    os.close(fd)
    # Before the cut the unsynced bytes are visible, but not on the backing disk.
    assert read_file(fs.path("unsynced")) == b"u" * 5000
    assert os.path.getsize(os.path.join(fs.backing, "unsynced")) == 0
    assert read_file(os.path.join(fs.backing, "synced")) == b"s" * 3000

    report = fs.cut(mode="drop")
    assert {f["path"] for f in report["files"]} == {"/unsynced", "/synced"}
    assert all(f["kept_sectors"] == 0 for f in report["files"])

    assert read_file(fs.path("unsynced")) == b""  # created (names are durable at once), empty
    assert read_file(fs.path("synced")) == b"s" * 3000
    assert read_file(fs.path("datasync")) == b"d" * 777
    assert os.stat(fs.path("synced")).st_size == 3000


def test_drop_reverts_an_unsynced_truncate(fs):
    write_file(fs.path("f"), b"a" * 4096, sync=True)
    os.truncate(fs.path("f"), 100)
    assert os.path.getsize(fs.path("f")) == 100
    write_file(fs.path("f"), b"b" * 10, offset=200)
    assert read_file(fs.path("f")) == b"a" * 100 + bytes(100) + b"b" * 10
    fs.cut(mode="drop")
    assert read_file(fs.path("f")) == b"a" * 4096


def test_a_synced_truncate_survives(fs):
    write_file(fs.path("f"), b"a" * 4096, sync=True)
    fd = os.open(fs.path("f"), os.O_RDWR)
    os.ftruncate(fd, 1000)
    os.pwrite(fd, b"c" * 24, 2000)  # the bytes 1000..2000 must read as zeros
    os.fsync(fd)
    os.close(fd)
    expected = b"a" * 1000 + bytes(1000) + b"c" * 24
    assert read_file(os.path.join(fs.backing, "f")) == expected
    fs.cut(mode="drop")
    assert read_file(fs.path("f")) == expected


# (b) ------------------------------------------------------------------------------------------

SECTORS = 64


def tear_once(tmp, seed, keep=0.5, cut_seed=None):
    """64 synced sectors of b'o', all overwritten unsynced with distinct bytes, then a tear cut.

    Returns which sectors survived as new (True) or old (False); asserts each is whole."""
    m = Mount(tmp, seed=seed, keep=keep)
    try:
        name = f"torn-{seed}-{keep}-{cut_seed}"
        write_file(m.path(name), b"o" * (SECTORS * SECTOR), sync=True)
        new = b"".join(bytes([65 + i % 26]) * SECTOR for i in range(SECTORS))
        # Unaligned writes, so that sectors are pieced together from several writes.
        write_file(m.path(name), new[:700])
        write_file(m.path(name), new[700:20000], offset=700)
        write_file(m.path(name), new[20000:], offset=20000)
        report = m.cut(**({"seed": cut_seed} if cut_seed else {}))
        got = read_file(m.path(name))
    finally:
        m.stop()
    assert len(got) == SECTORS * SECTOR
    kept = []
    for i in range(SECTORS):
        sec = got[i * SECTOR:(i + 1) * SECTOR]
        assert sec in (b"o" * SECTOR, new[i * SECTOR:(i + 1) * SECTOR]), f"sector {i} is torn"
        kept.append(sec != b"o" * SECTOR)
    assert report["files"][0]["pending_sectors"] == SECTORS
    assert report["files"][0]["kept_sectors"] == sum(kept)
    return kept


def test_tear_keeps_a_reproducible_subset_of_sectors(tmp_path):
    first = tear_once(str(tmp_path / "1"), "42")
    assert 0 < sum(first) < SECTORS, first
    assert tear_once(str(tmp_path / "2"), "42") == first
    assert tear_once(str(tmp_path / "3"), "43") != first
    assert tear_once(str(tmp_path / "4"), "7", cut_seed="abc") == tear_once(
        str(tmp_path / "5"), "8", cut_seed="abc")
    assert sum(tear_once(str(tmp_path / "6"), "1", keep=0.0)) == 0
    assert sum(tear_once(str(tmp_path / "7"), "1", keep=1.0)) == SECTORS


def test_tear_past_the_end_extends_with_holes(fs):
    write_file(fs.path("g"), b"a" * SECTOR, sync=True)
    write_file(fs.path("g"), b"b" * (8 * SECTOR), offset=SECTOR)
    fs.cut(seed="holes", keep=0.5)
    got = read_file(fs.path("g"))
    assert got[:SECTOR] == b"a" * SECTOR
    assert len(got) % SECTOR == 0
    for i in range(1, len(got) // SECTOR):
        assert got[i * SECTOR:(i + 1) * SECTOR] in (b"b" * SECTOR, bytes(SECTOR))


# (c) ------------------------------------------------------------------------------------------

def test_reads_and_sizes_see_unsynced_writes(fs):
    rng = random.Random(5)
    path = fs.path("model")
    model = bytearray()
    synced = b""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for step in range(400):
            op = rng.random()
            if op < 0.6:
                off = rng.randrange(0, len(model) + 3000)
                data = rng.randbytes(rng.randrange(1, 3000))
                os.pwrite(fd, data, off)
                if off > len(model):
                    model.extend(bytes(off - len(model)))
                model[off:off + len(data)] = data
            elif op < 0.75:
                size = rng.randrange(0, len(model) + 2000)
                os.ftruncate(fd, size)
                del model[size:]
                model.extend(bytes(size - len(model)))
            elif op < 0.8:
                os.fsync(fd)
                synced = bytes(model)
            assert os.fstat(fd).st_size == len(model), step
            assert os.stat(path).st_size == len(model), step
            off = rng.randrange(0, len(model) + 10)
            n = rng.randrange(0, 5000)
            assert os.pread(fd, n, off) == bytes(model[off:off + n]), step
            assert read_file(os.path.join(fs.backing, "model")) == synced, step
        assert read_file(path) == bytes(model)
    finally:
        os.close(fd)
    fs.cut(mode="drop")
    assert read_file(path) == synced


def test_open_trunc_append_rename_unlink(fs):
    write_file(fs.path("t"), b"old", sync=True)
    with open(fs.path("t"), "wb") as f:  # O_TRUNC: unsynced like any truncate
        f.write(b"new")
    with open(fs.path("t"), "ab") as f:
        f.write(b"+more")
    assert read_file(fs.path("t")) == b"new+more"
    os.rename(fs.path("t"), fs.path("u"))  # the pending data follows the file
    assert read_file(fs.path("u")) == b"new+more"
    write_file(fs.path("gone"), b"z" * 100)
    os.unlink(fs.path("gone"))
    assert not os.path.exists(fs.path("gone"))
    fs.cut(mode="drop")
    assert read_file(fs.path("u")) == b"old"
    assert not os.path.exists(fs.path("gone"))


def test_shm_is_mmapped_passed_through_and_zeroed_by_a_cut(fs):
    fd = os.open(fs.path("db-shm"), os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, 32768)
    with mmap.mmap(fd, 32768) as mm:
        mm[100:105] = b"hello"
        mm.flush()
    os.close(fd)
    assert read_file(os.path.join(fs.backing, "db-shm"))[100:105] == b"hello"
    report = fs.cut(mode="drop")
    assert report["shm_truncated"] == ["db-shm"]
    assert os.path.getsize(fs.path("db-shm")) == 0


# (d) ------------------------------------------------------------------------------------------

WRITER = r"""
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA synchronous=" + sys.argv[3])
db.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v BLOB)")
i = int(sys.argv[2])
while True:
    db.execute("BEGIN")
    db.execute("INSERT INTO t VALUES (?, randomblob(?))", (i, 100 + i % 3000))
    if i % 7 == 0:
        db.execute("DELETE FROM t WHERE id = ?", (i - 5,))
    db.execute("COMMIT")
    print(i, flush=True)
    i += 1
    if i % 150 == 0:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
"""


def committed_then_killed(path, first, commits, rng, sync="FULL"):
    """Runs WRITER until `commits` commits returned plus a random bit more, SIGKILLs it."""
    proc = subprocess.Popen(  # pylint: disable=consider-using-with
        [sys.executable, "-c", WRITER, path, str(first), sync], stdout=subprocess.PIPE, text=True)
    done = []
    target = commits + rng.randrange(0, 20)
    for line in proc.stdout:
        done.append(int(line))
        if len(done) >= target:
            break
    proc.send_signal(signal.SIGKILL)
    # Lines already printed are commits that returned, too.
    done.extend(int(line) for line in proc.stdout.read().split())
    proc.wait()
    return done


@pytest.mark.parametrize("mode", ["tear", "drop"])
def test_sqlite_wal_survives_cuts(fs, mode):
    rng = random.Random(mode)
    path = fs.path("test.db")
    present = set()
    first = 1
    for cycle in range(4):
        done = committed_then_killed(path, first, 60 + 40 * cycle, rng)
        assert done, "no commit returned"
        report = fs.cut(mode=mode, seed=f"sqlite-{mode}-{cycle}")
        assert report["open_handles"] == 0
        db = sqlite3.connect(path)
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = {r[0] for r in db.execute("SELECT id FROM t")}
        db.close()
        present |= set(done)
        present -= {i - 5 for i in done if i % 7 == 0}
        missing = present - rows
        assert not missing, f"cycle {cycle}: commits lost: {sorted(missing)[:10]}"
        first = max(done) + 1


def test_sqlite_without_fsync_loses_commits(fs):
    """The negative control: with synchronous=OFF nothing is synced, and a drop cut loses it."""
    path = fs.path("nosync.db")
    done = committed_then_killed(path, 1, 100, random.Random(0), sync="OFF")
    report = fs.cut(mode="drop")
    assert sum(f["pending_sectors"] for f in report["files"]) > 0
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
    rows = {r[0] for r in db.execute("SELECT id FROM t")} if "t" in tables else set()
    db.close()
    assert set(done) - rows, "a drop cut lost no unsynced commit"
