#!/usr/bin/env python3
"""powerfs: a FUSE pass-through file system that can simulate a power cut.

It mirrors a backing directory at a mount point. Every byte written to a file since that
file's last fsync/fdatasync is kept apart, in this daemon's memory (an overlay per file, by
512-byte sector), and reaches the backing file only at the next fsync/fdatasync of that file.
Reads, sizes and truncates see the overlay, so the processes using the mount see an ordinary
file. A power cut (the `cut` command on the control socket) then keeps a random, seeded subset
of each file's unsynced sectors (`tear`), or none of them (`drop`), writes those to the backing
files, forgets the rest, truncates every `*-shm` file to 0 bytes, and serving goes on: a server
can be restarted on the mount as on a machine that came back up.

Simplifications (see README.md, "Power-loss test"):
- Creating, unlinking and renaming files, directory fsyncs, chmod/chown/utimens, links and
  directories are applied to the backing directory at once: they are durable immediately.
- `*-shm` files (SQLite's WAL index) pass straight through, page cache and mmap included;
  every other file is opened with direct_io, so no page cache of the kernel keeps data this
  daemon has dropped.
- A sector written several times since the last sync survives, if at all, with its newest
  content: intermediate versions never reach the disk. Files are cut independently.
- A cut also decides, with the same probability as a sector, whether a pending shrink
  (truncate) survives; a kept sector past the synced end extends the file (holes read zero).
- POSIX and flock locks are left to the kernel (this file system has no lock operation).

Usage:
  powerfs.py mount BACKING MOUNTPOINT --control SOCK [--seed N] [--mode tear|drop] [--keep P]
  powerfs.py cut --control SOCK [--mode tear|drop] [--keep P] [--seed N]
  powerfs.py stats --control SOCK
  powerfs.py ping --control SOCK

`mount` runs in the foreground until SIGTERM/SIGINT (or `umount MOUNTPOINT`), which unmount.
The control commands print one JSON object. The processes writing to the mount must be dead
(SIGKILLed and reaped) before a cut: a cut does not stop anyone from writing.
"""

import argparse
import errno
import json
import os
import random
import socket
import stat
import sys
import threading
import time

SECTOR = 512


class Node:
    """One backing file (an inode) and the writes to it since its last sync."""

    def __init__(self, fd, path, passthrough):
        self.fd = fd
        self.path = path
        self.passthrough = passthrough
        self.opens = 0
        size = os.fstat(fd).st_size
        self.synced = size  # size of the backing file, as of the last sync
        self.size = size  # size the processes see
        # Smallest size since the last sync: backing bytes at or past min(low, synced) are gone
        # (truncated away) and read as zeros unless a dirty sector says otherwise.
        self.low = size
        # sector number -> bytearray(SECTOR): the sector as the processes see it. Bytes past
        # self.size are always zero.
        self.dirty = {}

    def valid(self):
        return min(self.low, self.synced)

    def pending(self):
        return bool(self.dirty) or self.size != self.synced or self.low != self.synced

    def _base_sector(self, i):
        buf = bytearray(SECTOR)
        start, valid = i * SECTOR, self.valid()
        if start < valid:
            data = os.pread(self.fd, min(SECTOR, valid - start), start)
            buf[: len(data)] = data
        return buf

    def read(self, size, offset):
        if self.passthrough:
            return os.pread(self.fd, size, offset)
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        out = bytearray(end - offset)
        valid = self.valid()
        if offset < valid:
            data = os.pread(self.fd, min(end, valid) - offset, offset)
            out[: len(data)] = data
        if self.dirty:
            first, last = offset // SECTOR, (end - 1) // SECTOR
            if last - first + 1 <= len(self.dirty):
                hits = [i for i in range(first, last + 1) if i in self.dirty]
            else:
                hits = [i for i in self.dirty if first <= i <= last]
            for i in hits:
                sec, start = self.dirty[i], i * SECTOR
                a, b = max(offset, start), min(end, start + SECTOR)
                out[a - offset : b - offset] = sec[a - start : b - start]
        return bytes(out)

    def write(self, data, offset):
        if self.passthrough:
            return os.pwrite(self.fd, data, offset)
        end = offset + len(data)
        for i in range(offset // SECTOR, (end - 1) // SECTOR + 1 if data else 0):
            start = i * SECTOR
            a, b = max(offset, start), min(end, start + SECTOR)
            sec = self.dirty.get(i)
            if sec is None:
                sec = bytearray(SECTOR) if b - a == SECTOR else self._base_sector(i)
                self.dirty[i] = sec
            sec[a - start : b - start] = data[a - offset : b - offset]
        self.size = max(self.size, end)
        return len(data)

    def truncate(self, length):
        if self.passthrough:
            os.ftruncate(self.fd, length)
            return
        if length < self.size:
            first_gone = -(-length // SECTOR)
            for i in [i for i in self.dirty if i >= first_gone]:
                del self.dirty[i]
            tail = self.dirty.get(length // SECTOR)
            if tail is not None and length % SECTOR:
                tail[length % SECTOR :] = bytes(SECTOR - length % SECTOR)
            self.low = min(self.low, length)
        self.size = length

    def _write_sectors(self, sectors):
        """Writes dirty sectors (ascending) to the backing file, runs coalesced, clipped."""
        run_start, run = None, []
        for i in sectors + [None]:
            if run and (i is None or i != run_start + len(run)):
                off = run_start * SECTOR
                buf = b"".join(self.dirty[j] for j in run)[: self.size - off]
                if buf:
                    os.pwrite(self.fd, buf, off)
                run = []
            if i is not None:
                if not run:
                    run_start = i
                run.append(i)

    def sync(self, datasync):
        if not self.passthrough and self.pending():
            valid = self.valid()
            if os.fstat(self.fd).st_size > valid:
                os.ftruncate(self.fd, valid)
            self._write_sectors(sorted(self.dirty))
            if os.fstat(self.fd).st_size != self.size:
                os.ftruncate(self.fd, self.size)
            self._reset()
        if datasync:
            os.fdatasync(self.fd)
        else:
            os.fsync(self.fd)

    def _reset(self):
        self.dirty = {}
        self.synced = self.low = self.size = os.fstat(self.fd).st_size

    def cut(self, mode, keep, rng):
        """Power cut: a random subset of the pending sectors reaches the disk, the rest is lost."""
        report = {
            "path": self.path,
            "pending_sectors": len(self.dirty),
            "kept_sectors": 0,
            "size_seen": self.size,
            "size_synced": self.synced,
        }
        if mode == "tear" and self.pending():
            shrink_kept = self.valid() < self.synced and rng.random() < keep
            kept = [i for i in sorted(self.dirty) if rng.random() < keep]
            if shrink_kept:
                os.ftruncate(self.fd, self.valid())
            self._write_sectors(kept)
            report["kept_sectors"] = len(kept)
            report["shrink_kept"] = shrink_kept
        os.fsync(self.fd)
        self._reset()
        report["size_after"] = self.size
        return report


def _fh(fi):
    """The file handle of a fuse_file_info, None for none (fusepy passes a NULL pointer)."""
    return getattr(fi, "fh", None) if fi else None


class PowerFS:
    """The FUSE operations (fusepy, raw_fi): every path is mirrored under self.root."""

    use_ns = True

    def __init__(self, root, seed, mode, keep):
        self.root = os.path.realpath(root)
        self.seed, self.mode, self.keep = seed, mode, keep
        self.cuts = 0
        self._mutex = threading.RLock()
        self.nodes = {}  # (st_dev, st_ino) -> Node
        self.fhs = {}  # file handle -> Node
        self.next_fh = 1
        self.mounted = threading.Event()

    def __call__(self, op, *args):
        from fuse import FuseOSError  # pylint: disable=import-outside-toplevel

        fn = getattr(self, op, None)
        if fn is None:
            raise FuseOSError(errno.ENOSYS)
        try:
            with self._mutex:
                return fn(*args)
        except OSError as e:
            raise FuseOSError(e.errno or errno.EIO) from e

    def _p(self, path):
        return os.path.join(self.root, path.lstrip("/"))

    # --- files -------------------------------------------------------------------------

    def _node_of_path(self, path):
        st = os.lstat(self._p(path))
        return self.nodes.get((st.st_dev, st.st_ino)), st

    def _attach(self, path, fi, flags, mode=None):
        real = self._p(path)
        if mode is not None:
            fd = os.open(real, os.O_RDWR | os.O_CREAT | (flags & os.O_EXCL), mode)
        else:
            try:
                fd = os.open(real, os.O_RDWR)
            except PermissionError:
                fd = os.open(real, os.O_RDONLY)
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        node = self.nodes.get(key)
        if node is None:
            node = Node(fd, path, path.endswith("-shm"))
            self.nodes[key] = node
        else:
            os.close(fd)
            node.path = path
        if flags & os.O_TRUNC:
            node.truncate(0)
        node.opens += 1
        fh = self.next_fh
        self.next_fh += 1
        self.fhs[fh] = node
        fi.fh = fh
        fi.direct_io = 0 if node.passthrough else 1
        fi.keep_cache = 0
        return 0

    def open(self, path, fi):
        return self._attach(path, fi, fi.flags)

    def create(self, path, mode, fi):
        return self._attach(path, fi, fi.flags, mode)

    def read(self, path, size, offset, fi):
        return self.fhs[fi.fh].read(size, offset)

    def write(self, path, data, offset, fi):
        return self.fhs[fi.fh].write(data, offset)

    def truncate(self, path, length, fi=None):
        if _fh(fi) in self.fhs:
            node = self.fhs[fi.fh]
        else:
            node, st = self._node_of_path(path)
            if node is None:
                if path.endswith("-shm"):
                    os.truncate(self._p(path), length)
                    return 0
                node = Node(os.open(self._p(path), os.O_RDWR), path, False)
                self.nodes[(st.st_dev, st.st_ino)] = node
        node.truncate(length)
        return 0

    def fsync(self, path, datasync, fi):
        self.fhs[fi.fh].sync(datasync)
        return 0

    def flush(self, path, fi):
        return 0

    def release(self, path, fi):
        node = self.fhs.pop(fi.fh)
        node.opens -= 1
        self._forget_if_unused(node)
        return 0

    def _forget_if_unused(self, node):
        if node.opens > 0:
            return
        st = os.fstat(node.fd)
        if node.passthrough or st.st_nlink == 0 or not node.pending():
            self.nodes.pop((st.st_dev, st.st_ino), None)
            os.close(node.fd)

    def getattr(self, path, fi=None):
        if _fh(fi) in self.fhs:
            node = self.fhs[fi.fh]
            st = os.fstat(node.fd)
        else:
            node, st = self._node_of_path(path)
        attrs = {
            k: getattr(st, k)
            for k in (
                "st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_ino",
                "st_atime_ns", "st_mtime_ns", "st_ctime_ns", "st_blocks", "st_blksize",
            )
        }
        for k in ("st_atime", "st_mtime", "st_ctime"):
            attrs[k] = attrs.pop(k + "_ns")
        if node is not None and not node.passthrough:
            attrs["st_size"] = node.size
            attrs["st_blocks"] = -(-node.size // 512)
        return attrs

    # --- names and directories: applied to the backing directory at once ------------------

    def _after_unlink(self):
        for node in list(self.nodes.values()):
            self._forget_if_unused(node)

    def unlink(self, path):
        os.unlink(self._p(path))
        self._after_unlink()

    def rename(self, old, new):
        os.rename(self._p(old), self._p(new))
        for node in self.nodes.values():
            if node.path == old:
                node.path = new
        self._after_unlink()

    def link(self, target, source):
        os.link(self._p(source), self._p(target))

    def symlink(self, target, source):
        os.symlink(source, self._p(target))

    def readlink(self, path):
        return os.readlink(self._p(path))

    def mkdir(self, path, mode):
        os.mkdir(self._p(path), mode)

    def rmdir(self, path):
        os.rmdir(self._p(path))

    def mknod(self, path, mode, dev):
        os.mknod(self._p(path), mode, dev)

    def chmod(self, path, mode):
        os.chmod(self._p(path), mode)

    def chown(self, path, uid, gid):
        os.lchown(self._p(path), uid, gid)

    def utimens(self, path, times=None):
        os.utime(self._p(path), ns=times, follow_symlinks=False)

    def access(self, path, amode):
        if not os.access(self._p(path), amode):
            raise OSError(errno.EACCES, "access")
        return 0

    def opendir(self, path):
        if not stat.S_ISDIR(os.lstat(self._p(path)).st_mode):
            raise OSError(errno.ENOTDIR, path)
        return 0

    def readdir(self, path, fh):
        return [".", ".."] + os.listdir(self._p(path))

    def releasedir(self, path, fh):
        return 0

    def fsyncdir(self, path, datasync, fh):
        return 0

    def statfs(self, path):
        sv = os.statvfs(self._p(path))
        return {
            k: getattr(sv, k)
            for k in (
                "f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree",
                "f_files", "f_flag", "f_frsize", "f_namemax",
            )
        }

    def init(self, path):
        self.mounted.set()

    def destroy(self, path):
        pass

    # --- control ---------------------------------------------------------------------------

    def power_cut(self, mode=None, keep=None, seed=None, wait=5.0):
        # The kernel sends RELEASE for the files of a killed process in the background: give
        # the handles of the dead writer a moment to go (handles still open are reported).
        deadline = time.monotonic() + wait
        while self.fhs and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._mutex:
            mode = mode or self.mode
            keep = self.keep if keep is None else keep
            if seed is None:
                seed = f"{self.seed}/{self.cuts}"
            self.cuts += 1
            rng = random.Random(str(seed))
            files = []
            for node in sorted(self.nodes.values(), key=lambda n: n.path):
                if node.passthrough or os.fstat(node.fd).st_nlink == 0:
                    continue
                files.append(node.cut(mode, keep, rng))
            shm = []
            for d, _, names in os.walk(self.root):
                for name in sorted(names):
                    if name.endswith("-shm"):
                        os.truncate(os.path.join(d, name), 0)
                        shm.append(os.path.relpath(os.path.join(d, name), self.root))
            for node in list(self.nodes.values()):
                self._forget_if_unused(node)
            return {
                "cut": self.cuts,
                "mode": mode,
                "keep": keep,
                "seed": str(seed),
                "open_handles": len(self.fhs),
                "files": files,
                "shm_truncated": shm,
            }

    def stats(self):
        with self._mutex:
            return {
                "mounted": self.mounted.is_set(),
                "cuts": self.cuts,
                "open_handles": len(self.fhs),
                "files": [
                    {
                        "path": n.path,
                        "pending_sectors": len(n.dirty),
                        "size_seen": n.size,
                        "size_synced": n.synced,
                        "opens": n.opens,
                    }
                    for n in sorted(self.nodes.values(), key=lambda n: n.path)
                    if not n.passthrough
                ],
            }


def serve_control(fs, path):
    """One JSON request per connection on a Unix socket; answers one JSON line."""
    if os.path.exists(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(8)

    def loop():
        while True:
            conn, _ = srv.accept()
            with conn:
                try:
                    req = json.loads(conn.makefile("r").readline() or "{}")
                    cmd = req.get("cmd")
                    if cmd == "cut":
                        ans = fs.power_cut(req.get("mode"), req.get("keep"), req.get("seed"))
                    elif cmd in ("stats", "ping"):
                        ans = fs.stats()
                    else:
                        ans = {"error": f"unknown command {cmd!r}"}
                except Exception as e:  # noqa: BLE001  pylint: disable=broad-except
                    ans = {"error": f"{type(e).__name__}: {e}"}
                conn.sendall((json.dumps(ans) + "\n").encode())

    threading.Thread(target=loop, daemon=True, name="control").start()


def control(path, req, timeout=60):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    with s:
        s.sendall((json.dumps(req) + "\n").encode())
        ans = json.loads(s.makefile("r").readline())
    if "error" in ans:
        raise RuntimeError(ans["error"])
    return ans


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    sub = ap.add_subparsers(dest="command", required=True)
    m = sub.add_parser("mount", help="serve BACKING at MOUNTPOINT (in the foreground)")
    m.add_argument("backing")
    m.add_argument("mountpoint")
    m.add_argument("--debug", action="store_true", help="libfuse's request log on stderr")
    c = sub.add_parser("cut", help="simulate a power cut now")
    for p in (m, c, sub.add_parser("stats"), sub.add_parser("ping")):
        p.add_argument("--control", required=True, help="the control socket's path")
    for p, default in ((m, True), (c, False)):
        p.add_argument("--mode", choices=("tear", "drop"), default="tear" if default else None,
                       help="tear: keep each unsynced sector with probability --keep; "
                       "drop: lose all unsynced data (default: tear, or the mount's)")
        p.add_argument("--keep", type=float, default=0.5 if default else None,
                       help="tear: the probability that an unsynced sector survives (0.5)")
        p.add_argument("--seed", default="1" if default else None,
                       help="the cuts' random seed (a cut's own: the mount's seed/cut number)")
    args = ap.parse_args(argv)

    if args.command != "mount":
        req = {"cmd": args.command}
        if args.command == "cut":
            req.update({k: getattr(args, k) for k in ("mode", "keep", "seed")
                        if getattr(args, k) is not None})
        print(json.dumps(control(args.control, req)))
        return 0

    from fuse import FUSE  # pylint: disable=import-outside-toplevel

    fs = PowerFS(args.backing, args.seed, args.mode, args.keep)
    serve_control(fs, args.control)
    FUSE(
        fs,
        args.mountpoint,
        raw_fi=True,
        foreground=True,
        debug=args.debug,
        fsname="powerfs",
        subtype="powerfs",
        # No attribute, name or negative caching: sizes change under the kernel at a cut.
        attr_timeout=0,
        entry_timeout=0,
        negative_timeout=0,
        ac_attr_timeout=0,
        hard_remove=True,
        big_writes=True,
        max_write=131072,
        max_read=131072,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
