// Durability: every write the server acknowledged survives SIGKILL (crash) and
// SIGTERM (graceful stop) in the middle of a write load.
//
// A child process (durability_writer.ts) runs 32 concurrent writer loops over
// 4 KV Connect clients and prints each key only after its commit resolved ok.
// Mid-load (writes in flight) the server gets SIGKILL; it is restarted on the
// same file and every acknowledged key must be there with its value.
// Server only.

import { assert, e2eTest, fmt, listAll, sleep, type TestCtx, withTimeout } from "./server.ts";
import { durValue } from "./durability_writer.ts";

const WRITERS = 32;
const CLIENTS = 4;
const LOAD_MS = 1500; // time under load before the kill (loops would run longer)

async function crashUnderLoad(ctx: TestCtx, signal: "SIGKILL" | "SIGTERM") {
  const server = await ctx.server();
  const writerPath = new URL("./durability_writer.ts", import.meta.url).pathname;
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--unstable-kv", writerPath, server.url, String(WRITERS), String(CLIENTS), "10000"],
    env: { DENO_KV_ACCESS_TOKEN: server.token, NO_COLOR: "1" },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let childExited = false;
  const childStatus = child.status.then((s) => {
    childExited = true;
    return s;
  });
  ctx.defer(async () => {
    if (!childExited) {
      try {
        child.kill("SIGKILL");
      } catch { /* gone */ }
    }
    await childStatus;
  });

  const acked = new Map<string, { loop: number; seq: number }>();
  let ready = false;
  let done = false;
  const stderrChunks: string[] = [];
  (async () => {
    for await (const c of child.stderr.pipeThrough(new TextDecoderStream())) stderrChunks.push(c);
  })().catch(() => {});
  const reading = (async () => {
    let buf = "";
    for await (const chunk of child.stdout.pipeThrough(new TextDecoderStream())) {
      buf += chunk;
      let i;
      while ((i = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        if (line === "ready") ready = true;
        else if (line === "done") done = true;
        else {
          const m = line.match(/^ack (\d+) (\d+)$/);
          if (m) acked.set(`${m[1]}/${m[2]}`, { loop: Number(m[1]), seq: Number(m[2]) });
        }
      }
    }
    // a partial last line (no "\n") is ignored: it was never fully reported
  })();

  // wait for the writers to be up and acknowledged writes to flow
  const startDeadline = Date.now() + 15_000;
  while ((!ready || acked.size < WRITERS) && Date.now() < startDeadline) {
    if (childExited) break;
    await sleep(20);
  }
  assert.ok(ready && acked.size > 0, `writer did not start: acks=${acked.size}\n${stderrChunks.join("")}`);
  await sleep(LOAD_MS);
  assert.ok(!done, "writers finished before the kill; the kill must happen under load");
  const ackedAtKill = acked.size;

  if (signal === "SIGKILL") {
    const st = await server.kill("SIGKILL");
    assert.equal(st.signal, "SIGKILL", `server exit after SIGKILL: ${fmt(st)}`);
  } else {
    // graceful stop with writes in flight: exit code 0 within 10 s
    await server.stop(10_000);
  }
  // responses already on the wire may still resolve; then stop the writers
  await sleep(300);
  child.kill("SIGKILL");
  await childStatus;
  await withTimeout(reading, 5000, "writer output");
  assert.ok(ackedAtKill >= 100, `too little load before the kill (${ackedAtKill} acks); writer stderr:\n${stderrChunks.join("")}`);

  // restart on the same file
  const server2 = await ctx.server({ dbPath: server.dbPath });
  const kv = await ctx.open(server2);
  const entries = await listAll<ReturnType<typeof durValue>>(kv, { prefix: ["dur"] }, { batchSize: 500 });
  const present = new Map(entries.map((e) => [`${String(e.key[1])}/${String(e.key[2])}`, e]));
  const missing: string[] = [];
  for (const [id, { loop, seq }] of acked) {
    const e = present.get(id);
    if (!e) {
      missing.push(id);
      continue;
    }
    assert.deepStrictEqual(e.value, durValue(loop, seq), `value of acknowledged key ${id}`);
  }
  assert.deepStrictEqual(
    missing.slice(0, 20),
    [],
    `${missing.length} of ${acked.size} acknowledged writes lost after ${signal}`,
  );
  // every row that made it is intact (in-flight writes may or may not have landed)
  for (const e of entries) {
    assert.deepStrictEqual(e.value, durValue(e.key[1] as number, e.key[2] as number), `row ${fmt(e.key)}`);
  }
  // per loop, the surviving keys have no gaps below the last acknowledged one
  const maxAck = new Map<number, number>();
  for (const { loop, seq } of acked.values()) maxAck.set(loop, Math.max(maxAck.get(loop) ?? -1, seq));
  for (const [loop, max] of maxAck) {
    for (let s = 0; s <= max; s++) assert.ok(present.has(`${loop}/${s}`), `loop ${loop} seq ${s} missing`);
  }
  // the restarted server keeps going with newer versionstamps
  const newest = entries.map((e) => e.versionstamp).reduce((a, b) => (a > b ? a : b), "");
  const r = await kv.set(["after-restart"], 1);
  assert.ok(r.versionstamp > newest, "versionstamps continue after a crash");
  console.log(
    `durability (${signal}): ${acked.size} acknowledged (${ackedAtKill} at the signal), ${entries.length} present after restart`,
  );
}

e2eTest("durability: acknowledged writes survive SIGKILL mid-load", (ctx) => crashUnderLoad(ctx, "SIGKILL"), {
  serverOnly: true,
  timeoutMs: 30_000,
});

e2eTest("durability: SIGTERM mid-load exits 0 and keeps every acknowledged write", (ctx) => crashUnderLoad(ctx, "SIGTERM"), {
  serverOnly: true,
  timeoutMs: 30_000,
});
