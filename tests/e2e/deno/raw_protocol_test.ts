// Hand-made KV Connect requests for what real clients never send (or never
// let us observe): SPEC §10 fixes, server-side limits, error statuses/texts,
// failed_checks, raw watch frames, and both HTTP/1.1 and h2c transports.
// Server only.

import { DatabaseSync } from "node:sqlite";
import { assert, e2eTest, fmt, sleep, type TestCtx, withTimeout } from "./server.ts";
import {
  AW_CHECK_FAILURE,
  AW_SUCCESS,
  bytesValue,
  concat,
  encodeAtomicWrite,
  encodeKey,
  encodeSnapshotRead,
  encodeWatch,
  hex,
  le64,
  M_DELETE,
  M_MAX,
  M_MIN,
  M_SET,
  M_SET_SUFFIX_VS,
  M_SUM,
  NIL_UUID,
  RawClient,
  type RawResponse,
  SR_SUCCESS,
  VE_BYTES,
  VE_LE64,
  VE_V8,
} from "./raw.ts";

const opts = { serverOnly: true };

async function setup(ctx: TestCtx, http2 = false) {
  const s = await ctx.server();
  const c = new RawClient(s.url, s.token, { http2 });
  ctx.defer(() => c.close());
  return { s, c };
}

function expectError(r: RawResponse, status: number, text: string | RegExp, what: string) {
  const ok = typeof text === "string" ? r.text.includes(text) : text.test(r.text);
  assert.ok(
    r.status === status && ok,
    `${what}: expected ${status} with ${JSON.stringify(String(text))}, got ${r.status} ${JSON.stringify(r.text)}`,
  );
}

const K = (...parts: Deno.KvKeyPart[]) => encodeKey(parts);

/** The global version (`data_version`, row 0) in the server's SQLite file. */
function globalVersion(dbPath: string): bigint {
  const db = new DatabaseSync(dbPath, { readOnly: true });
  try {
    const row = db.prepare("SELECT version FROM data_version WHERE k = 0").get() as { version: number | bigint };
    return BigInt(row.version);
  } finally {
    db.close();
  }
}

/** The version in a versionstamp (its first 8 bytes, big-endian). */
function stampVersion(vs: Uint8Array): bigint {
  return new DataView(vs.buffer, vs.byteOffset, 8).getBigUint64(0);
}

/** The client ports of the TCP connections established to the server's `port` (from the
 * server's side, in /proc/net/tcp: both ends are on this machine). */
async function peersOf(port: number): Promise<number[]> {
  const peers: number[] = [];
  for (const line of (await Deno.readTextFile("/proc/net/tcp")).split("\n").slice(1)) {
    const f = line.trim().split(/\s+/);
    if (f.length < 4 || f[3] !== "01") continue; // 01: ESTABLISHED
    if (parseInt(f[1].split(":")[1], 16) === port) peers.push(parseInt(f[2].split(":")[1], 16));
  }
  return peers;
}

e2eTest("raw: metadata exchange (HTTP/1.1 and h2c)", async (ctx) => {
  for (const http2 of [false, true]) {
    const { s, c } = await setup(ctx, http2);
    const r = await c.metadata();
    assert.equal(r.status, 200, `metadata (http2=${http2}): ${r.status} ${r.text}`);
    assert.equal(r.contentType, "application/json", "content-type must be exactly application/json");
    const m = JSON.parse(r.text);
    assert.deepStrictEqual(Object.keys(m).sort(), ["databaseId", "endpoints", "expiresAt", "token", "version"]);
    assert.equal(m.version, 3);
    assert.match(m.databaseId, /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/);
    assert.ok(Array.isArray(m.endpoints) && m.endpoints.length >= 1);
    for (const e of m.endpoints) assert.deepStrictEqual(Object.keys(e).sort(), ["consistency", "url"]);
    assert.ok(m.endpoints.some((e: { consistency: string }) => e.consistency === "strong"));
    assert.ok(!m.endpoints[0].url.endsWith("/"));
    assert.equal(typeof m.token, "string");
    assert.match(m.expiresAt, /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$/);
    assert.ok(Date.parse(m.expiresAt) > Date.now() + 10 * 60 * 1000, "metadata valid ≥ 10 minutes");
    // v2-only client
    const r2 = await c.metadata([2]);
    assert.equal(r2.status, 200);
    assert.equal(JSON.parse(r2.text).version, 2);
    await s.stop();
  }
}, opts);

e2eTest("raw: metadata errors and authentication", async (ctx) => {
  const { c } = await setup(ctx);
  expectError(await c.metadata([1, 2, 3], `Bearer wrong-token-123456`), 401, "Invalid access token.", "wrong token");
  expectError(await c.metadata([1, 2, 3], `Basic ${c.token}`), 401, "Invalid access token.", "wrong scheme");
  expectError(await c.metadata([1, 2, 3], ""), 401, "Malformed authorization header.", "no auth header");
  expectError(
    await c.metadata([1]),
    400,
    "The server could not negotiate a protocol version. The server requires protocol version 2 or 3.",
    "only v1",
  );
  expectError(
    await c.post("/", "not json", { authorization: `Bearer ${c.token}`, "content-type": "application/json" }),
    400,
    "The server requires at least protocol version 2. Use Deno 1.38.0 or newer.",
    "bad json",
  );
  // bearer scheme is case-insensitive
  assert.equal((await c.metadata([1, 2, 3], `bearer ${c.token}`)).status, 200);
  // SPEC §10 D10 (recommended): authenticate before negotiating
  const r = await c.metadata([1], "Bearer wrong-token-123456");
  assert.equal(r.status, 401, `unauthenticated + bad version: expected 401, got ${r.status} ${r.text}`);
  // unknown path
  expectError(await c.post("/nope", "", {}), 404, "Resource not found.", "unknown path");
  expectError(await c.post("/v2/snapshot_read/", "", c.dataHeaders()), 404, "Resource not found.", "trailing slash");
}, opts);

e2eTest("raw: data-path header validation", async (ctx) => {
  const { c } = await setup(ctx);
  const body = encodeSnapshotRead([{ start: K("a"), end: concat(K("a"), [0]), limit: 1 }]);
  const h = c.dataHeaders();
  const without = (name: string) => Object.fromEntries(Object.entries(h).filter(([k]) => k !== name));
  expectError(await c.call("snapshot_read", body, without("x-denokv-version")), 400, "Expected protocol version 2.", "no version");
  expectError(await c.call("snapshot_read", body, { ...h, "x-denokv-version": "4" }), 400, "Expected protocol version 2.", "version 4");
  expectError(await c.call("snapshot_read", body, without("authorization")), 401, "Malformed authorization header.", "no auth");
  expectError(await c.call("snapshot_read", body, { ...h, authorization: "Bearer nope-nope-nope" }), 401, "Invalid access token.", "bad token");
  expectError(
    await c.call("snapshot_read", body, { ...h, "x-denokv-database-id": "11111111-1111-1111-1111-111111111111" }),
    400,
    "Invalid database id.",
    "wrong db id",
  );
  expectError(await c.call("snapshot_read", body, without("x-denokv-database-id")), 400, "Invalid database id.", "no db id");
  // v2 header, simple-form nil uuid
  const ok = await c.call("snapshot_read", body, { ...h, "x-denokv-version": "2", "x-denokv-database-id": NIL_UUID.replaceAll("-", "") });
  assert.equal(ok.status, 200, `${ok.status} ${ok.text}`);
  expectError(await c.call("snapshot_read", new Uint8Array([0xff, 0xff, 0xff])), 400, "Request protobuf is invalid", "garbage body");
}, opts);

e2eTest("raw: request body over 2 MiB gets 413 (h2c), client can go on", async (ctx) => {
  const { s, c } = await setup(ctx, true);
  const first = await c.read([{ start: K("a"), end: concat(K("a"), [0]), limit: 1 }]);
  assert.equal(first.status, SR_SUCCESS);
  const before = await peersOf(s.port);
  assert.equal(before.length, 1, `one HTTP/2 connection to the server: ${before}`);
  let hugeStatus: number | string;
  try {
    const r = await c.call("atomic_write", new Uint8Array(2 * 1024 * 1024 + 10));
    hugeStatus = r.status;
    if (r.status === 413) assert.match(r.text, /^Failed to buffer the request body/);
  } catch (e) {
    hugeStatus = `no response: ${e}${e instanceof Error && e.cause ? ` (${e.cause})` : ""}`;
  }
  assert.equal(hugeStatus, 413, "body over 2 MiB");
  const next = await c.read([{ start: K("a"), end: concat(K("a"), [0]), limit: 1 }]);
  assert.equal(next.status, SR_SUCCESS, "request after the 413");
  assert.deepStrictEqual(await peersOf(s.port), before, "the request after the 413 went on the same HTTP/2 connection");
}, opts);

/** Minimal HTTP/1.1 exchange on one TCP connection (no pooling surprises). */
class H1Conn {
  #conn: Deno.TcpConn;
  #buf: Uint8Array = new Uint8Array(0);
  constructor(conn: Deno.TcpConn) {
    this.#conn = conn;
  }
  static async open(url: string) {
    const u = new URL(url);
    return new H1Conn(await Deno.connect({ hostname: u.hostname, port: Number(u.port) }));
  }
  close() {
    try {
      this.#conn.close();
    } catch { /* closed */ }
  }
  /** Writes as much of the request as the peer accepts; returns an error text if writing failed. */
  async send(path: string, headers: Record<string, string>, body: Uint8Array): Promise<string | null> {
    const head = `POST ${path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: ${body.length}\r\n` +
      Object.entries(headers).map(([k, v]) => `${k}: ${v}\r\n`).join("") + "\r\n";
    const data = concat(new TextEncoder().encode(head), body);
    try {
      let off = 0;
      while (off < data.length) off += await this.#conn.write(data.subarray(off));
      return null;
    } catch (e) {
      return String(e);
    }
  }
  async #fill(): Promise<boolean> {
    const chunk = new Uint8Array(65536);
    const n = await this.#conn.read(chunk);
    if (n === null) return false;
    this.#buf = concat(this.#buf, chunk.subarray(0, n));
    return true;
  }
  /** Reads one response; null if the connection was closed first. */
  async response(): Promise<{ status: number; headers: Map<string, string>; body: string } | null> {
    let end;
    while ((end = findCrlf2(this.#buf)) < 0) if (!(await this.#fill())) return null;
    const head = new TextDecoder().decode(this.#buf.subarray(0, end)).split("\r\n");
    const status = Number(head[0].split(" ")[1]);
    const headers = new Map(head.slice(1).map((l) => {
      const i = l.indexOf(":");
      return [l.slice(0, i).trim().toLowerCase(), l.slice(i + 1).trim()] as [string, string];
    }));
    const len = Number(headers.get("content-length") ?? 0);
    while (this.#buf.length < end + 4 + len) if (!(await this.#fill())) return null;
    const body = new TextDecoder().decode(this.#buf.subarray(end + 4, end + 4 + len));
    this.#buf = this.#buf.slice(end + 4 + len);
    return { status, headers, body };
  }
}

function findCrlf2(b: Uint8Array): number {
  for (let i = 0; i + 3 < b.length; i++) {
    if (b[i] === 13 && b[i + 1] === 10 && b[i + 2] === 13 && b[i + 3] === 10) return i;
  }
  return -1;
}

e2eTest("raw: request body over 2 MiB gets 413 (HTTP/1.1); the connection is closed cleanly or reusable", async (ctx) => {
  const s = await ctx.server();
  const h = { authorization: `Bearer ${s.token}`, "x-denokv-version": "3", "x-denokv-database-id": NIL_UUID };
  const conn = await H1Conn.open(s.url);
  ctx.defer(() => conn.close());
  const writeErr = await conn.send("/v2/atomic_write", h, new Uint8Array(2 * 1024 * 1024 + 10));
  let first;
  try {
    first = await withTimeout(conn.response(), 10_000, "413 response");
  } catch (e) {
    throw new Error(`no 413 response (write: ${writeErr ?? "ok"}): ${e}`);
  }
  assert.ok(first, `connection closed without a response (write: ${writeErr ?? "ok"})`);
  assert.equal(first.status, 413, `status ${first.status} ${first.body}`);
  assert.match(first.body, /^Failed to buffer the request body/);
  if (first.headers.get("connection")?.toLowerCase() === "close") return; // closing is announced: fine
  // not announced: the connection must stay usable for the next request
  const body = encodeSnapshotRead([{ start: K("a"), end: concat(K("a"), [0]), limit: 1 }]);
  const err2 = await conn.send("/v2/snapshot_read", h, body);
  let second = null;
  let readErr = "";
  try {
    second = await withTimeout(conn.response(), 10_000, "second response");
  } catch (e) {
    readErr = String(e);
  }
  assert.ok(
    second?.status === 200,
    `after a 413 without "connection: close" the server ${second ? `answered ${second.status}` : "closed the connection"}` +
      ` (write: ${err2 ?? "ok"}, read: ${readErr || "EOF"}); HTTP/1.1 clients that reuse the connection fail`,
  );
}, opts);

e2eTest("raw: snapshot_read semantics and limits", async (ctx) => {
  const { c } = await setup(ctx);
  const w = await c.write({
    mutations: ["a", "b", "c", "d"].map((x) => ({ key: K("r", x), type: M_SET, value: bytesValue(x) })),
  });
  assert.equal(w.out?.status, AW_SUCCESS, `${w.res.status} ${w.res.text}`);
  const prefix = K("r");
  const out = await c.read([
    { start: concat(prefix, [0]), end: concat(prefix, [0xff]), limit: 10 },
    { start: concat(prefix, [0]), end: concat(prefix, [0xff]), limit: 2, reverse: true },
    { start: K("r", "b"), end: K("r", "b"), limit: 5 }, // start == end: empty
    { start: K("r", "c"), end: K("r", "a"), limit: 5 }, // start > end: empty
  ]);
  assert.equal(out.status, SR_SUCCESS);
  assert.equal(out.stronglyConsistent, true);
  assert.equal(out.readDisabled, false);
  assert.equal(out.ranges.length, 4);
  const dec = (xs: { value: Uint8Array }[]) => xs.map((e) => new TextDecoder().decode(e.value));
  assert.deepStrictEqual(dec(out.ranges[0]), ["a", "b", "c", "d"]);
  assert.deepStrictEqual(dec(out.ranges[1]), ["d", "c"]);
  assert.deepStrictEqual(out.ranges[2], []);
  assert.deepStrictEqual(out.ranges[3], []);
  for (const e of out.ranges[0]) {
    assert.equal(e.encoding, VE_BYTES);
    assert.deepStrictEqual(e.versionstamp, w.out!.versionstamp);
  }
  // zero ranges
  const zero = await c.call("snapshot_read", new Uint8Array());
  assert.equal(zero.status, 200);
  // limits
  const r = { start: K("a"), end: K("b"), limit: 100 };
  expectError(await c.call("snapshot_read", encodeSnapshotRead(Array(11).fill(r))), 400, "Too many read ranges requested in one read request.", "11 ranges");
  assert.equal((await c.call("snapshot_read", encodeSnapshotRead(Array(10).fill(r)))).status, 200, "10 ranges × 100 = 1000 entries");
  expectError(
    await c.call("snapshot_read", encodeSnapshotRead([{ ...r, limit: 1000 }, { ...r, limit: 1 }])),
    400,
    "The total number of entries requested across read ranges in the read request is too large.",
    "1001 entries",
  );
  expectError(await c.call("snapshot_read", encodeSnapshotRead([{ ...r, limit: 0 }])), 400, "The read range limit of the snapshot read request is invalid.", "limit 0");
  expectError(await c.call("snapshot_read", encodeSnapshotRead([{ ...r, limit: -1 }])), 400, "The read range limit of the snapshot read request is invalid.", "limit -1");
  const k2049 = new Uint8Array(2049).fill(0x02);
  assert.equal((await c.call("snapshot_read", encodeSnapshotRead([{ start: k2049, end: k2049, limit: 1 }]))).status, 200, "2049-byte read key");
  const k2050 = new Uint8Array(2050).fill(0x02);
  expectError(await c.call("snapshot_read", encodeSnapshotRead([{ start: K("a"), end: k2050, limit: 1 }])), 400, "A key exceeds the key size limit.", "2050-byte read key");
}, opts);

e2eTest("raw: atomic_write reports ALL failed checks (SPEC §10 D7)", async (ctx) => {
  const { s, c } = await setup(ctx);
  const w = await c.write({ mutations: [{ key: K("x"), type: M_SET, value: bytesValue("1") }] });
  const vs = w.out!.versionstamp;
  assert.equal(globalVersion(s.dbPath), stampVersion(vs), "the global version is the last write's");
  const bogus = new Uint8Array(10).fill(0x7f);
  const r = await c.write({
    checks: [
      { key: K("x") }, // 0: must be absent -> fails
      { key: K("x"), versionstamp: vs }, // 1: passes
      { key: K("y"), versionstamp: bogus }, // 2: missing key with a versionstamp -> fails
      { key: K("y") }, // 3: passes
      { key: K("x"), versionstamp: bogus }, // 4: wrong versionstamp -> fails
    ],
    mutations: [{ key: K("z"), type: M_SET, value: bytesValue("no") }],
  });
  assert.equal(r.res.status, 200, r.res.text);
  assert.equal(r.out!.status, AW_CHECK_FAILURE);
  assert.equal(r.out!.versionstamp.length, 0, "no versionstamp on check failure");
  assert.deepStrictEqual(r.out!.failedChecks, [0, 2, 4]);
  assert.equal(await c.get(K("z")), null);
  // the version did not advance
  assert.equal(globalVersion(s.dbPath), stampVersion(vs), "a write whose checks failed advanced the global version");
  // invalid versionstamp length in a check
  expectError(await c.call("atomic_write", encodeAtomicWrite({ checks: [{ key: K("x"), versionstamp: new Uint8Array(9) }] })), 400, "Invalid versionstamp.", "9-byte check versionstamp");
}, opts);

e2eTest("raw: up to 100 checks accepted, 101 refused (SPEC §10 D19)", async (ctx) => {
  const { c } = await setup(ctx);
  const checks = (n: number) => Array.from({ length: n }, (_, i) => ({ key: K("c", i) }));
  const r100 = await c.write({ checks: checks(100), mutations: [{ key: K("ok"), type: M_SET, value: bytesValue("1") }] });
  assert.equal(r100.res.status, 200, r100.res.text);
  assert.equal(r100.out!.status, AW_SUCCESS);
  expectError(await c.call("atomic_write", encodeAtomicWrite({ checks: checks(101) })), 400, "Too many checks included in atomic write.", "101 checks");
}, opts);

e2eTest("raw: LE64 of wrong length and unknown encodings get 400, server survives (SPEC §10 D2/D3)", async (ctx) => {
  const { c } = await setup(ctx);
  const cases: [string, { data: Uint8Array; encoding: number }, number][] = [
    ["LE64 7 bytes set", { data: new Uint8Array(7), encoding: VE_LE64 }, M_SET],
    ["LE64 9 bytes set", { data: new Uint8Array(9), encoding: VE_LE64 }, M_SET],
    ["LE64 0 bytes sum", { data: new Uint8Array(0), encoding: VE_LE64 }, M_SUM],
    ["LE64 4 bytes min", { data: new Uint8Array(4), encoding: VE_LE64 }, M_MIN],
    ["LE64 16 bytes max", { data: new Uint8Array(16), encoding: VE_LE64 }, M_MAX],
    ["encoding 0", { data: new Uint8Array([1]), encoding: 0 }, M_SET],
    ["encoding 4", { data: new Uint8Array([1]), encoding: 4 }, M_SET],
    ["encoding 99", { data: new Uint8Array([1]), encoding: 99 }, M_SET],
  ];
  for (const [what, value, type] of cases) {
    const r = await c.call("atomic_write", encodeAtomicWrite({
      mutations: [
        { key: K("before"), type: M_SET, value: bytesValue("x") },
        { key: K("bad"), type, value },
      ],
    }));
    assert.equal(r.status, 400, `${what}: expected 400, got ${r.status} ${JSON.stringify(r.text)}`);
    assert.equal(await c.get(K("before")), null, `${what}: nothing written`);
    assert.equal(await c.get(K("bad")), null, `${what}: nothing written`);
  }
  // missing value / unknown mutation type
  expectError(await c.call("atomic_write", encodeAtomicWrite({ mutations: [{ key: K("m"), type: M_SET }] })), 400, "Invalid mutation kind or arguments.", "set without value");
  expectError(await c.call("atomic_write", encodeAtomicWrite({ mutations: [{ key: K("m"), type: 0, value: bytesValue("x") }] })), 400, "Invalid mutation kind or arguments.", "M_UNSPECIFIED");
  expectError(await c.call("atomic_write", encodeAtomicWrite({ mutations: [{ key: K("m"), type: 7, value: bytesValue("x") }] })), 400, "Invalid mutation kind or arguments.", "type 7");
  expectError(await c.call("atomic_write", encodeAtomicWrite({ mutations: [{ key: K("m"), type: M_SET, value: bytesValue("x"), expireAtMs: -2 }] })), 400, "Invalid mutation expire at.", "expire -2");
  // delete without a value is fine
  assert.equal((await c.write({ mutations: [{ key: K("m"), type: M_DELETE }] })).out?.status, AW_SUCCESS);
  // still serving, and LE64 of the right length works
  const ok = await c.write({ mutations: [{ key: K("u"), type: M_SET, value: { data: le64(42n), encoding: VE_LE64 } }] });
  assert.equal(ok.out?.status, AW_SUCCESS);
  const e = await c.get(K("u"));
  assert.equal(e?.encoding, VE_LE64);
  assert.deepStrictEqual(e?.value, le64(42n));
}, opts);

e2eTest("raw: server-side write limits and their texts", async (ctx) => {
  const { c } = await setup(ctx);
  const v = (n: number) => ({ data: new Uint8Array(n), encoding: VE_BYTES });
  const key = (n: number) => new Uint8Array(n).fill(0x02);
  const write = (a: Parameters<typeof encodeAtomicWrite>[0]) => c.call("atomic_write", encodeAtomicWrite(a));
  assert.equal((await write({ mutations: [{ key: key(2048), type: M_SET, value: v(65536) }] })).status, 200, "2048-byte key, 65536-byte value");
  expectError(await write({ mutations: [{ key: key(2049), type: M_SET, value: v(1) }] }), 400, "A key exceeds the key size limit.", "2049-byte write key");
  expectError(await write({ mutations: [{ key: K("v"), type: M_SET, value: v(65537) }] }), 400, "A value exceeds the value size limit.", "65537-byte value");
  assert.equal((await write({ checks: [{ key: key(2049) }] })).status, 200, "2049-byte check key");
  expectError(await write({ checks: [{ key: key(2050) }] }), 400, "A key exceeds the key size limit.", "2050-byte check key");
  const muts = (n: number) => Array.from({ length: n }, (_, i) => ({ key: K("m", i), type: M_SET, value: v(1) }));
  assert.equal((await write({ mutations: muts(1000) })).status, 200, "1000 mutations");
  expectError(await write({ mutations: muts(1001) }), 400, "Too many mutations / enqueues included in atomic write.", "1001 mutations");
  const bigs = (n: number) => Array.from({ length: n }, (_, i) => ({ key: K("b", i), type: M_SET, value: v(65536) }));
  assert.equal((await write({ mutations: bigs(12) })).status, 200, "12 × 64 KiB");
  expectError(await write({ mutations: bigs(13) }), 400, "The total size of the atomic write is too large.", "13 × 64 KiB");
  // nothing of the refused writes was stored
  assert.equal(await c.get(K("b", 12)), null);
}, opts);

e2eTest("raw: expired rows are absent for reads, checks and sums (SPEC §10 D4)", async (ctx) => {
  const { c } = await setup(ctx);
  const past = Date.now() - 60_000;
  const w = await c.write({
    mutations: [
      { key: K("e", "s"), type: M_SET, value: bytesValue("old"), expireAtMs: past },
      { key: K("e", "u"), type: M_SET, value: { data: le64(100n), encoding: VE_LE64 }, expireAtMs: past },
      { key: K("e", "live"), type: M_SET, value: bytesValue("live"), expireAtMs: Date.now() + 3_600_000 },
    ],
  });
  assert.equal(w.out?.status, AW_SUCCESS, w.res.text);
  assert.equal(await c.get(K("e", "s")), null, "expired row returned by a point read");
  const all = await c.read([{ start: concat(K("e"), [0]), end: concat(K("e"), [0xff]), limit: 10 }]);
  assert.deepStrictEqual(all.ranges[0].map((e) => hex(e.key)), [hex(K("e", "live"))], "expired rows returned by a range read");
  const rev = await c.read([{ start: concat(K("e"), [0]), end: concat(K("e"), [0xff]), limit: 10, reverse: true }]);
  assert.equal(rev.ranges[0].length, 1);
  const chk = await c.write({ checks: [{ key: K("e", "s") }], mutations: [{ key: K("e", "s"), type: M_SET, value: bytesValue("new") }] });
  assert.equal(chk.out?.status, AW_SUCCESS, "absent-check on an expired row must pass");
  const sum = await c.write({ mutations: [{ key: K("e", "u"), type: M_SUM, value: { data: le64(1n), encoding: VE_LE64 } }] });
  assert.equal(sum.out?.status, AW_SUCCESS);
  assert.deepStrictEqual((await c.get(K("e", "u")))?.value, le64(1n), "sum on an expired U64 starts from nothing");
}, opts);

e2eTest("raw: failed mutation leaves no trace and does not advance the version (SPEC §10 D1)", async (ctx) => {
  const { s: server, c } = await setup(ctx);
  const a = await c.write({ mutations: [{ key: K("s"), type: M_SET, value: bytesValue("str") }] });
  const vsA = a.out!.versionstamp;
  assert.equal(globalVersion(server.dbPath), stampVersion(vsA), "the global version is the last write's");
  const bad = await c.write({
    mutations: [
      { key: K("k1"), type: M_SET, value: bytesValue("1") },
      { key: K("s"), type: M_SUM, value: { data: le64(1n), encoding: VE_LE64 } },
    ],
  });
  expectError(bad.res, 400, "Failed to perform 'sum' mutation on a non-U64 value in the database", "sum on bytes");
  assert.equal(await c.get(K("k1")), null);
  const s = await c.get(K("s"));
  assert.deepStrictEqual(s?.versionstamp, vsA);
  assert.equal(globalVersion(server.dbPath), stampVersion(vsA), "a failed write advanced the global version");
  // min/max with a non-LE64 operand
  expectError(
    (await c.write({ mutations: [{ key: K("mm"), type: M_MIN, value: bytesValue("x") }] })).res,
    400,
    "Failed to perform 'min' mutation on a non-U64 operand",
    "min bytes operand",
  );
  expectError(
    (await c.write({ mutations: [{ key: K("mm"), type: M_SUM, value: bytesValue("x") }] })).res,
    400,
    "Some of the parameters are not valid V8 values",
    "sum bytes operand",
  );
  assert.equal(globalVersion(server.dbPath), stampVersion(vsA), "a refused write advanced the global version");
  // V8 sum bounds (only third-party clients send them): 10n + 5n with max 12n
  const v8big = (n: number) => new Uint8Array([0xff, 0x0f, 0x5a, 0x10, n, 0, 0, 0, 0, 0, 0, 0]);
  await c.write({ mutations: [{ key: K("b"), type: M_SET, value: { data: v8big(10), encoding: VE_V8 } }] });
  expectError(
    (await c.write({ mutations: [{ key: K("b"), type: M_SUM, value: { data: v8big(5), encoding: VE_V8 }, sumMax: v8big(12) }] })).res,
    400,
    "The result of a Sum operation would exceed its range limit",
    "sum above max",
  );
  const clamp = await c.write({ mutations: [{ key: K("b"), type: M_SUM, value: { data: v8big(5), encoding: VE_V8 }, sumMax: v8big(12), sumClamp: true }] });
  assert.equal(clamp.out?.status, AW_SUCCESS, clamp.res.text);
  // D12: bounds apply to a missing key too
  const absent = await c.write({ mutations: [{ key: K("nb"), type: M_SUM, value: { data: v8big(50), encoding: VE_V8 }, sumMax: v8big(12), sumClamp: true }] });
  assert.equal(absent.out?.status, AW_SUCCESS, absent.res.text);
  const nb = await c.get(K("nb"));
  assert.ok(nb !== null);
  assert.equal(nb.value[4], 12, `sum bound not applied to a missing key: ${hex(nb.value)}`);
}, opts);

e2eTest("raw: versionstamped-suffix key layout", async (ctx) => {
  const { c } = await setup(ctx);
  const r = await c.write({ mutations: [{ key: K("jobs"), type: M_SET_SUFFIX_VS, value: bytesValue("j") }] });
  assert.equal(r.out?.status, AW_SUCCESS);
  const vs = hex(r.out!.versionstamp);
  const expectKey = K("jobs", vs);
  const e = await c.get(expectKey);
  assert.ok(e, `key ${hex(expectKey)} not found`);
  assert.equal(hex(e.versionstamp), vs);
}, opts);

e2eTest("raw: enqueue validation (npm-style enqueues are stored)", async (ctx) => {
  const { c } = await setup(ctx);
  const payload = new Uint8Array([0xff, 0x0f, 0x49, 0x02]);
  const ok = await c.write({ enqueues: [{ payload, deadlineMs: Date.now() + 1000, keysIfUndelivered: [K("dlq")], backoffSchedule: [100, 200] }] });
  assert.equal(ok.out?.status, AW_SUCCESS, ok.res.text);
  assert.equal(ok.out!.versionstamp.length, 10);
  // D5: a past deadline is fine (deliver asap); > now + 30 d is refused
  const past = await c.write({ enqueues: [{ payload, deadlineMs: Date.now() - 40 * 86400_000 }] });
  assert.equal(past.res.status, 200, `past deadline: ${past.res.status} ${past.res.text}`);
  expectError(
    (await c.write({ enqueues: [{ payload, deadlineMs: Date.now() + 31 * 86400_000 }] })).res,
    400,
    "Invalid mutation enqueue deadline.",
    "deadline in 31 days",
  );
  expectError((await c.write({ enqueues: [{ payload, deadlineMs: 1, backoffSchedule: Array(11).fill(1) }] })).res, 400, "Too many backoff intervals for a single queue message.", "11 intervals");
  expectError((await c.write({ enqueues: [{ payload, deadlineMs: 1, backoffSchedule: [3_600_001] }] })).res, 400, "A backoff interval exceeds the maximum allowed backoff interval.", "interval > 1 h");
  expectError((await c.write({ enqueues: [{ payload, deadlineMs: 1, keysIfUndelivered: Array(11).fill(K("d")) }] })).res, 400, "Too many dead letter keys for a single queue message.", "11 dlq keys");
  expectError((await c.write({ enqueues: [{ payload: new Uint8Array(65537), deadlineMs: 1 }] })).res, 400, "A value exceeds the value size limit.", "payload 65537");
  // enqueues write no KV rows
  const all = await c.read([{ start: new Uint8Array([0]), end: new Uint8Array([0xff]), limit: 100 }]);
  assert.deepStrictEqual(all.ranges[0], []);
}, opts);

e2eTest("raw: watch frames (first frame complete; every frame carries every key)", async (ctx) => {
  const { c } = await setup(ctx);
  const ka = K("w", "a"), kb = K("w", "b");
  const init = await c.write({ mutations: [{ key: ka, type: M_SET, value: bytesValue("A") }] });
  const watch = await c.watch([ka, kb]);
  ctx.defer(() => watch.cancel());
  assert.equal(watch.response.headers.get("content-type"), "application/octet-stream");
  const f1 = await watch.next();
  assert.ok(f1, "first frame");
  assert.equal(f1.status, SR_SUCCESS);
  assert.equal(f1.keys.length, 2);
  assert.ok(f1.keys.every((k) => k.changed), "first frame: changed=true for every key");
  assert.deepStrictEqual(f1.keys[0].entry?.versionstamp, init.out!.versionstamp);
  assert.equal(f1.keys[1].entry, null);
  const w = await c.write({ mutations: [{ key: kb, type: M_SET, value: bytesValue("B") }] });
  const f2 = await watch.next();
  assert.ok(f2);
  assert.deepStrictEqual(f2.keys[1].entry?.versionstamp, w.out!.versionstamp);
  // Deno 2.x maps `changed=false` to null ("deleted") instead of "unchanged"
  // (ext/kv WatchEntry::Unchanged → null), so a server that sends
  // changed=false makes real Deno clients see unchanged keys as deleted.
  assert.ok(
    f2.keys[0].changed && f2.keys[0].entry !== null,
    `unchanged key must be re-sent as changed=true with its entry for Deno clients; got ${fmt(f2.keys[0])}`,
  );
  // 2049-byte watch keys (D8d) and > 10 keys
  const w2049 = await c.watch([new Uint8Array(2049).fill(0x02)]); // throws unless 200
  const f2049 = await w2049.next();
  await w2049.cancel();
  assert.equal(f2049?.keys.length, 1, "2049-byte watch key accepted");
  expectError(await c.call("watch", encodeWatch(Array(11).fill(ka))), 400, "Too many keys watched in a single watch request.", "11 watch keys");
}, { ...opts, timeoutMs: 20_000 });

e2eTest("raw: concurrent HTTP/1.1 and h2c clients see each other's writes", async (ctx) => {
  const s = await ctx.server();
  const h1 = new RawClient(s.url, s.token);
  const h2 = new RawClient(s.url, s.token, { http2: true });
  ctx.defer(() => h2.close());
  await Promise.all(Array.from({ length: 20 }, (_, i) =>
    (i % 2 ? h1 : h2).write({ mutations: [{ key: K("mix", i), type: M_SET, value: bytesValue(String(i)) }] })
  ));
  for (const c of [h1, h2]) {
    const out = await c.read([{ start: concat(K("mix"), [0]), end: concat(K("mix"), [0xff]), limit: 100 }]);
    assert.equal(out.ranges[0].length, 20);
  }
  await sleep(0);
}, opts);
