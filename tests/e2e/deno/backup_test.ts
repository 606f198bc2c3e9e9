// The S3 backup with the real Deno CLI: a primary backed up to a real S3-compatible server
// (moto, from the venv tests/s3/setup.sh makes; $E2E_MOTO_SERVER overrides), written by
// Deno over KV Connect and, while it is stopped, by Deno's own local KV on the same file;
// then `denokv restore` writes a new file that Deno's local KV opens with the same entries
// (values, versionstamps) as the primary's file; and the upstream denokv, started as a replica
// of the backup (`--sync-from-s3`), serves Deno the primary's entries and follows its new
// writes. Server only.

import { assert, e2eTest, fmt, listAll, openRemoteKv, serverBinary, sleep, startServer } from "./server.ts";

const opts = { serverOnly: true, timeoutMs: 90_000 };
const BUCKET = "e2e-backups";
const S3_ENV = { AWS_ACCESS_KEY_ID: "testing", AWS_SECRET_ACCESS_KEY: "testing", AWS_REGION: "us-east-1" };

function motoServer(): string {
  return Deno.env.get("E2E_MOTO_SERVER") ??
    `${Deno.env.get("HOME")}/.cache/denokv/s3-venv/bin/moto_server`;
}

async function freePort(): Promise<number> {
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (l.addr as Deno.NetAddr).port;
  l.close();
  return port;
}

/** moto on a free port with the bucket made; killed by the returned function. */
async function startMoto(): Promise<{ endpoint: string; stop: () => Promise<void> }> {
  const port = await freePort();
  const child = new Deno.Command(motoServer(), {
    args: ["-H", "127.0.0.1", "-p", String(port)],
    stdin: "null",
    stdout: "null",
    stderr: "null",
  }).spawn();
  const endpoint = `http://127.0.0.1:${port}`;
  for (let i = 0;; i++) {
    try {
      const r = await fetch(`${endpoint}/${BUCKET}`, { method: "PUT" });
      await r.body?.cancel();
      assert.equal(r.status, 200, "create the bucket");
      break;
    } catch (e) {
      if (i > 300) throw new Error(`moto did not start: ${e}`);
      await sleep(100);
    }
  }
  return {
    endpoint,
    stop: async () => {
      child.kill("SIGKILL");
      await child.status;
    },
  };
}

async function scrape(server: { logs: () => string }): Promise<string> {
  const m = server.logs().match(/Metrics on (http:\/\/[^\s]+)/);
  if (!m) throw new Error("no metrics address in the log");
  return await (await fetch(m[1])).text();
}

function gauge(text: string, name: string): number {
  const line = text.split("\n").find((l) => l.startsWith(name + " "));
  if (!line) throw new Error(`no ${name}`);
  return Number(line.split(" ")[1]);
}

/** Values of every kind, a sum, a max and a min, a delete, and `many` keys of growing size. */
async function writeSample(kv: Deno.Kv, many: number) {
  await kv.set(["s", "str"], "hello 🦕");
  await kv.set(["s", "obj"], { a: [1, { b: new Map([["x", 1n]]) }], d: new Date(1700000000000) });
  await kv.set(["s", "bytes"], new Uint8Array([0, 1, 255]));
  await kv.set(["s", "far"], "expires in an hour", { expireIn: 3_600_000 });
  await kv.atomic().sum(["s", "u64"], 40n).commit();
  await kv.atomic().sum(["s", "u64"], 2n).commit();
  await kv.atomic().max(["s", "max"], 7n).commit();
  await kv.atomic().min(["s", "min"], 7n).commit();
  await kv.set(["gone"], 1);
  await kv.delete(["gone"]);
  for (let i = 0; i < many; i++) await kv.set(["many", i], "v".repeat(i));
}

type Entry = Deno.KvEntry<unknown>;
function normalize(e: Entry) {
  const v = e.value instanceof Deno.KvU64 ? { KvU64: e.value.value } : e.value;
  return { key: e.key, value: v, versionstamp: e.versionstamp };
}

e2eTest("backup: a database restored from S3 opens in Deno with the primary's entries", async (ctx) => {
  const moto = await startMoto();
  for (const [k, v] of Object.entries(S3_ENV)) Deno.env.set(k, v);
  try {
    const dir = await ctx.tempDir("denokv-backup-");
    const path = `${dir}/primary.sqlite`;
    const backupArgs = [
      "--backup-to-s3", "--s3-bucket", BUCKET, "--s3-prefix", "e2e/", "--s3-endpoint", moto.endpoint,
      "--metrics-addr", "127.0.0.1:0",
    ];
    let server = await ctx.server({ dbPath: path, extraArgs: backupArgs });
    let kv = await ctx.open(server);
    await writeSample(kv, 200);
    kv.close();
    await server.stop();

    // Deno's own local KV writes the file while denokv is stopped.
    const local = await Deno.openKv(path);
    await local.set(["s", "str"], "changed by the Deno CLI");
    await local.set(["cli", "new"], 42);
    await local.delete(["many", 0]);
    local.close();

    server = await ctx.server({ dbPath: path, extraArgs: backupArgs });
    kv = await ctx.open(server);
    await kv.set(["after"], "restart");
    kv.close();
    // Shipped: nothing pending and the CLI's commits were noticed (a new snapshot).
    for (let i = 0;; i++) {
      const text = await scrape(server);
      if (
        gauge(text, "denokv_backup_lag_versions") === 0 &&
        gauge(text, "denokv_backup_pending_commits") === 0 &&
        gauge(text, "denokv_backup_history_resets_total") === 1
      ) break;
      if (i > 200) throw new Error("the backup did not catch up:\n" + text);
      await sleep(100);
    }
    await server.stop();

    const restored = `${dir}/restored.sqlite`;
    const out = await new Deno.Command(serverBinary(), {
      args: ["--sqlite-path", restored, "restore", "--s3-bucket", BUCKET, "--s3-prefix", "e2e/", "--s3-endpoint", moto.endpoint],
      env: { ...S3_ENV, RUST_LOG: "warn" },
      stdout: "piped",
      stderr: "piped",
    }).output();
    const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
    assert.ok(out.success, text);
    assert.match(text, /^Restored to versionstamp [0-9a-f]{20} \(\d{4}-\d\d-\d\dT[\d:.]+Z\), \d+ keys$/m);

    const want = await listAll(await ctx.open(path), { prefix: [] });
    const got = await listAll(await ctx.open(restored), { prefix: [] });
    assert.equal(got.length, want.length, `entry count; got ${fmt(got.map((e) => e.key))}`);
    for (let i = 0; i < want.length; i++) {
      assert.deepStrictEqual(normalize(got[i]), normalize(want[i]), `entry ${i} (${fmt(want[i].key)})`);
    }
    assert.ok(want.some((e) => e.key[0] === "cli"), "the CLI's write is in the restored file");
  } finally {
    await moto.stop();
  }
}, opts);

/** The upstream denokv binary ($DENOKV_UPSTREAM_BIN; tests/run-all.sh installs it). */
function upstreamBinary(): string {
  const bin = Deno.env.get("DENOKV_UPSTREAM_BIN") ??
    `${Deno.env.get("HOME")}/.cache/denokv/upstream/bin/denokv`;
  try {
    Deno.statSync(bin);
  } catch {
    throw new Error(
      `no upstream denokv at ${bin}: cargo install denokv --locked --root ~/.cache/denokv/upstream ` +
        "(tests/run-all.sh does), or set DENOKV_UPSTREAM_BIN",
    );
  }
  return bin;
}

/** Every entry of `kv`, normalized, until it equals `want` (or fails after `ms`). */
async function waitForEntries(kv: Deno.Kv, want: ReturnType<typeof normalize>[], ms: number, what: string) {
  const deadline = Date.now() + ms;
  for (;;) {
    const got = (await listAll(kv, { prefix: [] })).map(normalize);
    try {
      assert.deepStrictEqual(got, want, what);
      return;
    } catch (e) {
      if (Date.now() > deadline) throw e;
    }
    await sleep(250);
  }
}

e2eTest("backup: the upstream denokv, a replica of our backup, serves Deno the primary's entries", async (ctx) => {
  const upstream = upstreamBinary();
  const moto = await startMoto();
  for (const [k, v] of Object.entries(S3_ENV)) Deno.env.set(k, v);
  const s3 = ["--s3-bucket", BUCKET, "--s3-prefix", "upstream/", "--s3-endpoint", moto.endpoint];
  let replica: Awaited<ReturnType<typeof startServer>> | null = null;
  try {
    const dir = await ctx.tempDir("denokv-upstream-replica-");
    const primary = await ctx.server({
      dbPath: `${dir}/primary.sqlite`,
      extraArgs: ["--backup-to-s3", ...s3, "--metrics-addr", "127.0.0.1:0"],
    });
    const kv = await ctx.open(primary);
    await writeSample(kv, 100);
    for (let i = 0;; i++) {
      const text = await scrape(primary);
      if (gauge(text, "denokv_backup_lag_versions") === 0 && gauge(text, "denokv_backup_pending_commits") === 0) break;
      if (i > 200) throw new Error("the backup did not catch up:\n" + text);
      await sleep(100);
    }

    replica = await startServer({
      bin: upstream,
      token: primary.token,
      dbPath: `${dir}/upstream-replica.sqlite`,
      extraArgs: ["--sync-from-s3", ...s3],
      readyTimeoutMs: 60_000,
    });
    const fromReplica = await openRemoteKv(replica);
    const want = (await listAll(kv, { prefix: [] })).map(normalize);
    assert.ok(want.length > 100, `entries written: ${want.length}`);
    // The upstream replica syncs every 10-15 s.
    await waitForEntries(fromReplica, want, 60_000, "the upstream replica serves the primary's entries");

    // It follows: new writes, a delete and a sum on the primary reach it through S3.
    await kv.set(["later"], "after the replica started");
    await kv.delete(["many", 5]);
    await kv.atomic().sum(["s", "u64"], 8n).commit();
    const after = (await listAll(kv, { prefix: [] })).map(normalize);
    await waitForEntries(fromReplica, after, 60_000, "the upstream replica follows the primary's new writes");
    const u64 = await fromReplica.get<Deno.KvU64>(["s", "u64"]);
    assert.equal(u64.value?.value, 50n);
    fromReplica.close();
  } finally {
    if (replica) await replica.kill("SIGKILL");
    await moto.stop();
  }
}, { ...opts, timeoutMs: 180_000 });
