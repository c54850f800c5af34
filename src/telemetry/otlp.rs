//! Export of the gateway's spans over OTLP/HTTP (protobuf), off unless `[tracing] otlp_endpoint`
//! is set.
//!
//! The OpenTelemetry layer is part of the subscriber from the start ([`layer`]), exporting
//! nothing; `serve` and `dev` [`install`] the exporter once the configuration is loaded, and
//! [`Exporting::shutdown`] flushes it after the last request. Requests never wait for export:
//! ended spans go into a bounded queue that a background thread sends in batches; when the queue
//! is full, spans are dropped (logged once when dropping starts, and with the total at shutdown).

use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider,
};
use tracing::Metadata;
use tracing::subscriber::Interest;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::DynFilterFn;
use tracing_subscriber::registry::LookupSpan;

use crate::http_client::{HttpClient, fetch, full_body};

/// `[tracing]` with an `otlp_endpoint`: where and how spans are exported.
#[derive(Debug, Clone, PartialEq)]
pub struct OtlpSettings {
    /// The collector's traces URL (`otlp_endpoint` with `/v1/traces`).
    pub endpoint: http::Uri,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// Share of new traces recorded (a caller's sampled flag is followed).
    pub sample_ratio: f64,
    /// Ended spans waiting for export; more are dropped.
    pub queue_size: usize,
    /// Longest one export request may take.
    pub export_timeout: Duration,
}

impl OtlpSettings {
    pub const DEFAULT_SERVICE_NAME: &'static str = "greenhouse-gateway";
    pub const DEFAULT_QUEUE_SIZE: usize = 2048;
    pub const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
}

/// The installed tracer; set once per process.
static TRACER: OnceLock<SdkTracer> = OnceLock::new();
/// Whether spans are exported now (from [`install`] until [`Exporting::shutdown`]).
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// Whether spans are being exported.
pub fn exporting() -> bool {
    ACTIVE.load(Ordering::Acquire)
}

fn is_exported_span(meta: &Metadata<'_>) -> bool {
    meta.is_span()
        && meta.target() == super::SPAN_TARGET
        && super::EXPORTED_SPANS.contains(&meta.name())
}

/// The OpenTelemetry layer for the process's subscriber. It sees only the spans of
/// [`super::EXPORTED_SPANS`] (never a log event), and those only while exporting, so until
/// [`install`] (and always, when export is off) it costs one atomic load per such span.
pub fn layer<S>() -> impl Layer<S> + Send + Sync + 'static
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    let filter =
        DynFilterFn::new(|meta: &Metadata<'_>, _cx: &_| exporting() && is_exported_span(meta))
            .with_max_level_hint(tracing::Level::INFO)
            .with_callsite_filter(|meta: &'static Metadata<'static>| {
                if is_exported_span(meta) {
                    Interest::sometimes()
                } else {
                    Interest::never()
                }
            });
    tracing_opentelemetry::layer()
        .with_tracer(Installed)
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_tracked_inactivity(false)
        .with_filter(filter)
}

/// The tracer [`install`] sets, or until then one that records nothing.
#[derive(Debug, Clone, Copy)]
struct Installed;

impl opentelemetry::trace::Tracer for Installed {
    type Span = opentelemetry_sdk::trace::Span;

    fn build_with_context(
        &self,
        builder: opentelemetry::trace::SpanBuilder,
        parent_cx: &opentelemetry::Context,
    ) -> Self::Span {
        static OFF: OnceLock<SdkTracer> = OnceLock::new();
        TRACER
            .get()
            .unwrap_or_else(|| {
                OFF.get_or_init(|| {
                    SdkTracerProvider::builder()
                        .with_sampler(Sampler::AlwaysOff)
                        .build()
                        .tracer("off")
                })
            })
            .build_with_context(builder, parent_cx)
    }
}

/// The environment variables the exporter reads its compression from, the trace-specific first.
const COMPRESSION_VARIABLES: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
    "OTEL_EXPORTER_OTLP_COMPRESSION",
];

/// Whether a compression variable's value is one the exporter applies: unset or empty, `gzip` or
/// `none` (in any case). The exporter skips any other value without a word (`zstd` included: its
/// feature is not built in) and reads the next variable; [`install`] warns instead.
fn compression_is_supported(value: Option<&std::ffi::OsStr>) -> bool {
    match value {
        None => true,
        Some(v) if v.is_empty() => true,
        Some(v) => v
            .to_str()
            .is_some_and(|v| v.eq_ignore_ascii_case("gzip") || v.eq_ignore_ascii_case("none")),
    }
}

/// Exporting spans; [`Exporting::shutdown`] flushes what is queued.
#[must_use = "spans queued at exit are lost unless shutdown() is awaited"]
pub struct Exporting {
    provider: SdkTracerProvider,
    flush_within: Duration,
}

/// Starts exporting spans as `settings` say, trusting the web roots plus `extra_ca` for an
/// `https` collector. Once per process; must be called within the Tokio runtime.
pub fn install(settings: &OtlpSettings, extra_ca: Option<&Path>) -> Result<Exporting, String> {
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|_| "span export needs the Tokio runtime".to_string())?;
    let client = crate::http_client::build_client(extra_ca, Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    let http = ExportClient {
        client,
        runtime,
        timeout: settings.export_timeout,
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(http)
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(settings.endpoint.to_string())
        .with_timeout(settings.export_timeout)
        .build()
        .map_err(|e| format!("the OTLP exporter cannot be built: {e}"))?;
    let batch = BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(settings.queue_size)
                .build(),
        )
        .build();
    let resource = Resource::builder_empty()
        .with_service_name(settings.service_name.clone())
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(batch)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            settings.sample_ratio,
        ))))
        .with_resource(resource)
        .build();
    if TRACER
        .set(provider.tracer(OtlpSettings::DEFAULT_SERVICE_NAME))
        .is_err()
    {
        let _ = provider.shutdown();
        return Err("span export is already installed in this process".to_string());
    }
    ACTIVE.store(true, Ordering::Release);
    tracing::info!(
        endpoint = %settings.endpoint,
        service_name = %settings.service_name,
        sample_ratio = settings.sample_ratio,
        "exporting spans over OTLP/HTTP"
    );
    for variable in COMPRESSION_VARIABLES {
        if !compression_is_supported(std::env::var_os(variable).as_deref()) {
            tracing::warn!(
                variable,
                "this compression variable is ignored: its value is neither gzip nor none (zstd \
                 is not built in); span batches go as the other one says, else uncompressed"
            );
        }
    }
    Ok(Exporting {
        provider,
        flush_within: settings.export_timeout + Duration::from_secs(2),
    })
}

impl Exporting {
    /// Stops exporting new spans and sends the ones queued, waiting at most one export timeout
    /// (and a little) for the collector. Call after the listeners have stopped, so that the
    /// spans of the last requests have ended.
    pub async fn shutdown(self) {
        ACTIVE.store(false, Ordering::Release);
        let provider = self.provider;
        let within = self.flush_within;
        // The flush blocks its thread until the exporter thread is done: not a runtime worker.
        let flushed = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(within));
        match tokio::time::timeout(within + Duration::from_secs(1), flushed).await {
            Ok(Ok(Ok(()))) => tracing::info!("spans flushed"),
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "spans could not all be exported"),
            Ok(Err(_)) | Err(_) => tracing::warn!("span export did not finish in time"),
        }
    }
}

/// Largest collector answer read (an OTLP answer is a few bytes, or a partial-success note).
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// The exporter's HTTP client: the gateway's own (rustls with aws-lc-rs), run on the gateway's
/// runtime. The exporter calls it from its own thread and waits for the spawned task.
struct ExportClient {
    client: HttpClient,
    runtime: tokio::runtime::Handle,
    timeout: Duration,
}

impl std::fmt::Debug for ExportClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportClient")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for ExportClient {
    async fn send_bytes(
        &self,
        request: Request<Bytes>,
    ) -> Result<Response<Bytes>, opentelemetry_http::HttpError> {
        let (parts, body) = request.into_parts();
        let request = Request::from_parts(parts, full_body(body));
        let client = self.client.clone();
        let timeout = self.timeout;
        let (status, headers, body) = self
            .runtime
            .spawn(async move { fetch(&client, request, MAX_ANSWER_BYTES, timeout).await })
            .await??;
        let mut response = Response::new(body);
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        Ok(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_gzip_none_or_unset_is_applied_anything_else_is_warned_about() {
        use std::ffi::OsStr;
        assert!(compression_is_supported(None));
        for ok in ["", "gzip", "GZIP", "none", "None"] {
            assert!(compression_is_supported(Some(OsStr::new(ok))), "{ok:?}");
        }
        for not in ["zstd", "br", " gzip"] {
            assert!(!compression_is_supported(Some(OsStr::new(not))), "{not:?}");
        }
    }
}
