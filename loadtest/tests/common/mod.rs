//! Harness: runs the real `denokv` server on a free loopback port with a temporary database,
//! and the load generator against it.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub const TOKEN: &str = "loadtest-token-0123456789";

/// The tests put real load on a 2-core machine: one at a time keeps their numbers sane.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The server binary. Cargo only tells a package where its own binaries are, so this finds
/// `denokv` next to the test executable's folder: `<target>/<profile>/deps/<test>` →
/// `<target>/<profile>/denokv`. `cargo test --workspace` builds it; `DENOKV_BIN` overrides.
pub fn server_binary() -> PathBuf {
    let bin = match std::env::var_os("DENOKV_BIN") {
        Some(path) => PathBuf::from(path),
        None => {
            let exe = std::env::current_exe().expect("the test knows its own path");
            let profile_dir = exe
                .parent()
                .and_then(Path::parent)
                .expect("test executables live in <target>/<profile>/deps");
            profile_dir.join(format!("denokv{}", std::env::consts::EXE_SUFFIX))
        }
    };
    assert!(
        bin.exists(),
        "the denokv server binary is missing at {}: build it with the same profile first \
         (`cargo build -p denokv`, or run `cargo test --workspace`), or set DENOKV_BIN",
        bin.display()
    );
    bin
}

pub fn loadtest_binary() -> &'static str {
    env!("CARGO_BIN_EXE_denokv-loadtest")
}

/// A running server; killed on drop if a test failed before stopping it.
pub struct Server {
    child: Option<Child>,
    pub url: String,
    pub db: PathBuf,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Starts the server on `db` (created if missing) and waits for its address.
    pub fn start(db: &Path) -> Server {
        let mut child = Command::new(server_binary())
            .arg("--sqlite-path")
            .arg(db)
            .args(["serve", "--access-token", TOKEN, "--addr", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run the denokv binary");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            const READY: &str = "Listening on http://";
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(i) = line.find(READY) {
                    let _ = tx.send(line[i + READY.len()..].trim().to_string());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let Ok(addr) = rx.recv_timeout(Duration::from_secs(20)) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the server did not start; its log:\n{}",
                log.lock().unwrap().join("\n")
            );
        };
        Server {
            child: Some(child),
            url: format!("http://{addr}"),
            db: db.to_path_buf(),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// SIGTERM, and the server must exit 0 (a clean drain) within 20 s.
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("the server is running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = wait(&mut child, Duration::from_secs(20));
        assert!(
            status.success(),
            "the server exited with {status} after SIGTERM; log:\n{}",
            self.log_text()
        );
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("the server is running");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn wait(child: &mut Child, limit: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the process did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One finished run of the load generator.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    /// The `--json` report (Null if none was written).
    pub json: serde_json::Value,
}

impl Run {
    pub fn explain(&self) -> String {
        format!(
            "exit {}\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// The load generator's command for `server`, with `--json` into `dir`.
pub fn loadtest_command(server: &Server, dir: &Path, args: &[&str]) -> (Command, PathBuf) {
    let json = dir.join(format!("report-{}.json", unique()));
    let mut cmd = Command::new(loadtest_binary());
    cmd.args(args)
        .args(["--url", &server.url, "--token", TOKEN, "--json"])
        .arg(&json)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    (cmd, json)
}

/// Runs the load generator to the end.
pub fn loadtest(server: &Server, dir: &Path, args: &[&str]) -> Run {
    let (mut cmd, json) = loadtest_command(server, dir, args);
    finish(cmd.output().expect("cannot run denokv-loadtest"), &json)
}

pub fn finish(out: Output, json: &Path) -> Run {
    let json = std::fs::read_to_string(json)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(serde_json::Value::Null);
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        json,
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}
