// End-to-end tests with the npm client `@deno/kv` under Node (HTTP/1.1 via
// Node's fetch). Each test starts its own denokv on a temp database.
//
// Unlike Deno's CLI, @deno/kv checks almost no limits client-side, so the
// server's own limit errors are asserted here.

import { test } from "node:test";
import assert from "node:assert/strict";
import {
  denoKv,
  listAll,
  nextFrame,
  rejectsWith,
  sleep,
  waitForFrame,
  withServer,
} from "./helpers.mjs";

const T = { timeout: 30_000 };
const { KvU64 } = await denoKv();
const VS = /^[0-9a-f]{20}$/;

test("npm: set / get / getMany / delete and value types", T, () =>
  withServer(async ({ open }) => {
    const kv = await open();
    assert.deepEqual(await kv.get(["missing"]), { key: ["missing"], value: null, versionstamp: null });
    const values = {
      str: "héllo 🦕",
      num: 1.5,
      negzero: -0,
      nan: NaN,
      inf: -Infinity,
      big: -(2n ** 80n),
      bool: false,
      nul: null,
      date: new Date(1700000000000),
      re: /a+/gi,
      map: new Map([["k", { v: [1, 2] }]]),
      set: new Set([1, "two"]),
      arr: [1, [2, [3]], { x: null }],
      obj: { nested: { deep: { value: 42 } } },
      bytes: new Uint8Array([0, 1, 255]),
      u64: new KvU64(2n ** 64n - 1n),
    };
    const stamps = {};
    for (const [k, v] of Object.entries(values)) {
      const r = await kv.set(["t", k], v);
      assert.equal(r.ok, true);
      assert.match(r.versionstamp, VS);
      stamps[k] = r.versionstamp;
    }
    for (const [k, v] of Object.entries(values)) {
      const e = await kv.get(["t", k]);
      assert.equal(e.versionstamp, stamps[k], `versionstamp ${k}`);
      if (v instanceof KvU64) {
        assert.ok(e.value instanceof KvU64, `${k} is KvU64`);
        assert.equal(e.value.value, v.value);
      } else if (v instanceof Uint8Array) {
        assert.deepEqual([...e.value], [...v]);
      } else {
        assert.deepStrictEqual(e.value, v, k);
      }
    }
    const keys = [["t", "str"], ["t", "nope"], ["t", "num"]];
    const many = await kv.getMany(keys);
    assert.deepStrictEqual(many.map((e) => e.value), ["héllo 🦕", null, 1.5]);
    assert.deepStrictEqual(many.map((e) => e.key), keys);
    await kv.delete(["t", "str"]);
    assert.equal((await kv.get(["t", "str"])).value, null);
    // the point read of a deleted key must not return its neighbour
    assert.deepStrictEqual((await kv.get(["t", "str"])).key, ["t", "str"]);
  }));

test("npm: list with prefix, start/end, reverse, limit, cursor, batchSize", T, () =>
  withServer(async ({ open }) => {
    const kv = await open();
    const op = kv.atomic();
    for (let i = 0; i < 30; i++) op.set(["l", i], i);
    assert.equal((await op.commit()).ok, true);
    await kv.set(["l"], "prefix itself");
    await kv.set(["lz", 0], "neighbour");
    const vals = (es) => es.map((e) => e.value);
    const seq = (a, b) => Array.from({ length: b - a }, (_, i) => a + i);
    assert.deepStrictEqual(vals(await listAll(kv, { prefix: ["l"] })), seq(0, 30));
    assert.deepStrictEqual(vals(await listAll(kv, { prefix: ["l"] }, { reverse: true, limit: 3 })), [29, 28, 27]);
    assert.deepStrictEqual(vals(await listAll(kv, { prefix: ["l"], start: ["l", 25] })), seq(25, 30));
    assert.deepStrictEqual(vals(await listAll(kv, { prefix: ["l"], end: ["l", 2] })), [0, 1]);
    assert.deepStrictEqual(vals(await listAll(kv, { start: ["l", 10], end: ["l", 13] })), [10, 11, 12]);
    // batchSize 1 is avoided on purpose: @deno/kv 0.14 starts prefix lists AT the
    // prefix key and skips it client-side, so with the key ["l"] present and
    // batchSize 1 it re-reads the same batch forever (a client bug).
    for (const batchSize of [2, 4, 30]) {
      assert.deepStrictEqual(vals(await listAll(kv, { prefix: ["l"] }, { batchSize })), seq(0, 30), `batchSize ${batchSize}`);
    }
    const it = kv.list({ prefix: ["l"] }, { limit: 7 });
    const first = [];
    for await (const e of it) first.push(e.value);
    assert.deepStrictEqual(first, seq(0, 7));
    assert.deepStrictEqual(vals(await listAll(kv, { prefix: ["l"] }, { limit: 7, cursor: it.cursor })), seq(7, 14));
  }));

test("npm: atomic checks, 100 checks, conflicts", T, () =>
  withServer(async ({ open }) => {
    const kv = await open();
    const r = await kv.set(["a"], 1);
    const ok = await kv.atomic().check({ key: ["a"], versionstamp: r.versionstamp }).set(["a"], 2).commit();
    assert.equal(ok.ok, true);
    const bad = await kv.atomic().check({ key: ["a"], versionstamp: r.versionstamp }).set(["a"], 3).commit();
    assert.deepStrictEqual(bad, { ok: false });
    assert.equal((await kv.get(["a"])).value, 2);
    // 11 .. 100 checks are fine
    for (const n of [11, 100]) {
      const op = kv.atomic();
      for (let i = 0; i < n; i++) op.check({ key: ["c", n, i], versionstamp: null });
      op.set(["c", "done", n], true);
      assert.equal((await op.commit()).ok, true, `${n} checks`);
    }
    // 101: the server refuses (npm has no client-side limit)
    const op = kv.atomic();
    for (let i = 0; i < 101; i++) op.check({ key: ["c", i], versionstamp: null });
    await rejectsWith(assert, () => op.commit(), "Too many checks included in atomic write.", "101 checks");
  }));

test("npm: sum / min / max and the non-U64 error; failed atomic writes nothing", T, () =>
  withServer(async ({ open }) => {
    const kv = await open();
    await kv.atomic().sum(["n"], 5n).sum(["n"], 6n).commit();
    assert.equal((await kv.get(["n"])).value.value, 11n);
    await kv.atomic().min(["n"], 3n).commit();
    assert.equal((await kv.get(["n"])).value.value, 3n);
    await kv.atomic().max(["n"], 9n).commit();
    assert.equal((await kv.get(["n"])).value.value, 9n);
    await kv.set(["s"], "a string");
    await rejectsWith(
      assert,
      () => kv.atomic().set(["k1"], "first").sum(["s"], 1n).commit(),
      "Failed to perform 'sum' mutation on a non-U64 value in the database",
    );
    assert.equal((await kv.get(["k1"])).value, null, "k1 must not be written by a failed atomic");
    await rejectsWith(assert, () => kv.atomic().min(["s"], 1n).commit(), "Failed to perform 'min' mutation on a non-U64 value in the database");
    await rejectsWith(assert, () => kv.atomic().max(["s"], 1n).commit(), "Failed to perform 'max' mutation on a non-U64 value in the database");
    // V8 sums through mutate()
    await kv.atomic().mutate({ type: "sum", key: ["v8"], value: 40n }).commit();
    await kv.atomic().mutate({ type: "sum", key: ["v8"], value: 2n }).commit();
    assert.equal((await kv.get(["v8"])).value, 42n);
    await rejectsWith(assert, () => kv.atomic().mutate({ type: "sum", key: ["v8"], value: 1 }).commit(), "Cannot sum BigInt with Number");
  }));

test("npm: expireIn — expired values are never returned", T, () =>
  withServer(async ({ open }) => {
    const kv = await open();
    await kv.set(["x", "stay"], 1);
    // Long enough to read it back before it expires, even on a loaded machine.
    await kv.set(["x", "go"], 2, { expireIn: 4000 });
    const setAt = Date.now();
    assert.equal((await kv.get(["x", "go"])).value, 2, "visible before its expiry");
    await sleep(Math.max(0, setAt + 4150 - Date.now()));
    assert.equal((await kv.get(["x", "go"])).value, null);
    assert.deepStrictEqual((await listAll(kv, { prefix: ["x"] })).map((e) => e.key[1]), ["stay"]);
  }));

test("npm: enqueue is stored and returns a versionstamp (no KV rows written)", T, () =>
  withServer(async ({ open }) => {
    const kv = await open();
    const r = await kv.enqueue({ job: 1 });
    assert.equal(r.ok, true);
    assert.match(r.versionstamp, VS);
    const r2 = await kv.enqueue("later", { delay: 60_000, keysIfUndelivered: [["dlq", 1]] });
    assert.equal(r2.ok, true);
    assert.ok(r2.versionstamp > r.versionstamp);
    const r3 = await kv.atomic().set(["with-enqueue"], 1).enqueue("m").commit();
    assert.equal(r3.ok, true);
    assert.equal((await kv.get(["with-enqueue"])).versionstamp, r3.versionstamp);
    assert.deepStrictEqual((await listAll(kv, { prefix: ["dlq"] })), []);
    // an enqueue more than 30 days out is refused by the server
    await rejectsWith(assert, () => kv.enqueue("too late", { delay: 31 * 24 * 3600 * 1000 }), /Invalid mutation enqueue deadline|Delay/);
  }));

test("npm: watch sees writes of a second client, and deletions", T, () =>
  withServer(async ({ open, defer }) => {
    const watcher = await open();
    const writer = await open();
    await writer.set(["w", "a"], "A0");
    const reader = watcher.watch([["w", "a"], ["w", "b"]]).getReader();
    defer(() => reader.cancel());
    const f0 = await nextFrame(reader, 10_000, "first frame");
    assert.deepStrictEqual(f0.map((e) => e.value), ["A0", null]);
    const w1 = await writer.set(["w", "b"], "B1");
    const f1 = await waitForFrame(reader, (f) => f[1].versionstamp === w1.versionstamp, 10_000, "b=B1");
    assert.deepStrictEqual(f1.map((e) => e.value), ["A0", "B1"]);
    await writer.delete(["w", "a"]);
    const f2 = await waitForFrame(reader, (f) => f[0].versionstamp === null, 10_000, "a deleted");
    assert.deepStrictEqual(f2.map((e) => e.value), [null, "B1"]);
  }));

test("npm: server-side limits and their error texts", T, () =>
  withServer(async ({ open }) => {
    const kv = await open();
    // ["k", s] encodes as 02 6b 00 02 <s> 00: 5 bytes + s
    assert.equal((await kv.set(["k", "x".repeat(2043)], 1)).ok, true, "2048-byte key");
    await rejectsWith(assert, () => kv.set(["k", "x".repeat(2044)], 1), "A key exceeds the key size limit.", "2049-byte key");
    assert.equal((await kv.set(["v"], new Uint8Array(65536))).ok, true, "65536-byte value");
    await rejectsWith(assert, () => kv.set(["v"], new Uint8Array(65537)), "A value exceeds the value size limit.", "65537-byte value");
    const many = kv.atomic();
    for (let i = 0; i < 1001; i++) many.set(["m", i], i);
    await rejectsWith(assert, () => many.commit(), "Too many mutations / enqueues included in atomic write.", "1001 mutations");
    const big = kv.atomic();
    for (let i = 0; i < 13; i++) big.set(["b", i], new Uint8Array(65536));
    await rejectsWith(assert, () => big.commit(), "The total size of the atomic write is too large.", "13 × 64 KiB");
    assert.deepStrictEqual(await listAll(kv, { prefix: ["m"] }), []);
    assert.deepStrictEqual(await listAll(kv, { prefix: ["b"] }), []);
    // the client is still fine after the errors
    assert.equal((await kv.set(["after"], 1)).ok, true);
  }));
