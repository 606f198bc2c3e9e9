// Child process of durability_test.ts (not a test file itself).
//
// Runs WRITERS concurrent writer loops against URL (env DENO_KV_ACCESS_TOKEN),
// spread over CLIENTS Deno.openKv handles. Each loop writes unique keys
// ["dur", loop, seq] with a value derived from (loop, seq), and prints
// "ack <loop> <seq>" to stdout only after the commit resolved ok. Runs until
// killed, or DURATION_MS elapses (then prints "done").
//
// usage: deno run -A --unstable-kv durability_writer.ts URL WRITERS CLIENTS DURATION_MS

const [url, writersArg, clientsArg, durationArg] = Deno.args;
const WRITERS = Number(writersArg ?? 32);
const CLIENTS = Number(clientsArg ?? 4);
const DURATION_MS = Number(durationArg ?? 10_000);

export function durValue(loop: number, seq: number) {
  return { loop, seq, pad: `${loop}:${seq}:`.padEnd(64, "x") };
}

if (import.meta.main) {
  const kvs = await Promise.all(Array.from({ length: CLIENTS }, () => Deno.openKv(url)));
  const enc = new TextEncoder();
  const out = Deno.stdout;
  // write each line with one write call so lines are never interleaved
  const emit = async (line: string) => {
    const b = enc.encode(line + "\n");
    let off = 0;
    while (off < b.length) off += await out.write(b.subarray(off));
  };
  await emit("ready");
  const deadline = Date.now() + DURATION_MS;
  await Promise.all(Array.from({ length: WRITERS }, async (_, loop) => {
    const kv = kvs[loop % CLIENTS];
    for (let seq = 0; Date.now() < deadline; seq++) {
      const r = loop % 4 === 0
        // some loops use atomics with a check, to mix write shapes
        ? await kv.atomic()
          .check({ key: ["dur", loop, seq], versionstamp: null })
          .set(["dur", loop, seq], durValue(loop, seq))
          .commit()
        : await kv.set(["dur", loop, seq], durValue(loop, seq));
      if (!r.ok) throw new Error(`unexpected check failure at ${loop}/${seq}`);
      await emit(`ack ${loop} ${seq}`);
    }
  }));
  await emit("done");
  for (const kv of kvs) kv.close();
}
