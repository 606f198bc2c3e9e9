//! The protocol model: limits, values, versionstamps, and the validated form of requests.
//! Nothing here touches SQLite or HTTP.

pub mod key;
pub mod limits;
pub mod model;
pub mod v8sum;
pub mod validate;
pub mod value;
pub mod versionstamp;
pub mod wire;

use std::borrow::Cow;
use std::fmt;

/// Input the protocol refuses: always answered with 400 and this exact text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvError(Cow<'static, str>);

impl KvError {
    pub fn new(message: impl Into<Cow<'static, str>>) -> Self {
        KvError(message.into())
    }

    pub fn message(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for KvError {}

/// The current time in ms since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
