// Shared by the Node suite and the Deno child it spawns: sample values and a
// canonical JSON form to compare values across the two clients.

export function sampleValues() {
  return [
    ["str", "héllo 🦕"],
    ["empty", ""],
    ["int", 42],
    ["float", -1.25],
    ["negzero", -0],
    ["nan", NaN],
    ["inf", Infinity],
    ["big", 2n ** 70n],
    ["negbig", -5n],
    ["true", true],
    ["null", null],
    ["date", new Date(1700000000123)],
    ["re", /ab+c/gi],
    ["map", new Map([["a", 1], ["b", [2, 3]]])],
    ["set", new Set(["x", 1])],
    ["arr", [1, "two", [3, { four: 4 }]]],
    ["obj", { nested: { list: [null, false], s: "x" } }],
    ["bytes", new Uint8Array([0, 1, 2, 253, 254, 255])],
  ];
}

export function canon(v) {
  if (v === null) return null;
  if (v === undefined) return { undefined: true };
  if (typeof v === "number") {
    if (Number.isNaN(v)) return { num: "NaN" };
    if (Object.is(v, -0)) return { num: "-0" };
    if (!Number.isFinite(v)) return { num: String(v) };
    return { num: v };
  }
  if (typeof v === "bigint") return { bigint: v.toString() };
  if (typeof v === "string" || typeof v === "boolean") return v;
  if (v instanceof Date) return { date: v.getTime() };
  if (v instanceof RegExp) return { re: [v.source, v.flags] };
  if (v instanceof Map) return { map: [...v].map(([k, x]) => [canon(k), canon(x)]) };
  if (v instanceof Set) return { set: [...v].map(canon) };
  if (v instanceof Uint8Array) return { bytes: [...v] };
  if (Array.isArray(v)) return { arr: v.map(canon) };
  if (typeof v === "object" && typeof v.value === "bigint" && /KvU64/.test(v.constructor?.name ?? "")) {
    return { u64: v.value.toString() };
  }
  if (typeof v === "object") return { obj: Object.entries(v).map(([k, x]) => [k, canon(x)]) };
  return { unknown: String(v) };
}
