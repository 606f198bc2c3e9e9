//! The result of a run: built from the merged counts, shown as a table or as JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::cli::{Format, OutputArgs, RunArgs};
use crate::client::Proto;
use crate::run::PreloadInfo;
use crate::server::ProcessUsage;
use crate::stats::{self, Stats};
use crate::workload::CheckResult;

/// Latency of one kind of operation, in milliseconds.
#[derive(Debug, Serialize)]
pub struct Latency {
    pub count: u64,
    pub per_sec: f64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>, seconds: f64) -> Latency {
        let ms = |micros: u64| micros as f64 / 1000.0;
        Latency {
            count: h.len(),
            per_sec: h.len() as f64 / seconds,
            mean: h.mean() / 1000.0,
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub workload: &'static str,
    pub url: String,
    pub proto: Proto,
    /// Concurrent clients (closed loop: one request in flight each).
    pub concurrency: u32,
    /// TCP connections the clients used.
    pub connections: u32,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub settings: BTreeMap<&'static str, serde_json::Value>,
    pub preload: Option<PreloadInfo>,
    /// Successful operations in the measured time (for `watch`: acknowledged writes).
    pub ops: u64,
    pub ops_per_sec: f64,
    /// By kind of operation; `all` when there is more than one kind of operation.
    pub latency_ms: BTreeMap<String, Latency>,
    /// `cas` writes refused by their check.
    pub conflicts: u64,
    /// By `HTTP <status>: <first line of body>`, `transport: …`, `protocol: …`.
    pub errors: BTreeMap<String, u64>,
    pub error_total: u64,
    pub counters: BTreeMap<String, u64>,
    pub checks: Vec<CheckResult>,
    /// Every check passed and at least one operation succeeded.
    pub passed: bool,
    /// The server's CPU and memory over the measured window (`--server-pid`).
    pub server: Option<ProcessUsage>,
    /// Server CPU milliseconds per 1,000 operations (= microseconds per operation).
    pub server_cpu_ms_per_1k_ops: Option<f64>,
    /// The load generator's own CPU milliseconds per 1,000 operations (with --server-pid):
    /// on a shared machine, what the client takes from the server.
    pub client_cpu_ms_per_1k_ops: Option<f64>,
}

impl Report {
    /// `extra_kinds` are shown with their latency but not counted as operations (the watch
    /// notifications of `watch`, whose operations are the writes).
    pub fn new(
        workload: &'static str,
        args: &RunArgs,
        connections: u32,
        stats: Stats,
        extra_kinds: &[&str],
    ) -> Report {
        let seconds = args.duration.as_secs_f64().max(1e-9);
        let mut latency_ms = BTreeMap::new();
        let mut all = stats::histogram();
        let mut op_kinds = 0;
        for (kind, h) in &stats.latency {
            if !extra_kinds.contains(kind) {
                all.add(h).expect("histograms share bounds");
                op_kinds += 1;
            }
            latency_ms.insert(kind.to_string(), Latency::of(h, seconds));
        }
        if op_kinds > 1 {
            latency_ms.insert("all".into(), Latency::of(&all, seconds));
        }
        let settings = BTreeMap::from([
            ("keys", args.keys.into()),
            ("value_size", args.value_size.into()),
            ("preload", args.preload.into()),
            ("read_pct", args.read_pct.into()),
            ("list_size", args.list_size.into()),
            ("hot_keys", args.hot_keys.into()),
            ("sum_max", args.sum_max.into()),
            ("watchers", args.watchers.into()),
            (
                "write_interval_ms",
                (args.write_interval.as_secs_f64() * 1000.0).into(),
            ),
            ("seed", args.seed.into()),
            ("timeout_s", args.client.timeout.as_secs_f64().into()),
        ]);
        Report {
            workload,
            url: args.client.url.clone(),
            proto: args.client.proto,
            concurrency: args.client.concurrency,
            connections,
            duration_s: args.duration.as_secs_f64(),
            warmup_s: args.warmup.as_secs_f64(),
            settings,
            preload: None,
            ops: all.len(),
            ops_per_sec: all.len() as f64 / seconds,
            latency_ms,
            conflicts: stats.conflicts,
            error_total: stats.error_total(),
            errors: stats.errors,
            counters: stats
                .counters
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            checks: Vec::new(),
            passed: !all.is_empty(),
            server: None,
            server_cpu_ms_per_1k_ops: None,
            client_cpu_ms_per_1k_ops: None,
        }
    }

    pub fn set_usage(&mut self, server: Option<ProcessUsage>, client: Option<ProcessUsage>) {
        let per_1k = |u: &Option<ProcessUsage>| {
            u.as_ref()
                .filter(|_| self.ops > 0)
                .map(|u| u.cpu_seconds * 1e6 / self.ops as f64)
        };
        self.server_cpu_ms_per_1k_ops = per_1k(&server);
        self.client_cpu_ms_per_1k_ops = per_1k(&client);
        self.server = server;
    }

    pub fn add_check(&mut self, check: CheckResult) {
        self.passed &= check.passed;
        self.checks.push(check);
    }

    pub fn table(&self) -> String {
        let mut t = String::new();
        let proto = match self.proto {
            Proto::H1 => "HTTP/1.1",
            Proto::H2 => "HTTP/2 (h2c)",
        };
        let _ = writeln!(
            t,
            "{} against {}: {proto}, {} clients on {} connections, {:.1} s measured after {:.1} s warm-up",
            self.workload, self.url, self.concurrency, self.connections, self.duration_s, self.warmup_s
        );
        if let Some(p) = &self.preload {
            let _ = writeln!(
                t,
                "preload: {} keys in {} writes, {:.1} s",
                p.keys, p.writes, p.seconds
            );
        }
        let _ = writeln!(
            t,
            "\n{:<10} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "latency",
            "count",
            "per sec",
            "mean ms",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms"
        );
        for (kind, l) in &self.latency_ms {
            let _ = writeln!(
                t,
                "{kind:<10} {:>10} {:>10.1} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                l.count, l.per_sec, l.mean, l.p50, l.p90, l.p99, l.p999, l.max
            );
        }
        let _ = writeln!(
            t,
            "\nops: {} ({:.1}/s)   conflicts: {}   errors: {}",
            self.ops, self.ops_per_sec, self.conflicts, self.error_total
        );
        for (label, n) in &self.errors {
            let _ = writeln!(t, "  {n:>8}  {label}");
        }
        if let Some(u) = &self.server {
            let _ = writeln!(
                t,
                "server (pid {}): {:.2} CPU s, {:.1} ms per 1000 ops, RSS {:.1} -> {:.1} MiB; \
                 load generator: {:.1} CPU ms per 1000 ops",
                u.pid,
                u.cpu_seconds,
                self.server_cpu_ms_per_1k_ops.unwrap_or(0.0),
                u.rss_mib_start,
                u.rss_mib_end,
                self.client_cpu_ms_per_1k_ops.unwrap_or(0.0)
            );
        }
        if !self.counters.is_empty() {
            let _ = writeln!(t, "counters:");
            for (name, n) in &self.counters {
                let _ = writeln!(t, "  {n:>8}  {name}");
            }
        }
        for c in &self.checks {
            show_check(&mut t, c, 20);
        }
        if self.ops == 0 {
            let _ = writeln!(t, "FAILED: no operation succeeded");
        }
        t
    }
}

pub fn show_check(t: &mut String, c: &CheckResult, limit: usize) {
    let verdict = if c.passed { "PASS" } else { "FAIL" };
    let _ = writeln!(t, "{verdict} {}: {}", c.name, c.summary);
    for p in c.problems.iter().take(limit) {
        let _ = writeln!(t, "  {p}");
    }
    if c.problems.len() > limit {
        let _ = writeln!(t, "  … and {} more", c.problems.len() - limit);
    }
}

/// Prints `table` or the JSON on stdout as `--format` says, and writes the JSON to `--json`
/// if given.
pub fn emit<T: Serialize>(value: &T, table: &str, output: &OutputArgs) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    if let Some(path) = &output.json {
        std::fs::write(path, format!("{text}\n"))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    match output.format {
        Format::Table => print!("{table}"),
        Format::Json => println!("{text}"),
    }
    Ok(())
}
