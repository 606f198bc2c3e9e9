// A tiny hand-written KV Connect client (protobuf + HTTP) for requests no
// real client sends: malformed values, server-side limits, failed_checks,
// raw watch frames. Field numbers follow SPEC.md §2.2.

// ---------------------------------------------------------------------------
// Protobuf encoding
// ---------------------------------------------------------------------------

export class PbWriter {
  #b: number[] = [];

  varint(v: number | bigint): this {
    let n = BigInt.asUintN(64, BigInt(v));
    while (n >= 0x80n) {
      this.#b.push(Number(n & 0x7fn) | 0x80);
      n >>= 7n;
    }
    this.#b.push(Number(n));
    return this;
  }
  tag(field: number, wire: number): this {
    return this.varint((field << 3) | wire);
  }
  uint(field: number, v: number | bigint | boolean): this {
    return this.tag(field, 0).varint(typeof v === "boolean" ? (v ? 1 : 0) : v);
  }
  bytes(field: number, data: Uint8Array): this {
    this.tag(field, 2).varint(data.length);
    for (const x of data) this.#b.push(x);
    return this;
  }
  message(field: number, w: PbWriter): this {
    return this.bytes(field, w.finish());
  }
  /** packed repeated varints */
  packed(field: number, vs: (number | bigint)[]): this {
    const inner = new PbWriter();
    for (const v of vs) inner.varint(v);
    return this.bytes(field, inner.finish());
  }
  finish(): Uint8Array {
    return new Uint8Array(this.#b);
  }
}

export type PbValue = bigint | Uint8Array;
export type PbFields = Map<number, PbValue[]>;

export function pbDecode(buf: Uint8Array): PbFields {
  const out: PbFields = new Map();
  let i = 0;
  const varint = (): bigint => {
    let shift = 0n;
    let r = 0n;
    while (true) {
      if (i >= buf.length) throw new Error("truncated varint");
      const b = buf[i++];
      r |= BigInt(b & 0x7f) << shift;
      if (!(b & 0x80)) return r;
      shift += 7n;
    }
  };
  while (i < buf.length) {
    const key = Number(varint());
    const field = key >> 3;
    const wire = key & 7;
    let v: PbValue;
    if (wire === 0) v = varint();
    else if (wire === 2) {
      const len = Number(varint());
      v = buf.slice(i, i + len);
      if (v.length !== len) throw new Error("truncated bytes");
      i += len;
    } else if (wire === 1) {
      v = buf.slice(i, i + 8);
      i += 8;
    } else if (wire === 5) {
      v = buf.slice(i, i + 4);
      i += 4;
    } else throw new Error(`unsupported wire type ${wire}`);
    const list = out.get(field) ?? [];
    list.push(v);
    out.set(field, list);
  }
  return out;
}

function unpackVarints(vals: PbValue[] | undefined): bigint[] {
  const out: bigint[] = [];
  for (const v of vals ?? []) {
    if (typeof v === "bigint") out.push(v);
    else {
      let i = 0; // packed encoding
      while (i < v.length) {
        let shift = 0n;
        let r = 0n;
        while (true) {
          const b = v[i++];
          r |= BigInt(b & 0x7f) << shift;
          if (!(b & 0x80)) break;
          shift += 7n;
        }
        out.push(r);
      }
    }
  }
  return out;
}

// ---------------------------------------------------------------------------
// Keys (tuple encoding, SPEC §4) — strings, bytes, bigints, numbers, booleans
// ---------------------------------------------------------------------------

const enc = new TextEncoder();

function escapeNul(bytes: Uint8Array): number[] {
  const out: number[] = [];
  for (const b of bytes) {
    out.push(b);
    if (b === 0) out.push(0xff);
  }
  return out;
}

export function encodeKey(parts: Deno.KvKeyPart[]): Uint8Array {
  const out: number[] = [];
  for (const p of parts) {
    if (p instanceof Uint8Array) out.push(0x01, ...escapeNul(p), 0x00);
    else if (typeof p === "string") out.push(0x02, ...escapeNul(enc.encode(p)), 0x00);
    else if (typeof p === "bigint") {
      if (p === 0n) out.push(0x14);
      else {
        const neg = p < 0n;
        let m = neg ? -p : p;
        const mag: number[] = [];
        while (m > 0n) {
          mag.unshift(Number(m & 0xffn));
          m >>= 8n;
        }
        if (mag.length > 8) throw new Error("big integers not supported here");
        if (neg) out.push(0x14 - mag.length, ...mag.map((b) => b ^ 0xff));
        else out.push(0x14 + mag.length, ...mag);
      }
    } else if (typeof p === "number") {
      const dv = new DataView(new ArrayBuffer(8));
      dv.setFloat64(0, Number.isNaN(p) ? NaN : p);
      const b = new Uint8Array(dv.buffer);
      if (b[0] & 0x80) for (let i = 0; i < 8; i++) b[i] ^= 0xff;
      else b[0] ^= 0x80;
      out.push(0x21, ...b);
    } else if (p === false) out.push(0x26);
    else if (p === true) out.push(0x27);
    else throw new Error(`unsupported key part ${String(p)}`);
  }
  return new Uint8Array(out);
}

export function concat(...xs: (Uint8Array | number[])[]): Uint8Array {
  const len = xs.reduce((a, x) => a + x.length, 0);
  const out = new Uint8Array(len);
  let o = 0;
  for (const x of xs) {
    out.set(x, o);
    o += x.length;
  }
  return out;
}

export function hex(b: Uint8Array): string {
  return [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
}

export function unhex(s: string): Uint8Array {
  return new Uint8Array(s.match(/../g)!.map((h) => parseInt(h, 16)));
}

export function le64(n: bigint): Uint8Array {
  const dv = new DataView(new ArrayBuffer(8));
  dv.setBigUint64(0, n, true);
  return new Uint8Array(dv.buffer);
}

// ---------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------

export const VE_V8 = 1, VE_LE64 = 2, VE_BYTES = 3;
export const M_SET = 1, M_DELETE = 2, M_SUM = 3, M_MAX = 4, M_MIN = 5, M_SET_SUFFIX_VS = 9;
export const AW_SUCCESS = 1, AW_CHECK_FAILURE = 2;
export const SR_SUCCESS = 1;

export interface RawRange {
  start: Uint8Array;
  end: Uint8Array;
  limit: number;
  reverse?: boolean;
}

export interface RawCheck {
  key: Uint8Array;
  versionstamp?: Uint8Array; // absent/empty = must not exist
}

export interface RawMutation {
  key: Uint8Array;
  type: number;
  value?: { data: Uint8Array; encoding: number };
  expireAtMs?: number;
  sumMin?: Uint8Array;
  sumMax?: Uint8Array;
  sumClamp?: boolean;
}

export interface RawEnqueue {
  payload: Uint8Array;
  deadlineMs: number;
  keysIfUndelivered?: Uint8Array[];
  backoffSchedule?: number[];
}

export function encodeSnapshotRead(ranges: RawRange[]): Uint8Array {
  const w = new PbWriter();
  for (const r of ranges) {
    const m = new PbWriter().bytes(1, r.start).bytes(2, r.end);
    if (r.limit) m.uint(3, r.limit);
    if (r.reverse) m.uint(4, true);
    w.message(1, m);
  }
  return w.finish();
}

export function encodeAtomicWrite(
  a: { checks?: RawCheck[]; mutations?: RawMutation[]; enqueues?: RawEnqueue[] },
): Uint8Array {
  const w = new PbWriter();
  for (const c of a.checks ?? []) {
    const m = new PbWriter().bytes(1, c.key);
    if (c.versionstamp && c.versionstamp.length) m.bytes(2, c.versionstamp);
    w.message(1, m);
  }
  for (const mu of a.mutations ?? []) {
    const m = new PbWriter().bytes(1, mu.key);
    if (mu.value) {
      const v = new PbWriter().bytes(1, mu.value.data);
      if (mu.value.encoding) v.uint(2, mu.value.encoding);
      m.message(2, v);
    }
    if (mu.type) m.uint(3, mu.type);
    if (mu.expireAtMs) m.uint(4, mu.expireAtMs);
    if (mu.sumMin) m.bytes(5, mu.sumMin);
    if (mu.sumMax) m.bytes(6, mu.sumMax);
    if (mu.sumClamp) m.uint(7, true);
    w.message(2, m);
  }
  for (const e of a.enqueues ?? []) {
    const m = new PbWriter().bytes(1, e.payload);
    if (e.deadlineMs) m.uint(2, e.deadlineMs);
    for (const k of e.keysIfUndelivered ?? []) m.bytes(3, k);
    if (e.backoffSchedule?.length) m.packed(4, e.backoffSchedule);
    w.message(3, m);
  }
  return w.finish();
}

export function encodeWatch(keys: Uint8Array[]): Uint8Array {
  const w = new PbWriter();
  for (const k of keys) w.message(1, new PbWriter().bytes(1, k));
  return w.finish();
}

export interface RawEntry {
  key: Uint8Array;
  value: Uint8Array;
  encoding: number;
  versionstamp: Uint8Array;
}

function decodeEntry(b: Uint8Array): RawEntry {
  const f = pbDecode(b);
  return {
    key: (f.get(1)?.[0] as Uint8Array) ?? new Uint8Array(),
    value: (f.get(2)?.[0] as Uint8Array) ?? new Uint8Array(),
    encoding: Number((f.get(3)?.[0] as bigint) ?? 0n),
    versionstamp: (f.get(4)?.[0] as Uint8Array) ?? new Uint8Array(),
  };
}

export interface RawReadOutput {
  ranges: RawEntry[][];
  readDisabled: boolean;
  stronglyConsistent: boolean;
  status: number;
}

export function decodeSnapshotReadOutput(b: Uint8Array): RawReadOutput {
  const f = pbDecode(b);
  return {
    ranges: (f.get(1) ?? []).map((r) => (pbDecode(r as Uint8Array).get(1) ?? []).map((e) => decodeEntry(e as Uint8Array))),
    readDisabled: ((f.get(2)?.[0] as bigint) ?? 0n) !== 0n,
    stronglyConsistent: ((f.get(4)?.[0] as bigint) ?? 0n) !== 0n,
    status: Number((f.get(8)?.[0] as bigint) ?? 0n),
  };
}

export interface RawWriteOutput {
  status: number;
  versionstamp: Uint8Array;
  failedChecks: number[];
}

export function decodeAtomicWriteOutput(b: Uint8Array): RawWriteOutput {
  const f = pbDecode(b);
  return {
    status: Number((f.get(1)?.[0] as bigint) ?? 0n),
    versionstamp: (f.get(2)?.[0] as Uint8Array) ?? new Uint8Array(),
    failedChecks: unpackVarints(f.get(4)).map(Number),
  };
}

export interface RawWatchKeyOutput {
  changed: boolean;
  entry: RawEntry | null;
}

export interface RawWatchOutput {
  status: number;
  keys: RawWatchKeyOutput[];
}

export function decodeWatchOutput(b: Uint8Array): RawWatchOutput {
  const f = pbDecode(b);
  return {
    status: Number((f.get(1)?.[0] as bigint) ?? 0n),
    keys: (f.get(2) ?? []).map((k) => {
      const kf = pbDecode(k as Uint8Array);
      const e = kf.get(2)?.[0] as Uint8Array | undefined;
      return { changed: ((kf.get(1)?.[0] as bigint) ?? 0n) !== 0n, entry: e ? decodeEntry(e) : null };
    }),
  };
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

export interface RawResponse {
  status: number;
  contentType: string | null;
  body: Uint8Array;
  text: string;
}

export const NIL_UUID = "00000000-0000-0000-0000-000000000000";

export class RawClient {
  readonly base: string;
  readonly token: string;
  readonly client?: Deno.HttpClient;

  /** http2: force cleartext HTTP/2 with prior knowledge, as Deno's KV client does. */
  constructor(base: string, token: string, opts: { http2?: boolean } = {}) {
    this.base = base;
    this.token = token;
    // a dedicated connection pool per RawClient, so one test's broken
    // connection cannot leak into another's
    this.client = opts.http2
      // deno-lint-ignore no-explicit-any
      ? Deno.createHttpClient({ http1: false, http2: true } as any)
      // deno-lint-ignore no-explicit-any
      : Deno.createHttpClient({ http1: true, http2: false } as any);
  }

  close() {
    this.client?.close();
  }

  async post(path: string, body: BodyInit | null, headers: Record<string, string> = {}): Promise<RawResponse> {
    const res = await fetch(this.base + path, {
      method: "POST",
      body,
      headers,
      // deno-lint-ignore no-explicit-any
      ...(this.client ? { client: this.client } as any : {}),
    });
    const buf = new Uint8Array(await res.arrayBuffer());
    return {
      status: res.status,
      contentType: res.headers.get("content-type"),
      body: buf,
      text: new TextDecoder().decode(buf),
    };
  }

  dataHeaders(extra: Record<string, string> = {}): Record<string, string> {
    return {
      authorization: `Bearer ${this.token}`,
      "x-denokv-version": "3",
      "x-denokv-database-id": NIL_UUID,
      ...extra,
    };
  }

  metadata(versions: number[] = [1, 2, 3], auth = `Bearer ${this.token}`): Promise<RawResponse> {
    const headers: Record<string, string> = { "content-type": "application/json" };
    if (auth) headers.authorization = auth;
    return this.post("/", JSON.stringify({ supportedVersions: versions }), headers);
  }

  call(method: "snapshot_read" | "atomic_write" | "watch", body: Uint8Array, headers?: Record<string, string>) {
    return this.post(`/v2/${method}`, body as BodyInit, headers ?? this.dataHeaders());
  }

  async read(ranges: RawRange[]): Promise<RawReadOutput> {
    const r = await this.call("snapshot_read", encodeSnapshotRead(ranges));
    if (r.status !== 200) throw new Error(`snapshot_read: ${r.status} ${r.text}`);
    return decodeSnapshotReadOutput(r.body);
  }

  /** Read one key (or null). */
  async get(key: Uint8Array): Promise<RawEntry | null> {
    const out = await this.read([{ start: key, end: concat(key, [0]), limit: 1 }]);
    return out.ranges[0][0] ?? null;
  }

  async write(a: Parameters<typeof encodeAtomicWrite>[0]): Promise<{ res: RawResponse; out: RawWriteOutput | null }> {
    const res = await this.call("atomic_write", encodeAtomicWrite(a));
    return { res, out: res.status === 200 ? decodeAtomicWriteOutput(res.body) : null };
  }

  /** Open a watch; returns a frame reader. */
  async watch(keys: Uint8Array[]): Promise<WatchFrames> {
    const res = await fetch(this.base + "/v2/watch", {
      method: "POST",
      body: encodeWatch(keys) as BodyInit,
      headers: this.dataHeaders(),
      // deno-lint-ignore no-explicit-any
      ...(this.client ? { client: this.client } as any : {}),
    });
    if (res.status !== 200) throw new Error(`watch: ${res.status} ${await res.text()}`);
    return new WatchFrames(res);
  }
}

export class WatchFrames {
  readonly response: Response;
  readonly #reader: ReadableStreamDefaultReader<Uint8Array>;
  #buf: Uint8Array = new Uint8Array(0);
  pings = 0;

  constructor(res: Response) {
    this.response = res;
    this.#reader = res.body!.getReader();
  }

  async #fill(n: number): Promise<boolean> {
    while (this.#buf.length < n) {
      const { done, value } = await this.#reader.read();
      if (done) return false;
      this.#buf = concat(this.#buf, value);
    }
    return true;
  }

  /** Next non-ping frame (pings are counted). Null at end of stream. */
  async next(): Promise<RawWatchOutput | null> {
    while (true) {
      if (!(await this.#fill(4))) return null;
      const len = new DataView(this.#buf.buffer, this.#buf.byteOffset, 4).getUint32(0, true);
      if (!(await this.#fill(4 + len))) return null;
      const frame = this.#buf.slice(4, 4 + len);
      this.#buf = this.#buf.slice(4 + len);
      if (len === 0) {
        this.pings++;
        continue;
      }
      return decodeWatchOutput(frame);
    }
  }

  async cancel() {
    await this.#reader.cancel().catch(() => {});
  }
}

export function bytesValue(s: string | Uint8Array) {
  return { data: typeof s === "string" ? enc.encode(s) : s, encoding: VE_BYTES };
}
