// Shared helpers for the Deno end-to-end suite.
//
// Every test goes through `e2eTest`, which gives it a `TestCtx`. Servers and
// KV handles opened through the context are closed/stopped when the test ends
// (also when it fails or times out), so no test leaks a server process.
//
// Environment:
//   DENOKV_BIN   path of the denokv binary (default: the cargo debug build)
//   E2E_TARGET   "server" (default): tests talk to a real denokv over http://
//                "local": tests that can run against Deno's own local KV
//                (a temp SQLite file) do so; server-only tests are skipped.
//                Used to validate test logic without a server binary.
//   E2E_KEEP_LOGS=1  print every server's stderr when it stops.

import assert from "node:assert/strict";

export { assert };

export type Target = "server" | "local";
export const TARGET: Target = (Deno.env.get("E2E_TARGET") ?? "server") === "local"
  ? "local"
  : "server";
export const IS_SERVER = TARGET === "server";

/** Maximum run time of one test unless it says otherwise. */
export const DEFAULT_TEST_TIMEOUT_MS = 30_000;

export function serverBinary(): string {
  const explicit = Deno.env.get("DENOKV_BIN");
  if (explicit) return explicit;
  const target = Deno.env.get("CARGO_TARGET_DIR") ??
    `${Deno.env.get("HOME")}/.cache/denokv/target`;
  return `${target}/debug/denokv`;
}

export function randomToken(): string {
  const b = crypto.getRandomValues(new Uint8Array(16));
  return "e2e-" + [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Rejects with `message` if `p` has not settled within `ms`. */
export async function withTimeout<T>(p: Promise<T>, ms: number, message: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timeout after ${ms} ms: ${message}`)), ms);
  });
  try {
    return await Promise.race([p, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

// ---------------------------------------------------------------------------
// Server process
// ---------------------------------------------------------------------------

export interface ServerOptions {
  /** SQLite file to serve; a fresh temp file if omitted. */
  dbPath?: string;
  token?: string;
  /** Serve with `--access-token-file tokenFile` instead of `--access-token token`. */
  tokenFile?: string;
  /** Address to bind; default 127.0.0.1:0 (port parsed from the log). */
  addr?: string;
  extraArgs?: string[];
  readyTimeoutMs?: number;
  /** Another server binary with the same command line (the upstream denokv); default ours. */
  bin?: string;
}

export class ServerProcess {
  readonly url: string;
  readonly port: number;
  readonly token: string;
  readonly dbPath: string;
  readonly #child: Deno.ChildProcess;
  readonly #log: string[];
  #status: Promise<Deno.CommandStatus>;
  #exited: Deno.CommandStatus | null = null;
  #stopped = false;

  constructor(
    child: Deno.ChildProcess,
    log: string[],
    url: string,
    port: number,
    token: string,
    dbPath: string,
  ) {
    this.#child = child;
    this.#log = log;
    this.url = url;
    this.port = port;
    this.token = token;
    this.dbPath = dbPath;
    this.#status = child.status.then((s) => (this.#exited = s));
  }

  get pid(): number {
    return this.#child.pid;
  }

  get exited(): Deno.CommandStatus | null {
    return this.#exited;
  }

  logs(): string {
    return this.#log.join("\n");
  }

  /** SIGTERM, wait for exit (≤ timeoutMs), require exit code 0. Idempotent. */
  async stop(timeoutMs = 10_000): Promise<void> {
    if (this.#stopped) return;
    this.#stopped = true;
    if (this.#exited === null) {
      try {
        this.#child.kill("SIGTERM");
      } catch { /* already gone */ }
    }
    let status: Deno.CommandStatus;
    try {
      status = await withTimeout(this.#status, timeoutMs, "server exit after SIGTERM");
    } catch (e) {
      try {
        this.#child.kill("SIGKILL");
      } catch { /* ignore */ }
      await this.#status;
      throw new Error(
        `denokv (pid ${this.pid}) did not exit within ${timeoutMs} ms of SIGTERM; killed. ${e}\n` +
          this.tail(),
      );
    }
    if (Deno.env.get("E2E_KEEP_LOGS") === "1") console.error(this.logs());
    if (!status.success || status.code !== 0) {
      throw new Error(
        `denokv exited with code ${status.code} signal ${status.signal} after SIGTERM (expected 0)\n` +
          this.tail(),
      );
    }
  }

  /** Send a signal without waiting (e.g. SIGKILL for crash tests). Returns the exit status. */
  async kill(signal: Deno.Signal = "SIGKILL"): Promise<Deno.CommandStatus> {
    this.#stopped = true;
    if (this.#exited === null) {
      try {
        this.#child.kill(signal);
      } catch { /* already gone */ }
    }
    return await withTimeout(this.#status, 10_000, `server exit after ${signal}`);
  }

  tail(lines = 60): string {
    const l = this.#log.slice(-lines);
    return `--- last ${l.length} lines of denokv output (pid ${this.pid}) ---\n${l.join("\n")}\n---`;
  }
}

const MAX_LOG_LINES = 5000;

/** run.sh passes E2E_PID_FILE so it can kill servers a crashed test runner left. */
function recordPid(pid: number) {
  const f = Deno.env.get("E2E_PID_FILE");
  if (!f) return;
  try {
    Deno.writeTextFileSync(f, `${pid}\n`, { append: true });
  } catch { /* best effort */ }
}

async function drainLines(
  stream: ReadableStream<Uint8Array>,
  onLine: (line: string) => void,
): Promise<void> {
  let buf = "";
  try {
    for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
      buf += chunk;
      let i;
      while ((i = buf.indexOf("\n")) >= 0) {
        onLine(buf.slice(0, i));
        buf = buf.slice(i + 1);
      }
    }
  } catch { /* process gone */ }
  if (buf.length) onLine(buf);
}

// Strip ANSI colour codes (tracing may colour its output).
// deno-lint-ignore no-control-regex
const ANSI = /\x1b\[[0-9;]*m/g;

/**
 * The environment for a server process: ours minus DENO_KV_* (tests set
 * DENO_KV_ACCESS_TOKEN for the client, and the server would read it too).
 */
export function serverEnv(): Record<string, string> {
  const env = Deno.env.toObject();
  for (const k of Object.keys(env)) if (k.startsWith("DENO_KV_")) delete env[k];
  return env;
}

/** Start the real denokv binary. Always a real server, whatever TARGET says. */
export async function startServer(opts: ServerOptions = {}): Promise<ServerProcess> {
  const bin = opts.bin ?? serverBinary();
  try {
    const st = await Deno.stat(bin);
    if (!st.isFile) throw new Error("not a file");
  } catch {
    throw new Error(
      `denokv binary not found at ${bin}; build it (cargo build -p denokv) or set DENOKV_BIN`,
    );
  }
  let dbPath = opts.dbPath;
  if (!dbPath) {
    const dir = await Deno.makeTempDir({ prefix: "denokv-e2e-" });
    dbPath = `${dir}/db.sqlite`;
  }
  const token = opts.token ?? randomToken();
  const args = [
    "--sqlite-path",
    dbPath,
    "serve",
    ...(opts.tokenFile ? ["--access-token-file", opts.tokenFile] : ["--access-token", token]),
    "--addr",
    opts.addr ?? "127.0.0.1:0",
    ...(opts.extraArgs ?? []),
  ];
  const env = serverEnv();
  if (!env.RUST_LOG) env.RUST_LOG = "info";
  const child = new Deno.Command(bin, {
    args,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    clearEnv: true,
    env,
  }).spawn();
  recordPid(child.pid);
  const log: string[] = [];
  let resolveReady: (url: string) => void;
  const ready = new Promise<string>((r) => (resolveReady = r));
  const onLine = (raw: string) => {
    const line = raw.replace(ANSI, "");
    log.push(line);
    if (log.length > MAX_LOG_LINES) log.splice(0, log.length - MAX_LOG_LINES);
    const m = line.match(/Listening on (https?:\/\/[^\s]+)/);
    if (m) resolveReady(m[1].replace(/\/$/, ""));
  };
  drainLines(child.stdout, onLine);
  drainLines(child.stderr, onLine);
  const exited = child.status.then((s) => {
    throw new Error(
      `denokv exited (code ${s.code}, signal ${s.signal}) before it was listening:\n${log.join("\n")}`,
    );
  });
  let url: string;
  try {
    url = await withTimeout(
      Promise.race([ready, exited]),
      opts.readyTimeoutMs ?? 15_000,
      `waiting for "Listening on http://" from ${bin} ${args.join(" ")}`,
    );
  } catch (e) {
    try {
      child.kill("SIGKILL");
    } catch { /* ignore */ }
    await child.status.catch(() => {});
    throw new Error(`${e instanceof Error ? e.message : e}\n${log.join("\n")}`);
  }
  exited.catch(() => {}); // the process may legitimately exit later (stop/kill)
  const port = Number(new URL(url).port);
  return new ServerProcess(child, log, url, port, token, dbPath);
}

/** Open a Deno KV client to a running server. */
export async function openRemoteKv(server: { url: string; token: string }): Promise<Deno.Kv> {
  Deno.env.set("DENO_KV_ACCESS_TOKEN", server.token);
  return await withTimeout(Deno.openKv(server.url), 15_000, `Deno.openKv(${server.url})`);
}

// ---------------------------------------------------------------------------
// Test context
// ---------------------------------------------------------------------------

/** What a test talks to: a real server, or (E2E_TARGET=local) a local KV file. */
export interface KvTarget {
  kind: Target;
  /** URL (server) or file path (local) given to Deno.openKv. */
  url: string;
  token: string;
  dbPath: string;
  server: ServerProcess | null;
}

export class TestCtx {
  readonly #kvs: Deno.Kv[] = [];
  readonly #servers: ServerProcess[] = [];
  readonly #cleanups: (() => unknown)[] = [];
  readonly #dirs: string[] = [];

  /** A temp directory, removed at test end if the test passed (kept for debugging otherwise). */
  async tempDir(prefix = "denokv-e2e-"): Promise<string> {
    const dir = await Deno.makeTempDir({ prefix });
    this.#dirs.push(dir);
    return dir;
  }

  /** A fresh target: a server on a new temp DB, or a local temp file. */
  async target(opts: ServerOptions = {}): Promise<KvTarget> {
    if (IS_SERVER) {
      const server = await this.server(opts);
      return { kind: "server", url: server.url, token: server.token, dbPath: server.dbPath, server };
    }
    const dbPath = opts.dbPath ?? `${await this.tempDir("denokv-e2e-local-")}/db.sqlite`;
    return { kind: "local", url: dbPath, token: "", dbPath, server: null };
  }

  /** A real server (whatever TARGET is), stopped with SIGTERM at test end. */
  async server(opts: ServerOptions = {}): Promise<ServerProcess> {
    if (!opts.dbPath) opts = { ...opts, dbPath: `${await this.tempDir()}/db.sqlite` };
    const s = await startServer(opts);
    this.#servers.push(s);
    return s;
  }

  /** A KV handle on the target, closed at test end. */
  async open(t: KvTarget | ServerProcess | string): Promise<Deno.Kv> {
    let kv: Deno.Kv;
    if (typeof t === "string") {
      kv = await Deno.openKv(t);
    } else if (t instanceof ServerProcess) {
      kv = await openRemoteKv(t);
    } else if (t.kind === "server") {
      kv = await openRemoteKv(t);
    } else {
      kv = await Deno.openKv(t.url);
    }
    this.#kvs.push(kv);
    return kv;
  }

  /** Close a KV handle now (idempotent with the end-of-test close). */
  close(kv: Deno.Kv) {
    const i = this.#kvs.indexOf(kv);
    if (i >= 0) this.#kvs.splice(i, 1);
    try {
      kv.close();
    } catch { /* already closed */ }
  }

  defer(fn: () => unknown) {
    this.#cleanups.push(fn);
  }

  /** Runs at test end. Returns the errors met (server exit problems, panics). */
  async cleanup(testFailed: boolean): Promise<Error[]> {
    const errors: Error[] = [];
    for (const fn of this.#cleanups.reverse()) {
      try {
        await fn();
      } catch (e) {
        errors.push(e instanceof Error ? e : new Error(String(e)));
      }
    }
    for (const kv of this.#kvs) {
      try {
        kv.close();
      } catch { /* already closed */ }
    }
    this.#kvs.length = 0;
    for (const s of this.#servers) {
      try {
        await s.stop();
      } catch (e) {
        errors.push(e instanceof Error ? e : new Error(String(e)));
      }
      const logs = s.logs();
      if (/panicked at/.test(logs)) {
        errors.push(new Error(`denokv logged a panic:\n${s.tail(80)}`));
      } else if (testFailed) {
        console.error(s.tail(40));
      }
    }
    this.#servers.length = 0;
    if (!testFailed && errors.length === 0) {
      for (const d of this.#dirs) await Deno.remove(d, { recursive: true }).catch(() => {});
    } else if (this.#dirs.length) {
      console.error(`kept temp dirs: ${this.#dirs.join(" ")}`);
    }
    this.#dirs.length = 0;
    return errors;
  }
}

export interface E2eOptions {
  timeoutMs?: number;
  /** Skip unless E2E_TARGET=server (the test needs the real binary). */
  serverOnly?: boolean;
  ignore?: boolean;
}

/** Deno.test wrapper: per-test timeout and guaranteed cleanup. */
export function e2eTest(
  name: string,
  fn: (ctx: TestCtx) => Promise<void>,
  opts: E2eOptions = {},
) {
  const timeoutMs = opts.timeoutMs ?? DEFAULT_TEST_TIMEOUT_MS;
  Deno.test({
    name,
    ignore: opts.ignore || (opts.serverOnly === true && !IS_SERVER),
    // Remote KV keeps background tasks (metadata refresh, HTTP/2 connections).
    sanitizeOps: false,
    sanitizeResources: false,
    fn: async () => {
      const ctx = new TestCtx();
      let failure: unknown = null;
      try {
        await withTimeout(fn(ctx), timeoutMs, `test "${name}"`);
      } catch (e) {
        failure = e;
      }
      const errors = await ctx.cleanup(failure !== null);
      if (failure !== null) {
        if (errors.length) console.error("cleanup errors:", errors.map(String).join("\n"));
        throw failure;
      }
      if (errors.length === 1) throw errors[0];
      if (errors.length > 1) throw new AggregateError(errors, errors.map(String).join("\n"));
    },
  });
}

// ---------------------------------------------------------------------------
// Assertions and small utilities
// ---------------------------------------------------------------------------

/** Expect `fn` to throw/reject with an error whose message contains `text`. */
export async function assertRejects(
  fn: () => unknown,
  text: string | RegExp,
  what = "operation",
): Promise<Error> {
  let threw = false;
  let err: unknown;
  try {
    await fn();
  } catch (e) {
    threw = true;
    err = e;
  }
  if (!threw) throw new assert.AssertionError({ message: `${what}: expected an error matching ${text}, but it succeeded` });
  const msg = err instanceof Error ? `${err.name}: ${err.message}` : String(err);
  const ok = typeof text === "string" ? msg.includes(text) : text.test(msg);
  if (!ok) {
    throw new assert.AssertionError({
      message: `${what}: expected an error matching ${JSON.stringify(String(text))}, got: ${msg}`,
    });
  }
  return err as Error;
}

export const VERSIONSTAMP_RE = /^[0-9a-f]{20}$/;

export function assertVersionstamp(vs: unknown, what = "versionstamp"): asserts vs is string {
  assert.ok(typeof vs === "string" && VERSIONSTAMP_RE.test(vs), `${what} is not 20 lowercase hex chars: ${vs}`);
}

export async function listAll<T = unknown>(
  kv: Deno.Kv,
  selector: Deno.KvListSelector,
  options?: Deno.KvListOptions,
): Promise<Deno.KvEntry<T>[]> {
  const out: Deno.KvEntry<T>[] = [];
  for await (const e of kv.list<T>(selector, options)) out.push(e);
  return out;
}

/** Read the next watch frame within `ms`. */
export async function nextFrame<T>(
  reader: ReadableStreamDefaultReader<T>,
  ms: number,
  what: string,
): Promise<T> {
  const r = await withTimeout(reader.read(), ms, what);
  if (r.done) throw new Error(`watch stream ended while waiting for ${what}`);
  return r.value;
}

/** Read frames until `pred` holds (≤ ms overall); returns the matching frame. */
export async function waitForFrame<T>(
  reader: ReadableStreamDefaultReader<T>,
  pred: (frame: T) => boolean,
  ms: number,
  what: string,
): Promise<T> {
  const deadline = Date.now() + ms;
  const seen: T[] = [];
  while (true) {
    const left = deadline - Date.now();
    if (left <= 0) {
      throw new Error(`timeout after ${ms} ms waiting for ${what}; frames seen: ${fmt(seen)}`);
    }
    let frame: T;
    try {
      frame = await nextFrame(reader, left, what);
    } catch (e) {
      throw new Error(`${e instanceof Error ? e.message : e}; frames seen: ${fmt(seen)}`);
    }
    seen.push(frame);
    if (pred(frame)) return frame;
  }
}

export function fmt(v: unknown): string {
  return Deno.inspect(v, { depth: 6, colors: false, compact: true, breakLength: Infinity });
}

/** Message of an error, with the Deno KV Connect wrapper text if any. */
export function errText(e: unknown): string {
  return e instanceof Error ? `${e.name}: ${e.message}` : String(e);
}
