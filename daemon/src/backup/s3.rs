//! The S3 client of the backup and the replica: one bucket and prefix, the standard AWS
//! credential chain, and `--s3-endpoint` for S3-compatible stores (path-style addressing).
//! Async, for the side thread's own small tokio runtime; never used on a serving core.

use std::time::{Duration, SystemTime};

use std::sync::Arc;

use anyhow::bail;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{Delete, ObjectIdentifier};
use bytes::Bytes;

use super::metrics::BackupMetrics;

/// Where the backup lives: `s3://bucket/prefix`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub bucket: String,
    /// Empty, or ending with `/`.
    pub prefix: String,
    /// An S3-compatible endpoint (`http://127.0.0.1:5000`); `None`: AWS.
    pub endpoint: Option<String>,
}

impl Location {
    pub fn new(bucket: String, prefix: String, endpoint: Option<String>) -> anyhow::Result<Self> {
        if bucket.is_empty() {
            bail!("--s3-bucket not set");
        }
        if !prefix.is_empty() && !prefix.ends_with('/') {
            bail!("--s3-prefix must end with a slash");
        }
        Ok(Location {
            bucket,
            prefix,
            endpoint,
        })
    }

    pub fn describe(&self) -> String {
        match &self.endpoint {
            Some(e) => format!("s3://{}/{} at {e}", self.bucket, self.prefix),
            None => format!("s3://{}/{}", self.bucket, self.prefix),
        }
    }
}

/// One object of a listing.
#[derive(Clone, Debug)]
pub struct Listed {
    /// Relative to the prefix.
    pub key: String,
    pub last_modified: Option<SystemTime>,
    pub size: u64,
}

/// The operations we make, for errors and the `denokv_s3_requests_total{operation}` metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Put,
    Get,
    List,
    Delete,
}

impl Operation {
    pub fn name(self) -> &'static str {
        match self {
            Operation::Put => "put",
            Operation::Get => "get",
            Operation::List => "list",
            Operation::Delete => "delete",
        }
    }
}

/// An S3 request that failed, with what it was.
#[derive(Debug)]
pub struct S3Error {
    pub operation: Operation,
    pub key: String,
    pub cause: String,
}

impl std::fmt::Display for S3Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "S3 {} of {} failed: {}",
            self.operation.name(),
            self.key,
            self.cause
        )
    }
}

impl std::error::Error for S3Error {}

/// A bucket and prefix, with a client.
#[derive(Clone)]
pub struct Bucket {
    client: aws_sdk_s3::Client,
    location: Location,
    metrics: Option<Arc<BackupMetrics>>,
}

/// The systemd credential that holds an AWS credentials file (`LoadCredential=` in the unit).
const CREDENTIAL: &str = "aws-credentials";

/// The profile files to read when systemd passed a non-empty `aws-credentials` credential
/// (the package installs an empty one, so that the unit starts without it) and
/// `AWS_SHARED_CREDENTIALS_FILE` does not name another file. `None`: the SDK's defaults.
fn credential_files() -> Option<aws_runtime::env_config::file::EnvConfigFiles> {
    use aws_runtime::env_config::file::{EnvConfigFileKind, EnvConfigFiles};
    if std::env::var_os("AWS_SHARED_CREDENTIALS_FILE").is_some() {
        return None;
    }
    let path = crate::config::credential(CREDENTIAL)?;
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) => {
            tracing::warn!("S3 credentials: cannot read {}: {e}", path.display());
            return None;
        }
    };
    if text.trim().is_empty() {
        return None;
    }
    tracing::info!("S3 credentials: the systemd credential {CREDENTIAL}");
    Some(
        EnvConfigFiles::builder()
            .include_default_config_file(true)
            .with_file(EnvConfigFileKind::Credentials, path)
            .build(),
    )
}

/// Per request: a stuck connection must not stall the backup for ever.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl Bucket {
    /// Builds the client (reads the AWS configuration: environment, profile, IMDS). Region:
    /// the configured one, else `us-east-1` (S3-compatible stores rarely care).
    pub async fn connect(location: Location, metrics: Option<Arc<BackupMetrics>>) -> Bucket {
        use aws_smithy_http_client::tls;
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .operation_timeout(OPERATION_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .build();
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .http_client(http)
            .timeout_config(timeouts);
        if let Some(endpoint) = &location.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        if let Some(files) = credential_files() {
            loader = loader.profile_files(files);
        }
        let shared = loader.load().await;
        let mut config = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(location.endpoint.is_some());
        if shared.region().is_none() {
            config = config.region(aws_sdk_s3::config::Region::new("us-east-1"));
        }
        let config = config.build();
        Bucket {
            client: aws_sdk_s3::Client::from_conf(config),
            location,
            metrics,
        }
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.location.prefix)
    }

    fn count(&self, operation: Operation) {
        if let Some(m) = &self.metrics {
            m.s3_request(operation).inc();
        }
    }

    fn error(&self, operation: Operation, key: &str, e: impl std::error::Error) -> S3Error {
        if let Some(m) = &self.metrics {
            m.s3_error(operation).inc();
        }
        S3Error {
            operation,
            // The whole address: a listing of an empty prefix has no key of its own.
            key: format!("s3://{}/{}", self.location.bucket, self.full(key)),
            cause: error_chain(&e),
        }
    }

    pub async fn put(&self, key: &str, body: Bytes) -> Result<(), S3Error> {
        self.count(Operation::Put);
        self.client
            .put_object()
            .bucket(&self.location.bucket)
            .key(self.full(key))
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| self.error(Operation::Put, key, e))?;
        Ok(())
    }

    /// The object's bytes, or `None` when it does not exist.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, S3Error> {
        self.count(Operation::Get);
        let out = self
            .client
            .get_object()
            .bucket(&self.location.bucket)
            .key(self.full(key))
            .send()
            .await;
        let out = match out {
            Ok(out) => out,
            Err(e) if e.as_service_error().is_some_and(|e| e.is_no_such_key()) => return Ok(None),
            Err(e) => return Err(self.error(Operation::Get, key, e)),
        };
        let body = out
            .body
            .collect()
            .await
            .map_err(|e| self.error(Operation::Get, key, e))?;
        Ok(Some(body.into_bytes()))
    }

    /// Every object under `dir` (relative to the prefix) whose key sorts after `start_after`
    /// (relative too), in key order; at most `limit`.
    pub async fn list(
        &self,
        dir: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Listed>, S3Error> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut req = self
                .client
                .list_objects_v2()
                .bucket(&self.location.bucket)
                .prefix(self.full(dir))
                .max_keys(limit.saturating_sub(out.len()).clamp(1, 1000) as i32);
            if let Some(after) = start_after {
                req = req.start_after(self.full(after));
            }
            if let Some(t) = &token {
                req = req.continuation_token(t);
            }
            self.count(Operation::List);
            let page = req
                .send()
                .await
                .map_err(|e| self.error(Operation::List, dir, e))?;
            for o in page.contents() {
                let Some(key) = o.key() else { continue };
                let Some(rel) = key.strip_prefix(&self.location.prefix) else {
                    continue;
                };
                out.push(Listed {
                    key: rel.to_string(),
                    last_modified: o
                        .last_modified()
                        .and_then(|t| SystemTime::try_from(*t).ok()),
                    size: o.size().unwrap_or(0).max(0) as u64,
                });
            }
            token = page.next_continuation_token().map(str::to_string);
            if token.is_none() || out.len() >= limit {
                return Ok(out);
            }
        }
    }

    /// The objects under `dir` in key order, a page (of up to 1000) at a time.
    pub fn pages<'a>(&'a self, dir: &'a str) -> Pages<'a> {
        Pages {
            bucket: self,
            dir,
            after: None,
            done: false,
        }
    }

    /// Deletes `keys` (relative), 1000 a request.
    pub async fn delete(&self, keys: &[String]) -> Result<(), S3Error> {
        for chunk in keys.chunks(1000) {
            let ids = chunk
                .iter()
                .map(|k| ObjectIdentifier::builder().key(self.full(k)).build())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| self.error(Operation::Delete, &chunk[0], e))?;
            let delete = Delete::builder()
                .set_objects(Some(ids))
                .quiet(true)
                .build()
                .map_err(|e| self.error(Operation::Delete, &chunk[0], e))?;
            self.count(Operation::Delete);
            let out = self
                .client
                .delete_objects()
                .bucket(&self.location.bucket)
                .delete(delete)
                .send()
                .await
                .map_err(|e| self.error(Operation::Delete, &chunk[0], e))?;
            if let Some(e) = out.errors().first() {
                return Err(S3Error {
                    operation: Operation::Delete,
                    key: e.key().unwrap_or_default().to_string(),
                    cause: e.message().unwrap_or("refused").to_string(),
                });
            }
        }
        Ok(())
    }
}

/// A listing read a page at a time (see [`Bucket::pages`]).
pub struct Pages<'a> {
    bucket: &'a Bucket,
    dir: &'a str,
    after: Option<String>,
    done: bool,
}

impl Pages<'_> {
    /// The next page; `None` after the last.
    pub async fn next(&mut self) -> Result<Option<Vec<Listed>>, S3Error> {
        if self.done {
            return Ok(None);
        }
        let page = self
            .bucket
            .list(self.dir, self.after.as_deref(), 1000)
            .await?;
        self.done = page.len() < 1000;
        match page.last() {
            Some(last) => self.after = Some(last.key.clone()),
            None => return Ok(None),
        }
        Ok(Some(page))
    }
}

/// An error and its causes on one line (the SDK's top-level text is often just
/// "service error" or "dispatch failure").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
