// kv.watch across two clients, and queues (enqueue) through the Deno client.

import {
  assert,
  assertRejects,
  e2eTest,
  fmt,
  IS_SERVER,
  nextFrame,
  sleep,
  waitForFrame,
} from "./server.ts";

type Frame = Deno.KvEntryMaybe<unknown>[];

e2eTest("watch: changes by a second client arrive; deletion shows as null", async (ctx) => {
  const target = await ctx.target();
  const watcher = await ctx.open(target);
  const writer = await ctx.open(target);
  const pre = await writer.set(["w", "a"], "initial");

  const reader = watcher.watch([["w", "a"], ["w", "b"]]).getReader();
  ctx.defer(() => reader.cancel().catch(() => {}));

  // first frame: the current state of every key
  const first = await nextFrame(reader, 10_000, "first watch frame");
  assert.equal(first.length, 2);
  assert.deepStrictEqual(first[0], { key: ["w", "a"], value: "initial", versionstamp: pre.versionstamp });
  assert.deepStrictEqual(first[1], { key: ["w", "b"], value: null, versionstamp: null });

  // a write by the other client
  const w1 = await writer.set(["w", "b"], { n: 1 });
  const f1 = await waitForFrame(reader, (f: Frame) => f[1].versionstamp === w1.versionstamp, 10_000, "frame with b={n:1}");
  assert.deepStrictEqual(f1[1].value, { n: 1 });
  assert.deepStrictEqual(f1[0], { key: ["w", "a"], value: "initial", versionstamp: pre.versionstamp });

  // an atomic touching both keys arrives as one consistent frame
  const w2 = await writer.atomic().set(["w", "a"], "second").sum(["w", "c"], 1n).set(["w", "b"], { n: 2 }).commit();
  assert.ok(w2.ok);
  const f2 = await waitForFrame(
    reader,
    (f: Frame) => f[0].versionstamp === (w2 as Deno.KvCommitResult).versionstamp,
    10_000,
    "frame with a=second",
  );
  assert.equal(f2[0].value, "second");
  assert.deepStrictEqual(f2[1].value, { n: 2 }, "both keys of one atomic are in the same frame");

  // deletion
  await writer.delete(["w", "a"]);
  const f3 = await waitForFrame(reader, (f: Frame) => f[0].versionstamp === null, 10_000, "frame with a deleted");
  assert.deepStrictEqual(f3[0], { key: ["w", "a"], value: null, versionstamp: null });
  assert.deepStrictEqual(f3[1].value, { n: 2 });

  // writes to unrelated keys do not produce frames with changed data: after a pause long
  // enough for such a frame to arrive, the very next frame is the one for b=last
  await writer.set(["w", "unrelated"], 1);
  await sleep(500);
  const w4 = await writer.set(["w", "b"], "last");
  const f4 = await nextFrame(reader, 10_000, "frame with b=last");
  assert.equal(f4[1].versionstamp, w4.versionstamp, `a frame came before b=last's: ${fmt(f4)}`);
  assert.equal(f4[1].value, "last");
});

e2eTest("watch: two watchers on different clients, U64 sums, rapid updates converge", async (ctx) => {
  const target = await ctx.target();
  const a = await ctx.open(target);
  const b = await ctx.open(target);
  const writer = await ctx.open(target);
  const ra = a.watch([["cnt"]]).getReader();
  const rb = b.watch([["cnt"], ["other"]]).getReader();
  ctx.defer(() => ra.cancel().catch(() => {}));
  ctx.defer(() => rb.cancel().catch(() => {}));
  assert.equal((await nextFrame(ra, 10_000, "first frame a"))[0].value, null);
  assert.equal((await nextFrame(rb, 10_000, "first frame b"))[0].value, null);
  let last = "";
  for (let i = 0; i < 20; i++) {
    last = ((await writer.atomic().sum(["cnt"], 1n).commit()) as Deno.KvCommitResult).versionstamp;
  }
  for (const [name, r] of [["a", ra], ["b", rb]] as const) {
    const f = await waitForFrame(r, (f: Frame) => f[0].versionstamp === last, 10_000, `watcher ${name} sees the 20th sum`);
    assert.equal((f[0].value as Deno.KvU64).value, 20n);
  }
});

e2eTest("watch: a key that expires is reported as deleted", async (ctx) => {
  const target = await ctx.target();
  const watcher = await ctx.open(target);
  const writer = await ctx.open(target);
  await writer.set(["wexp"], "soon gone", { expireIn: 2000 });
  const reader = watcher.watch([["wexp"]]).getReader();
  ctx.defer(() => reader.cancel().catch(() => {}));
  const first = await nextFrame(reader, 10_000, "first frame");
  assert.equal(first[0].value, "soon gone");
  // Upstream only notices in its sweep (≤ 61 s late). We allow 15 s.
  await waitForFrame(reader, (f: Frame) => f[0].value === null, 15_000, "expired key reported as null");
}, { timeoutMs: 30_000, ignore: !IS_SERVER });

e2eTest("enqueue: Deno refuses enqueue over KV Connect", async (ctx) => {
  const kv = await ctx.open(await ctx.target({}));
  if (IS_SERVER) {
    await assertRejects(
      () => kv.enqueue({ hello: "world" }),
      "Enqueue operations are not supported in KV Connect",
    );
    await assertRejects(
      () => kv.atomic().set(["q"], 1).enqueue("msg", { delay: 10 }).commit(),
      "Enqueue operations are not supported in KV Connect",
    );
    // the set in the refused atomic was not sent
    assert.equal((await kv.get(["q"])).value, null);
  } else {
    const r = await kv.enqueue({ hello: "world" });
    assert.ok(r.ok);
  }
  // the client validates enqueue options before anything else
  await assertRejects(
    () => kv.enqueue("x", { delay: 31 * 24 * 3600 * 1000 }),
    "Delay cannot be greater than 30 days",
  );
  // the connection is still usable
  assert.ok((await kv.set(["after"], 1)).ok);
  // listenQueue over KV Connect never delivers; just make sure it does not crash the client
  if (IS_SERVER) {
    const p = kv.listenQueue(() => {});
    p.catch(() => {});
    await sleep(100);
    assert.ok((await kv.set(["after2"], 1)).ok);
  }
});
