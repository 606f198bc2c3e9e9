//! Bearer-token authentication, and the token set that SIGHUP can replace.

use std::cell::RefCell;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use http::HeaderMap;

use super::error::ApiError;

/// Shortest access token accepted.
pub const MIN_TOKEN_LEN: usize = 12;

/// The access tokens this server accepts.
#[derive(Clone)]
pub struct Tokens {
    tokens: Vec<String>,
}

impl Tokens {
    pub fn new(tokens: Vec<String>) -> Self {
        Tokens { tokens }
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Tokens one per line; surrounding white space and blank lines are ignored. `origin` names
    /// the source in errors, which never quote a token.
    pub fn parse(text: &str, origin: &str) -> anyhow::Result<Tokens> {
        let mut tokens = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let token = line.trim();
            if token.is_empty() {
                continue;
            }
            if token.len() < MIN_TOKEN_LEN {
                bail!(
                    "{origin}, line {}: Access token must be at minimum {MIN_TOKEN_LEN} chars long.",
                    i + 1
                );
            }
            tokens.push(token.to_string());
        }
        if tokens.is_empty() {
            bail!("{origin} holds no access token (one per line)");
        }
        Ok(Tokens { tokens })
    }

    /// Checks the `Authorization` header (SPEC §1.3.2 steps 3–4) and returns the token used.
    /// The header is split at the first space; the scheme is `bearer` in any case.
    pub fn authenticate<'a>(&self, headers: &'a HeaderMap) -> Result<&'a str, ApiError> {
        let value = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(ApiError::malformed_authorization)?;
        let (scheme, token) = value
            .split_once(' ')
            .ok_or_else(ApiError::malformed_authorization)?;
        let mut ok = false;
        for t in &self.tokens {
            // Visit every token so the time taken does not tell which one was close.
            ok |= constant_time_eq(t.as_bytes(), token.as_bytes());
        }
        if scheme.eq_ignore_ascii_case("bearer") && ok {
            Ok(token)
        } else {
            Err(ApiError::invalid_token())
        }
    }
}

/// Says how many tokens there are, never what they are.
impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} hidden)", self.tokens.len())
    }
}

/// Where the access tokens come from.
#[derive(Clone)]
pub enum TokenSource {
    /// `--access-token` or `DENO_KV_ACCESS_TOKEN`: fixed for the life of the process.
    Given(String),
    /// A file (`--access-token-file`, or the systemd credential `access-token`), one token per
    /// line, re-read on SIGHUP.
    File(PathBuf),
}

impl TokenSource {
    pub fn load(&self) -> anyhow::Result<Tokens> {
        match self {
            TokenSource::Given(token) => {
                if token.len() < MIN_TOKEN_LEN {
                    bail!("Access token must be at minimum {MIN_TOKEN_LEN} chars long.");
                }
                Ok(Tokens::new(vec![token.clone()]))
            }
            TokenSource::File(path) => load_file(path),
        }
    }

    /// Says where tokens come from, for the log (never the tokens themselves).
    pub fn describe(&self) -> String {
        match self {
            TokenSource::Given(_) => "the command line or DENO_KV_ACCESS_TOKEN".to_string(),
            TokenSource::File(path) => path.display().to_string(),
        }
    }

    pub fn reloadable(&self) -> bool {
        matches!(self, TokenSource::File(_))
    }
}

/// Never shows a given token.
impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSource::Given(_) => f.write_str("Given(hidden)"),
            TokenSource::File(path) => f.debug_tuple("File").field(path).finish(),
        }
    }
}

fn load_file(path: &Path) -> anyhow::Result<Tokens> {
    let origin = path.display().to_string();
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read access tokens from {origin}"))?;
    let Ok(text) = std::str::from_utf8(&bytes) else {
        bail!("{origin} is not UTF-8 text: cannot read access tokens from it");
    };
    let tokens = Tokens::parse(text, &origin)?;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o004 != 0 {
            tracing::warn!("{origin} is readable by every user: chmod o-r it");
        }
    }
    Ok(tokens)
}

/// The token set every core reads, replaced as a whole on reload.
pub struct SharedTokens {
    generation: AtomicU64,
    current: Mutex<Arc<Tokens>>,
}

impl SharedTokens {
    pub fn new(tokens: Tokens) -> Self {
        SharedTokens {
            generation: AtomicU64::new(0),
            current: Mutex::new(Arc::new(tokens)),
        }
    }

    /// Swaps in a new set: every request that starts after this returns uses it.
    pub fn replace(&self, tokens: Tokens) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(tokens);
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The set, and a generation no newer than it.
    fn snapshot(&self) -> (u64, Arc<Tokens>) {
        let generation = self.generation.load(Ordering::Acquire);
        let tokens = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        (generation, tokens)
    }
}

/// One core's copy of the shared set. A request costs one atomic load to see that the copy is
/// current; only a reload makes the core take the lock and copy again.
pub struct CoreTokens {
    shared: Arc<SharedTokens>,
    cached: RefCell<(u64, Arc<Tokens>)>,
}

impl CoreTokens {
    pub fn new(shared: Arc<SharedTokens>) -> Self {
        let cached = RefCell::new(shared.snapshot());
        CoreTokens { shared, cached }
    }

    /// [`Tokens::authenticate`] against the current set.
    pub fn authenticate<'a>(&self, headers: &'a HeaderMap) -> Result<&'a str, ApiError> {
        if self.shared.generation.load(Ordering::Acquire) != self.cached.borrow().0 {
            *self.cached.borrow_mut() = self.shared.snapshot();
        }
        self.cached.borrow().1.authenticate(headers)
    }
}

/// Compares in time that depends only on the lengths (SPEC §10 D9).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(header: Option<&str>) -> Result<String, String> {
        let mut h = HeaderMap::new();
        if let Some(v) = header {
            h.insert(http::header::AUTHORIZATION, v.parse().unwrap());
        }
        let tokens = Tokens::new(vec!["0123456789abcdef".into(), "second token 1".into()]);
        tokens
            .authenticate(&h)
            .map(str::to_string)
            .map_err(|e| e.message)
    }

    #[test]
    fn authorization_rules() {
        assert_eq!(
            check(Some("Bearer 0123456789abcdef")).unwrap(),
            "0123456789abcdef"
        );
        assert_eq!(
            check(Some("bEaReR 0123456789abcdef")).unwrap(),
            "0123456789abcdef"
        );
        assert_eq!(
            check(Some("Bearer second token 1")).unwrap(),
            "second token 1",
            "split at the first space"
        );
        assert_eq!(check(None).unwrap_err(), "Malformed authorization header.");
        assert_eq!(
            check(Some("Bearer")).unwrap_err(),
            "Malformed authorization header."
        );
        assert_eq!(
            check(Some("Bearer wrong-token-123")).unwrap_err(),
            "Invalid access token."
        );
        assert_eq!(
            check(Some("Basic 0123456789abcdef")).unwrap_err(),
            "Invalid access token."
        );
        assert_eq!(
            check(Some("Bearer  0123456789abcdef")).unwrap_err(),
            "Invalid access token."
        );
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        h
    }

    #[test]
    fn a_replaced_set_is_seen_by_every_core() {
        let shared = Arc::new(SharedTokens::new(Tokens::new(
            vec!["old-token-0123".into()],
        )));
        let core = CoreTokens::new(shared.clone());
        assert!(core.authenticate(&bearer("old-token-0123")).is_ok());
        shared.replace(Tokens::new(vec![
            "new-token-0123".into(),
            "other-token-456".into(),
        ]));
        assert!(core.authenticate(&bearer("old-token-0123")).is_err());
        assert!(core.authenticate(&bearer("new-token-0123")).is_ok());
        assert!(core.authenticate(&bearer("other-token-456")).is_ok());
        let late = CoreTokens::new(shared);
        assert!(late.authenticate(&bearer("new-token-0123")).is_ok());
    }

    #[test]
    fn token_files_hold_one_token_a_line() {
        let t = Tokens::parse("  first-token-123 \r\n\n\tsecond token 1\n", "f").unwrap();
        assert_eq!(t.tokens, ["first-token-123", "second token 1"]);
        let err = Tokens::parse("first-token-123\nsecret\n", "/etc/x").unwrap_err();
        let err = err.to_string();
        assert_eq!(
            err,
            "/etc/x, line 2: Access token must be at minimum 12 chars long."
        );
        assert!(!err.contains("secret"), "never quote a token");
        assert!(Tokens::parse("\n \n", "f")
            .unwrap_err()
            .to_string()
            .contains("no access token"));
    }

    #[test]
    fn token_sources_load_and_describe_without_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "file-token-0123\n").unwrap();
        let file = TokenSource::File(path.clone());
        assert_eq!(file.load().unwrap().len(), 1);
        assert!(file.reloadable());
        assert_eq!(file.describe(), path.display().to_string());
        let given = TokenSource::Given("given-token-0123".into());
        assert_eq!(given.load().unwrap().len(), 1);
        assert!(!given.reloadable());
        assert!(!given.describe().contains("given-token"));
        assert!(TokenSource::Given("short".into()).load().is_err());
        let missing = TokenSource::File(dir.path().join("missing"))
            .load()
            .unwrap_err();
        assert!(format!("{missing:#}").starts_with("cannot read access tokens from"));
    }
}
