#!/usr/bin/env python3
"""What a connection costs the release server, for docs/RELIABILITY.md: server memory per idle
connection over HTTP/1.1 and h2, in the clear and over TLS (`--tls-cert`), and new TLS
handshakes a second.

    loadtest/conn-cost-report.py                   # measure, rewrite the section in RELIABILITY.md
    loadtest/conn-cost-report.py --connections 500 --out /tmp/c.md

Each case starts a fresh server (release binary, $CARGO_TARGET_DIR/release/denokv; `cargo
build --release -p denokv`), opens --connections connections from one loopback address, makes
one request on each (`GET /`, answered 404: enough for the server to hold a live keep-alive
connection with its buffers in use), keeps them open and idle, and reads the server's resident
memory before and with them: (with - before) / connections. h2 is prior knowledge in the clear
and ALPN `h2` over TLS, with the request hand-encoded (HPACK static table). Handshakes:
`openssl s_time -new` for --seconds against the TLS server (TLS 1.3, then 1.2; a P-256
certificate made with openssl), with the client on the same cores. Loopback only; every server
is stopped.
"""

import argparse
import os
import re
import socket
import ssl
import struct
import subprocess
import tempfile
import time
from pathlib import Path

from reportlib import ROOT, free_port, log, raise_open_files, release_binary, rss_kib, write_section

TOKEN = "conn-cost-report-token-0123456789"
BEGIN, END = "<!-- conn-cost-report:begin -->", "<!-- conn-cost-report:end -->"
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"








def h2_frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def h2_request(tls):
    # HEADERS on stream 1, END_STREAM | END_HEADERS: :method GET (static 2), :path / (4),
    # :scheme http (6) or https (7), :authority "x" (name 1, literal without indexing).
    block = bytes([0x82, 0x84, 0x87 if tls else 0x86, 0x01, 0x01]) + b"x"
    return H2_PREFACE + h2_frame(0x4, 0, 0) + h2_frame(0x1, 0x5, 1, block)


def read_h2_answer(sock):
    """Reads frames until the answer's HEADERS on stream 1; acks the server's SETTINGS."""
    buf = b""
    while True:
        while len(buf) >= 9:
            length = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + length:
                break
            kind, flags, stream = buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
            buf = buf[9 + length:]
            if kind == 0x4 and not flags & 0x1:
                sock.sendall(h2_frame(0x4, 0x1, 0))
            if kind == 0x1 and stream == 1:
                return True
            if kind == 0x7:  # GOAWAY
                return False
        chunk = sock.recv(65536)
        if not chunk:
            return False
        buf += chunk


def open_idle(port, n, proto, tls_ctx):
    """`n` connections, each after one answered request; returns the open sockets."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=20)
        if tls_ctx is not None:
            s = tls_ctx.wrap_socket(s, server_hostname="localhost")
        if proto == "h1":
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            ok = bool(s.recv(4096))
        else:
            s.sendall(h2_request(tls_ctx is not None))
            ok = read_h2_answer(s)
        if not ok:
            raise SystemExit(f"a {proto} connection got no answer")
        socks.append(s)
    return socks


def make_cert(work):
    key, cert = work / "key.pem", work / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True)
    return cert, key


class Server:
    def __init__(self, binary, work, name, connections, tls):
        self.port = free_port()
        args = [str(binary), "--sqlite-path", str(work / f"{name}.sqlite"), "serve",
                "--addr", f"127.0.0.1:{self.port}", "--metrics-addr", "off",
                "--max-connections", str(connections + 100),
                "--max-connections-per-ip", str(connections + 100)]
        if tls:
            args += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
        self.p = subprocess.Popen(args, env={**os.environ, "DENO_KV_ACCESS_TOKEN": TOKEN, "RUST_LOG": "warn"},
                                  stdout=subprocess.DEVNULL, stderr=open(work / f"{name}.log", "w"))
        deadline = time.time() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or self.p.poll() is not None:
                    raise SystemExit(f"the server ({name}) did not start: see {work / (name + '.log')}")
                time.sleep(0.1)
        time.sleep(0.5)

    def stop(self):
        self.p.terminate()
        self.p.wait(timeout=30)


def idle_case(binary, work, proto, tls, n, ctx):
    name = f"{proto}-{'tls' if tls else 'clear'}"
    server = Server(binary, work, name, n, tls)
    try:
        # The probe connection above and the first connection's allocations settle first.
        warm = open_idle(server.port, 10, proto, ctx)
        before = rss_kib(server.p.pid)
        socks = open_idle(server.port, n, proto, ctx)
        time.sleep(2)
        with_conns = rss_kib(server.p.pid)
        for s in socks + warm:
            s.close()
    finally:
        server.stop()
    per = (with_conns - before) / n
    log(f"{name}: {per:.1f} KiB per idle connection ({before / 1024:.1f} -> {with_conns / 1024:.1f} MiB)")
    return {"before_mib": before / 1024, "with_mib": with_conns / 1024, "kib": per}


def handshakes(binary, work, tls, seconds, version):
    server = Server(binary, work, f"s_time-{version}", 100, tls)
    try:
        out = subprocess.run(
            ["openssl", "s_time", "-connect", f"127.0.0.1:{server.port}", "-new", "-time", str(seconds),
             f"-{version}"],
            capture_output=True, text=True, timeout=seconds + 60).stdout
    finally:
        server.stop()
    # "N connections in T real seconds" (the line before it counts the client's CPU seconds).
    m = re.search(r"(\d+) connections in (\d+) real seconds", out)
    if not m:
        raise SystemExit(f"unexpected openssl s_time output:\n{out}")
    count, secs = int(m.group(1)), float(m.group(2))
    log(f"{version}: {count} handshakes in {secs} s")
    return {"count": count, "seconds": secs, "per_s": count / secs}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--seconds", type=int, default=6, help="each openssl s_time run")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/RELIABILITY.md")
    args = ap.parse_args()
    raise_open_files(args.connections + 500)
    binary = release_binary()
    if not binary.exists():
        raise SystemExit(f"no release binary at {binary}: cargo build --release -p denokv")
    work = Path(tempfile.mkdtemp(prefix="denokv-conn-cost-"))
    tls = make_cert(work)
    load_before = os.getloadavg()[0]

    def client_ctx(alpn):
        ctx = ssl.create_default_context(cafile=str(tls[0]))
        ctx.set_alpn_protocols([alpn])
        return ctx

    cases = {}
    for proto in ("h1", "h2"):
        cases[(proto, False)] = idle_case(binary, work, proto, None, args.connections, None)
        alpn = "http/1.1" if proto == "h1" else "h2"
        cases[(proto, True)] = idle_case(binary, work, proto, tls, args.connections, client_ctx(alpn))
    shakes = {v: handshakes(binary, work, tls, args.seconds, v) for v in ("tls1_3", "tls1_2")}

    n = args.connections
    rows = [
        f"Measured by `loadtest/conn-cost-report.py --connections {n} --seconds {args.seconds}` on "
        f"{time.strftime('%Y-%m-%d')} ({os.cpu_count()} CPUs, release build, loopback; load average "
        f"{load_before:.1f} before and {os.getloadavg()[0]:.1f} after: other work shared the cores). Each row: a fresh "
        f"server, {n:,} connections each after one answered request (`GET /`), held idle; the server's "
        "resident memory before and with them.",
        "",
        "| connections | server RSS before | with them | per idle connection |",
        "|---|---|---|---|",
    ]
    names = {("h1", False): "HTTP/1.1", ("h1", True): "HTTP/1.1 over TLS",
             ("h2", False): "h2 (prior knowledge, as Deno's client)", ("h2", True): "h2 over TLS (ALPN)"}
    for key in (("h1", False), ("h1", True), ("h2", False), ("h2", True)):
        c = cases[key]
        rows.append(f"| {n:,} × {names[key]} | {c['before_mib']:.1f} MiB | {c['with_mib']:.1f} MiB | "
                    f"{c['kib']:.1f} KiB |")
    worst = max(c["kib"] for c in cases.values())
    rows += [
        "",
        f"At the most expensive kind ({worst:.1f} KiB), the default cap of 10,000 connections holds "
        f"{worst * 10_000 / 1024:.0f} MiB.",
        "",
        f"New TLS handshakes (`openssl s_time -new -time {args.seconds}`, one connection at a time, "
        "the client on the same cores; P-256 certificate): "
        f"TLS 1.3 {shakes['tls1_3']['count']:,} in {shakes['tls1_3']['seconds']:.2f} s "
        f"({shakes['tls1_3']['per_s']:,.0f} a second), "
        f"TLS 1.2 {shakes['tls1_2']['count']:,} in {shakes['tls1_2']['seconds']:.2f} s "
        f"({shakes['tls1_2']['per_s']:,.0f} a second).",
    ]
    text = "\n".join(rows)
    print(text)
    write_section(args.out, BEGIN, END, "What a connection costs", text)


if __name__ == "__main__":
    main()
