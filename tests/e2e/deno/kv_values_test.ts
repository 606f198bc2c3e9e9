// Every value type the Deno client can store, and every key part type with
// its ordering, round-tripped through the server.

import { assert, assertRejects, e2eTest, fmt, listAll } from "./server.ts";

class Point {
  constructor(public x: number, public y: number) {}
}

function valueCases(): [string, unknown][] {
  const shared = { shared: true };
  // deno-lint-ignore no-explicit-any
  const cyclic: any = { name: "cyclic" };
  cyclic.self = cyclic;
  // deno-lint-ignore no-sparse-arrays
  const sparse = [1, , 3];
  const view = new Uint8Array([9, 8, 7, 6, 5]).subarray(1, 4);
  const random = crypto.getRandomValues(new Uint8Array(65536));
  return [
    ["string-empty", ""],
    ["string", "hello"],
    ["string-unicode", "héllo wörld 🦕 \u{10FFFF}"],
    ["string-nul", "a\u0000b\u0000"],
    ["string-long-twobyte", "🦕".repeat(7000)],
    ["string-long-onebyte", "x".repeat(60000)],
    ["num-zero", 0],
    ["num-negzero", -0],
    ["num-int", 42],
    ["num-neg", -1],
    ["num-frac", 1.5],
    ["num-nan", NaN],
    ["num-inf", Infinity],
    ["num-neginf", -Infinity],
    ["num-maxsafe", Number.MAX_SAFE_INTEGER],
    ["num-minvalue", Number.MIN_VALUE],
    ["num-2^31", 2 ** 31],
    ["num--2^31-1", -(2 ** 31) - 1],
    ["bigint-zero", 0n],
    ["bigint-neg", -1n],
    ["bigint-2^64", 2n ** 64n],
    ["bigint-huge-neg", -(2n ** 200n) + 7n],
    ["bool-true", true],
    ["bool-false", false],
    ["null", null],
    ["undefined", undefined],
    ["date-epoch", new Date(0)],
    ["date", new Date("2024-02-29T12:34:56.789Z")],
    ["date-invalid", new Date(NaN)],
    ["regexp", /a+b[\d]*$/gimsu],
    ["map", new Map<unknown, unknown>([["a", 1], [2, { x: [1, 2] }], [3n, new Set([1])]])],
    ["set", new Set<unknown>([1, "a", 2n, null])],
    ["array-empty", []],
    ["array-nested", [1, "a", null, [2, [3, [undefined]]], { o: true }]],
    ["array-sparse", sparse],
    ["object-nested", { a: { b: { c: [1, { d: new Map([["k", new Date(5)]]) }] } }, "": 0, "1": "one" }],
    ["object-empty", {}],
    ["object-shared-refs", { a: shared, b: shared }],
    ["object-cyclic", cyclic],
    ["boxed", [new String("s"), new Number(3), new Boolean(false)]],
    ["u8-empty", new Uint8Array(0)],
    ["u8", new Uint8Array([0, 1, 2, 254, 255])],
    ["u8-subarray", view],
    ["u8-64KiB-random", random],
    ["i8", new Int8Array([-128, 0, 127])],
    ["u8clamped", new Uint8ClampedArray([0, 128, 255])],
    ["i16", new Int16Array([-32768, 1, 32767])],
    ["u16", new Uint16Array([0, 65535])],
    ["i32", new Int32Array([-(2 ** 31), 2 ** 31 - 1])],
    ["u32", new Uint32Array([0, 2 ** 32 - 1])],
    ["f32", new Float32Array([1.5, -0, NaN, Infinity])],
    ["f64", new Float64Array([Math.PI, -0, NaN, -Infinity])],
    ["bi64", new BigInt64Array([-(2n ** 63n), 2n ** 63n - 1n])],
    ["bu64", new BigUint64Array([0n, 2n ** 64n - 1n])],
    ["dataview", new DataView(new Uint8Array([1, 2, 3, 4]).buffer, 1, 2)],
    ["arraybuffer", new Uint8Array([1, 2, 3, 0, 255]).buffer],
    ["arraybuffer-empty", new ArrayBuffer(0)],
    ["kvu64-zero", new Deno.KvU64(0n)],
    ["kvu64", new Deno.KvU64(12345678901234567890n)],
    ["kvu64-max", new Deno.KvU64(2n ** 64n - 1n)],
    ["error", new Error("boom")],
    ["typeerror", new TypeError("bad type")],
    ["rangeerror", new RangeError("out of range")],
    ["class-instance", new Point(1, 2)],
  ];
}

function assertSameValue(name: string, got: unknown, want: unknown) {
  const msg = `value "${name}": got ${fmt(got)}, want ${fmt(want)}`;
  if (want instanceof Deno.KvU64) {
    assert.ok(got instanceof Deno.KvU64, msg);
    assert.equal((got as Deno.KvU64).value, want.value, msg);
    return;
  }
  if (want instanceof Error) {
    assert.ok(got instanceof Error, msg);
    assert.equal(Object.getPrototypeOf(got), Object.getPrototypeOf(want), msg);
    assert.equal((got as Error).message, want.message, msg);
    return;
  }
  if (want instanceof Point) {
    // V8 serialization keeps own properties, not the class
    assert.deepStrictEqual({ ...(got as object) }, { x: 1, y: 2 }, msg);
    assert.ok(!(got instanceof Point), msg);
    return;
  }
  if (want instanceof DataView) {
    assert.ok(got instanceof DataView, msg);
    assert.deepStrictEqual(
      new Uint8Array(got.buffer, got.byteOffset, got.byteLength),
      new Uint8Array(want.buffer, want.byteOffset, want.byteLength),
      msg,
    );
    return;
  }
  if (name === "object-shared-refs") {
    // deno-lint-ignore no-explicit-any
    const g = got as any;
    assert.ok(g.a === g.b, "shared references stay shared");
  }
  if (name === "object-cyclic") {
    // deno-lint-ignore no-explicit-any
    const g = got as any;
    assert.ok(g.self === g, "cycle preserved");
    assert.equal(g.name, "cyclic");
    return;
  }
  if (name === "array-sparse") {
    assert.ok(!(1 in (got as unknown[])), "hole preserved");
  }
  assert.deepStrictEqual(got, want, msg);
}

e2eTest("values: every type round-trips through set/get/getMany/list", async (ctx) => {
  const kv = await ctx.open(await ctx.target());
  const cases = valueCases();
  const stamps = new Map<string, string>();
  for (const [name, value] of cases) {
    const r = await kv.set(["val", name], value);
    assert.ok(r.ok, name);
    stamps.set(name, r.versionstamp);
  }
  for (const [name, want] of cases) {
    const e = await kv.get(["val", name]);
    assert.equal(e.versionstamp, stamps.get(name), `versionstamp of ${name}`);
    if (name === "undefined") {
      // undefined is a stored value (versionstamp present), not a missing key
      assert.equal(e.value, undefined);
      continue;
    }
    assertSameValue(name, e.value, want);
  }
  const byName = new Map(cases);
  const listed = await listAll(kv, { prefix: ["val"] });
  assert.equal(listed.length, cases.length);
  for (const e of listed) assertSameValue(e.key[1] as string, e.value, byName.get(e.key[1] as string));
  for (let i = 0; i < cases.length; i += 10) {
    const chunk = cases.slice(i, i + 10);
    const many = await kv.getMany(chunk.map(([n]) => ["val", n]));
    many.forEach((e, j) => assertSameValue(chunk[j][0], e.value, chunk[j][1]));
  }
  // all values written in one atomic come back the same
  const op = kv.atomic();
  for (const [name, value] of cases.filter(([n]) => !n.includes("64KiB") && !n.includes("long"))) {
    op.set(["val2", name], value);
  }
  assert.ok((await op.commit()).ok);
  for (const e of await listAll(kv, { prefix: ["val2"] })) {
    assertSameValue(e.key[1] as string, e.value, byName.get(e.key[1] as string));
  }
});

e2eTest("values: uncloneable values are refused by the client", async (ctx) => {
  const kv = await ctx.open(await ctx.target());
  await assertRejects(() => kv.set(["bad"], Symbol("s")), /could not be cloned|DataCloneError/);
  await assertRejects(() => kv.set(["bad"], () => 1), /could not be cloned|DataCloneError/);
  await assertRejects(() => kv.set(["bad"], new WeakMap()), /could not be cloned|DataCloneError/);
  assert.equal((await kv.get(["bad"])).versionstamp, null);
});

/** Key parts in the order the tuple encoding sorts them (SPEC §4). */
function orderedParts(): Deno.KvKeyPart[] {
  return [
    // bytes (tag 01)
    new Uint8Array([]),
    new Uint8Array([0]),
    new Uint8Array([0, 0]),
    new Uint8Array([0, 1]),
    new Uint8Array([1]),
    new Uint8Array([1, 0]),
    new Uint8Array([255]),
    new Uint8Array([255, 255]),
    // strings (tag 02), UTF-8 bytewise
    "",
    "\u0000",
    "\u0000\u0000",
    "\u0000a",
    "A",
    "a",
    "a\u0000",
    "aa",
    "b",
    "é",
    "\uffff",
    "🦕", // f0 9f a6 95 > ef bf bf ("\uffff") in UTF-8, though < in UTF-16
    // integers (tags 0b..1d), numerically
    -(2n ** 200n),
    -(2n ** 64n),
    -(2n ** 64n) + 1n,
    -256n,
    -255n,
    -1n,
    0n,
    1n,
    255n,
    256n,
    2n ** 63n,
    2n ** 64n,
    2n ** 200n,
    // doubles (tag 21)
    -Infinity,
    -1e300,
    -1,
    -Number.MIN_VALUE,
    -0,
    0,
    Number.MIN_VALUE,
    1,
    1.5,
    2 ** 53,
    1e300,
    Infinity,
    NaN,
    // booleans
    false,
    true,
  ];
}

function shuffled<T>(xs: T[], seed = 12345): T[] {
  const out = [...xs];
  let s = seed;
  for (let i = out.length - 1; i > 0; i--) {
    s = (s * 1103515245 + 12345) & 0x7fffffff;
    const j = s % (i + 1);
    [out[i], out[j]] = [out[j], out[i]];
  }
  return out;
}

e2eTest("keys: every part type, exact get and tuple ordering", async (ctx) => {
  const kv = await ctx.open(await ctx.target());
  const parts = orderedParts();
  const idx = (p: Deno.KvKeyPart) => parts.findIndex((q) => Object.is(q, p) || (q instanceof Uint8Array && p instanceof Uint8Array && q.length === p.length && q.every((b, i) => b === p[i])));
  for (let i = 0; i < parts.length; i += 20) {
    const op = kv.atomic();
    for (const p of shuffled(parts).slice(i, i + 20)) op.set(["ord", p], idx(p));
    assert.ok((await op.commit()).ok);
  }
  const listed = await listAll<number>(kv, { prefix: ["ord"] });
  assert.deepStrictEqual(listed.map((e) => e.key), parts.map((p) => ["ord", p]), "ascending order");
  assert.deepStrictEqual(listed.map((e) => e.value), parts.map((_, i) => i));
  const rev = await listAll<number>(kv, { prefix: ["ord"] }, { reverse: true });
  assert.deepStrictEqual(rev.map((e) => e.value), parts.map((_, i) => parts.length - 1 - i), "descending order");
  // exact gets, including -0 vs 0 and 1n vs 1 being distinct keys
  for (let i = 0; i < parts.length; i++) {
    const e = await kv.get<number>(["ord", parts[i]]);
    assert.equal(e.value, i, `get ${fmt(parts[i])}`);
    assert.deepStrictEqual(e.key, ["ord", parts[i]]);
  }
  // type boundaries with start/end
  const ints = await listAll(kv, { start: ["ord", -(2n ** 200n)], end: ["ord", -Infinity] });
  assert.equal(ints.length, parts.filter((p) => typeof p === "bigint").length);
  const strings = await listAll(kv, { prefix: ["ord"], end: ["ord", -(2n ** 200n)] }, { reverse: true, limit: 3 });
  assert.deepStrictEqual(strings.map((e) => e.key[1]), ["🦕", "\uffff", "é"]);
});

e2eTest("keys: multi-part keys, prefixes and prefix isolation", async (ctx) => {
  const kv = await ctx.open(await ctx.target());
  const keys: Deno.KvKey[] = [
    ["m", "a"],
    ["m", "a", "b"],
    ["m", "a", "b", "c"],
    ["m", "a", 1n],
    ["m", "a", 1],
    ["m", "a", true],
    ["m", "a\u0000"],
    ["m", "ab"],
    ["m", new Uint8Array([0]), "x"],
    ["m", new Uint8Array([0, 0]), "x"],
  ];
  for (const [i, k] of keys.entries()) await kv.set(k, i);
  const all = await listAll<number>(kv, { prefix: ["m"] });
  assert.deepStrictEqual(all.map((e) => e.key), [
    ["m", new Uint8Array([0]), "x"],
    ["m", new Uint8Array([0, 0]), "x"],
    ["m", "a"],
    ["m", "a", "b"],
    ["m", "a", "b", "c"],
    ["m", "a", 1n],
    ["m", "a", 1],
    ["m", "a", true],
    ["m", "a\u0000"],
    ["m", "ab"],
  ]);
  // prefix ["m","a"] holds only proper extensions of ["m","a"]
  const underA = await listAll(kv, { prefix: ["m", "a"] });
  assert.deepStrictEqual(underA.map((e) => e.key.slice(2)), [["b"], ["b", "c"], [1n], [1], [true]]);
  const underBytes = await listAll(kv, { prefix: ["m", new Uint8Array([0])] });
  assert.deepStrictEqual(underBytes.map((e) => e.value), [8]);
  // deep key
  const deep: Deno.KvKey = Array.from({ length: 30 }, (_, i) => (i % 2 ? i : `p${i}`));
  await kv.set(deep, "deep");
  assert.equal((await kv.get(deep)).value, "deep");
  assert.deepStrictEqual((await kv.get(deep)).key, deep);
});
