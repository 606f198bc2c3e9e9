// SQLite file compatibility with the Deno CLI's local KV, both ways:
//  (a) Deno local KV writes a file → our server serves it (values AND versionstamps)
//  (b) our server writes a file → Deno local KV opens it
// plus a schema comparison (node:sqlite) and the queue table format.
// Server only.

import { DatabaseSync } from "node:sqlite";
import v8 from "node:v8";
import {
  assert,
  assertVersionstamp,
  e2eTest,
  fmt,
  listAll,
  sleep,
  withTimeout,
} from "./server.ts";
import { AW_SUCCESS, encodeKey, RawClient } from "./raw.ts";

const opts = { serverOnly: true };

function sample(): [Deno.KvKey, unknown][] {
  return [
    [["c", "str"], "hello 🦕"],
    [["c", "num"], -0],
    [["c", "nan"], NaN],
    [["c", "big"], -(2n ** 100n)],
    [["c", "obj"], { a: [1, { b: new Map([["x", new Set([1, 2])]]) }], d: new Date(1700000000000) }],
    [["c", "re"], /x+/g],
    [["c", "bytes"], new Uint8Array([0, 1, 2, 255])],
    [["c", "ab"], new Uint8Array([9, 9]).buffer],
    [["c", "f64"], new Float64Array([1.5, -0])],
    [["c", "u64"], new Deno.KvU64(2n ** 64n - 2n)],
    [["c", "null"], null],
    [["c", "undef"], undefined],
    [["c", 1n], "bigint key"],
    [["c", 2.5], "number key"],
    [["c", true], "bool key"],
    [["c", new Uint8Array([0, 0])], "bytes key"],
    [["c", "unicode", "é", "\u0000"], "deep key"],
    [["d", "big-value"], "v".repeat(60000)],
  ];
}

type Entry = Deno.KvEntry<unknown>;

function normalize(e: Entry) {
  const v = e.value instanceof Deno.KvU64 ? { KvU64: e.value.value } : e.value;
  return { key: e.key, value: v, versionstamp: e.versionstamp };
}

function assertSameEntries(got: Entry[], want: Entry[], what: string) {
  assert.equal(got.length, want.length, `${what}: entry count; got keys ${fmt(got.map((e) => e.key))}`);
  for (let i = 0; i < want.length; i++) {
    assert.deepStrictEqual(normalize(got[i]), normalize(want[i]), `${what}: entry ${i} (${fmt(want[i].key)})`);
  }
}

function maxStamp(es: Entry[]): string {
  return es.map((e) => e.versionstamp).reduce((a, b) => (a > b ? a : b), "");
}

interface SchemaInfo {
  tables: Record<string, string[]>;
  indexes: string[];
  migration: number;
}

function schemaOf(path: string): SchemaInfo {
  const db = new DatabaseSync(path, { readOnly: true });
  try {
    const tables: Record<string, string[]> = {};
    for (const t of ["migration_state", "data_version", "kv", "queue", "queue_running"]) {
      const cols = db.prepare(`PRAGMA table_info(${t})`).all() as {
        name: string;
        type: string;
        notnull: number;
        dflt_value: string | null;
        pk: number;
      }[];
      tables[t] = cols.map((c) =>
        `${c.name} ${c.type.toLowerCase()} notnull=${c.notnull} default=${c.dflt_value} pk=${c.pk}`
      );
    }
    const wr = db.prepare(`SELECT sql FROM sqlite_master WHERE name = 'kv'`).get() as { sql: string };
    tables["kv"].push(`without_rowid=${/without\s+rowid/i.test(wr.sql)}`);
    const indexes = (db.prepare(`PRAGMA index_list(kv)`).all() as { name: string }[])
      .map((i) => i.name)
      .filter((n) => !n.startsWith("sqlite_autoindex"))
      .sort();
    const m = db.prepare(`SELECT version FROM migration_state WHERE k = 0`).get() as { version: number };
    return { tables, indexes, migration: m.version };
  } finally {
    db.close();
  }
}

e2eTest("compat (a): a file written by Deno's local KV is served with the same values and versionstamps", async (ctx) => {
  const dir = await ctx.tempDir("denokv-compat-a-");
  const path = `${dir}/local.sqlite`;

  // --- write with Deno's local KV
  const local = await Deno.openKv(path);
  for (const [k, v] of sample()) await local.set(k, v);
  await local.set(["e", "far"], "expires in an hour", { expireIn: 3_600_000 });
  await local.set(["e", "soon"], "expires soon", { expireIn: 500 });
  const soonSetAt = Date.now();
  await local.atomic().sum(["e", "counter"], 41n).commit();
  await local.atomic().sum(["e", "counter"], 1n).commit();
  const vs = await local.set(["log", local.commitVersionstamp()], "versionstamped");
  await local.set(["gone"], 1);
  await local.delete(["gone"]);
  await local.enqueue({ job: 1 }, { delay: 3_600_000, keysIfUndelivered: [["dlq"]] });
  const stored = await listAll(local, { prefix: [] });
  local.close();
  assert.ok(stored.some((e) => e.key[0] === "log" && e.key[1] === vs.versionstamp));

  // wait until ["e","soon"] has expired (Deno's local KV may still hold the row)
  await sleep(Math.max(0, soonSetAt + 500 + 100 - Date.now()));
  const want = stored.filter((e) => !(e.key[0] === "e" && e.key[1] === "soon"));

  // --- serve the same file
  const server = await ctx.server({ dbPath: path });
  const kv = await ctx.open(server);
  const got = await listAll(kv, { prefix: [] });
  assertSameEntries(got, want, "server view of a local file");
  // point reads agree too
  for (const e of want.slice(0, 10)) {
    const g = await kv.get(e.key);
    assert.deepStrictEqual(normalize(g as Entry), normalize(e), `get ${fmt(e.key)}`);
  }
  assert.equal((await kv.get(["e", "soon"])).value, null, "expired row written by Deno must not be served");
  // checks against versionstamps written by Deno pass
  const far = want.find((e) => e.key[1] === "far")!;
  const c = await kv.atomic().check(far).set(["e", "far"], "updated over http").commit();
  assert.ok(c.ok, "check with a versionstamp written by Deno local KV");
  // new commits continue after the file's version counter
  assertVersionstamp((c as Deno.KvCommitResult).versionstamp);
  assert.ok((c as Deno.KvCommitResult).versionstamp > maxStamp(want), "server versionstamps continue the file's counter");
  // U64 written locally can be summed remotely
  await kv.atomic().sum(["e", "counter"], 8n).commit();
  assert.equal((await kv.get<Deno.KvU64>(["e", "counter"])).value?.value, 50n);

  ctx.close(kv);
  await server.stop();
  // the queued message is still in the file, untouched
  const db = new DatabaseSync(path, { readOnly: true });
  const q = db.prepare(`SELECT count(*) AS n FROM queue`).get() as { n: number };
  db.close();
  assert.equal(q.n, 1, "queue row preserved");
}, opts);

e2eTest("compat (b): a file written by our server opens in Deno's local KV with the same contents", async (ctx) => {
  const dir = await ctx.tempDir("denokv-compat-b-");
  const path = `${dir}/server.sqlite`;
  const server = await ctx.server({ dbPath: path });
  const kv = await ctx.open(server);
  for (const [k, v] of sample()) await kv.set(k, v);
  await kv.set(["e", "far"], "expires in an hour", { expireIn: 3_600_000 });
  await kv.set(["e", "soon"], "expires soon", { expireIn: 1000 });
  const soonSetAt = Date.now();
  await kv.atomic().sum(["e", "counter"], 41n).commit();
  await kv.atomic().sum(["e", "counter"], 1n).commit();
  await kv.atomic().max(["e", "max"], 7n).commit();
  const vs = await kv.set(["log", kv.commitVersionstamp()], "versionstamped");
  await kv.set(["gone"], 1);
  await kv.delete(["gone"]);
  // an enqueue the way @deno/kv sends it, with a due deadline
  const raw = new RawClient(server.url, server.token);
  ctx.defer(() => raw.close());
  const payload = new Uint8Array(v8.serialize({ job: "from-server" }));
  const enq = await raw.write({
    enqueues: [{ payload, deadlineMs: Date.now(), keysIfUndelivered: [encodeKey(["dlq"])], backoffSchedule: [100] }],
  });
  assert.equal(enq.out?.status, AW_SUCCESS, `enqueue: ${enq.res.status} ${enq.res.text}`);
  const served = await listAll(kv, { prefix: [] });
  assert.ok(served.some((e) => e.key[0] === "log" && e.key[1] === vs.versionstamp));
  ctx.close(kv);
  await server.stop();

  // --- schema matches what Deno creates
  const refPath = `${dir}/reference.sqlite`;
  const ref = await Deno.openKv(refPath);
  await ref.set(["x"], 1);
  ref.close();
  const ours = schemaOf(path);
  const theirs = schemaOf(refPath);
  assert.deepStrictEqual(ours, theirs, "schema of a server-created file vs a Deno-created file");
  {
    const db = new DatabaseSync(path, { readOnly: true });
    const kinds = db.prepare(
      `SELECT DISTINCT typeof(k) AS k, typeof(v) AS v, typeof(v_encoding) AS e, typeof(version) AS ver, seq FROM kv`,
    ).all();
    const q = db.prepare(
      `SELECT backoff_schedule, keys_if_undelivered, typeof(keys_if_undelivered) AS t, typeof(id) AS idt FROM queue`,
    ).all() as { backoff_schedule: string; keys_if_undelivered: string; t: string; idt: string }[];
    db.close();
    assert.deepStrictEqual(kinds.map((r) => ({ ...r })), [{ k: "blob", v: "blob", e: "integer", ver: "integer", seq: 0 }]);
    assert.equal(q.length, 1, "enqueued message stored in the queue table");
    assert.equal(q[0].t, "text", "keys_if_undelivered stored as TEXT");
    assert.equal(q[0].idt, "text");
    assert.deepStrictEqual(JSON.parse(q[0].keys_if_undelivered), [[...encodeKey(["dlq"])]]);
    assert.deepStrictEqual(JSON.parse(q[0].backoff_schedule), [100]);
  }

  // wait past the expiry of ["e","soon"]
  await sleep(Math.max(0, soonSetAt + 1000 + 100 - Date.now()));

  // --- open with Deno's local KV
  const local = await Deno.openKv(path);
  ctx.defer(() => {
    try {
      local.close();
    } catch { /* closed */ }
  });
  const want = served.filter((e) => !(e.key[0] === "e" && e.key[1] === "soon"));
  // Deno sweeps expired rows at start-up (in the background): poll briefly
  let got = await listAll(local, { prefix: [] });
  for (let i = 0; i < 30 && got.length !== want.length; i++) {
    await sleep(100);
    got = await listAll(local, { prefix: [] });
  }
  assertSameEntries(got, want, "Deno local view of a server file");
  // new local commits continue after the server's counter
  const after = await local.set(["after"], 1);
  assert.ok(after.versionstamp > maxStamp(want), "local versionstamps continue the server's counter");
  // the message enqueued through the server is delivered by Deno's local queue
  const delivered = await withTimeout(
    new Promise<unknown>((resolve) => {
      local.listenQueue((msg) => resolve(msg));
    }),
    10_000,
    "delivery of the server-enqueued message by Deno local KV",
  );
  assert.deepStrictEqual(delivered, { job: "from-server" });
}, opts);

e2eTest("compat: server on a file Deno also has open (WAL, both directions)", async (ctx) => {
  const dir = await ctx.tempDir("denokv-compat-c-");
  const path = `${dir}/shared.sqlite`;
  const server = await ctx.server({ dbPath: path });
  const kv = await ctx.open(server);
  const local = await Deno.openKv(path);
  ctx.defer(() => {
    try {
      local.close();
    } catch { /* closed */ }
  });
  const r1 = await kv.set(["shared", "from-server"], 1);
  const e1 = await local.get(["shared", "from-server"]);
  assert.equal(e1.value, 1);
  assert.equal(e1.versionstamp, r1.versionstamp);
  // ten local commits advance the file's counter by ≥ 10, more than one server
  // commit can (1..9): a server that caches the counter would go backwards
  let r2 = await local.set(["shared", "from-local"], 2);
  assert.ok(r2.versionstamp > r1.versionstamp);
  for (let i = 0; i < 10; i++) r2 = await local.set(["shared", "from-local"], 2);
  const e2 = await kv.get(["shared", "from-local"]);
  assert.equal(e2.value, 2, "server sees a row committed by another process");
  assert.equal(e2.versionstamp, r2.versionstamp);
  const r3 = await kv.set(["shared", "again"], 3);
  assert.ok(
    r3.versionstamp > r2.versionstamp,
    `server versionstamps stay monotonic when another process writes: server ${r1.versionstamp}, ` +
      `then Deno local ${r2.versionstamp}, then server ${r3.versionstamp}`,
  );
  assert.equal((await local.get(["shared", "again"])).versionstamp, r3.versionstamp);
}, opts);
