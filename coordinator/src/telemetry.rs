//! OpenTelemetry traces, off unless `--otlp-endpoint` is set: spans are
//! exported over OTLP/gRPC in batches. W3C trace context links the pieces
//! of one transaction: the application's `traceparent` (gRPC metadata or
//! HTTP header) is the parent of the coordinator's request span; that
//! span's context is kept with the transaction (replicated, so a new
//! leader continues the same trace) and is the parent of every branch-call
//! span, whose context goes to the participant in its `traceparent`.
//!
//! With tracing off, nothing is created per call, and a client's
//! `traceparent` is still kept and passed on to participants as it came,
//! so their own spans join the application's trace.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The header and metadata key of W3C trace context.
pub const TRACEPARENT: &str = "traceparent";

static ON: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported.
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Flushes and stops the exporter when dropped (at the end of `serve`).
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        let _ = self.provider.force_flush();
        let _ = self.provider.shutdown();
    }
}

/// The layer that turns `tracing` spans into exported OpenTelemetry spans,
/// and the guard that flushes them. Must be called inside the runtime.
pub fn layer<S>(
    endpoint: &str,
    service_name: &str,
) -> Result<
    (
        tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::SdkTracer>,
        Telemetry,
    ),
    String,
>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| format!("--otlp-endpoint {endpoint}: {e}"))?;
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                // Spans leave within half a second; a bounded queue drops
                // the excess rather than growing (2,048 spans).
                .with_scheduled_delay(Duration::from_millis(500))
                .with_max_queue_size(2048)
                .build(),
        )
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service_name.to_string())
                .build(),
        )
        .build();
    let tracer = provider.tracer("tandem");
    ON.store(true, Ordering::Relaxed);
    Ok((
        tracing_opentelemetry::layer().with_tracer(tracer),
        Telemetry { provider },
    ))
}

/// A `traceparent` value if it is well formed (W3C Trace Context, version
/// 00: `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`, ids not all
/// zero). Anything else is ignored, as the standard says.
pub fn valid_traceparent(value: &str) -> Option<&str> {
    let parts: Vec<&str> = value.trim().split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    match parts.as_slice() {
        [version, trace, span, flags]
            if *version == "00"
                && hex(trace, 32)
                && hex(span, 16)
                && hex(flags, 2)
                && trace.bytes().any(|b| b != b'0')
                && span.bytes().any(|b| b != b'0') =>
        {
            Some(value.trim())
        }
        _ => None,
    }
}

/// A span for work done on behalf of `traceparent` (none when tracing is
/// off): its parent is that context.
pub fn child_span(
    make: impl FnOnce() -> tracing::Span,
    traceparent: Option<&str>,
) -> tracing::Span {
    if !enabled() {
        return tracing::Span::none();
    }
    let span = make();
    if let Some(parent) = traceparent.and_then(valid_traceparent) {
        let carrier = HashMap::from([(TRACEPARENT.to_string(), parent.to_string())]);
        let context = TraceContextPropagator::new().extract(&carrier);
        let _ = span.set_parent(context);
    }
    span
}

/// What to pass on for work under `span`: its own context when tracing is
/// on, otherwise the context it came with (`fallback`), unchanged.
pub fn traceparent_for(span: &tracing::Span, fallback: Option<&str>) -> Option<String> {
    if enabled() && !span.is_none() {
        let mut carrier = HashMap::new();
        TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
        if let Some(value) = carrier.remove(TRACEPARENT) {
            return Some(value);
        }
    }
    fallback.and_then(valid_traceparent).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_trace_contexts_are_kept() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(valid_traceparent(good), Some(good));
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            assert_eq!(valid_traceparent(bad), None, "{bad}");
        }
        // Off: no span is made; the context passes on as it came.
        let span = child_span(|| tracing::info_span!("x"), Some(good));
        assert!(span.is_none());
        assert_eq!(traceparent_for(&span, Some(good)).as_deref(), Some(good));
        assert_eq!(traceparent_for(&span, Some("junk")), None);
    }
}
