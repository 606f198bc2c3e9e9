//! denokv-loadtest: a closed-loop KV Connect load generator for denokv.
//!
//! ```text
//! export DENO_KV_ACCESS_TOKEN=...            # or --token
//! denokv-loadtest write --url http://127.0.0.1:4512 --proto h1 --concurrency 64 --duration 5s
//! denokv-loadtest read  --url ... --proto h2 --connections 1 --preload --keys 10000
//! denokv-loadtest sum   --url ... --hot-keys 10          # exit 1 if a counter is off
//! denokv-loadtest watch --url ... --watchers 100 --hot-keys 3
//! denokv-loadtest idle  --url ... --proto h1 --concurrency 10000 --server-pid $PID
//! denokv-loadtest disk --dir /var/lib/denokv             # fdatasync/s, SQLite commits/s
//! denokv-loadtest gen-db --path big.sqlite --keys 10000000   # then serve it and `read`
//! denokv-loadtest http-fuzz --duration 30s --seed 1     # starts its own server (see httpfuzz)
//! denokv-loadtest write --url ... --ack-log acks.log     # kill -9 the server meanwhile,
//! denokv-loadtest verify --url ... --ack-log acks.log    # restart it, then check
//! denokv-loadtest crash-mix --url ... --ack-log acks.log --stop-when-down   # tests/crash/
//! ```
//!
//! Reports go to stdout as a table (`--format json` for JSON) and with `--json FILE` to a file.
//!
//! Exit status: 0 when the run (or `verify`) passed; 1 when a check failed (counters that do
//! not add up, lost acknowledged writes, undelivered watch notifications, or no operation
//! succeeded at all); 2 when the run could not be done (bad options, server unreachable).

mod acklog;
mod cli;
mod client;
mod data;
mod disk;
mod gendb;
mod httpfuzz;
mod idle;
mod report;
mod run;
mod server;
mod stats;
mod verify;
mod watch;
mod workload;

use clap::Parser;

use cli::{Cli, Command};
use workload::Workload;

fn main() {
    let cli = Cli::parse();
    if let Command::GenDb(a) = &cli.command {
        match gendb::generate(&a.path, a.keys, a.value_size as usize, a.seed) {
            Ok(seconds) => {
                println!(
                    "wrote {} keys to {} in {seconds:.1} s",
                    a.keys,
                    a.path.display()
                );
                return;
            }
            Err(e) => {
                eprintln!("denokv-loadtest: {e:#}");
                std::process::exit(2);
            }
        }
    }
    if let Command::Disk(a) = &cli.command {
        let result = disk::run(a).and_then(|r| {
            report::emit(&r, &r.table(), &a.output)?;
            Ok(r)
        });
        if let Err(e) = result {
            eprintln!("denokv-loadtest: {e:#}");
            std::process::exit(2);
        }
        return;
    }
    if let Command::HttpFuzz(a) = &cli.command {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("cannot start the tokio runtime");
        match runtime.block_on(httpfuzz::run(a)).and_then(|r| {
            report::emit(&r, &r.table(), &a.output)?;
            Ok(r.passed)
        }) {
            Ok(true) => return,
            Ok(false) => std::process::exit(1),
            Err(e) => {
                eprintln!("denokv-loadtest: {e:#}");
                std::process::exit(2);
            }
        }
    }
    let client_args = match &cli.command {
        Command::GenDb(_) | Command::Disk(_) | Command::HttpFuzz(_) => {
            unreachable!("handled above")
        }
        Command::Idle(a) => &a.client,
        Command::Verify(a) => &a.client,
        Command::Write(a)
        | Command::Read(a)
        | Command::Mixed(a)
        | Command::Cas(a)
        | Command::List(a)
        | Command::Sum(a)
        | Command::CrashMix(a)
        | Command::Watch(a) => &a.client,
    };
    let threads = client_args
        .client_threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .expect("cannot start the tokio runtime");
    match runtime.block_on(dispatch(cli.command)) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("denokv-loadtest: {e:#}");
            std::process::exit(2);
        }
    }
}

/// Runs the command and prints its report; true if it passed.
async fn dispatch(command: Command) -> anyhow::Result<bool> {
    let (workload, args) = match command {
        Command::GenDb(_) | Command::Disk(_) | Command::HttpFuzz(_) => {
            unreachable!("these need no runtime of this kind")
        }
        Command::Idle(args) => {
            let result = idle::run(&args).await?;
            report::emit(&result, &result.table(), &args.output)?;
            return Ok(result.passed);
        }
        Command::Verify(args) => {
            let result = verify::verify(&args).await?;
            report::emit(&result, &result.table(args.show), &args.output)?;
            return Ok(result.passed);
        }
        Command::Write(a) => (Workload::Write, a),
        Command::Read(a) => (Workload::Read, a),
        Command::Mixed(a) => (Workload::Mixed, a),
        Command::Cas(a) => (Workload::Cas, a),
        Command::List(a) => (Workload::List, a),
        Command::Sum(a) => (Workload::Sum, a),
        Command::CrashMix(a) => (Workload::CrashMix, a),
        Command::Watch(a) => (Workload::Watch, a),
    };
    let result = run::run(workload, &args).await?;
    report::emit(&result, &result.table(), &args.output)?;
    Ok(result.passed)
}
