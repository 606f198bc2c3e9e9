//! Bearer-token authentication and access control: the token file (names, scopes, key
//! prefixes), the session tokens the metadata exchange hands out, and the token set that
//! SIGHUP can replace.
//!
//! A token is never kept in memory as text after it is read: each is held as its SHA-256
//! digest (compared in constant time, so neither the time taken nor a length shows how close
//! a guess was), an id and a session key, both HMACs keyed with the token itself (the parent
//! id of its session tokens, and what signs them). Names, never tokens, appear in logs, metrics and error texts.

use std::cell::RefCell;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use hmac::{Hmac, Mac};
use http::{HeaderMap, StatusCode};
use prometheus::IntCounter;
use sha2::{Digest, Sha256};

use super::error::ApiError;
use crate::kv::key;
use crate::metrics::Metrics;

/// Shortest access token accepted.
pub const MIN_TOKEN_LEN: usize = 12;
/// Longest token name.
pub const MAX_NAME_LEN: usize = 64;
/// Most tokens in one token file (each is compared on every request, and each name is a
/// label of the per-token metrics).
pub const MAX_TOKENS: usize = 1000;
/// The name of the token given by `--access-token` / `DENO_KV_ACCESS_TOKEN`.
pub const GIVEN_TOKEN_NAME: &str = "access-token";
/// Session tokens start with this; long-lived tokens may not.
const SESSION_PREFIX: &str = "denokv-session.";

type HmacSha256 = Hmac<Sha256>;

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Read,
    ReadWrite,
}

impl Scope {
    pub fn name(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::ReadWrite => "read-write",
        }
    }
}

/// Why a request was refused with 403: the `reason` label of `denokv_token_refusals_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A write with a `read` token.
    ReadOnly,
    /// A key or range outside the token's prefixes.
    Prefix,
}

impl Refusal {
    pub const ALL: [Refusal; 2] = [Refusal::ReadOnly, Refusal::Prefix];

    pub fn name(self) -> &'static str {
        match self {
            Refusal::ReadOnly => "read_only",
            Refusal::Prefix => "prefix",
        }
    }
}

/// One token's counters, resolved when its set is installed.
pub struct TokenCounters {
    pub requests: IntCounter,
    pub refusals: [IntCounter; Refusal::ALL.len()],
}

/// One access token: its name, scope and key prefixes, and how to recognise it.
pub struct Access {
    pub name: String,
    pub scope: Scope,
    /// Encoded key prefixes (SPEC §4); empty: every key.
    prefixes: Vec<Vec<u8>>,
    /// SHA-256 of the token.
    digest: [u8; 32],
    /// Derived from the token: names the parent of a session token.
    id: [u8; 16],
    /// Derived from the token: signs its session tokens, so they outlive a restart (and a
    /// reload that keeps the token) and die with the token.
    session_key: [u8; 32],
    counters: OnceLock<TokenCounters>,
}

impl Access {
    fn new(name: String, scope: Scope, prefixes: Vec<Vec<u8>>, token: &str) -> Access {
        Access {
            name,
            scope,
            prefixes,
            digest: Sha256::digest(token.as_bytes()).into(),
            id: token_id(token),
            session_key: session_key(token),
            counters: OnceLock::new(),
        }
    }

    /// Read-write, every key.
    pub fn full(name: &str, token: &str) -> Access {
        Access::new(name.to_string(), Scope::ReadWrite, Vec::new(), token)
    }

    /// Whether `key` lies under one of the token's prefixes.
    pub fn allows_key(&self, key: &[u8]) -> bool {
        self.prefixes.is_empty() || self.prefixes.iter().any(|p| key::in_prefix(p, key))
    }

    /// Whether every key of `[start, end)` lies under one prefix of the token.
    pub fn allows_range(&self, start: &[u8], end: &[u8]) -> bool {
        self.prefixes.is_empty()
            || self
                .prefixes
                .iter()
                .any(|p| key::range_in_prefix(p, start, end))
    }

    /// 403 unless the token may write.
    pub fn check_write(&self) -> Result<(), ApiError> {
        if self.scope == Scope::ReadWrite {
            return Ok(());
        }
        Err(self.refuse(
            Refusal::ReadOnly,
            format!(
                "Access denied: the access token '{}' may only read (scope read); this write \
                 was refused and nothing was written.",
                self.name
            ),
        ))
    }

    /// 403 unless every key lies under the token's prefixes.
    pub fn check_keys<'a>(&self, keys: impl IntoIterator<Item = &'a [u8]>) -> Result<(), ApiError> {
        if self.prefixes.is_empty() || keys.into_iter().all(|k| self.allows_key(k)) {
            return Ok(());
        }
        Err(self.refuse_prefix())
    }

    /// 403 unless every range lies under one of the token's prefixes.
    pub fn check_ranges<'a>(
        &self,
        ranges: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Result<(), ApiError> {
        if self.prefixes.is_empty() || ranges.into_iter().all(|(s, e)| self.allows_range(s, e)) {
            return Ok(());
        }
        Err(self.refuse_prefix())
    }

    fn refuse_prefix(&self) -> ApiError {
        self.refuse(
            Refusal::Prefix,
            format!(
                "Access denied: a key or range of this request lies outside the key prefixes \
                 of the access token '{}'; nothing was read or written.",
                self.name
            ),
        )
    }

    fn refuse(&self, reason: Refusal, message: String) -> ApiError {
        if let Some(c) = self.counters.get() {
            c.refusals[reason as usize].inc();
        }
        ApiError::new(StatusCode::FORBIDDEN, message)
    }

    /// Counts an authenticated request.
    pub fn count_request(&self) {
        if let Some(c) = self.counters.get() {
            c.requests.inc();
        }
    }

    /// The prefixes, encoded.
    pub fn prefixes(&self) -> &[Vec<u8>] {
        &self.prefixes
    }
}

/// Says what the token may do, never what it is.
impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("name", &self.name)
            .field("scope", &self.scope)
            .field("prefixes", &self.prefixes.len())
            .finish_non_exhaustive()
    }
}

/// The access tokens this server accepts.
#[derive(Clone)]
pub struct Tokens {
    entries: Vec<Arc<Access>>,
}

impl Tokens {
    /// Read-write tokens for every key, named `line-1`, `line-2`, … (for tests and tools).
    pub fn new(tokens: Vec<String>) -> Self {
        let entries = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| Arc::new(Access::full(&format!("line-{}", i + 1), t)))
            .collect();
        Tokens { entries }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The tokens' names, in file order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.name.as_str())
    }

    /// Resolves each token's counters (`denokv_token_requests_total`,
    /// `denokv_token_refusals_total`), so that requests count without a label lookup.
    pub fn attach_metrics(&self, metrics: &Metrics) {
        for e in &self.entries {
            let _ = e.counters.set(metrics.token_counters(&e.name));
        }
    }

    /// A token file (see the README, "Access tokens"). Each line is one of:
    ///
    /// - blank, or a comment starting with `#`;
    /// - a bare token (no white space): read-write, every key, named `line-N`;
    /// - `name scope token [prefix…]`, fields separated by white space, with `scope` `read`
    ///   or `read-write` and each prefix a JS key literal (`["users", 1n]`).
    ///
    /// `origin` names the source in errors, which never quote a token.
    pub fn parse(text: &str, origin: &str) -> anyhow::Result<Tokens> {
        let mut entries: Vec<Arc<Access>> = Vec::new();
        let mut lines_of: Vec<usize> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let access =
                parse_line(line, n).map_err(|e| anyhow::anyhow!("{origin}, line {n}: {e}"))?;
            if let Some(j) = entries.iter().position(|e| e.digest == access.digest) {
                bail!(
                    "{origin}, line {n}: the same token as on line {} (each token once)",
                    lines_of[j]
                );
            }
            if let Some(j) = entries.iter().position(|e| e.name == access.name) {
                bail!(
                    "{origin}, line {n}: the name '{}' is taken by line {} (names must differ)",
                    access.name,
                    lines_of[j]
                );
            }
            if entries.len() == MAX_TOKENS {
                bail!("{origin}, line {n}: more than {MAX_TOKENS} access tokens");
            }
            entries.push(Arc::new(access));
            lines_of.push(n);
        }
        if entries.is_empty() {
            bail!("{origin} holds no access token (one per line)");
        }
        Ok(Tokens { entries })
    }

    /// Checks the `Authorization` header (SPEC §1.3.2 steps 3–4) against the long-lived
    /// tokens and, unless `long_lived_only`, session tokens; returns whose token it is.
    /// The header is split at the first space; the scheme is `bearer` in any case.
    fn authenticate(
        &self,
        headers: &HeaderMap,
        long_lived_only: bool,
        now: SystemTime,
    ) -> Result<Arc<Access>, ApiError> {
        let (scheme, token) = split_authorization(headers)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(ApiError::invalid_token());
        }
        if let Some(session) = token.strip_prefix(SESSION_PREFIX) {
            if long_lived_only {
                return Err(ApiError::invalid_token());
            }
            let (id, expires_ms, tag) =
                parse_session(session, now).ok_or_else(ApiError::invalid_token)?;
            // The parent must still be in the set: a reload that removed it ends its sessions.
            let parent = self
                .entries
                .iter()
                .find(|e| e.id == id)
                .ok_or_else(ApiError::invalid_token)?;
            // Constant time (the hmac crate's verify).
            session_mac(&parent.session_key, &id, expires_ms)
                .verify_slice(&tag)
                .map_err(|_| ApiError::invalid_token())?;
            return Ok(parent.clone());
        }
        self.find(token).ok_or_else(ApiError::invalid_token)
    }

    /// The entry of a long-lived token. Compares fixed-length digests in constant time and
    /// visits every entry, so the time taken tells neither a length nor which one was close.
    fn find(&self, token: &str) -> Option<Arc<Access>> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for e in &self.entries {
            if constant_time_eq(&e.digest, &digest) {
                found = Some(e);
            }
        }
        found.cloned()
    }

    fn by_id(&self, id: &[u8; 16]) -> Option<Arc<Access>> {
        self.entries.iter().find(|e| &e.id == id).cloned()
    }
}

/// The `Authorization` header's scheme and token, split at the first space.
fn split_authorization(headers: &HeaderMap) -> Result<(&str, &str), ApiError> {
    headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(ApiError::malformed_authorization)?
        .split_once(' ')
        .ok_or_else(ApiError::malformed_authorization)
}

/// The token of a request already authenticated.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    split_authorization(headers).ok().map(|(_, token)| token)
}

/// Says how many tokens there are, never what they are.
impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} hidden)", self.entries.len())
    }
}

/// One line of a token file that is not blank or a comment. Errors never quote the line.
fn parse_line(line: &str, n: usize) -> Result<Access, String> {
    let mut fields = Fields(line);
    let first = fields.next().expect("the line is not blank");
    if fields.0.is_empty() {
        // A bare token, as in the one-token-per-line files.
        check_token(first)?;
        return Ok(Access::full(&format!("line-{n}"), first));
    }
    const FORMAT: &str =
        "a line with white space is `name scope token [prefix…]`; a bare token has none";
    let name = first;
    if name.len() > MAX_NAME_LEN
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return Err(format!(
            "the name (first field) must be 1 to {MAX_NAME_LEN} letters, digits, '_', '-' or \
             '.' ({FORMAT})"
        ));
    }
    let scope = match fields.next() {
        Some("read") => Scope::Read,
        Some("read-write") => Scope::ReadWrite,
        _ => {
            return Err(format!(
                "the scope (second field) must be read or read-write ({FORMAT})"
            ))
        }
    };
    let token = fields
        .next()
        .ok_or_else(|| format!("the token (third field) is missing ({FORMAT})"))?;
    check_token(token)?;
    let literals = key::parse_literals(fields.0).map_err(|e| format!("{e} ({FORMAT})"))?;
    let prefixes = literals.iter().map(|parts| key::encode(parts)).collect();
    Ok(Access::new(name.to_string(), scope, prefixes, token))
}

fn check_token(token: &str) -> Result<(), String> {
    if token.len() < MIN_TOKEN_LEN {
        return Err(format!(
            "Access token must be at minimum {MIN_TOKEN_LEN} chars long."
        ));
    }
    if token.starts_with(SESSION_PREFIX) {
        return Err(format!(
            "an access token may not start with {SESSION_PREFIX:?} (session tokens do)"
        ));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("an access token must be printable ASCII (clients send it in a header)".into());
    }
    Ok(())
}

/// White-space separated fields, the rest of the line kept.
struct Fields<'a>(&'a str);

impl<'a> Iterator for Fields<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let s = self.0.trim_start();
        if s.is_empty() {
            self.0 = s;
            return None;
        }
        let end = s.find(char::is_whitespace).unwrap_or(s.len());
        self.0 = s[end..].trim_start();
        Some(&s[..end])
    }
}

/// An HMAC keyed with `key` over `parts`.
fn keyed(key: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        mac.update(p);
    }
    mac
}

/// A token's id: a hash keyed with the token itself, so it tells nothing without the token.
fn token_id(token: &str) -> [u8; 16] {
    let full = keyed(token.as_bytes(), &[b"denokv token id\0"])
        .finalize()
        .into_bytes();
    full[..16].try_into().expect("16 of 32 bytes")
}

/// The key that signs a token's session tokens: derived from the token (a secret), not from
/// the process, so that session tokens survive a restart: clients that refresh metadata
/// only near `expiresAt` (`@deno/kv`) keep working across upgrades.
fn session_key(token: &str) -> [u8; 32] {
    keyed(token.as_bytes(), &[b"denokv session key\0"])
        .finalize()
        .into_bytes()
        .into()
}

fn session_mac(key: &[u8; 32], id: &[u8; 16], expires_ms: u64) -> HmacSha256 {
    keyed(key, &[b"denokv session\0", id, &expires_ms.to_be_bytes()])
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// A session token for `access`, valid until `expires` (whole milliseconds):
/// `denokv-session.<id>.<expiry, ms since 1970>.<HMAC-SHA-256>`, hex. It carries no name,
/// scope or prefix: those are its parent's, looked up by id on each request, so a reload
/// that changes or removes the parent applies to its sessions at once.
pub fn issue_session(access: &Access, expires: SystemTime) -> String {
    let expires_ms = millis(expires);
    let tag = session_mac(&access.session_key, &access.id, expires_ms)
        .finalize()
        .into_bytes();
    format!(
        "{SESSION_PREFIX}{}.{expires_ms}.{}",
        hex(&access.id),
        hex(&tag)
    )
}

/// A session token (without its prefix) taken apart: the parent's id, the expiry and the tag;
/// `None` when malformed or expired at `now`. The tag is checked against the parent's key.
fn parse_session(session: &str, now: SystemTime) -> Option<([u8; 16], u64, Vec<u8>)> {
    let mut parts = session.split('.');
    let (id, expires, tag) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !expires.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let id: [u8; 16] = unhex(id)?.try_into().ok()?;
    let expires_ms: u64 = expires.parse().ok()?;
    let tag = unhex(tag)?;
    (millis(now) < expires_ms).then_some((id, expires_ms, tag))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || s.len() > 128 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Where the access tokens come from.
#[derive(Clone)]
pub enum TokenSource {
    /// `--access-token` or `DENO_KV_ACCESS_TOKEN`: fixed for the life of the process.
    Given(String),
    /// A file (`--access-token-file`, or the systemd credential `access-token`), re-read on
    /// SIGHUP.
    File(PathBuf),
}

impl TokenSource {
    pub fn load(&self) -> anyhow::Result<Tokens> {
        match self {
            TokenSource::Given(token) => {
                if token.len() < MIN_TOKEN_LEN {
                    bail!("Access token must be at minimum {MIN_TOKEN_LEN} chars long.");
                }
                if token.starts_with(SESSION_PREFIX) {
                    bail!("the access token may not start with {SESSION_PREFIX:?}");
                }
                Ok(Tokens {
                    entries: vec![Arc::new(Access::full(GIVEN_TOKEN_NAME, token))],
                })
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
    /// Wakes open watch streams on a reload.
    reloaded: tokio::sync::watch::Sender<u64>,
}

impl SharedTokens {
    pub fn new(tokens: Tokens) -> Self {
        SharedTokens {
            generation: AtomicU64::new(0),
            current: Mutex::new(Arc::new(tokens)),
            reloaded: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Swaps in a new set: every request that starts after this returns uses it, and open
    /// watch streams check their token against it at their next wake-up.
    /// Returns the set replaced.
    pub fn replace(&self, tokens: Tokens) -> Arc<Tokens> {
        let old = std::mem::replace(
            &mut *self.current.lock().unwrap_or_else(|e| e.into_inner()),
            Arc::new(tokens),
        );
        let generation = self.generation.fetch_add(1, Ordering::Release) + 1;
        self.reloaded.send_replace(generation);
        old
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

    /// The current set.
    fn current(&self) -> Arc<Tokens> {
        if self.shared.generation.load(Ordering::Acquire) != self.cached.borrow().0 {
            *self.cached.borrow_mut() = self.shared.snapshot();
        }
        self.cached.borrow().1.clone()
    }

    /// The data path: a long-lived token or a session token.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Arc<Access>, ApiError> {
        self.current()
            .authenticate(headers, false, SystemTime::now())
    }

    /// The metadata exchange: long-lived tokens only, so that a session token cannot renew
    /// itself.
    pub fn authenticate_long_lived(&self, headers: &HeaderMap) -> Result<Arc<Access>, ApiError> {
        self.current()
            .authenticate(headers, true, SystemTime::now())
    }

    /// The token's entry in the current set (a reload may have changed or removed it), for
    /// requests that outlive a reload (watch streams).
    pub fn current_entry(&self, access: &Access) -> Option<Arc<Access>> {
        self.current().by_id(&access.id)
    }

    /// Changes whenever the set is replaced.
    pub fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::Acquire)
    }

    /// Says when the set is replaced (for watch streams).
    pub fn reloads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.reloaded.subscribe()
    }
}

/// Compares fixed-length digests without an early exit.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn headers(value: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(v) = value {
            h.insert(http::header::AUTHORIZATION, v.parse().unwrap());
        }
        h
    }

    fn bearer(token: &str) -> HeaderMap {
        headers(Some(&format!("Bearer {token}")))
    }

    fn check(header: Option<&str>) -> Result<String, String> {
        let tokens = Tokens::parse("0123456789abcdef\nsecond read second-token-1\n", "f").unwrap();
        tokens
            .authenticate(&headers(header), false, SystemTime::now())
            .map(|a| a.name.clone())
            .map_err(|e| e.message)
    }

    #[test]
    fn authorization_rules() {
        assert_eq!(check(Some("Bearer 0123456789abcdef")).unwrap(), "line-1");
        assert_eq!(check(Some("bEaReR 0123456789abcdef")).unwrap(), "line-1");
        assert_eq!(check(Some("Bearer second-token-1")).unwrap(), "second");
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
            "Invalid access token.",
            "split at the first space"
        );
        assert_eq!(
            check(Some("Bearer 0123456789abcdef0")).unwrap_err(),
            "Invalid access token.",
            "a longer token"
        );
        assert_eq!(
            check(Some("Bearer 0123456789abcde")).unwrap_err(),
            "Invalid access token.",
            "a prefix of a token"
        );
    }

    #[test]
    fn the_compare_is_of_fixed_length_digests() {
        let a = [7u8; 32];
        let mut b = a;
        assert!(constant_time_eq(&a, &b));
        for i in [0, 15, 31] {
            b = a;
            b[i] ^= 1;
            assert!(!constant_time_eq(&a, &b), "byte {i}");
        }
        // A token is held only as digests: what is compared has the same length whatever
        // the lengths of the stored and the presented token.
        let t = Tokens::new(vec!["short-token-1".into(), "a".repeat(500)]);
        assert!(t.find("short-token-1").is_some());
        assert!(t.find(&"a".repeat(500)).is_some());
        assert!(t.find(&"a".repeat(499)).is_none());
        assert!(t.find("").is_none());
    }

    #[test]
    fn a_replaced_set_is_seen_by_every_core() {
        let shared = Arc::new(SharedTokens::new(Tokens::new(
            vec!["old-token-0123".into()],
        )));
        let core = CoreTokens::new(shared.clone());
        assert!(core.authenticate(&bearer("old-token-0123")).is_ok());
        let g = core.generation();
        shared.replace(Tokens::new(vec![
            "new-token-0123".into(),
            "other-token-456".into(),
        ]));
        assert_ne!(core.generation(), g);
        assert!(core.authenticate(&bearer("old-token-0123")).is_err());
        assert!(core.authenticate(&bearer("new-token-0123")).is_ok());
        assert!(core.authenticate(&bearer("other-token-456")).is_ok());
        let late = CoreTokens::new(shared);
        assert!(late.authenticate(&bearer("new-token-0123")).is_ok());
    }

    #[test]
    fn bare_lines_keep_working_and_are_named_by_line() {
        let t = Tokens::parse(
            "  first-token-123 \r\n\n# a comment\n\tsecond-token-1\n",
            "f",
        )
        .unwrap();
        let names: Vec<&str> = t.names().collect();
        assert_eq!(names, ["line-1", "line-4"]);
        assert!(t
            .entries
            .iter()
            .all(|e| e.scope == Scope::ReadWrite && e.prefixes.is_empty()));
        let err = Tokens::parse("first-token-123\nsecret\n", "/etc/x").unwrap_err();
        let err = err.to_string();
        assert_eq!(
            err,
            "/etc/x, line 2: Access token must be at minimum 12 chars long."
        );
        assert!(!err.contains("secret"), "never quote a token");
        assert!(Tokens::parse("\n \n# only a comment\n", "f")
            .unwrap_err()
            .to_string()
            .contains("no access token"));
    }

    #[test]
    fn named_lines_have_a_scope_and_prefixes() {
        let t = Tokens::parse(
            "ada read-write ada-token-0123 [\"users\", 1n] [\"logs\"]\n\
             reporting   read\treporting-token-1\n\
             all read-write all-token-01234 []\n",
            "f",
        )
        .unwrap();
        let ada = t.find("ada-token-0123").unwrap();
        assert_eq!((ada.name.as_str(), ada.scope), ("ada", Scope::ReadWrite));
        use crate::kv::key::{encode, KeyPart::*};
        assert_eq!(
            ada.prefixes,
            [
                encode(&[String("users".into()), Int(1)]),
                encode(&[String("logs".into())])
            ]
        );
        assert!(ada.allows_key(&encode(&[String("users".into()), Int(1), True])));
        assert!(!ada.allows_key(&encode(&[String("users".into()), Int(2)])));
        assert!(ada.allows_key(&encode(&[String("logs".into())])));
        let reporting = t.find("reporting-token-1").unwrap();
        assert_eq!(reporting.scope, Scope::Read);
        assert!(reporting.prefixes.is_empty());
        assert!(reporting.allows_key(b"anything"));
        let all = t.find("all-token-01234").unwrap();
        assert!(
            all.allows_range(&[0], &[0xff]),
            "the empty prefix holds every key"
        );
    }

    #[test]
    fn malformed_lines_name_the_file_and_line_never_the_token() {
        let err = |text: &str| {
            Tokens::parse(text, "/etc/denokv/tokens")
                .unwrap_err()
                .to_string()
        };
        let cases = [
            (
                "ada readwrite SECRETSECRET12\n",
                "line 1: the scope (second field) must be read or read-write",
            ),
            (
                "ada read SECRET\n",
                "line 1: Access token must be at minimum 12 chars long.",
            ),
            (
                "ok-token-123456\nada read\n",
                "line 2: the token (third field) is missing",
            ),
            (
                "ada read SECRETSECRET12 users\n",
                "line 1: prefix 1: expected `[` at character 1 of the prefixes",
            ),
            (
                "ada read SECRETSECRET12 [\"a\" SECRET]\n",
                "line 1: prefix 1: expected `,` or `]` at character 6",
            ),
            (
                "ad@ read SECRETSECRET12\n",
                "line 1: the name (first field) must be",
            ),
            (
                "SECRET SECRETSECRET12 [\"x\"]\n",
                "line 1: the scope (second field)",
            ),
            (
                "a read SECRETSECRET12\nb read SECRETSECRET12\n",
                "line 2: the same token as on line 1",
            ),
            (
                "a read SECRETSECRET12\na read SECRETSECRET34\n",
                "line 2: the name 'a' is taken by line 1",
            ),
            (
                "line-2 read SECRETSECRET12\nSECRETSECRET34\n",
                "line 2: the name 'line-2' is taken by line 1",
            ),
            (
                "a read denokv-session.SECRETSECRET\n",
                "line 1: an access token may not start with",
            ),
            (
                "a read SECRETSECRET12\u{e9}\n",
                "line 1: an access token must be printable ASCII",
            ),
        ];
        for (text, want) in cases {
            let e = err(text);
            assert!(e.starts_with("/etc/denokv/tokens, "), "{e}");
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(!e.contains("SECRET"), "{text:?} quotes the token: {e}");
        }
        let many: String = (0..=MAX_TOKENS)
            .map(|i| format!("token-number-{i:05}\n"))
            .collect();
        assert_eq!(
            err(&many),
            format!(
                "/etc/denokv/tokens, line {}: more than 1000 access tokens",
                MAX_TOKENS + 1
            )
        );
    }

    #[test]
    fn read_tokens_cannot_write_and_prefix_tokens_stay_inside() {
        let t = Tokens::parse(
            "r read read-token-0123 [\"users\"]\nw read-write write-token-012 [\"users\"]\n",
            "f",
        )
        .unwrap();
        let r = t.find("read-token-0123").unwrap();
        let w = t.find("write-token-012").unwrap();
        let e = r.check_write().unwrap_err();
        assert_eq!(e.status, StatusCode::FORBIDDEN);
        assert_eq!(
            e.message,
            "Access denied: the access token 'r' may only read (scope read); this write was \
             refused and nothing was written."
        );
        assert!(w.check_write().is_ok());
        use crate::kv::key::{encode, prefix_range, KeyPart::*};
        let users = encode(&[String("users".into())]);
        let other = encode(&[String("other".into())]);
        assert!(w.check_keys([users.as_slice()]).is_ok());
        let e = w
            .check_keys([users.as_slice(), other.as_slice()])
            .unwrap_err();
        assert_eq!(e.status, StatusCode::FORBIDDEN);
        assert!(e
            .message
            .contains("outside the key prefixes of the access token 'w'"));
        let (s, end) = prefix_range(&users);
        assert!(r.check_ranges([(s.as_slice(), end.as_slice())]).is_ok());
        let (s, end) = prefix_range(&[]);
        assert!(r.check_ranges([(s.as_slice(), end.as_slice())]).is_err());
    }

    #[test]
    fn refusals_and_requests_are_counted_by_name() {
        let metrics = Metrics::new();
        let t = Tokens::parse("r read read-token-0123 [\"users\"]\n", "f").unwrap();
        t.attach_metrics(&metrics);
        let r = t.find("read-token-0123").unwrap();
        r.count_request();
        let _ = r.check_write();
        let _ = r.check_keys([b"\x02x\x00".as_slice()]);
        let _ = r.check_keys([b"\x02x\x00".as_slice()]);
        let text = String::from_utf8(metrics.encode()).unwrap();
        assert!(
            text.contains("denokv_token_requests_total{token=\"r\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("denokv_token_refusals_total{reason=\"read_only\",token=\"r\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("denokv_token_refusals_total{reason=\"prefix\",token=\"r\"} 2"),
            "{text}"
        );
        assert!(!text.contains("read-token"), "never the token");
    }

    #[test]
    fn session_tokens_carry_their_parent_and_expire() {
        let shared = Arc::new(SharedTokens::new(
            Tokens::parse("p read parent-token-01 [\"a\"]\nother-token-0123\n", "f").unwrap(),
        ));
        let core = CoreTokens::new(shared.clone());
        let parent = core
            .authenticate_long_lived(&bearer("parent-token-01"))
            .unwrap();
        let now = SystemTime::now();
        let session = issue_session(&parent, now + Duration::from_secs(60));
        assert!(session.starts_with("denokv-session."));
        assert!(
            !session.contains("parent-token"),
            "the parent token is not inside"
        );
        let got = core.authenticate(&bearer(&session)).unwrap();
        assert_eq!((got.name.as_str(), got.scope), ("p", Scope::Read));
        assert_eq!(got.prefixes, parent.prefixes);
        // Not for the metadata exchange: a session cannot renew itself.
        assert_eq!(
            core.authenticate_long_lived(&bearer(&session))
                .unwrap_err()
                .message,
            "Invalid access token."
        );
        // Expiry, to the millisecond.
        let tokens = shared.snapshot().1;
        let expires = UNIX_EPOCH + Duration::from_millis(millis(now) + 60_000);
        let at = |t: SystemTime| tokens.authenticate(&bearer(&session), false, t).is_ok();
        assert!(at(expires - Duration::from_millis(1)));
        assert!(!at(expires));
        assert!(!at(expires + Duration::from_secs(3600)));
        // Forged or altered: refused.
        let mut chars: Vec<char> = session.chars().collect();
        let last = chars.len() - 1;
        chars[last] = if chars[last] == '0' { '1' } else { '0' };
        let altered: String = chars.into_iter().collect();
        assert!(core.authenticate(&bearer(&altered)).is_err());
        let later = session.replace(
            &format!(".{}.", millis(expires)),
            &format!(".{}.", millis(expires) + 3_600_000),
        );
        assert_ne!(later, session);
        assert!(core.authenticate(&bearer(&later)).is_err(), "expiry moved");
        for bad in [
            "denokv-session.",
            "denokv-session.a.b.c",
            "denokv-session.00.1.00.00",
        ] {
            assert!(core.authenticate(&bearer(bad)).is_err(), "{bad}");
        }
        // A reload that keeps the parent keeps the session (with the parent's new scope);
        // one that removes it ends the session at once.
        shared.replace(Tokens::parse("p read-write parent-token-01\n", "f").unwrap());
        let got = core.authenticate(&bearer(&session)).unwrap();
        assert_eq!(got.scope, Scope::ReadWrite);
        assert!(core.current_entry(&parent).is_some());
        shared.replace(Tokens::parse("other-token-0123\n", "f").unwrap());
        assert_eq!(
            core.authenticate(&bearer(&session)).unwrap_err().message,
            "Invalid access token."
        );
        assert!(core.current_entry(&parent).is_none());
    }

    /// The numbers and names the README's "Access tokens" section states.
    #[test]
    fn the_readme_states_what_the_code_does() {
        let readme = include_str!("../../../README.md");
        let section = &readme[readme.find("## Access tokens").unwrap()..];
        let section = &section[..section.find("## Running under systemd").unwrap()];
        let flat = section.split_whitespace().collect::<Vec<_>>().join(" ");
        let ttl = {
            use clap::CommandFactory;
            let cli = crate::config::Cli::command();
            let serve = cli.find_subcommand("serve").unwrap();
            let arg = serve
                .get_arguments()
                .find(|a| a.get_long() == Some("session-token-ttl"))
                .unwrap();
            arg.get_default_values()[0].to_string_lossy().into_owned()
        };
        for stated in [
            format!("1 to {MAX_NAME_LEN} letters, digits, `_`, `-` or `.`"),
            format!("At most {MAX_TOKENS} tokens a file"),
            format!("(at most {MAX_TOKENS})"),
            format!("at least {MIN_TOKEN_LEN} printable ASCII characters"),
            format!("not starting with `{SESSION_PREFIX}`"),
            format!("named `{GIVEN_TOKEN_NAME}`"),
            format!("({ttl} by default;"),
            "`denokv_token_requests_total{token}`".to_string(),
            "`denokv_token_refusals_total{token,reason}`".to_string(),
            format!(
                "`reason`: `{}` or `{}`",
                Refusal::ReadOnly.name(),
                Refusal::Prefix.name()
            ),
        ] {
            assert!(flat.contains(&stated), "the README lacks {stated:?}");
        }
        // The example file parses, with the names and scopes the text gives.
        // Lines counted from the one after the fence.
        let example = section.split("```\n").nth(1).unwrap();
        let t = Tokens::parse(example, "README").unwrap();
        assert_eq!(
            t.names().collect::<Vec<_>>(),
            ["admin", "reporting", "ada", "line-5"]
        );
        let ada = &t.entries[2];
        use crate::kv::key::{encode, KeyPart::*};
        assert!(ada.allows_key(&encode(&[
            String("users".into()),
            Int(42),
            String("name".into())
        ])));
        assert!(!ada.allows_key(&encode(&[String("users".into()), Int(420)])));
        assert!(!ada.allows_key(&encode(&[String("users".into())])));
        assert!(t.entries[0].prefixes.is_empty() && t.entries[3].prefixes.is_empty());
        assert_eq!(t.entries[1].scope, Scope::Read);
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
        let loaded = given.load().unwrap();
        assert_eq!(loaded.names().collect::<Vec<_>>(), [GIVEN_TOKEN_NAME]);
        assert_eq!(loaded.entries[0].scope, Scope::ReadWrite);
        assert!(!given.reloadable());
        assert!(!given.describe().contains("given-token"));
        assert!(!format!("{given:?} {loaded:?} {:?}", loaded.entries[0]).contains("given-token"));
        assert!(TokenSource::Given("short".into()).load().is_err());
        let missing = TokenSource::File(dir.path().join("missing"))
            .load()
            .unwrap_err();
        assert!(format!("{missing:#}").starts_with("cannot read access tokens from"));
    }
}
