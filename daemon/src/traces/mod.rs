//! OpenTelemetry traces, exported over OTLP/HTTP (protobuf) only when the standard environment
//! asks for it: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`.
//!
//! Spans: one per request (a server span, ended when the response head is ready) and one per
//! commit batch of the committer. Each write's request span links to the batch that committed
//! it, and the batch span links back to every request it carried.
//!
//! When traces are off nothing is started (no exporter thread, no client) and a request pays
//! one atomic load: [`Span::server`] returns an empty handle whose methods do nothing.
//!
//! The exporter runs on the SDK's batch span processor thread with a blocking HTTP client
//! (`ureq`, see [`http_client`]), so no async runtime is needed anywhere (the serving threads run
//! monoio).

mod http_client;

use std::borrow::Cow;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use opentelemetry::trace::{Span as _, SpanKind, Status, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, InstrumentationScope, KeyValue, Value};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;

pub use opentelemetry::trace::SpanContext;

/// The tracer, set once when traces are configured. Its absence is the "off" check.
static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// Links one span may carry: a batch span links to each write it committed.
const MAX_LINKS: u32 = 1024;

/// How long one export may take, unless `OTEL_EXPORTER_OTLP_(TRACES_)TIMEOUT` says otherwise.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long shutdown waits for the last spans to be exported.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

const SERVICE_NAME: &str = "denokv";

/// True when spans are recorded and exported.
#[inline]
pub fn enabled() -> bool {
    TRACER.get().is_some()
}

/// The running exporter; [`Traces::shutdown`] exports what is left.
pub struct Traces {
    provider: SdkTracerProvider,
}

/// Where spans go, read from the environment; `None`: traces are off.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    /// The full URL spans are posted to (for the log line).
    url: String,
    /// Longest time one export may take.
    timeout: Duration,
}

/// Reads the OTLP configuration from `var` (the environment, or a stand-in in tests).
fn target_from(var: impl Fn(&str) -> Option<String>) -> anyhow::Result<Option<Target>> {
    let var = |name: &str| {
        var(name)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || var("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"))
    {
        return Ok(None);
    }
    let url = if let Some(url) = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        url
    } else if let Some(base) = var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        format!("{}/v1/traces", base.trim_end_matches('/'))
    } else {
        return Ok(None);
    };
    if let Some(exporter) = var("OTEL_TRACES_EXPORTER") {
        if !exporter.eq_ignore_ascii_case("otlp") {
            anyhow::bail!("OTEL_TRACES_EXPORTER={exporter:?} is not supported (only otlp)");
        }
    }
    for name in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Some(protocol) = var(name) {
            if protocol != "http/protobuf" {
                anyhow::bail!(
                    "{name}={protocol:?} is not supported: traces are sent as http/protobuf \
                     (to a collector's OTLP/HTTP port, usually 4318)"
                );
            }
            // The signal's own variable wins over the general one.
            break;
        }
    }
    if url.starts_with("https://") {
        anyhow::bail!(
            "{url}: https is not supported (this build has no TLS for traces); send them to a \
             collector over http, on loopback or a private network"
        );
    }
    if !url.starts_with("http://") {
        anyhow::bail!("{url}: the OTLP endpoint must be an http:// URL");
    }
    let timeout = [
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
        "OTEL_EXPORTER_OTLP_TIMEOUT",
    ]
    .iter()
    .find_map(|name| var(name).map(|v| (name, v)))
    .map(|(name, v)| match v.parse::<u64>() {
        Ok(ms) if ms > 0 => Ok(Duration::from_millis(ms)),
        _ => Err(anyhow::anyhow!(
            "{name}={v:?} is not a number of milliseconds"
        )),
    })
    .transpose()?
    .unwrap_or(EXPORT_TIMEOUT);
    Ok(Some(Target { url, timeout }))
}

/// Starts exporting traces if the environment configures OTLP; logs and returns `None` when it
/// does not, or when the configuration is unusable (the server then serves without traces).
pub fn init_from_env() -> Option<Traces> {
    let target = match target_from(|name| std::env::var(name).ok()) {
        Ok(Some(target)) => target,
        Ok(None) => return None,
        Err(e) => {
            tracing::error!("traces are off: {e:#}");
            return None;
        }
    };
    match start(&target) {
        Ok(traces) => {
            // Never the headers: they may hold an API key.
            tracing::info!("Traces: OTLP/HTTP to {}", target.url);
            Some(traces)
        }
        Err(e) => {
            tracing::error!("traces are off: {e:#}");
            None
        }
    }
}

fn start(target: &Target) -> anyhow::Result<Traces> {
    // The endpoint and headers come from the OTEL_EXPORTER_OTLP_* variables.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(http_client::BlockingClient::new(target.timeout))
        .with_timeout(target.timeout)
        .build()
        .context("cannot set up the OTLP trace exporter")?;
    let mut resource = Resource::builder();
    // OTEL_SERVICE_NAME (or service.name in OTEL_RESOURCE_ATTRIBUTES) wins; else "denokv".
    let detected = Resource::builder().build();
    let named = detected
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .is_some_and(|v| !v.as_str().starts_with("unknown_service"));
    if !named {
        resource = resource.with_service_name(SERVICE_NAME);
    }
    let resource = resource
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    // The sampler comes from OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG (default: all), the
    // batching from OTEL_BSP_*.
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_max_links_per_span(MAX_LINKS)
        .with_resource(resource)
        .build();
    let scope = InstrumentationScope::builder(SERVICE_NAME)
        .with_version(env!("CARGO_PKG_VERSION"))
        .build();
    if TRACER.set(provider.tracer_with_scope(scope)).is_err() {
        anyhow::bail!("traces were already started");
    }
    Ok(Traces { provider })
}

impl Traces {
    /// Exports the spans not yet sent and stops the exporter thread.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
            tracing::warn!("traces: the last spans may not have been exported: {e}");
        }
    }
}

/// A span when traces are on; otherwise an empty handle whose methods do nothing. Ends when
/// dropped.
pub struct Span(Option<opentelemetry_sdk::trace::Span>);

impl Span {
    /// The empty handle.
    pub const OFF: Span = Span(None);

    /// A root server span (a request), or [`Span::OFF`].
    #[inline]
    pub fn server(name: impl FnOnce() -> Cow<'static, str>) -> Span {
        match TRACER.get() {
            None => Span::OFF,
            Some(tracer) => Span(Some(
                tracer
                    .span_builder(name())
                    .with_kind(SpanKind::Server)
                    .start_with_context(tracer, &Context::new()),
            )),
        }
    }

    /// A root internal span started at `start`, linked to `links`, or [`Span::OFF`].
    pub fn internal<'a>(
        name: &'static str,
        start: SystemTime,
        links: impl Iterator<Item = &'a SpanContext>,
    ) -> Span {
        let Some(tracer) = TRACER.get() else {
            return Span::OFF;
        };
        let links = links
            .filter(|c| c.is_valid())
            .map(|c| opentelemetry::trace::Link::with_context(c.clone()))
            .collect();
        Span(Some(
            tracer
                .span_builder(name)
                .with_kind(SpanKind::Internal)
                .with_start_time(start)
                .with_links(links)
                .start_with_context(tracer, &Context::new()),
        ))
    }

    /// True unless this is the empty handle.
    #[inline]
    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }

    #[inline]
    pub fn set(&mut self, key: &'static str, value: impl Into<Value>) {
        if let Some(span) = &mut self.0 {
            span.set_attribute(KeyValue::new(key, value));
        }
    }

    /// Marks the span failed.
    pub fn set_error(&mut self, description: &'static str) {
        if let Some(span) = &mut self.0 {
            span.set_status(Status::error(description));
        }
    }

    /// This span's identity, to link other spans to it.
    pub fn context(&self) -> Option<SpanContext> {
        self.0.as_ref().map(|s| s.span_context().clone())
    }

    pub fn add_link(&mut self, to: &SpanContext) {
        if let Some(span) = &mut self.0 {
            if to.is_valid() {
                span.add_link(to.clone(), Vec::new());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn target(vars: &[(&str, &str)]) -> anyhow::Result<Option<Target>> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        target_from(|name| vars.get(name).cloned())
    }

    #[test]
    fn export_timeouts_in_milliseconds() {
        let ep = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318");
        let timeout = |vars: &[(&str, &str)]| target(vars).unwrap().unwrap().timeout;
        assert_eq!(timeout(&[ep]), EXPORT_TIMEOUT);
        assert_eq!(
            timeout(&[ep, ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500")]),
            Duration::from_millis(2500)
        );
        assert_eq!(
            timeout(&[
                ep,
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
                ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "700")
            ]),
            Duration::from_millis(700)
        );
        assert!(target(&[ep, ("OTEL_EXPORTER_OTLP_TIMEOUT", "10s")]).is_err());
    }

    fn url(vars: &[(&str, &str)]) -> String {
        target(vars).unwrap().expect("traces are on").url
    }

    #[test]
    fn off_unless_an_endpoint_is_set() {
        assert_eq!(target(&[]).unwrap(), None);
        assert_eq!(
            target(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")]).unwrap(),
            None
        );
        assert_eq!(target(&[("OTEL_SERVICE_NAME", "kv")]).unwrap(), None);
        let on = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")];
        assert!(target(&on).unwrap().is_some());
        for off in [
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ] {
            assert_eq!(target(&[on[0], off]).unwrap(), None, "{off:?}");
        }
    }

    #[test]
    fn endpoints_as_the_specification_builds_them() {
        assert_eq!(
            url(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")]),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            url(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318/base/")]),
            "http://c:4318/base/v1/traces"
        );
        // The signal's own endpoint is used as it is, and wins.
        assert_eq!(
            url(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:9/x")
            ]),
            "http://t:9/x"
        );
    }

    #[test]
    fn unusable_configurations_are_refused_with_a_reason() {
        let ep = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318");
        let err = |vars: &[(&str, &str)]| format!("{:#}", target(vars).unwrap_err());
        assert!(err(&[ep, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]).contains("http/protobuf"));
        assert!(err(&[ep, ("OTEL_TRACES_EXPORTER", "zipkin")]).contains("only otlp"));
        assert!(err(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c")]).contains("https"));
        assert!(err(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "c:4318")]).contains("http://"));
        // The traces protocol variable wins over the general one.
        assert!(target(&[
            ep,
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        ])
        .unwrap()
        .is_some());
    }

    #[test]
    fn the_empty_handle_does_nothing() {
        let mut span = Span::OFF;
        assert!(!span.is_on());
        span.set("n", 1i64);
        span.set_error("x");
        assert!(span.context().is_none());
        assert!(!Span::server(|| unreachable!("not named when off")).is_on());
    }
}
