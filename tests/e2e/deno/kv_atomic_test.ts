// Atomic operations: checks, sum/min/max, V8 sums, versionstamped keys,
// all-or-nothing failures.

import {
  assert,
  assertRejects,
  assertVersionstamp,
  e2eTest,
  IS_SERVER,
  listAll,
} from "./server.ts";

const U64 = (n: bigint) => new Deno.KvU64(n);
const MAX_U64 = 2n ** 64n - 1n;

async function u64(kv: Deno.Kv, key: Deno.KvKey): Promise<bigint | null> {
  const e = await kv.get(key);
  if (e.value === null) return null;
  assert.ok(e.value instanceof Deno.KvU64, `value at ${String(key)} is not a KvU64: ${e.value}`);
  return (e.value as Deno.KvU64).value;
}

e2eTest("atomic checks: success and conflict", async (ctx) => {
  const kv = await ctx.open(await ctx.target());
  const r0 = await kv.set(["acct", "a"], 100);
  // check with the current versionstamp passes
  const ok = await kv.atomic()
    .check({ key: ["acct", "a"], versionstamp: r0.versionstamp })
    .check({ key: ["acct", "b"], versionstamp: null })
    .set(["acct", "a"], 90)
    .set(["acct", "b"], 10)
    .commit();
  assert.equal(ok.ok, true);
  assertVersionstamp((ok as Deno.KvCommitResult).versionstamp);
  assert.equal((await kv.get(["acct", "a"])).value, 90);
  assert.equal((await kv.get(["acct", "b"])).versionstamp, (ok as Deno.KvCommitResult).versionstamp);

  // stale versionstamp: conflict, nothing written
  const stale = await kv.atomic()
    .check({ key: ["acct", "a"], versionstamp: r0.versionstamp })
    .set(["acct", "a"], 0)
    .set(["acct", "c"], "should not exist")
    .commit();
  assert.deepStrictEqual(stale, { ok: false });
  assert.equal((await kv.get(["acct", "a"])).value, 90);
  assert.equal((await kv.get(["acct", "c"])).value, null);

  // "must be absent" on an existing key fails
  const exists = await kv.atomic().check({ key: ["acct", "b"], versionstamp: null }).set(["x"], 1).commit();
  assert.equal(exists.ok, false);
  assert.equal((await kv.get(["x"])).value, null);

  // a versionstamp check on a missing key fails
  const gone = await kv.atomic()
    .check({ key: ["acct", "zzz"], versionstamp: (ok as Deno.KvCommitResult).versionstamp })
    .set(["x"], 1).commit();
  assert.equal(gone.ok, false);

  // checks only (no mutations) succeed and return a versionstamp
  const only = await kv.atomic().check({ key: ["acct", "nobody"], versionstamp: null }).commit();
  assert.equal(only.ok, true);

  // compare-and-swap race: of N concurrent CAS on the same versionstamp exactly one wins
  const cur = await kv.get<number>(["acct", "a"]);
  const results = await Promise.all(Array.from({ length: 10 }, (_, i) =>
    kv.atomic().check(cur).set(["acct", "a"], 1000 + i).commit()
  ));
  assert.equal(results.filter((r) => r.ok).length, 1, "exactly one CAS wins");
  const winner = results.findIndex((r) => r.ok);
  assert.equal((await kv.get(["acct", "a"])).value, 1000 + winner);
});

e2eTest("atomic checks: 11..100 checks are accepted (server allows Deno's 100)", async (ctx) => {
  const kv = await ctx.open(await ctx.target());
  const existing = await kv.set(["chk", "existing"], 1);
  for (const n of [10, 11, 50, 99, 100]) {
    const op = kv.atomic();
    for (let i = 0; i < n - 1; i++) op.check({ key: ["chk", "absent", n, i], versionstamp: null });
    op.check({ key: ["chk", "existing"], versionstamp: existing.versionstamp });
    op.set(["chk", "done", n], n);
    const r = await op.commit();
    assert.equal(r.ok, true, `${n} passing checks must commit`);
    assert.equal((await kv.get(["chk", "done", n])).value, n);
  }
  // 100 checks where only the last one fails
  const op = kv.atomic();
  for (let i = 0; i < 99; i++) op.check({ key: ["chk", "absent", "x", i], versionstamp: null });
  op.check({ key: ["chk", "existing"], versionstamp: null });
  op.set(["chk", "fail100"], 1);
  assert.deepStrictEqual(await op.commit(), { ok: false });
  assert.equal((await kv.get(["chk", "fail100"])).value, null);
  // 101: the Deno client refuses before sending
  const op101 = kv.atomic();
  for (let i = 0; i < 101; i++) op101.check({ key: ["chk", i], versionstamp: null });
  await assertRejects(() => op101.commit(), "Too many checks (max 100)");
});

e2eTest("sum/min/max on Deno.KvU64", async (ctx) => {
  const kv = await ctx.open(await ctx.target());
  // sum on a missing key stores the operand
  await kv.atomic().sum(["c", "s"], 5n).commit();
  assert.equal(await u64(kv, ["c", "s"]), 5n);
  await kv.atomic().sum(["c", "s"], 10n).sum(["c", "s"], 1n).commit();
  assert.equal(await u64(kv, ["c", "s"]), 16n);
  // wrapping arithmetic modulo 2^64
  await kv.set(["c", "w"], U64(MAX_U64));
  await kv.atomic().sum(["c", "w"], 2n).commit();
  assert.equal(await u64(kv, ["c", "w"]), 1n);
  // min / max: unsigned comparison, missing key stores the operand
  await kv.atomic().min(["c", "min"], 7n).commit();
  assert.equal(await u64(kv, ["c", "min"]), 7n);
  await kv.atomic().min(["c", "min"], 9n).commit();
  assert.equal(await u64(kv, ["c", "min"]), 7n);
  await kv.atomic().min(["c", "min"], 3n).commit();
  assert.equal(await u64(kv, ["c", "min"]), 3n);
  await kv.atomic().max(["c", "max"], 7n).commit();
  await kv.atomic().max(["c", "max"], 3n).commit();
  assert.equal(await u64(kv, ["c", "max"]), 7n);
  await kv.atomic().max(["c", "max"], MAX_U64).commit();
  assert.equal(await u64(kv, ["c", "max"]), MAX_U64);
  // mutations in one atomic see each other, in order
  const r = await kv.atomic()
    .set(["c", "seq"], U64(1n))
    .sum(["c", "seq"], 2n)
    .max(["c", "seq"], 10n)
    .min(["c", "seq"], 8n)
    .sum(["c", "seq"], 1n)
    .commit();
  assert.ok(r.ok);
  const e = await kv.get(["c", "seq"]);
  assert.equal((e.value as Deno.KvU64).value, 9n);
  assert.equal(e.versionstamp, (r as Deno.KvCommitResult).versionstamp);
  // KvU64 set/get round trip keeps the type
  await kv.set(["c", "zero"], U64(0n));
  assert.equal(await u64(kv, ["c", "zero"]), 0n);
  // sum keeps counting under concurrency (no lost updates)
  await Promise.all(Array.from({ length: 50 }, () => kv.atomic().sum(["c", "conc"], 1n).commit()));
  assert.equal(await u64(kv, ["c", "conc"]), 50n);
});

e2eTest("sum/min/max errors on non-U64 values; failed commit writes nothing", async (ctx) => {
  const kv = await ctx.open(await ctx.target());
  await kv.set(["e", "str"], "not a number");
  const before = await kv.get(["e", "str"]);
  for (const op of ["sum", "min", "max"] as const) {
    await assertRejects(
      () => kv.atomic()[op](["e", "str"], 1n).commit(),
      `Failed to perform '${op}' mutation on a non-U64 value in the database`,
      `${op} on a string`,
    );
  }
  // the stored value is untouched
  assert.deepStrictEqual(await kv.get(["e", "str"]), before);
  // a number stored with V8 is not a U64 either
  await kv.set(["e", "num"], 5);
  await assertRejects(
    () => kv.atomic().sum(["e", "num"], 1n).commit(),
    "Failed to perform 'sum' mutation on a non-U64 value in the database",
  );
  assert.equal((await kv.get(["e", "num"])).value, 5);

  // failed atomic: earlier mutations of the same write leave no trace
  await kv.set(["e", "k3"], "old");
  const k3 = await kv.get(["e", "k3"]);
  await assertRejects(
    () =>
      kv.atomic()
        .set(["e", "k1"], "written first")
        .set(["e", "k3"], "overwritten first")
        .delete(["e", "num"])
        .sum(["e", "str"], 1n)
        .commit(),
    "Failed to perform 'sum' mutation on a non-U64 value in the database",
  );
  if (IS_SERVER) {
    assert.equal((await kv.get(["e", "k1"])).value, null, "k1 must not be written by a failed atomic");
    assert.deepStrictEqual(await kv.get(["e", "k3"]), k3, "k3 must be unchanged");
    assert.equal((await kv.get(["e", "num"])).value, 5, "delete in a failed atomic must not apply");
  }

  // failing and succeeding writes racing (group commit): each is all-or-nothing
  const results = await Promise.allSettled(Array.from({ length: 20 }, (_, i) =>
    i % 2 === 0
      ? kv.atomic().set(["race", i], i).commit()
      : kv.atomic().set(["race", i], i).sum(["e", "str"], 1n).commit()
  ));
  results.forEach((r, i) => assert.equal(r.status, i % 2 === 0 ? "fulfilled" : "rejected", `write ${i}`));
  if (IS_SERVER) {
    const got = (await listAll(kv, { prefix: ["race"] })).map((e) => e.key[1]);
    assert.deepStrictEqual(got, [0, 2, 4, 6, 8, 10, 12, 14, 16, 18]);
  }
});

e2eTest("V8 sums via mutate({type:'sum'}) with bigint and number operands", async (ctx) => {
  const kv = await ctx.open(await ctx.target());
  // deno-lint-ignore no-explicit-any
  const sum = (key: Deno.KvKey, value: any) =>
    kv.atomic().mutate({ type: "sum", key, value }).commit();
  // bigint
  await sum(["v8", "big"], 5n);
  assert.equal((await kv.get(["v8", "big"])).value, 5n);
  await sum(["v8", "big"], 2n ** 70n);
  assert.equal((await kv.get(["v8", "big"])).value, 2n ** 70n + 5n);
  await sum(["v8", "big"], -(2n ** 71n));
  assert.equal((await kv.get(["v8", "big"])).value, 5n - 2n ** 70n);
  // numbers (f64)
  await sum(["v8", "num"], 5);
  await sum(["v8", "num"], 2.5);
  assert.equal((await kv.get(["v8", "num"])).value, 7.5);
  await sum(["v8", "num"], -10);
  assert.equal((await kv.get(["v8", "num"])).value, -2.5);
  // a number stored with set() can be summed
  await kv.set(["v8", "setnum"], 40);
  await sum(["v8", "setnum"], 2);
  assert.equal((await kv.get(["v8", "setnum"])).value, 42);
  await kv.set(["v8", "setbig"], 40n);
  await sum(["v8", "setbig"], 2n);
  assert.equal((await kv.get(["v8", "setbig"])).value, 42n);
  // mixed kinds are an error
  await assertRejects(() => sum(["v8", "big"], 1), "Cannot sum BigInt with Number");
  await assertRejects(() => sum(["v8", "num"], 1n), "Cannot sum Number with BigInt");
  // a stored KvU64 plus a bigint operand in u64 range behaves as a U64 sum
  await kv.set(["v8", "u"], U64(5n));
  await sum(["v8", "u"], 5n);
  assert.equal(await u64(kv, ["v8", "u"]), 10n);
  await sum(["v8", "u"], MAX_U64);
  assert.equal(await u64(kv, ["v8", "u"]), 9n, "wraps like a U64 sum");
  // KvU64 plus a number operand is an error
  await assertRejects(() => sum(["v8", "u"], 1), "Cannot sum KvU64 with Number");
  // stored string + V8 operand
  await kv.set(["v8", "str"], "s");
  await assertRejects(() => sum(["v8", "str"], 1n), /unsupported value type|Cannot sum/i);
  assert.equal((await kv.get(["v8", "str"])).value, "s");
  // min/max need U64 operands
  await assertRejects(
    // deno-lint-ignore no-explicit-any
    () => kv.atomic().mutate({ type: "min", key: ["v8", "m"], value: 5 as any }).commit(),
    "Failed to perform 'min' mutation on a non-U64 operand",
  );
  await assertRejects(
    // deno-lint-ignore no-explicit-any
    () => kv.atomic().mutate({ type: "max", key: ["v8", "m"], value: 5n as any }).commit(),
    "Failed to perform 'max' mutation on a non-U64 operand",
  );
  assert.equal((await kv.get(["v8", "m"])).value, null);
  // a non-number V8 operand
  await assertRejects(
    // deno-lint-ignore no-explicit-any
    () => sum(["v8", "bad"], "str" as any),
    /Some of the parameters are not valid V8 values|not valid/i,
  );
  assert.equal((await kv.get(["v8", "bad"])).value, null);
  // the Deno JS API refuses non-bigint operands for .sum() itself
  await assertRejects(
    // deno-lint-ignore no-explicit-any
    () => kv.atomic().sum(["v8", "x"], 5 as any).commit(),
    "Value must be a bigint",
    "atomic().sum(number)",
  );
});

e2eTest("versionstamped keys: commitVersionstamp() as last key part", async (ctx) => {
  const kv = await ctx.open(await ctx.target());
  const r = await kv.atomic()
    .set(["log", kv.commitVersionstamp()], "first")
    .set(["other", "x", kv.commitVersionstamp()], { n: 1 })
    .commit();
  assert.ok(r.ok);
  const vs = (r as Deno.KvCommitResult).versionstamp;
  assertVersionstamp(vs);
  const log = await listAll(kv, { prefix: ["log"] });
  assert.equal(log.length, 1);
  assert.deepStrictEqual(log[0].key, ["log", vs]);
  assert.equal(log[0].value, "first");
  assert.equal(log[0].versionstamp, vs);
  const other = await kv.get(["other", "x", vs]);
  assert.deepStrictEqual(other.value, { n: 1 });
  assert.equal(other.versionstamp, vs);

  // kv.set with the symbol works too; keys sort by commit order
  const stamps = [vs];
  for (let i = 0; i < 5; i++) {
    const s = await kv.set(["log", kv.commitVersionstamp()], `n${i}`);
    stamps.push(s.versionstamp);
  }
  const all = await listAll(kv, { prefix: ["log"] });
  assert.deepStrictEqual(all.map((e) => e.key[1]), stamps);
  assert.deepStrictEqual(all.map((e) => e.versionstamp), stamps);
  assert.deepStrictEqual(all.map((e) => e.value), ["first", "n0", "n1", "n2", "n3", "n4"]);

  // with expireIn
  const ex = await kv.set(["vexp", kv.commitVersionstamp()], "e", { expireIn: 3_600_000 });
  assert.equal((await kv.get(["vexp", ex.versionstamp])).value, "e");

  // mixed with a check that fails: nothing written
  const failed = await kv.atomic()
    .check({ key: ["log", vs], versionstamp: null })
    .set(["log", kv.commitVersionstamp()], "nope")
    .commit();
  assert.equal(failed.ok, false);
  assert.equal((await listAll(kv, { prefix: ["log"] })).length, 6);
});
