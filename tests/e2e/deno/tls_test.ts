// Built-in TLS (--tls-cert, --tls-key): the Deno CLI opens `https://localhost:PORT` trusting a
// test CA given in DENO_CERT. Deno reads DENO_CERT when it starts, so the client runs in a
// child Deno process. Server only; the certificates are made with the `openssl` command.

import { assert, e2eTest, withTimeout } from "./server.ts";

const opts = { serverOnly: true, timeoutMs: 60_000 };

async function openssl(dir: string, args: string[]) {
  const out = await new Deno.Command("openssl", { args, cwd: dir, stdout: "null", stderr: "piped" })
    .output();
  assert.equal(out.code, 0, `openssl ${args.join(" ")}: ${new TextDecoder().decode(out.stderr)}`);
}

/** A test CA and a certificate for localhost it signs: the paths of ca.pem, cert.pem, key.pem. */
async function makePki(dir: string) {
  const ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-noenc"];
  await openssl(dir, [
    "req", "-x509", ...ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
    "-subj", "/CN=denokv e2e CA", "-addext", "basicConstraints=critical,CA:TRUE",
    "-addext", "keyUsage=critical,keyCertSign",
  ]);
  await Deno.writeTextFile(
    `${dir}/leaf.ext`,
    "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n" +
      "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
  );
  await openssl(dir, ["req", ...ec, "-keyout", "key.pem", "-out", "leaf.csr", "-subj", "/CN=localhost"]);
  await openssl(dir, [
    "x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
    "-days", "2", "-out", "cert.pem", "-extfile", "leaf.ext",
  ]);
  return { ca: `${dir}/ca.pem`, cert: `${dir}/cert.pem`, key: `${dir}/key.pem` };
}

// The child: `kv URL` sets, gets, lists and watches, then prints what it saw as JSON;
// `fetch URL` fetches the URL and prints the status.
const CLIENT = `
const [mode, url] = Deno.args;
if (mode === "fetch") {
  const res = await fetch(url);
  await res.body?.cancel();
  console.log(JSON.stringify({ status: res.status }));
  Deno.exit(0);
}
const kv = await Deno.openKv(url);
await kv.set(["tls", 1], "one");
await kv.set(["tls", 2], { two: 2n });
const got = (await kv.get(["tls", 1])).value;
const listed = [];
for await (const e of kv.list({ prefix: ["tls"] })) listed.push(e.key[1]);
const reader = kv.watch([["tls", "w"]]).getReader();
const initial = (await reader.read()).value[0].value;
await kv.set(["tls", "w"], "changed");
let watched = initial;
while (watched !== "changed") watched = (await reader.read()).value[0].value;
await reader.cancel();
kv.close();
console.log(JSON.stringify({ got, listed, initial, watched }));
`;

async function runClient(dir: string, env: Record<string, string>, args: string[]) {
  await Deno.writeTextFile(`${dir}/client.ts`, CLIENT);
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--unstable-kv", `${dir}/client.ts`, ...args],
    env: { DENO_NO_UPDATE_CHECK: "1", NO_COLOR: "1", ...env },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  try {
    const out = await withTimeout(child.output(), 30_000, `deno ${args.join(" ")}`);
    return {
      code: out.code,
      stdout: new TextDecoder().decode(out.stdout),
      stderr: new TextDecoder().decode(out.stderr),
    };
  } catch (e) {
    try {
      child.kill("SIGKILL");
    } catch { /* gone */ }
    throw e;
  }
}

e2eTest("tls: Deno.openKv(https://localhost) with DENO_CERT: set, get, list, watch", async (ctx) => {
  const dir = await ctx.tempDir("denokv-e2e-tls-");
  const pki = await makePki(dir);
  const server = await ctx.server({ extraArgs: ["--tls-cert", pki.cert, "--tls-key", pki.key] });
  assert.match(server.url, /^https:\/\//);
  const url = `https://localhost:${server.port}`;

  // Not trusting the test CA, the client refuses the server.
  const untrusted = await runClient(dir, {}, ["fetch", url]);
  assert.notEqual(untrusted.code, 0, untrusted.stdout);
  assert.match(untrusted.stderr, /certificate|UnknownIssuer/i);

  const trusted = await runClient(dir, { DENO_CERT: pki.ca, DENO_KV_ACCESS_TOKEN: server.token }, [
    "kv",
    url,
  ]);
  assert.equal(trusted.code, 0, `client failed:\n${trusted.stderr}\n${server.tail()}`);
  const seen = JSON.parse(trusted.stdout.trim().split("\n").pop()!);
  assert.deepEqual(seen, { got: "one", listed: [1, 2], initial: null, watched: "changed" });
  assert.match(server.logs(), /Listening on https:\/\//);
}, opts);
