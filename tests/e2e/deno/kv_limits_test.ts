// Limits as seen from the Deno CLI client. The Deno client checks most limits
// itself before sending (TypeError, nothing reaches the server); the tests pin
// those messages and, more importantly, that values exactly AT each limit are
// accepted by the server. Server-side limit errors are exercised with the npm
// client (tests/e2e/node) and with raw requests (raw_protocol_test.ts).
//
// Client-side in Deno: write key 2048 B, read key 2049 B, value 65536 B,
// 10 ranges per read, 100 checks, 1000 mutations, 819200 B total mutation
// size, 81920 B total key size, 10 watched keys, enqueue delay ≤ 30 days.

import { assert, assertRejects, e2eTest, listAll } from "./server.ts";

/** A key ["L", "xxxx…"] whose encoding is exactly `bytes` long. */
function keyOfSize(bytes: number, fill = "x"): Deno.KvKey {
  // ["L", s] encodes as 02 4c 00 02 <s> 00 → 5 bytes of overhead
  return ["L", fill.repeat(bytes - 5)];
}

e2eTest("limits: key size (2048 bytes for writes, 2049 for reads)", async (ctx) => {
  const kv = await ctx.open(await ctx.target());
  const k2048 = keyOfSize(2048);
  // exactly at the write limit: accepted, and readable (get's range end is 2049 bytes)
  assert.ok((await kv.set(k2048, "max key")).ok);
  assert.equal((await kv.get(k2048)).value, "max key");
  const listed = await listAll(kv, { prefix: ["L"] });
  assert.equal(listed.length, 1);
  assert.deepStrictEqual(listed[0].key, k2048);
  // a check on a 2048-byte key and a getMany of it
  const c = await kv.atomic().check({ key: k2048, versionstamp: listed[0].versionstamp }).set(["ok"], 1).commit();
  assert.ok(c.ok);
  assert.equal((await kv.getMany([k2048, ["ok"]]))[0].value, "max key");
  // list with prefix = the 2048-byte key: range ends are 2049 bytes (read limit)
  assert.deepStrictEqual(await listAll(kv, { prefix: k2048 }), []);
  // one byte over: refused by the client
  const k2049 = keyOfSize(2049);
  await assertRejects(() => kv.set(k2049, 1), "Key too large for write (max 2048 bytes)");
  await assertRejects(() => kv.atomic().sum(k2049, 1n).commit(), "Key too large for write (max 2048 bytes)");
  await assertRejects(() => kv.delete(k2049), "Key too large for write (max 2048 bytes)");
  // reads of a 2049-byte key need a 2050-byte range end
  await assertRejects(() => kv.get(k2049), "Key too large for read (max 2049 bytes)");
  // versionstamped key: the server appends 22 bytes to the prefix
  const vr = await kv.set([...keyOfSize(2026, "v"), kv.commitVersionstamp()], "vs");
  assert.ok(vr.ok);
  const vk = [...keyOfSize(2026, "v"), vr.versionstamp];
  assert.equal((await kv.get(vk)).value, "vs", "2048-byte versionstamped key readable");
  // a 2048-byte prefix is allowed: the stored key is 2070 bytes, reachable by list
  const p2048: Deno.KvKey = ["L2", "w".repeat(2042)];
  const wr = await kv.set([...p2048, kv.commitVersionstamp()], "long");
  assert.ok(wr.ok);
  const l2 = await listAll(kv, { prefix: ["L2"] });
  assert.equal(l2.length, 1);
  assert.deepStrictEqual(l2[0].key, [...p2048, wr.versionstamp]);
  assert.equal(l2[0].value, "long");
});

e2eTest("limits: value size (65536 bytes)", async (ctx) => {
  const kv = await ctx.open(await ctx.target());
  const max = new Uint8Array(65536).fill(7);
  assert.ok((await kv.set(["v", "max"], max)).ok);
  const got = (await kv.get<Uint8Array>(["v", "max"])).value!;
  assert.equal(got.length, 65536);
  assert.ok(got.every((b) => b === 7));
  // a V8 string just under the limit (header bytes count)
  const s = "s".repeat(65530);
  assert.ok((await kv.set(["v", "str"], s)).ok);
  assert.equal((await kv.get(["v", "str"])).value, s);
  await assertRejects(() => kv.set(["v", "over"], new Uint8Array(65537)), "Value too large (max 65536 bytes)");
  await assertRejects(() => kv.set(["v", "over"], "s".repeat(70000)), "Value too large (max 65536 bytes)");
  assert.equal((await kv.get(["v", "over"])).versionstamp, null);
});

e2eTest("limits: mutations per atomic (1000) and total sizes", async (ctx) => {
  const kv = await ctx.open(await ctx.target());
  const op = kv.atomic();
  for (let i = 0; i < 1000; i++) op.set(["mut", i], i);
  assert.ok((await op.commit()).ok, "1000 mutations accepted");
  assert.equal((await listAll(kv, { prefix: ["mut"] }, { batchSize: 500 })).length, 1000);
  const mixed = kv.atomic();
  for (let i = 0; i < 500; i++) mixed.delete(["mut", i]);
  for (let i = 0; i < 500; i++) mixed.sum(["cnt", i % 10], 1n);
  assert.ok((await mixed.commit()).ok, "1000 mixed mutations accepted");
  assert.equal((await kv.get<Deno.KvU64>(["cnt", 3])).value?.value, 50n);

  const over = kv.atomic();
  for (let i = 0; i < 1001; i++) over.set(["mut2", i], i);
  await assertRejects(() => over.commit(), "Too many mutations (max 1000)");
  assert.deepStrictEqual(await listAll(kv, { prefix: ["mut2"] }), []);

  // 12 values of 64 KiB (786 432 B + keys) fit in the 819 200 B total; 13 do not
  const big = kv.atomic();
  for (let i = 0; i < 12; i++) big.set(["big", i], new Uint8Array(65536).fill(i));
  assert.ok((await big.commit()).ok, "786 KiB atomic accepted");
  assert.equal((await kv.get<Uint8Array>(["big", 11])).value![0], 11);
  const tooBig = kv.atomic();
  for (let i = 0; i < 13; i++) tooBig.set(["big2", i], new Uint8Array(65536));
  await assertRejects(() => tooBig.commit(), "Total mutation size too large (max 819200 bytes)");

  // total key size of value-carrying mutations: 81 920 bytes
  const keys40 = kv.atomic();
  for (let i = 0; i < 40; i++) keys40.set(["K", i, "k".repeat(2000 - 20)], i);
  assert.ok((await keys40.commit()).ok, "~80 000 B of keys accepted");
  const keys42 = kv.atomic();
  for (let i = 0; i < 42; i++) keys42.set(["K2", i, "k".repeat(2000 - 20)], i);
  await assertRejects(() => keys42.commit(), "Total key size too large (max 81920 bytes)");
});

e2eTest("limits: watch accepts 10 keys, refuses 11 (client-side)", async (ctx) => {
  const kv = await ctx.open(await ctx.target());
  const keys = Array.from({ length: 10 }, (_, i) => ["w", i]);
  const reader = kv.watch(keys).getReader();
  try {
    const r = await reader.read();
    assert.equal(r.done, false);
    assert.equal(r.value!.length, 10);
    assert.ok(r.value!.every((e) => e.value === null && e.versionstamp === null));
  } finally {
    await reader.cancel();
  }
  assert.throws(() => kv.watch(Array.from({ length: 11 }, (_, i) => ["w", i])), /Too many keys \(max 10\)/);
});
