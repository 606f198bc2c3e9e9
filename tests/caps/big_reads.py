#!/usr/bin/env python3
"""Memory of large snapshot reads (issue 12, "response size").

Fills a database with 1000 values of 64 KiB, restarts the server on it, then runs N
concurrent snapshot reads of all 1000 (each answer ~66 MB) over HTTP/1.1 and samples the
server's resident memory (VmRSS every 5 ms, and VmHWM at the end). With --slow, each client
sends its request and waits --wait seconds before reading the answer: a client that does not
read holds whatever the server has built for it.

    python3 tests/caps/big_reads.py --binary target/debug/denokv [--clients 16] [--slow]
        [-- extra server flags]

Standard library only; sends traffic only to the loopback server it starts.
"""
import argparse
import http.client
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

TOKEN = "0123456789abcdef"
HEADERS = {
    "authorization": f"Bearer {TOKEN}",
    "x-denokv-version": "3",
    "x-denokv-database-id": "00000000-0000-0000-0000-000000000000",
}


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(number, payload):
    """A length-delimited field."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def vfield(number, value):
    return varint(number << 3) + varint(value)


def key(i):
    return b"\x02big\x00" + struct.pack(">H", i)


def atomic_write(start, count, size):
    muts = b""
    for i in range(start, start + count):
        value = field(1, bytes([i % 251]) * size) + vfield(2, 3)  # BYTES
        muts += field(2, field(1, key(i)) + field(2, value) + vfield(3, 1))  # M_SET
    return muts


def snapshot_read(limit):
    rng = field(1, b"\x02big\x00") + field(2, b"\x02big\x01") + vfield(3, limit)
    return field(1, rng)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(binary, db, port, extra):
    proc = subprocess.Popen(
        [binary, "--sqlite-path", db, "serve", "--access-token", TOKEN,
         "--addr", f"127.0.0.1:{port}", "--metrics-addr", "off", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if k != "DENO_KV_ACCESS_TOKEN"},
    )
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    sys.exit("the server did not start")


def post(port, route, body, read=True, wait=0.0):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    c.request("POST", f"/v2/{route}", body=body, headers=HEADERS)
    if wait:
        time.sleep(wait)
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, data


def status_kib(pid, name):
    with open(f"/proc/{pid}/status") as f:
        m = re.search(rf"^{name}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--values", type=int, default=1000)
    ap.add_argument("--size", type=int, default=65536)
    ap.add_argument("--slow", action="store_true")
    ap.add_argument("--wait", type=float, default=3.0)
    ap.add_argument("extra", nargs="*")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        db = os.path.join(d, "db.sqlite")
        port = free_port()
        proc = start(a.binary, db, port, a.extra)
        per = max(1, 800_000 // (a.size + 16))
        for s in range(0, a.values, per):
            st, _ = post(port, "atomic_write", atomic_write(s, min(per, a.values - s), a.size))
            assert st == 200, st
        proc.terminate()
        proc.wait()
        proc = start(a.binary, db, port, a.extra)
        try:
            # One read first: the database pages in the cache, the allocator warmed up.
            st, data = post(port, "snapshot_read", snapshot_read(a.values))
            assert st == 200, st
            size = len(data)
            idle = status_kib(proc.pid, "VmRSS")
            peak = [idle]
            done = threading.Event()

            def sample():
                while not done.is_set():
                    peak[0] = max(peak[0], status_kib(proc.pid, "VmRSS"))
                    time.sleep(0.005)

            sampler = threading.Thread(target=sample)
            sampler.start()
            results = []

            def client():
                results.append(post(port, "snapshot_read", snapshot_read(a.values),
                                    wait=a.wait if a.slow else 0.0))

            t0 = time.time()
            threads = [threading.Thread(target=client) for _ in range(a.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            took = time.time() - t0
            done.set()
            sampler.join()
            bad = [st for st, data in results if st != 200 or len(data) != size]
            after = status_kib(proc.pid, "VmRSS")
            hwm = status_kib(proc.pid, "VmHWM")
            print(f"answer {size} bytes; {a.clients} {'slow' if a.slow else 'fast'} clients in "
                  f"{took:.1f} s; failed: {len(bad)}")
            print(f"server RSS: idle {idle // 1024} MiB, peak sampled {peak[0] // 1024} MiB, "
                  f"VmHWM {hwm // 1024} MiB, after {after // 1024} MiB")
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
