// Helpers for the Node end-to-end suite (npm client `@deno/kv`).
//
// Environment:
//   DENOKV_BIN          denokv binary (default: cargo debug build)
//   E2E_NODE_MODULES    node_modules dir holding @deno/kv (run.sh sets it);
//                       otherwise normal resolution from this directory.

import { spawn } from "node:child_process";
import { createRequire } from "node:module";
import { appendFileSync, existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { pathToFileURL } from "node:url";
import { randomBytes } from "node:crypto";

export function serverBinary() {
  if (process.env.DENOKV_BIN) return process.env.DENOKV_BIN;
  const target = process.env.CARGO_TARGET_DIR ?? join(process.env.HOME ?? "/root", ".cache/denokv/target");
  return join(target, "debug/denokv");
}

let kvModule;
/** The @deno/kv ESM entry point. */
export async function denoKv() {
  if (kvModule) return kvModule;
  const nm = process.env.E2E_NODE_MODULES;
  if (nm) {
    const pkgDir = join(nm, "@deno/kv");
    const pkg = JSON.parse(readFileSync(join(pkgDir, "package.json"), "utf8"));
    const entry = pkg.exports?.["."]?.import ?? pkg.module ?? pkg.main;
    kvModule = await import(pathToFileURL(join(pkgDir, entry)).href);
  } else {
    const require = createRequire(import.meta.url);
    kvModule = await import(pathToFileURL(require.resolve("@deno/kv")).href);
  }
  return kvModule;
}

export function withTimeout(p, ms, what) {
  let t;
  return Promise.race([
    p,
    new Promise((_, reject) => {
      t = setTimeout(() => reject(new Error(`timeout after ${ms} ms: ${what}`)), ms);
    }),
  ]).finally(() => clearTimeout(t));
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Start denokv on a temp DB; resolves once "Listening on http://…" is logged. */
export async function startServer({ dbPath, token } = {}) {
  const bin = serverBinary();
  if (!existsSync(bin)) throw new Error(`denokv binary not found at ${bin}; set DENOKV_BIN`);
  dbPath ??= join(mkdtempSync(join(tmpdir(), "denokv-e2e-node-")), "db.sqlite");
  token ??= "e2e-" + randomBytes(16).toString("hex");
  const env = { ...process.env };
  for (const k of Object.keys(env)) if (k.startsWith("DENO_KV_")) delete env[k];
  env.RUST_LOG ??= "info";
  const child = spawn(bin, ["--sqlite-path", dbPath, "serve", "--access-token", token, "--addr", "127.0.0.1:0"], {
    stdio: ["ignore", "pipe", "pipe"],
    env,
  });
  liveServers.add(child);
  if (process.env.E2E_PID_FILE) {
    try {
      appendFileSync(process.env.E2E_PID_FILE, `${child.pid}\n`);
    } catch { /* best effort */ }
  }
  child.on("exit", () => liveServers.delete(child));
  const log = [];
  let exit = null;
  const exited = new Promise((resolve) => child.on("exit", (code, signal) => resolve((exit = { code, signal }))));
  const url = await withTimeout(
    new Promise((resolve, reject) => {
      let buf = "";
      const onData = (d) => {
        buf += d.toString();
        let i;
        while ((i = buf.indexOf("\n")) >= 0) {
          // deno-lint-ignore no-control-regex
          const line = buf.slice(0, i).replace(/\x1b\[[0-9;]*m/g, "");
          buf = buf.slice(i + 1);
          log.push(line);
          if (log.length > 5000) log.shift();
          const m = line.match(/Listening on (http:\/\/\S+)/);
          if (m) resolve(m[1].replace(/\/$/, ""));
        }
      };
      child.stderr.on("data", onData);
      child.stdout.on("data", onData);
      exited.then(({ code, signal }) =>
        reject(new Error(`denokv exited (code ${code}, signal ${signal}) before listening:\n${log.join("\n")}`))
      );
    }),
    15_000,
    "denokv to listen",
  ).catch((e) => {
    child.kill("SIGKILL");
    throw e;
  });
  let stopped = false;
  return {
    url,
    token,
    dbPath,
    pid: child.pid,
    logs: () => log.join("\n"),
    /** SIGTERM, wait (≤ 10 s), require exit code 0. */
    async stop() {
      if (stopped) return;
      stopped = true;
      if (exit === null) child.kill("SIGTERM");
      let st;
      try {
        st = await withTimeout(exited, 10_000, "denokv exit after SIGTERM");
      } catch (e) {
        child.kill("SIGKILL");
        await exited;
        throw new Error(`${e.message}\n${log.slice(-40).join("\n")}`);
      }
      if (st.code !== 0) {
        throw new Error(`denokv exited with ${JSON.stringify(st)} after SIGTERM (expected code 0)\n${log.slice(-40).join("\n")}`);
      }
      if (/panicked at/.test(log.join("\n"))) throw new Error(`denokv logged a panic:\n${log.slice(-60).join("\n")}`);
    },
  };
}

/**
 * Run `fn(ctx)` with a fresh server; ctx.open() opens @deno/kv clients.
 * Everything is closed/stopped afterwards, also on failure.
 */
const liveServers = new Set();
// last resort: never leave a server behind, even if a test hangs
process.on("exit", () => {
  for (const child of liveServers) {
    try {
      child.kill("SIGKILL");
    } catch { /* gone */ }
  }
});

export async function withServer(fn, { timeoutMs = 25_000 } = {}) {
  const { openKv } = await denoKv();
  const server = await startServer();
  const kvs = [];
  const cleanups = [];
  const ctx = {
    server,
    async open(opts = {}) {
      const kv = await withTimeout(openKv(server.url, { accessToken: server.token, ...opts }), 15_000, "openKv");
      kvs.push(kv);
      return kv;
    },
    defer(f) {
      cleanups.push(f);
    },
  };
  let failure = null;
  try {
    // below node:test's 30 s timeout, so the cleanup below always runs
    await withTimeout(fn(ctx), timeoutMs, "test body");
  } catch (e) {
    failure = e;
  }
  for (const f of cleanups.reverse()) {
    try {
      await f();
    } catch { /* ignore */ }
  }
  for (const kv of kvs) {
    try {
      kv.close();
    } catch { /* closed */ }
  }
  let stopError = null;
  try {
    await server.stop();
  } catch (e) {
    stopError = e;
  }
  if (failure) {
    if (stopError) console.error(String(stopError));
    console.error(server.logs().split("\n").slice(-30).join("\n"));
    throw failure;
  }
  if (stopError) throw stopError;
  rmSync(dirname(server.dbPath), { recursive: true, force: true });
}

export async function listAll(kv, selector, options) {
  const out = [];
  for await (const e of kv.list(selector, options)) out.push(e);
  return out;
}

/** Assert that `fn` rejects with a message containing `text`. */
export async function rejectsWith(assert, fn, text, what = "operation") {
  let err;
  try {
    await fn();
  } catch (e) {
    err = e;
  }
  assert.ok(err, `${what}: expected an error containing ${JSON.stringify(String(text))}, but it succeeded`);
  const msg = String(err?.message ?? err);
  const ok = text instanceof RegExp ? text.test(msg) : msg.includes(text);
  assert.ok(ok, `${what}: expected an error containing ${JSON.stringify(String(text))}, got: ${msg}`);
  return err;
}

/** Read the next watch frame within ms. */
export async function nextFrame(reader, ms, what) {
  const r = await withTimeout(reader.read(), ms, what);
  if (r.done) throw new Error(`watch stream ended while waiting for ${what}`);
  return r.value;
}

export async function waitForFrame(reader, pred, ms, what) {
  const deadline = Date.now() + ms;
  const seen = [];
  while (true) {
    const left = deadline - Date.now();
    if (left <= 0) throw new Error(`timeout waiting for ${what}; frames: ${JSON.stringify(seen, replacer)}`);
    const f = await nextFrame(reader, left, what).catch((e) => {
      throw new Error(`${e.message}; frames: ${JSON.stringify(seen, replacer)}`);
    });
    seen.push(f);
    if (pred(f)) return f;
  }
}

function replacer(_k, v) {
  return typeof v === "bigint" ? `${v}n` : v;
}
