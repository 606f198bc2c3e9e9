// Load generator with the real Deno KV client (`Deno.openKv`), for loadtest/perf-report.py.
//
// Runs PROCESSES Deno subprocesses, each with its own Deno.openKv (so its own connection,
// as each app server process has one), each keeping CONCURRENCY operations in flight
// (closed loop: an operation starts when the previous one of its loop has finished), on a
// preloaded key set of KEYS keys ["kvload", i] with 100-byte values, for a warm-up and then a
// measured window. Prints one JSON report (and writes it to --json): ops/s and latency
// percentiles per operation, errors by message, failed checks apart from errors.
//
//   deno run -A --unstable-kv loadtest/deno/kvload.ts --url http://127.0.0.1:4512 \
//     --token TOKEN --processes 4 --concurrency 32 --mix app --duration 5 --warmup 1 \
//     --keys 10000 --preload [--server-pid PID] [--json out.json]
//
// Operations (--mix NAME or --mix get=80,set=15,cas=5, weights in percent):
//   get  kv.get(key) of a random preloaded key; a missing or wrong value is an error
//   set  kv.set(key, value) of a random key
//   cas  kv.get(key), then kv.atomic().check({ key, versionstamp }).set(key, value).commit():
//        two requests, timed together; a commit answered { ok: false } (another writer got
//        there first) is counted in check_failed, not as an error and not in ops
// Named mixes: reads (get=100), rw (get=80,set=20), app (get=80,set=15,cas=5), writes (set=100).
//
// Counting: `ops` and the latencies are the operations that completed successfully inside
// the measured window; `error_total` counts every operation that threw or returned something
// wrong at any time (warm-up and the drain after the window included), by message in
// `errors`, and every operation still unanswered 10 s after the window (the Deno client
// retries a request whose connection broke, so a dead server shows up that way). A process
// that fails or does not report counts as an error too. Latency
// percentiles come from log-spaced buckets 1% wide (p50/p90/p99 are the bucket's upper
// bound, at most the exact max). CPU: the server's (with --server-pid) and the client
// processes' user+system time over the measured window, per 1,000 ops.
//
// Exit status: 0 no errors, 1 errors were counted, 2 the load could not be run.

const VALUE_SIZE = 100;
const DRAIN_S = 10; // how long a process waits for its operations in flight after the window
const MIXES: Record<string, Record<string, number>> = {
  reads: { get: 100 },
  rw: { get: 80, set: 20 },
  app: { get: 80, set: 15, cas: 5 },
  writes: { set: 100 },
};
const OPS = ["get", "set", "cas"] as const;
type Op = typeof OPS[number];

// ---- arguments ------------------------------------------------------------------------------

interface Args {
  url: string;
  token?: string;
  processes: number;
  concurrency: number;
  duration: number; // seconds
  warmup: number; // seconds
  keys: number;
  mix: Record<string, number>;
  mixName: string;
  preload: boolean;
  serverPid?: number;
  json?: string;
  child: boolean;
  seed: number;
}

function usage(msg: string | null): never {
  if (msg) console.error(`kvload: ${msg}`);
  (msg ? console.error : console.log)(
    "usage: kvload.ts --url URL [--token T] [--processes N] [--concurrency C] " +
      "[--duration S] [--warmup S] [--keys K] [--mix reads|rw|app|writes|get=80,set=15,cas=5] " +
      "[--preload] [--server-pid PID] [--json FILE]\n" +
      "(the token can come from $DENO_KV_ACCESS_TOKEN; the comment at the top of " +
      "loadtest/deno/kvload.ts says what is measured and how)",
  );
  Deno.exit(msg ? 2 : 0);
}

function parseMix(s: string): Record<string, number> {
  if (MIXES[s]) return MIXES[s];
  const mix: Record<string, number> = {};
  for (const part of s.split(",")) {
    const [op, w] = part.split("=");
    if (!(OPS as readonly string[]).includes(op) || !(Number(w) >= 0)) {
      usage(`bad --mix part "${part}" (ops: ${OPS.join(", ")})`);
    }
    mix[op] = Number(w);
  }
  if (Object.values(mix).reduce((a, b) => a + b, 0) <= 0) usage("--mix has no weight");
  return mix;
}

function parseArgs(argv: string[]): Args {
  const a: Args = {
    url: "",
    processes: 1,
    concurrency: 64,
    duration: 5,
    warmup: 1,
    keys: 10_000,
    mix: MIXES.reads,
    mixName: "reads",
    preload: false,
    child: false,
    seed: 0,
  };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i];
    const v = () => {
      if (i + 1 >= argv.length) usage(`${k} needs a value`);
      return argv[++i];
    };
    const num = () => {
      const n = Number(v());
      if (!Number.isFinite(n) || n < 0) usage(`${k} needs a number`);
      return n;
    };
    switch (k) {
      case "--url":
        a.url = v();
        break;
      case "--token":
        a.token = v();
        break;
      case "--processes":
        a.processes = num();
        break;
      case "--concurrency":
        a.concurrency = num();
        break;
      case "--duration":
        a.duration = num();
        break;
      case "--warmup":
        a.warmup = num();
        break;
      case "--keys":
        a.keys = num();
        break;
      case "--mix":
        a.mixName = v();
        a.mix = parseMix(a.mixName);
        break;
      case "--preload":
        a.preload = true;
        break;
      case "--server-pid":
        a.serverPid = num();
        break;
      case "--json":
        a.json = v();
        break;
      case "--help":
      case "-h":
        usage(null);
        break;
      case "--child":
        a.child = true;
        break;
      case "--seed":
        a.seed = num();
        break;
      default:
        usage(`unknown argument ${k}`);
    }
  }
  if (!a.url) usage("--url is required");
  if (a.processes < 1 || a.concurrency < 1 || a.keys < 1 || a.duration <= 0) {
    usage("--processes, --concurrency, --keys and --duration must be positive");
  }
  return a;
}

// ---- latency histogram ----------------------------------------------------------------------

const BASE = 1.01;
const LOG_BASE = Math.log(BASE);
const BUCKETS = 2400; // 1.01^2400 µs is far beyond any run

class Hist {
  counts = new Float64Array(BUCKETS);
  n = 0;
  sum = 0;
  max = 0;

  add(ms: number) {
    const us = ms * 1000;
    const i = us <= 1 ? 0 : Math.min(BUCKETS - 1, Math.ceil(Math.log(us) / LOG_BASE));
    this.counts[i]++;
    this.n++;
    this.sum += ms;
    if (ms > this.max) this.max = ms;
  }

  toJSON() {
    const b: [number, number][] = [];
    this.counts.forEach((c, i) => c && b.push([i, c]));
    return { n: this.n, sum: this.sum, max: this.max, buckets: b };
  }

  merge(o: { n: number; sum: number; max: number; buckets: [number, number][] }) {
    for (const [i, c] of o.buckets) this.counts[i] += c;
    this.n += o.n;
    this.sum += o.sum;
    this.max = Math.max(this.max, o.max);
  }

  quantile(q: number): number | null {
    if (!this.n) return null;
    const target = Math.max(1, Math.ceil(q * this.n));
    let cum = 0;
    for (let i = 0; i < BUCKETS; i++) {
      cum += this.counts[i];
      if (cum >= target) return Math.min(BASE ** i / 1000, this.max);
    }
    return this.max;
  }

  summary() {
    if (!this.n) return null;
    const r = (x: number | null) => x === null ? null : Math.round(x * 1000) / 1000;
    return {
      count: this.n,
      mean: r(this.sum / this.n),
      p50: r(this.quantile(0.5)),
      p90: r(this.quantile(0.9)),
      p99: r(this.quantile(0.99)),
      max: r(this.max),
    };
  }
}

// ---- helpers --------------------------------------------------------------------------------

const now = () => performance.timeOrigin + performance.now(); // ms since the epoch
const sleepUntil = (t: number) => new Promise((r) => setTimeout(r, Math.max(0, t - now())));

/** user+system CPU ticks of a process, from /proc/PID/stat; null if unreadable. */
function cpuTicks(pid: number | "self"): number | null {
  try {
    const s = Deno.readTextFileSync(`/proc/${pid}/stat`);
    const f = s.slice(s.lastIndexOf(")") + 2).split(" ");
    return Number(f[11]) + Number(f[12]); // utime, stime (fields 14 and 15)
  } catch {
    return null;
  }
}

function errMsg(e: unknown): string {
  const s = e instanceof Error ? `${e.name}: ${e.message}` : String(e);
  return s.replace(/\s+/g, " ").slice(0, 300);
}

async function readLine(reader: ReadableStreamDefaultReader<string>, buf: { s: string }) {
  while (!buf.s.includes("\n")) {
    const { value, done } = await reader.read();
    if (done) {
      const rest = buf.s;
      buf.s = "";
      return rest.length ? rest : null;
    }
    buf.s += value;
  }
  const i = buf.s.indexOf("\n");
  const line = buf.s.slice(0, i);
  buf.s = buf.s.slice(i + 1);
  return line;
}

const key = (i: number) => ["kvload", i];

function makeValue(seed: number) {
  const v = new Uint8Array(VALUE_SIZE);
  for (let i = 0; i < VALUE_SIZE; i++) v[i] = (seed * 31 + i * 7) & 0xff;
  return v;
}

// ---- one process: the load ------------------------------------------------------------------

async function child(a: Args) {
  const kv = await Deno.openKv(a.url);
  const value = makeValue(a.seed);
  // One request first, so the connection is up before the clock starts.
  await kv.get(key(0));
  const enc = new TextEncoder();
  const emit = async (line: string) => {
    const b = enc.encode(line + "\n");
    let off = 0;
    while (off < b.length) off += await Deno.stdout.write(b.subarray(off));
  };
  await emit("ready");
  const stdin = Deno.stdin.readable.pipeThrough(new TextDecoderStream()).getReader();
  const go = await readLine(stdin, { s: "" });
  if (!go?.startsWith("go ")) throw new Error(`expected "go <t0>" on stdin, got ${go}`);
  const t0 = Number(go.slice(3));
  const start = t0 + a.warmup * 1000, end = start + a.duration * 1000;

  const total = Object.values(a.mix).reduce((x, y) => x + y, 0);
  const cumulative: [Op, number][] = [];
  let acc = 0;
  for (const op of OPS) {
    if (a.mix[op]) cumulative.push([op, (acc += a.mix[op]) / total]);
  }
  const pick = (): Op => {
    const r = Math.random();
    for (const [op, c] of cumulative) if (r < c) return op;
    return cumulative[cumulative.length - 1][0];
  };

  const hist: Record<string, Hist> = {};
  const ops: Record<string, number> = {};
  const checkFailed: Record<string, number> = {};
  const errors: Record<string, number> = {};
  for (const op of OPS) {
    hist[op] = new Hist();
    ops[op] = 0;
    checkFailed[op] = 0;
  }
  const inflight: Record<string, number> = { get: 0, set: 0, cas: 0 };
  const error = (op: Op, msg: string) => {
    const k = `${op}: ${msg}`;
    errors[k] = (errors[k] ?? 0) + 1;
  };
  const checkValue = (op: Op, r: Deno.KvEntryMaybe<unknown>) => {
    if (r.versionstamp === null) {
      error(op, "a preloaded key is missing");
      return false;
    }
    if (!(r.value instanceof Uint8Array) || r.value.length !== VALUE_SIZE) {
      error(op, "unexpected value");
      return false;
    }
    return true;
  };

  // "ok": counted; "check": a failed check; "error": already counted in errors
  const run = async (op: Op): Promise<"ok" | "check" | "error"> => {
    const k = key(Math.floor(Math.random() * a.keys));
    switch (op) {
      case "get":
        return checkValue(op, await kv.get(k)) ? "ok" : "error";
      case "set": {
        const r = await kv.set(k, value);
        if (!r.ok) {
          error(op, "set answered ok: false");
          return "error";
        }
        return "ok";
      }
      case "cas": {
        const r = await kv.get(k);
        if (!checkValue(op, r)) return "error";
        const c = await kv.atomic().check({ key: k, versionstamp: r.versionstamp }).set(k, value)
          .commit();
        return c.ok ? "ok" : "check";
      }
    }
  };

  // This process's CPU time at the window's edges: read by a timer, or by the first
  // operation to finish past the edge if that comes first (a busy loop delays timers).
  let cpuStart: number | null = null, cpuEnd: number | null = null;
  const edges = () => {
    const t = now();
    if (cpuStart === null && t >= start) cpuStart = cpuTicks("self");
    if (cpuEnd === null && t >= end) cpuEnd = cpuTicks("self");
  };
  const timers = [
    setTimeout(edges, Math.max(0, start - now())),
    setTimeout(edges, Math.max(0, end - now())),
  ];
  await sleepUntil(t0);
  const loop = async () => {
    for (edges(); now() < end; edges()) {
      const op = pick();
      const s = performance.now();
      let outcome: "ok" | "check" | "error";
      inflight[op]++;
      try {
        outcome = await run(op);
      } catch (e) {
        error(op, errMsg(e));
        outcome = "error";
      }
      inflight[op]--;
      const t = performance.now();
      const done = performance.timeOrigin + t;
      if (done >= start && done <= end) {
        if (outcome === "ok") {
          ops[op]++;
          hist[op].add(t - s);
        } else if (outcome === "check") {
          checkFailed[op]++;
        }
      }
    }
  };
  // The Deno client retries a request whose connection failed, so a dead server shows as
  // operations that never return: those still waiting DRAIN_S after the window are errors.
  const drained = await Promise.race([
    Promise.all(Array.from({ length: a.concurrency }, loop)).then(() => true),
    sleepUntil(end + DRAIN_S * 1000).then(() => false),
  ]);
  for (const op of OPS) {
    if (inflight[op]) {
      const k = `${op}: no answer ${DRAIN_S} s after the window`;
      errors[k] = (errors[k] ?? 0) + inflight[op];
    }
  }
  for (const t of timers) clearTimeout(t);
  if (drained) kv.close();
  const result = {
    pid: Deno.pid,
    ops,
    check_failed: checkFailed,
    errors,
    hist: Object.fromEntries(OPS.map((op) => [op, hist[op].toJSON()])),
    cpu_ticks: cpuStart !== null && cpuEnd !== null ? cpuEnd - cpuStart : null,
  };
  await emit(JSON.stringify(result));
  Deno.exit(0); // operations that never answered must not keep the process alive
}

// ---- the coordinator ------------------------------------------------------------------------

async function preload(a: Args) {
  const kv = await Deno.openKv(a.url);
  const value = makeValue(0);
  const BATCH = 500;
  let next = 0;
  const worker = async () => {
    while (next < a.keys) {
      const from = next;
      next = Math.min(a.keys, next + BATCH);
      const at = kv.atomic();
      for (let i = from; i < next; i++) at.set(key(i), value);
      const r = await at.commit();
      if (!r.ok) throw new Error(`preload batch at ${from} answered ok: false`);
    }
  };
  await Promise.all(Array.from({ length: 4 }, worker));
  kv.close();
}

async function clockTicks(): Promise<number> {
  try {
    const out = await new Deno.Command("getconf", { args: ["CLK_TCK"], stdout: "piped" }).output();
    const n = Number(new TextDecoder().decode(out.stdout).trim());
    return n > 0 ? n : 100;
  } catch {
    return 100;
  }
}

interface ChildResult {
  ops: Record<string, number>;
  check_failed: Record<string, number>;
  errors: Record<string, number>;
  hist: Record<string, { n: number; sum: number; max: number; buckets: [number, number][] }>;
  cpu_ticks: number | null;
}

async function coordinator(a: Args) {
  if (a.token) Deno.env.set("DENO_KV_ACCESS_TOKEN", a.token);
  const fail = (msg: string): never => {
    console.error(`kvload: ${msg}`);
    Deno.exit(2);
  };
  if (a.preload) {
    try {
      await preload(a);
    } catch (e) {
      fail(`preload failed: ${errMsg(e)}`);
    }
  }
  const script = new URL(import.meta.url).pathname;
  const procs = Array.from({ length: a.processes }, (_, i) => {
    const args = [
      "run",
      "-A",
      "--unstable-kv",
      "--no-config",
      script,
      "--child",
      "--url",
      a.url,
      "--concurrency",
      String(a.concurrency),
      "--duration",
      String(a.duration),
      "--warmup",
      String(a.warmup),
      "--keys",
      String(a.keys),
      "--mix",
      a.mixName,
      "--seed",
      String(i + 1),
    ];
    const p = new Deno.Command(Deno.execPath(), {
      args,
      stdin: "piped",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const stderr = { s: "" };
    const stderrDone = (async () => {
      for await (const chunk of p.stderr.pipeThrough(new TextDecoderStream())) {
        stderr.s = (stderr.s + chunk).slice(-2000);
      }
    })();
    return {
      p,
      stderr,
      stderrDone,
      out: p.stdout.pipeThrough(new TextDecoderStream()).getReader(),
      buf: { s: "" },
      stdin: p.stdin.getWriter(),
    };
  });
  const killAll = () => {
    for (const c of procs) {
      try {
        c.p.kill("SIGKILL");
      } catch { /* already gone */ }
    }
  };
  const withTimeout = <T>(p: Promise<T>, ms: number, what: string) =>
    Promise.race([
      p,
      new Promise<never>((_, rej) => setTimeout(() => rej(new Error(`${what}: timed out`)), ms)),
    ]);

  // Every process connected and answered one request before the clock starts.
  try {
    await withTimeout(
      Promise.all(procs.map(async (c, i) => {
        const line = await readLine(c.out, c.buf);
        if (line !== "ready") {
          await c.p.status;
          await c.stderrDone;
          throw new Error(`process ${i} did not start: ${line ?? ""} ${c.stderr.s.trim()}`);
        }
      })),
      60_000,
      "waiting for the client processes",
    );
  } catch (e) {
    killAll();
    fail(errMsg(e));
  }
  const t0 = now() + 100;
  const enc = new TextEncoder();
  await Promise.all(
    procs.map((c) => c.stdin.write(enc.encode(`go ${t0}\n`)).then(() => c.stdin.close())),
  );
  const start = t0 + a.warmup * 1000, end = start + a.duration * 1000;
  await sleepUntil(start);
  const serverStart = a.serverPid ? cpuTicks(a.serverPid) : null;
  await sleepUntil(end);
  const serverEnd = a.serverPid ? cpuTicks(a.serverPid) : null;

  const merged: Record<string, Hist> = {};
  for (const op of OPS) merged[op] = new Hist();
  const all = new Hist();
  const ops: Record<string, number> = {}, checkFailed: Record<string, number> = {};
  const errors: Record<string, number> = {};
  for (const op of OPS) ops[op] = checkFailed[op] = 0;
  let clientTicks: number | null = 0;
  let failedProcs = 0;
  const deadline = (DRAIN_S + 20) * 1000; // after the window: the drain, then the report
  const results = await Promise.all(procs.map(async (c, i) => {
    try {
      const line = await withTimeout(readLine(c.out, c.buf), deadline, `process ${i}`);
      const st = await withTimeout(c.p.status, deadline, `process ${i} exit`);
      await c.stderrDone;
      if (!line || !st.success) {
        throw new Error(`process ${i} exited ${st.code}: ${line ?? ""} ${c.stderr.s.trim()}`);
      }
      return JSON.parse(line) as ChildResult;
    } catch (e) {
      try {
        c.p.kill("SIGKILL");
      } catch { /* gone */ }
      const k = `client process failed: ${errMsg(e)}`;
      errors[k] = (errors[k] ?? 0) + 1;
      failedProcs++;
      return null;
    }
  }));
  for (const r of results) {
    if (!r) continue;
    for (const op of OPS) {
      ops[op] += r.ops[op];
      checkFailed[op] += r.check_failed[op];
      merged[op].merge(r.hist[op]);
      all.merge(r.hist[op]);
    }
    for (const [k, n] of Object.entries(r.errors)) errors[k] = (errors[k] ?? 0) + n;
    clientTicks = r.cpu_ticks === null || clientTicks === null ? null : clientTicks + r.cpu_ticks;
  }
  if (failedProcs) clientTicks = null;

  const hz = await clockTicks();
  const total = Object.values(ops).reduce((x, y) => x + y, 0);
  const perOp = (ticks: number | null) =>
    ticks === null || !total ? null : Math.round((ticks / hz) * 1e6 / total * 10) / 10;
  const errorTotal = Object.values(errors).reduce((x, y) => x + y, 0);
  const latency: Record<string, unknown> = { all: all.summary() };
  const per_op: Record<string, unknown> = {};
  for (const op of OPS) {
    if (!a.mix[op]) continue;
    latency[op] = merged[op].summary();
    per_op[op] = {
      ops: ops[op],
      ops_per_sec: ops[op] / a.duration,
      check_failed: checkFailed[op],
      errors: Object.entries(errors).filter(([k]) => k.startsWith(`${op}: `))
        .reduce((x, [, n]) => x + n, 0),
    };
  }
  const report = {
    tool: "loadtest/deno/kvload.ts",
    deno: Deno.version.deno,
    url: a.url,
    processes: a.processes,
    concurrency: a.concurrency,
    keys: a.keys,
    value_size: VALUE_SIZE,
    mix_name: a.mixName,
    mix: a.mix,
    warmup_s: a.warmup,
    duration_s: a.duration,
    ops: total,
    ops_per_sec: total / a.duration,
    check_failed: Object.values(checkFailed).reduce((x, y) => x + y, 0),
    error_total: errorTotal,
    errors,
    failed_processes: failedProcs,
    per_op,
    latency_ms: latency,
    // server CPU µs per op (= ms per 1,000 ops), as denokv-loadtest reports it
    server_cpu_ms_per_1k_ops: serverStart !== null && serverEnd !== null
      ? perOp(serverEnd - serverStart)
      : null,
    client_cpu_ms_per_1k_ops: perOp(clientTicks),
  };
  const text = JSON.stringify(report, null, 2);
  if (a.json) await Deno.writeTextFile(a.json, text + "\n");
  console.log(text);
  Deno.exit(errorTotal ? 1 : 0);
}

if (import.meta.main) {
  const a = parseArgs(Deno.args);
  if (a.child) {
    try {
      await child(a);
    } catch (e) {
      console.error(`kvload child: ${errMsg(e)}`);
      Deno.exit(2);
    }
  } else {
    await coordinator(a);
  }
}
