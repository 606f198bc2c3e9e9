#!/usr/bin/env python3
"""Writes the seed corpus (corpus/<target>/seed-*): a few valid inputs per target, hand-encoded
from the SPEC's messages. Re-run after changing it; the fuzzers add their own finds beside."""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def varint(n):
    n &= (1 << 64) - 1
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def field(num, wire, payload):
    key = varint(num << 3 | wire)
    if wire == 0:
        return key + varint(payload)
    return key + varint(len(payload)) + payload


def b(num, data):
    return field(num, 2, data)


def i(num, n):
    return field(num, 0, n)


def key(*parts):
    """The key codec (SPEC §4) for strings and small ints."""
    out = b""
    for p in parts:
        if isinstance(p, str):
            out += b"\x02" + p.encode().replace(b"\x00", b"\x00\xff") + b"\x00"
        elif isinstance(p, bytes):
            out += b"\x01" + p.replace(b"\x00", b"\x00\xff") + b"\x00"
        elif p is True or p is False:
            out += b"\x27" if p else b"\x26"
        elif isinstance(p, float):
            bits = struct.unpack(">Q", struct.pack(">d", p))[0]
            bits = (~bits) & (2**64 - 1) if bits >> 63 else bits ^ (1 << 63)
            out += b"\x21" + struct.pack(">Q", bits)
        else:
            m = abs(p).to_bytes((abs(p).bit_length() + 7) // 8, "big")
            if p >= 0:
                out += bytes([0x14 + len(m)]) + m
            else:
                out += bytes([0x14 - len(m)]) + bytes(~x & 0xFF for x in m)
    return out


V8_NUM = b"\xff\x0f\x4e" + struct.pack("<d", 1.5)
V8_SMI = b"\xff\x0f\x49\x0a"  # 5
V8_BIG = b"\xff\x0f\x5a\x10" + (5).to_bytes(8, "little")
V8_BIG_MAX = b"\xff\x0f\x5a\x10" + (100).to_bytes(8, "little")
V8_STR = b"\xff\x0f\x22\x03abc"


def value(data, enc):
    return b(2, b(1, data) + i(2, enc))


def mutation(k, kind, val=None, expire=0, mn=b"", mx=b"", clamp=False):
    out = b(1, k)
    if val is not None:
        out += val
    out += i(3, kind)
    if expire:
        out += i(4, expire)
    if mn:
        out += b(5, mn)
    if mx:
        out += b(6, mx)
    if clamp:
        out += i(7, 1)
    return b(2, out)


def rng(start, end, limit, reverse=False):
    return b(1, b(1, start) + b(2, end) + i(3, limit) + (i(4, 1) if reverse else b""))


SEEDS = {
    "snapshot_read": [
        rng(key("a"), key("b"), 1),
        rng(key("users") + b"\x00", key("users") + b"\xff", 100, True)
        + rng(key("x", 1), key("x", 2), 10),
        rng(b"", b"\xff", 1000),
    ],
    "watch": [
        b(1, b(1, key("a"))),
        b(1, b(1, key("a", 1))) + b(1, b(1, key("b", True))),
    ],
    "atomic_write": [
        mutation(key("a"), 1, value(V8_STR, 1)),
        b(1, b(1, key("a")) + b(2, bytes(10))) + mutation(key("a"), 2),
        b(1, b(1, key("n")))
        + mutation(key("n"), 3, value((1).to_bytes(8, "little"), 2))
        + mutation(key("m"), 5, value((9).to_bytes(8, "little"), 2))
        + mutation(key("m"), 4, value((3).to_bytes(8, "little"), 2), expire=1_700_000_060_000),
        mutation(key("s"), 3, value(V8_BIG, 1), mn=V8_BIG, mx=V8_BIG_MAX, clamp=True)
        + mutation(key("f"), 3, value(V8_NUM, 1))
        + mutation(key("v"), 9, value(b"raw", 3)),
        b(3, b(1, V8_STR) + i(2, 1_700_000_001_000) + b(3, key("dead")) + b(4, varint(100) + varint(1000))),
    ],
    "metadata": [
        b'{"supportedVersions":[2,3]}',
        b'{"supportedVersions":[1,2]}',
        b'{"supportedVersions":[3]}',
        b"{}",
    ],
    "headers": [
        b"x-denokv-version:3\nauthorization:Bearer fuzz-token\n"
        b"x-denokv-database-id:00000000-0000-0000-0000-000000000000\n",
        b"x-denokv-version:2\nauthorization:bearer fuzz-token\n"
        b"x-denokv-database-id:00000000000000000000000000000000\ncontent-type:application/x-protobuf\n",
    ],
    "key_codec": [
        key("a"),
        key("users", 42, True, False),
        key(b"\x00\xff\x00", -1, 2**70, -(2**70), 1.5, -0.0),
        key("s\x00x", 0, float("inf")),
    ],
    # Arbitrary's layout for (operand, min, max, clamp, stored) is not stable across its
    # versions: these are just plausible byte strings holding V8 numbers.
    "v8sum": [
        bytes([len(V8_SMI)]) + V8_SMI + b"\x00\x00\x01\x01" + bytes([len(V8_SMI)]) + V8_SMI + b"\x01",
        bytes([len(V8_BIG)]) + V8_BIG + bytes([len(V8_BIG)]) + V8_BIG + bytes([len(V8_BIG_MAX)]) + V8_BIG_MAX + b"\x01",
        V8_NUM * 3,
    ],
    "uring_writer": [
        bytes([0, 0, 0, 0x20, 0, 7]) * 3,
        bytes([0, 0x10, 0, 0x00, 0x10, 1, 1, 0, 0x00, 0, 0x08, 2, 0, 0x04, 0, 0x00, 0x01, 3]),
    ],
}

for target, seeds in SEEDS.items():
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    for n, seed in enumerate(seeds):
        with open(os.path.join(d, f"seed-{n}"), "wb") as f:
            f.write(seed)
