// Cross-client interop through one server: values written by @deno/kv (Node,
// HTTP/1.1, Node's V8 serializer) are read by the Deno CLI (h2c), and back.
// Needs the Deno CLI: $E2E_DENO (run.sh sets it) or `deno` on PATH.

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import v8 from "node:v8";
import { denoKv, withServer, withTimeout } from "./helpers.mjs";
import { canon, sampleValues } from "./interop_canon.mjs";

function findDeno() {
  const c = process.env.E2E_DENO || "deno";
  const r = spawnSync(c, ["--version"], { stdio: "ignore" });
  return r.status === 0 ? c : null;
}
const DENO = findDeno();
const canonUrl = new URL("./interop_canon.mjs", import.meta.url).href;

const denoScript = `
import { canon, sampleValues } from ${JSON.stringify(canonUrl)};
const kv = await Deno.openKv(Deno.args[0]);
const got = [];
for await (const e of kv.list({ prefix: ["from-node"] })) got.push([e.key[1], canon(e.value), e.versionstamp]);
const op = kv.atomic();
for (const [name, v] of sampleValues()) op.set(["from-deno", name], v);
op.set(["from-deno", "u64"], new Deno.KvU64(7n));
const r = await op.commit();
console.log(JSON.stringify({ got, versionstamp: r.versionstamp }));
kv.close();
`;

function runDeno(url, token) {
  return withTimeout(
    new Promise((resolve, reject) => {
      const child = spawn(DENO, ["eval", "--unstable-kv", "--ext=js", denoScript, url], {
        env: { ...process.env, DENO_KV_ACCESS_TOKEN: token, NO_COLOR: "1" },
        stdio: ["ignore", "pipe", "pipe"],
      });
      let out = "";
      let err = "";
      child.stdout.on("data", (d) => (out += d));
      child.stderr.on("data", (d) => (err += d));
      child.on("error", reject);
      child.on("exit", (code) => {
        if (code !== 0) reject(new Error(`deno exited ${code}: ${err}`));
        else resolve(JSON.parse(out.trim().split("\n").pop()));
      });
    }),
    20_000,
    "deno child",
  );
}

test("interop: @deno/kv (Node) and the Deno CLI read each other's values", { timeout: 30_000, skip: DENO ? false : "Deno CLI not found (set E2E_DENO)" }, () =>
  withServer(async ({ server, open }) => {
    const { KvU64 } = await denoKv();
    const kv = await open();
    const stamps = {};
    for (const [name, v] of sampleValues()) stamps[name] = (await kv.set(["from-node", name], v)).versionstamp;
    stamps.u64 = (await kv.set(["from-node", "u64"], new KvU64(7n))).versionstamp;

    const res = await runDeno(server.url, server.token);
    const want = new Map([...sampleValues(), ["u64", { value: 7n, constructor: { name: "KvU64" } }]].map(([n, v]) => [n, canon(v)]));
    assert.equal(res.got.length, want.size, "Deno sees every key written by Node");
    for (const [name, c, vs] of res.got) {
      assert.deepStrictEqual(c, want.get(name), `Deno's view of ${name} written by Node`);
      assert.equal(vs, stamps[name], `versionstamp of ${name}`);
    }
    // Deno 2.9 writes V8 serialization format version 16 (ff 10 …), which the V8
    // in Node 20 cannot read ("unsupported version"); compare what Node can decode
    // and check the rest arrives byte-intact as a V8 value.
    const tolerant = await open({
      encodeV8: v8.serialize,
      decodeV8: (bytes) => {
        try {
          return { decoded: v8.deserialize(bytes) };
        } catch (e) {
          return { undecodable: new Uint8Array(bytes), error: String(e) };
        }
      },
    });
    let undecodable = 0;
    for (const [name, v] of [...sampleValues(), ["u64", new KvU64(7n)]]) {
      const e = await tolerant.get(["from-deno", name]);
      assert.equal(e.versionstamp, res.versionstamp, `versionstamp of ${name} written by Deno`);
      if (v instanceof Uint8Array || v instanceof KvU64) {
        assert.deepStrictEqual(canon(e.value), canon(v), `Node's view of ${name} written by Deno`);
      } else if (e.value.undecodable) {
        undecodable++;
        assert.equal(e.value.undecodable[0], 0xff, `${name}: V8 header`);
        assert.match(e.value.error, /version/, `${name}: ${e.value.error}`);
      } else {
        assert.deepStrictEqual(canon(e.value.decoded), canon(v), `Node's view of ${name} written by Deno`);
      }
    }
    if (undecodable) console.log(`interop: ${undecodable} V8 values from Deno not decodable by Node ${process.version} (V8 ${process.versions.v8})`);
  }));

