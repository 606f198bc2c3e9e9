//! Logs: to stderr, filtered by the log level file (`--log-level-file`, re-read on SIGHUP) or
//! else `RUST_LOG` (default `info`). Under journald (`$JOURNAL_STREAM` names our stderr) each
//! line starts with its syslog priority (`<6>` info, `<4>` warn, `<3>` error) and carries no
//! timestamp: journald adds its own.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// The filter when neither the log level file nor `RUST_LOG` gives one.
const DEFAULT_FILTER: &str = "info";

/// Controls the installed logger: re-reads the log level on request.
pub struct Logging {
    filter: reload::Handle<EnvFilter, Registry>,
    level_file: Option<PathBuf>,
}

/// Installs the logger. `level_file`, when given and readable, overrides `RUST_LOG`.
pub fn init_logging(level_file: Option<PathBuf>) -> Logging {
    let (filter, problem) = match &level_file {
        Some(path) => match read_level_file(path) {
            Ok(Some(filter)) => (filter, None),
            Ok(None) => (start_filter(), None),
            Err(e) => (start_filter(), Some(e)),
        },
        None => (start_filter(), None),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let journal = journald_owns_stderr();
    let ansi = !journal && std::io::IsTerminal::is_terminal(&std::io::stderr());
    // A closed stderr must not take the server down: the default reports the failed write with
    // eprintln!, which panics on that same closed stderr.
    let plain = (!journal).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .log_internal_errors(false)
    });
    let journald = journal.then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .log_internal_errors(false)
            // The priority says the level; journald adds the time.
            .event_format(SyslogPriority(
                tracing_subscriber::fmt::format()
                    .without_time()
                    .with_level(false),
            ))
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(plain)
        .with(journald)
        .init();
    if let Some(e) = problem {
        tracing::warn!("{e:#}; using RUST_LOG or {DEFAULT_FILTER:?} instead");
    }
    Logging {
        filter: handle,
        level_file,
    }
}

/// A log filter read from the log level file, not yet in force.
pub struct NewLevel {
    filter: EnvFilter,
    /// What it is and where it came from, for the reload log line.
    pub description: String,
}

impl Logging {
    /// Re-reads the log level file: `None` when there is no such file configured. A missing or
    /// empty file means the start-up default (`RUST_LOG`, else `info`).
    pub fn read_level(&self) -> anyhow::Result<Option<NewLevel>> {
        let Some(path) = &self.level_file else {
            return Ok(None);
        };
        let (filter, origin) = match read_level_file(path)? {
            Some(filter) => (filter, path.display().to_string()),
            None => (start_filter(), "RUST_LOG or the default".to_string()),
        };
        let description = format!("log level {:?} from {origin}", filter.to_string());
        Ok(Some(NewLevel {
            filter,
            description,
        }))
    }

    /// Puts a filter read by `read_level` in force.
    pub fn apply(&self, level: NewLevel) -> anyhow::Result<()> {
        self.filter
            .reload(level.filter)
            .context("cannot change the log level")
    }
}

/// `RUST_LOG`, else `info`.
fn start_filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER))
}

/// The filter in the log level file; `None` when the file is missing or empty.
fn read_level_file(path: &Path) -> anyhow::Result<Option<EnvFilter>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot read the log level from {}", path.display()))
        }
    };
    let directives: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    if directives.is_empty() {
        return Ok(None);
    }
    let directives = directives.join(",");
    EnvFilter::builder()
        .parse(&directives)
        .map(Some)
        .with_context(|| {
            format!(
                "{}: {directives:?} is not a log filter (try info, debug or denokv=debug,warn)",
                path.display()
            )
        })
}

/// True when `$JOURNAL_STREAM` names the file our stderr is (systemd connected it to journald).
fn journald_owns_stderr() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    stderr_identity() == Some((dev, ino))
}

/// What starts a line written straight to stderr for an error: its syslog priority under
/// journald, else nothing.
pub fn error_prefix() -> &'static str {
    if journald_owns_stderr() {
        "<3>"
    } else {
        ""
    }
}

/// The device and inode of our stderr.
pub fn stderr_identity() -> Option<(u64, u64)> {
    use std::os::fd::AsFd;
    let fd = std::io::stderr().as_fd().try_clone_to_owned().ok()?;
    let meta = std::fs::File::from(fd).metadata().ok()?;
    Some((meta.dev(), meta.ino()))
}

/// The syslog priority journald reads from a `<N>` line prefix.
fn syslog_priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// Prefixes each line with its syslog priority (`sd-daemon(3)`).
struct SyslogPriority<F>(F);

impl<S, N, F> FormatEvent<S, N> for SyslogPriority<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "<{}>", syslog_priority(event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_are_the_syslog_ones() {
        assert_eq!(syslog_priority(&Level::ERROR), 3);
        assert_eq!(syslog_priority(&Level::WARN), 4);
        assert_eq!(syslog_priority(&Level::INFO), 6);
        assert_eq!(syslog_priority(&Level::DEBUG), 7);
        assert_eq!(syslog_priority(&Level::TRACE), 7);
    }

    #[test]
    fn level_files_hold_a_filter() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log-level");
        assert!(read_level_file(&path).unwrap().is_none(), "missing");
        std::fs::write(&path, "\n# comment\n").unwrap();
        assert!(read_level_file(&path).unwrap().is_none(), "empty");
        std::fs::write(&path, "debug\n").unwrap();
        assert_eq!(
            read_level_file(&path).unwrap().unwrap().to_string(),
            "debug"
        );
        std::fs::write(&path, "denokv=debug\nwarn\n").unwrap();
        let f = read_level_file(&path).unwrap().unwrap().to_string();
        assert!(f.contains("denokv=debug") && f.contains("warn"), "{f}");
        std::fs::write(&path, "denokv=loud\n").unwrap();
        let err = format!("{:#}", read_level_file(&path).unwrap_err());
        assert!(err.contains("is not a log filter"), "{err}");
    }
}
