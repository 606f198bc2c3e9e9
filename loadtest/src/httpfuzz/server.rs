//! The server under test: a real `denokv` process on loopback with a token file, short
//! deadlines, and a database of its own, whose file is checked after it stops.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

/// The long-lived tokens of a run, derived from the seed (so that a saved request replays).
#[derive(Clone, Debug)]
pub struct Tokens {
    /// Every key: writes the sentinels and reads them back. Never in a fuzzed request.
    pub sentinel: String,
    /// Read-write under `["fuzz"]`.
    pub fuzz: String,
    /// Read-only under `["fuzz"]`.
    pub read: String,
}

impl Tokens {
    pub fn of_seed(seed: u64) -> Tokens {
        let t = |kind: &str, salt: u64| format!("{kind}-{:016x}", super::mix(seed ^ salt));
        Tokens {
            sentinel: t("sentinel", 0x5e),
            fuzz: t("fuzz-rw", 0xf1),
            read: t("fuzz-ro", 0xf2),
        }
    }

    /// The token file: the sentinel token for every key, the others for `["fuzz"]` only.
    fn file(&self) -> String {
        format!(
            "# denokv-loadtest http-fuzz\nsentinel read-write {}\nfuzz read-write {} [\"fuzz\"]\n\
             fuzzread read {} [\"fuzz\"]\n",
            self.sentinel, self.fuzz, self.read
        )
    }
}

/// The flags the server runs with besides the caller's: deadlines short enough that every slow
/// path ends well within the hang timeout, and no fsync per commit (speed; durability is not
/// what this tests).
pub const FLAGS: &[&str] = &[
    "--first-byte-timeout",
    "2",
    "--head-timeout",
    "2",
    "--idle-timeout",
    "5",
    "--h2-keepalive-interval",
    "5",
    "--h2-keepalive-timeout",
    "5",
    "--sync-mode",
    "normal",
    "--session-token-ttl",
    "86400",
];

pub struct Server {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub db: PathBuf,
    pub command: String,
    log: Arc<Mutex<VecDeque<String>>>,
    errors: Arc<Mutex<Vec<String>>>,
}

/// `denokv` beside this program (`target/<profile>/`), unless given.
pub fn default_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name(format!("denokv{}", std::env::consts::EXE_SUFFIX));
    if !bin.exists() {
        bail!(
            "no server binary at {} (build it: cargo build -p denokv), or give --server-bin",
            bin.display()
        );
    }
    Ok(bin)
}

impl Server {
    pub fn start(
        bin: &Path,
        dir: &Path,
        tokens: &Tokens,
        extra: &[String],
    ) -> anyhow::Result<Server> {
        use std::os::unix::fs::PermissionsExt;
        let token_file = dir.join("tokens");
        std::fs::write(&token_file, tokens.file())?;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))?;
        let db = dir.join("fuzz.sqlite");
        let mut args: Vec<String> = vec![
            "--sqlite-path".into(),
            db.display().to_string(),
            "serve".into(),
            "--access-token-file".into(),
            token_file.display().to_string(),
            "--addr".into(),
            "127.0.0.1:0".into(),
            "--metrics-addr".into(),
            "127.0.0.1:0".into(),
        ];
        args.extend(FLAGS.iter().map(|s| s.to_string()));
        args.extend(extra.iter().cloned());
        let command = format!("{} {}", bin.display(), args.join(" "));
        let mut child = Command::new(bin)
            .args(&args)
            .env_remove("DENO_KV_ACCESS_TOKEN")
            .env_remove("DENOKV_ACCESS_TOKEN_FILE")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("CREDENTIALS_DIRECTORY")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {}", bin.display()))?;
        let stderr = child.stderr.take().expect("piped");
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let (sink, error_sink) = (log.clone(), errors.clone());
        std::thread::spawn(move || {
            const READY: &str = "Listening on http://";
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(i) = line.find(READY) {
                    let _ = tx.send(line[i + READY.len()..].trim().to_string());
                }
                if line.contains("ERROR") || line.contains("panick") {
                    let mut e = error_sink.lock().unwrap();
                    if e.len() < 100 {
                        e.push(line.clone());
                    }
                }
                let mut l = sink.lock().unwrap();
                if l.len() == 200 {
                    l.pop_front();
                }
                l.push_back(line);
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a.parse().context("the server's address")?,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let tail: Vec<String> = log.lock().unwrap().iter().cloned().collect();
                bail!("the server did not start; its log:\n{}", tail.join("\n"));
            }
        };
        Ok(Server {
            child: Some(child),
            addr,
            db,
            command,
            log,
            errors,
        })
    }

    /// The exit status, if the server has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self, n: usize) -> String {
        let l = self.log.lock().unwrap();
        let skip = l.len().saturating_sub(n);
        l.iter().skip(skip).cloned().collect::<Vec<_>>().join("\n")
    }

    /// Log lines at ERROR or about a panic (the first 100).
    pub fn error_lines(&self) -> Vec<String> {
        self.errors.lock().unwrap().clone()
    }

    /// SIGTERM, then waits up to 30 s for the exit.
    pub fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        let mut child = self.child.take().ok_or_else(|| anyhow!("not running"))?;
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the server did not exit within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `PRAGMA integrity_check` of a database file no process has open: `ok` or the problems.
pub fn integrity_check(db: &Path) -> anyhow::Result<String> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut stmt = conn.prepare("PRAGMA integrity_check")?;
    let rows: Vec<String> = stmt
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    Ok(rows.join("; "))
}
