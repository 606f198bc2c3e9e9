// Process lifecycle: start-up errors, graceful stop with live clients (open
// watch streams, writes in flight), restart on the same file. Server only.

import {
  assert,
  assertRejects,
  e2eTest,
  nextFrame,
  randomToken,
  serverBinary,
  serverEnv,
  type ServerProcess,
  startServer,
  withTimeout,
} from "./server.ts";

const opts = { serverOnly: true };

async function runBinary(args: string[], timeoutMs = 10_000) {
  const child = new Deno.Command(serverBinary(), {
    args,
    clearEnv: true,
    env: serverEnv(),
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  try {
    const out = await withTimeout(child.output(), timeoutMs, `denokv ${args.join(" ")}`);
    const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
    return { code: out.code, text };
  } catch (e) {
    try {
      child.kill("SIGKILL");
    } catch { /* gone */ }
    throw e;
  }
}

e2eTest("lifecycle: start-up errors exit non-zero with a message", async (ctx) => {
  const dir = await ctx.tempDir("denokv-e2e-life-");
  const db = `${dir}/db.sqlite`;
  const short = await runBinary(["--sqlite-path", db, "serve", "--access-token", "short", "--addr", "127.0.0.1:0"]);
  assert.equal(short.code, 1, `short token: exit ${short.code}\n${short.text}`);
  assert.match(short.text, /Access token must be at minimum 12 chars long/);
  const missing = await runBinary(["--sqlite-path", db, "serve", "--addr", "127.0.0.1:0"]);
  assert.equal(missing.code, 2, `missing token: exit ${missing.code}\n${missing.text}`);
  const badAddr = await runBinary(["--sqlite-path", db, "serve", "--access-token", randomToken(), "--addr", "not-an-address"]);
  assert.equal(badAddr.code, 2, `bad --addr: exit ${badAddr.code}\n${badAddr.text}`);
}, opts);

e2eTest("lifecycle: a second server on a port in use fails instead of sharing it", async (ctx) => {
  const first = await ctx.server();
  let second: ServerProcess | null = null;
  let startError = "";
  try {
    // SO_REUSEPORT must not let two databases answer on one address
    second = await startServer({
      dbPath: `${await ctx.tempDir()}/second.sqlite`,
      addr: `127.0.0.1:${first.port}`,
      readyTimeoutMs: 5000,
    });
  } catch (e) {
    startError = String(e);
  }
  if (second) {
    await second.stop().catch(() => {});
    assert.fail(`a second denokv started listening on 127.0.0.1:${first.port}, already served by pid ${first.pid}`);
  }
  assert.match(startError, /exited \(code 1,/, `expected exit code 1 for an address in use, got: ${startError.slice(0, 400)}`);
}, opts);

e2eTest("lifecycle: SIGTERM with an open watch stream and idle clients exits 0 promptly", async (ctx) => {
  const s = await ctx.server();
  const kv = await ctx.open(s);
  const idle = await ctx.open(s);
  await kv.set(["w"], 1);
  await idle.get(["w"]); // the idle client has an open HTTP/2 connection
  const reader = kv.watch([["w"]]).getReader();
  ctx.defer(() => reader.cancel().catch(() => {}));
  assert.equal((await nextFrame(reader, 10_000, "first frame")).at(0)?.value, 1);
  const t0 = Date.now();
  await s.stop(10_000); // throws unless exit code 0 within 10 s
  assert.ok(Date.now() - t0 < 10_000);
}, opts);

e2eTest("lifecycle: restart on the same file keeps data and versionstamps", async (ctx) => {
  const s = await ctx.server();
  let kv = await ctx.open(s);
  const r = await kv.set(["persist"], { v: 1 });
  await kv.set(["persist-exp"], "x", { expireIn: 3_600_000 });
  ctx.close(kv);
  await s.stop();
  const s2 = await ctx.server({ dbPath: s.dbPath, token: randomToken() });
  // a client still using the first server's token is refused by the new one
  Deno.env.set("DENO_KV_ACCESS_TOKEN", s.token);
  // (Deno 2.x validates the token inside Deno.openKv itself)
  await assertRejects(
    () => withTimeout(Deno.openKv(s2.url).then(async (k) => {
      try {
        await k.get(["persist"]);
      } finally {
        k.close();
      }
    }), 15_000, "openKv + get with a stale token"),
    "Invalid access token.",
  );
  kv = await ctx.open(s2);
  const e = await kv.get(["persist"]);
  assert.deepStrictEqual(e, { key: ["persist"], value: { v: 1 }, versionstamp: r.versionstamp });
  assert.equal((await kv.get(["persist-exp"])).value, "x");
  const r2 = await kv.set(["persist"], { v: 2 });
  assert.ok(r2.versionstamp > r.versionstamp);
}, opts);
