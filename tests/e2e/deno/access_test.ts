// Access control with the real Deno CLI: a token file with names, scopes and
// key prefixes (README, "Access tokens"); 403 texts as Deno shows them; session
// tokens; a SIGHUP reload that removes a token. Server only.

import {
  assert,
  assertRejects,
  e2eTest,
  nextFrame,
  randomToken,
  type ServerProcess,
  sleep,
  type TestCtx,
  waitForFrame,
  withTimeout,
} from "./server.ts";

const opts = { serverOnly: true };

const READ_ONLY = "Access denied: the access token 'reporting' may only read (scope read); " +
  "this write was refused and nothing was written.";
const OUTSIDE = "Access denied: a key or range of this request lies outside the key prefixes " +
  "of the access token 'ada'; nothing was read or written.";

interface Tokens {
  admin: string;
  reporting: string;
  ada: string;
}

function tokenFile(t: Tokens, without: (keyof Tokens)[] = []): string {
  const lines = [
    "# name scope token [prefix…]",
    `admin read-write ${t.admin}`,
    `reporting read ${t.reporting}`,
    `ada read-write ${t.ada} ["users", 1n] ["shared"]`,
  ];
  return lines.filter((l) => !without.some((w) => l.startsWith(`${w} `))).join("\n") + "\n";
}

async function setup(ctx: TestCtx) {
  const tokens = { admin: randomToken(), reporting: randomToken(), ada: randomToken() };
  const dir = await ctx.tempDir();
  const file = `${dir}/tokens`;
  await Deno.writeTextFile(file, tokenFile(tokens));
  const server = await ctx.server({ tokenFile: file, token: tokens.admin });
  const as = async (token: string) =>
    await ctx.open({ kind: "server", url: server.url, token, dbPath: server.dbPath, server: null });
  return { tokens, file, server, as };
}

async function waitForLog(s: ServerProcess, text: string, ms = 10_000) {
  const deadline = Date.now() + ms;
  while (!s.logs().includes(text)) {
    if (Date.now() > deadline) throw new Error(`no "${text}" in the log:\n${s.tail()}`);
    await sleep(20);
  }
}

e2eTest("access: a read token reads, and its set fails with the 403 text", async (ctx) => {
  const { tokens, as } = await setup(ctx);
  const admin = await as(tokens.admin);
  await admin.set(["doc", 1], "hello");
  const reporting = await as(tokens.reporting);
  assert.equal((await reporting.get(["doc", 1])).value, "hello");
  assert.equal((await Array.fromAsync(reporting.list({ prefix: [] }))).length, 1);
  const err = await assertRejects(() => reporting.set(["doc", 1], "changed"), READ_ONLY, "set");
  assert.match(err.message, /status=403/);
  await assertRejects(() => reporting.delete(["doc", 1]), READ_ONLY, "delete");
  await assertRejects(
    () => reporting.atomic().check({ key: ["doc", 1], versionstamp: null }).sum(["n"], 1n).commit(),
    READ_ONLY,
    "atomic",
  );
  assert.equal((await admin.get(["doc", 1])).value, "hello", "nothing was written");
  assert.equal((await admin.get(["n"])).value, null);
}, opts);

e2eTest("access: a prefix token reads, writes, lists and watches inside its prefixes and is refused outside", async (ctx) => {
  const { tokens, as } = await setup(ctx);
  const admin = await as(tokens.admin);
  await admin.set(["other"], "not ada's");
  await admin.set(["users", 2n], "another user");
  const ada = await as(tokens.ada);
  // Inside.
  await ada.set(["users", 1n, "name"], "Ada");
  await ada.set(["users", 1n, "langs", 1], "Analytical Engine");
  await ada.set(["shared", "x"], 1);
  assert.equal((await ada.get(["users", 1n, "name"])).value, "Ada");
  const listed = await Array.fromAsync(ada.list({ prefix: ["users", 1n] }));
  assert.deepStrictEqual(listed.map((e) => e.key), [["users", 1n, "langs", 1], ["users", 1n, "name"]]);
  assert.equal((await Array.fromAsync(ada.list({ prefix: ["users", 1n, "langs"] }))).length, 1);
  assert.equal((await Array.fromAsync(ada.list({ prefix: ["shared"] }, { reverse: true }))).length, 1);
  const res = await ada.atomic()
    .check({ key: ["users", 1n, "name"], versionstamp: listed[1].versionstamp })
    .set(["users", 1n, "name"], "Ada Lovelace")
    .commit();
  assert.ok(res.ok);
  const reader = ada.watch([["users", 1n, "name"]]).getReader();
  ctx.defer(() => reader.cancel().catch(() => {}));
  assert.equal((await nextFrame(reader, 10_000, "first frame"))[0].value, "Ada Lovelace");
  await admin.set(["users", 1n, "name"], "A. A. Lovelace");
  await waitForFrame(reader, (f) => f[0].value === "A. A. Lovelace", 10_000, "the change");
  // Outside: every call refused with 403, nothing written.
  await assertRejects(() => ada.get(["other"]), OUTSIDE, "get outside");
  await assertRejects(() => ada.get(["users", 2n]), OUTSIDE, "get of another user");
  await assertRejects(() => ada.getMany([["users", 1n, "name"], ["other"]]), OUTSIDE, "getMany");
  await assertRejects(() => Array.fromAsync(ada.list({ prefix: [] })), OUTSIDE, "list all");
  await assertRejects(() => Array.fromAsync(ada.list({ prefix: ["users"] })), OUTSIDE, "list wider");
  await assertRejects(
    () => Array.fromAsync(ada.list({ start: ["users", 1n], end: ["users", 3n] })),
    OUTSIDE,
    "list range across users",
  );
  await assertRejects(() => ada.set(["other"], "mine"), OUTSIDE, "set outside");
  await assertRejects(() => ada.set(["users", 10n], "mine"), OUTSIDE, "set of another user");
  await assertRejects(
    () => ada.atomic().set(["users", 1n, "ok"], 1).set(["other"], 2).commit(),
    OUTSIDE,
    "atomic half outside",
  );
  await assertRejects(
    () => ada.atomic().check({ key: ["other"], versionstamp: null }).set(["users", 1n, "ok"], 1).commit(),
    OUTSIDE,
    "check outside",
  );
  const outside = ada.watch([["other"]]).getReader();
  await assertRejects(() => withTimeout(outside.read(), 15_000, "watch outside"), OUTSIDE, "watch outside");
  assert.equal((await admin.get(["other"])).value, "not ada's");
  assert.equal((await admin.get(["users", 1n, "ok"])).value, null, "the inside half was not written");
  assert.equal((await admin.get(["users", 10n])).value, null);
}, opts);

e2eTest("access: a SIGHUP reload removes a token at once", async (ctx) => {
  const { tokens, file, server, as } = await setup(ctx);
  const admin = await as(tokens.admin);
  const ada = await as(tokens.ada);
  await ada.set(["users", 1n], "before");
  assert.equal((await ada.get(["users", 1n])).value, "before");
  await Deno.writeTextFile(file, tokenFile(tokens, ["ada"]));
  Deno.kill(server.pid, "SIGHUP");
  await waitForLog(server, "reloaded on SIGHUP: 2 access token(s)");
  // The same client (its session token, its open connection) is refused at once.
  await assertRejects(() => ada.get(["users", 1n]), "Invalid access token.", "get after removal");
  await assertRejects(() => ada.set(["users", 1n], "after"), "Invalid access token.", "set after removal");
  // The others go on.
  assert.equal((await admin.get(["users", 1n])).value, "before");
  await admin.set(["users", 1n], "admin");
  assert.ok(!server.logs().includes(tokens.ada), "the log holds no token");
}, opts);

e2eTest("access: a client keeps working across a server restart (its session token is renewed)", async (ctx) => {
  const { tokens, file, server, as } = await setup(ctx);
  const ada = await as(tokens.ada);
  await ada.set(["users", 1n], "before");
  await server.stop();
  // The new process has a new session key: the client's session token is refused (401) and
  // Deno fetches new metadata with its long-lived token, then retries.
  await ctx.server({
    dbPath: server.dbPath,
    tokenFile: file,
    token: tokens.admin,
    addr: `127.0.0.1:${server.port}`,
  });
  assert.equal((await ada.get(["users", 1n])).value, "before");
  await ada.set(["users", 1n], "after");
  assert.equal((await ada.get(["users", 1n])).value, "after");
}, opts);
