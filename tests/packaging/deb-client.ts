// The client side of tests/packaging/deb-e2e.sh, run by the Deno CLI inside the container:
//   deno run -A --unstable-kv deb-client.ts write URL KEY VALUE   set, then read it back
//   deno run -A --unstable-kv deb-client.ts read URL KEY VALUE    the key holds VALUE
//   deno run -A deb-client.ts metrics URL MIN_WRITES              /metrics answers, with at
//                                                                 least MIN_WRITES commits
// The access token comes from DENO_KV_ACCESS_TOKEN, as for any Deno KV Connect client.
// Exits non-zero (with the reason on stderr) when a check fails.

const [mode, url, ...rest] = Deno.args;

function fail(msg: string): never {
  console.error(`deb-client: ${msg}`);
  Deno.exit(1);
}

async function withKv(fn: (kv: Deno.Kv) => Promise<void>) {
  const kv = await Deno.openKv(url);
  try {
    await fn(kv);
  } finally {
    kv.close();
  }
}

switch (mode) {
  case "write": {
    const [key, value] = rest;
    await withKv(async (kv) => {
      const res = await kv.set(["deb-e2e", key], { value, at: Date.now() });
      if (!res.ok) fail(`set ${key} was not ok`);
      const got = await kv.get<{ value: string }>(["deb-e2e", key]);
      if (got.value?.value !== value) fail(`read back ${JSON.stringify(got.value)}, want ${value}`);
      if (got.versionstamp !== res.versionstamp) {
        fail(`versionstamp ${got.versionstamp}, want ${res.versionstamp}`);
      }
      // An atomic sum too: a mutation that is not a plain set.
      await kv.atomic().sum(["deb-e2e", "count"], 1n).commit();
    });
    console.log(`deb-client: wrote ${key}=${value}`);
    break;
  }
  case "read": {
    const [key, value] = rest;
    await withKv(async (kv) => {
      const got = await kv.get<{ value: string }>(["deb-e2e", key]);
      if (got.value?.value !== value) fail(`${key} is ${JSON.stringify(got.value)}, want ${value}`);
      const count = await kv.get<Deno.KvU64>(["deb-e2e", "count"]);
      console.log(`deb-client: read ${key}=${value}; count=${count.value?.value}`);
    });
    break;
  }
  case "metrics": {
    const minWrites = Number(rest[0] ?? "0");
    const res = await fetch(url);
    const text = await res.text();
    if (res.status !== 200) fail(`GET ${url}: ${res.status}`);
    if (!/^denokv_build_info\{version="[^"]+"\} 1$/m.test(text)) fail("no denokv_build_info");
    const m = text.match(/^denokv_writes_committed_total (\d+)$/m);
    if (!m) fail("no denokv_writes_committed_total");
    if (Number(m[1]) < minWrites) fail(`denokv_writes_committed_total ${m[1]} < ${minWrites}`);
    console.log(`deb-client: ${url} answers; denokv_writes_committed_total ${m[1]}`);
    break;
  }
  default:
    fail(`unknown mode ${mode}`);
}
