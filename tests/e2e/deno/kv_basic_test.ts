// get / getMany / list / set / delete / expiry / versionstamps through the
// Deno CLI's KV client (KV Connect over h2c when E2E_TARGET=server).

import {
  assert,
  assertRejects,
  assertVersionstamp,
  e2eTest,
  IS_SERVER,
  listAll,
  sleep,
} from "./server.ts";

e2eTest("get: missing key, set then get, overwrite", async (ctx) => {
  const kv = await ctx.open(await ctx.target());
  const missing = await kv.get(["nope"]);
  assert.deepStrictEqual(missing, { key: ["nope"], value: null, versionstamp: null });

  const r1 = await kv.set(["a"], "one");
  assert.equal(r1.ok, true);
  assertVersionstamp(r1.versionstamp);
  const e1 = await kv.get(["a"]);
  assert.deepStrictEqual(e1, { key: ["a"], value: "one", versionstamp: r1.versionstamp });

  const r2 = await kv.set(["a"], { two: 2 });
  assert.ok(r2.versionstamp > r1.versionstamp, "overwrite gets a newer versionstamp");
  const e2 = await kv.get(["a"]);
  assert.deepStrictEqual(e2.value, { two: 2 });
  assert.equal(e2.versionstamp, r2.versionstamp);

  // eventual consistency reads go to the same (only) endpoint
  const e3 = await kv.get(["a"], { consistency: "eventual" });
  assert.deepStrictEqual(e3.value, { two: 2 });
});

e2eTest("getMany: order preserved, missing keys null, max 10", async (ctx) => {
  const kv = await ctx.open(await ctx.target());
  const stamps: Record<string, string> = {};
  for (const k of ["k1", "k3", "k5", "k7", "k9"]) {
    stamps[k] = (await kv.set(["gm", k], k.toUpperCase())).versionstamp;
  }
  const keys = Array.from({ length: 10 }, (_, i) => ["gm", `k${9 - i}`]);
  const entries = await kv.getMany(keys);
  assert.equal(entries.length, 10);
  entries.forEach((e, i) => {
    assert.deepStrictEqual(e.key, keys[i]);
    const name = keys[i][1] as string;
    if (stamps[name]) {
      assert.equal(e.value, name.toUpperCase());
      assert.equal(e.versionstamp, stamps[name]);
    } else {
      assert.equal(e.value, null);
      assert.equal(e.versionstamp, null);
    }
  });
  // duplicate keys are fine
  const dup = await kv.getMany([["gm", "k1"], ["gm", "k1"]]);
  assert.equal(dup[0].value, "K1");
  assert.equal(dup[1].value, "K1");
  // 11 ranges: rejected by the Deno client before sending
  await assertRejects(
    () => kv.getMany(Array.from({ length: 11 }, (_, i) => ["gm", i])),
    "Too many ranges (max 10)",
  );
});

e2eTest("list: prefix, start, end, reverse, limit, cursor, batchSize", async (ctx) => {
  const kv = await ctx.open(await ctx.target());
  const N = 25;
  // insert in a scrambled order; number key parts sort numerically
  const order = Array.from({ length: N }, (_, i) => (i * 7) % N);
  for (let j = 0; j < N; j += 5) {
    const op = kv.atomic();
    for (const i of order.slice(j, j + 5)) op.set(["list", i], `v${i}`);
    assert.equal((await op.commit()).ok, true);
  }
  // neighbours that must never show up in prefix lists
  await kv.set(["lis"], "x");
  await kv.set(["list"], "the prefix itself is not a member");
  await kv.set(["lisu", 0], "x");
  await kv.set(["list\u0000", 0], "x");

  const ids = (es: Deno.KvEntry<unknown>[]) => es.map((e) => e.key[1] as number);
  const all = await listAll(kv, { prefix: ["list"] });
  assert.deepStrictEqual(ids(all), Array.from({ length: N }, (_, i) => i));
  for (const e of all) {
    assert.equal(e.value, `v${String(e.key[1])}`);
    assertVersionstamp(e.versionstamp);
  }

  const rev = await listAll(kv, { prefix: ["list"] }, { reverse: true });
  assert.deepStrictEqual(ids(rev), Array.from({ length: N }, (_, i) => N - 1 - i));

  const lim = await listAll(kv, { prefix: ["list"] }, { limit: 5 });
  assert.deepStrictEqual(ids(lim), [0, 1, 2, 3, 4]);
  const limRev = await listAll(kv, { prefix: ["list"] }, { limit: 3, reverse: true });
  assert.deepStrictEqual(ids(limRev), [24, 23, 22]);

  // prefix + start (inclusive), prefix + end (exclusive)
  assert.deepStrictEqual(
    ids(await listAll(kv, { prefix: ["list"], start: ["list", 20] })),
    [20, 21, 22, 23, 24],
  );
  assert.deepStrictEqual(
    ids(await listAll(kv, { prefix: ["list"], end: ["list", 3] })),
    [0, 1, 2],
  );
  // start/end without prefix
  assert.deepStrictEqual(
    ids(await listAll(kv, { start: ["list", 5], end: ["list", 9] })),
    [5, 6, 7, 8],
  );
  assert.deepStrictEqual(
    ids(await listAll(kv, { start: ["list", 5], end: ["list", 9] }, { reverse: true })),
    [8, 7, 6, 5],
  );
  // start == end and start > end (empty range)
  assert.deepStrictEqual(await listAll(kv, { start: ["list", 5], end: ["list", 5] }), []);
  await assertRejects(
    () => listAll(kv, { start: ["list", 9], end: ["list", 5] }),
    /Start key is greater than end key|greater/i,
  );
  // empty prefix result
  assert.deepStrictEqual(await listAll(kv, { prefix: ["nothing-here"] }), []);

  // cursor continuation
  const it = kv.list({ prefix: ["list"] }, { limit: 10 });
  const page1: number[] = [];
  for await (const e of it) page1.push(e.key[1] as number);
  assert.deepStrictEqual(page1, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
  const cursor = it.cursor;
  assert.ok(cursor.length > 0, "cursor after a full page");
  const page2 = ids(await listAll(kv, { prefix: ["list"] }, { limit: 10, cursor }));
  assert.deepStrictEqual(page2, [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]);
  // reverse cursor
  const itR = kv.list({ prefix: ["list"] }, { limit: 4, reverse: true });
  for await (const _ of itR) { /* drain */ }
  assert.deepStrictEqual(
    ids(await listAll(kv, { prefix: ["list"] }, { limit: 4, reverse: true, cursor: itR.cursor })),
    [20, 19, 18, 17],
  );

  // small batches force many round trips; results identical
  for (const batchSize of [1, 3, 7, 25, 100]) {
    assert.deepStrictEqual(
      ids(await listAll(kv, { prefix: ["list"] }, { batchSize })),
      Array.from({ length: N }, (_, i) => i),
      `batchSize ${batchSize}`,
    );
    assert.deepStrictEqual(
      ids(await listAll(kv, { prefix: ["list"] }, { batchSize, reverse: true, limit: 11 })),
      Array.from({ length: 11 }, (_, i) => N - 1 - i),
      `batchSize ${batchSize} reverse`,
    );
  }
});

e2eTest("list: more than 1000 entries in batches of 500 (server per-read limit is 1000)", async (ctx) => {
  const kv = await ctx.open(await ctx.target());
  const N = 1200;
  for (let j = 0; j < N; j += 400) {
    const op = kv.atomic();
    for (let i = j; i < j + 400; i++) op.set(["many", i], i);
    assert.equal((await op.commit()).ok, true);
  }
  const all = await listAll<number>(kv, { prefix: ["many"] }, { batchSize: 500 });
  assert.equal(all.length, N);
  all.forEach((e, i) => assert.equal(e.value, i));
  const rev = await listAll<number>(kv, { prefix: ["many"] }, { reverse: true, limit: 1001, batchSize: 500 });
  assert.equal(rev.length, 1001);
  assert.equal(rev[0].value, N - 1);
  assert.equal(rev[1000].value, N - 1001);
}, { timeoutMs: 30_000 });

e2eTest("delete: removes the key; deleting a missing key succeeds", async (ctx) => {
  const kv = await ctx.open(await ctx.target());
  await kv.set(["d", 1], "x");
  await kv.set(["d", 2], "y");
  await kv.delete(["d", 1]);
  assert.equal((await kv.get(["d", 1])).value, null);
  assert.equal((await kv.get(["d", 1])).versionstamp, null);
  assert.equal((await kv.get(["d", 2])).value, "y");
  await kv.delete(["d", "never-existed"]);
  const r = await kv.atomic().delete(["d", 2]).delete(["d", 3]).commit();
  assert.equal(r.ok, true);
  assert.deepStrictEqual(await listAll(kv, { prefix: ["d"] }), []);
  // delete then set in one atomic: last mutation wins
  await kv.atomic().set(["d", 4], "a").delete(["d", 4]).set(["d", 4], "b").commit();
  assert.equal((await kv.get(["d", 4])).value, "b");
});

e2eTest("expireIn: value is gone right after its expiry (never returned expired)", async (ctx) => {
  const kv = await ctx.open(await ctx.target());
  await kv.set(["exp", "keep"], "stays");
  await kv.set(["exp", "long"], "stays too", { expireIn: 3_600_000 });
  // Long enough to read both back before they expire, even on a loaded machine.
  const EXPIRE_IN = 4000;
  const r = await kv.set(["exp", "short"], "goes", { expireIn: EXPIRE_IN });
  const setDone = Date.now();
  await kv.set(["exp", "u64"], new Deno.KvU64(7n), { expireIn: EXPIRE_IN });
  // before expiry: visible everywhere
  const early = await kv.get(["exp", "short"]);
  const listedEarly = await listAll(kv, { prefix: ["exp"] });
  assert.deepStrictEqual(early, { key: ["exp", "short"], value: "goes", versionstamp: r.versionstamp });
  assert.equal(listedEarly.length, 4);

  // wait until just past the expiry computed by the client (expireAt = now + EXPIRE_IN at set time)
  await sleep(Math.max(0, setDone + EXPIRE_IN + 150 - Date.now()));
  if (IS_SERVER) {
    // the server must hide expired rows immediately (SPEC §10 D4), not after a sweep
    assert.equal((await kv.get(["exp", "short"])).value, null, "expired key returned by get");
    assert.equal((await kv.get(["exp", "short"])).versionstamp, null);
    const many = await kv.getMany([["exp", "short"], ["exp", "keep"], ["exp", "u64"]]);
    assert.deepStrictEqual(many.map((e) => e.value), [null, "stays", null]);
    const listed = await listAll(kv, { prefix: ["exp"] });
    assert.deepStrictEqual(listed.map((e) => e.key[1]), ["keep", "long"], "expired key returned by list");
    const listedRev = await listAll(kv, { prefix: ["exp"] }, { reverse: true, limit: 1 });
    assert.deepStrictEqual(listedRev.map((e) => e.key[1]), ["long"]);
    // an expired key counts as absent for checks
    const c = await kv.atomic().check({ key: ["exp", "short"], versionstamp: null })
      .set(["exp", "after"], 1).commit();
    assert.equal(c.ok, true, "check 'absent' on an expired key must pass");
    // ... and for sum: an expired U64 counts as absent, so the sum starts from 0
    await kv.atomic().sum(["exp", "u64"], 5n).commit();
    assert.equal((await kv.get<Deno.KvU64>(["exp", "u64"])).value?.value, 5n);
  } else {
    // Deno's local KV only deletes expired rows in a background sweep: poll.
    const deadline = Date.now() + 5000;
    while ((await kv.get(["exp", "short"])).value !== null && Date.now() < deadline) await sleep(200);
  }
  assert.equal((await kv.get(["exp", "keep"])).value, "stays");
  assert.equal((await kv.get(["exp", "long"])).value, "stays too");
  // setting again without expireIn clears the expiry
  await kv.set(["exp", "re"], 1, { expireIn: 800 });
  await kv.set(["exp", "re"], 2);
  await sleep(1000);
  assert.equal((await kv.get(["exp", "re"])).value, 2);
});

e2eTest("versionstamps: 20 hex chars, strictly increasing across commits, per-key", async (ctx) => {
  const kv = await ctx.open(await ctx.target());
  let prev = "";
  const stamps: string[] = [];
  for (let i = 0; i < 30; i++) {
    const r = i % 3 === 0
      ? await kv.set(["vs", i], i)
      : await kv.atomic().set(["vs", i], i).set(["vs2", i], i).commit();
    assert.ok(r.ok);
    assertVersionstamp(r.versionstamp);
    assert.ok(r.versionstamp > prev, `${r.versionstamp} > ${prev}`);
    prev = r.versionstamp;
    stamps.push(r.versionstamp);
  }
  // reads return each key's own versionstamp, not the current one
  const entries = await listAll(kv, { prefix: ["vs"] });
  assert.deepStrictEqual(entries.map((e) => e.versionstamp), stamps);
  const e2 = await listAll(kv, { prefix: ["vs2"] });
  for (const e of e2) assert.equal(e.versionstamp, stamps[e.key[1] as number]);
  // an empty atomic still commits and advances the versionstamp
  const empty = await kv.atomic().commit();
  assert.ok(empty.ok);
  assertVersionstamp(empty.versionstamp);
  assert.ok(empty.versionstamp > prev);
  // deletes advance it too
  const del = await kv.atomic().delete(["vs", 0]).commit();
  assert.ok(del.ok && del.versionstamp > empty.versionstamp);
  // concurrent commits (possibly group-committed together) all get distinct stamps
  const results = await Promise.all(
    Array.from({ length: 40 }, (_, i) => kv.set(["conc", i], i)),
  );
  const set = new Set(results.map((r) => r.versionstamp));
  assert.equal(set.size, 40, "concurrent commits must not share a versionstamp");
});
