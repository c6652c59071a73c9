//! One trace across two hops, read from the OpenTelemetry SDK's in-memory exporter (feature
//! `otel`).
//!
//! [`one_trace_across_two_hops`] installs an SDK tracer provider as the process's global one
//! and a `tracing` subscriber bridging `tracing` spans to it (once; keep such tests in their
//! own test binary), then publishes inside a root `tracing` span; the first subscription's
//! handler publishes again, and the second handles that. Every span of the chain must share
//! the root's trace id, each consume span (`process <topic>`) the child of the span the
//! message was published in.
//!
//! ```no_run
//! # async fn run(transport: std::sync::Arc<dyn busbar_core::Transport>) {
//! busbar_testkit::otel::one_trace_across_two_hops(transport).await;
//! # }
//! ```

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use busbar_core::Text;
use busbar_core::{Bus, Context, Envelope, Event, Transport};
use opentelemetry::trace::{SpanId, SpanKind, TraceId, TracerProvider as _};
use opentelemetry::Value;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use serde::{Deserialize, Serialize};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

use crate::conformance::{fast_retry, unique, wait_for, wait_limit};

/// The exporter every span of this process ends in, installing the tracer provider and the
/// subscriber on first use.
///
/// # Panics
///
/// When another global `tracing` subscriber is installed already.
pub fn exporter() -> &'static InMemorySpanExporter {
    static EXPORTER: OnceLock<InMemorySpanExporter> = OnceLock::new();
    EXPORTER.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("busbar-testkit"));
        opentelemetry::global::set_tracer_provider(provider);
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::set_global_default(subscriber)
            .expect("no other tracing subscriber is installed in this test binary");
        exporter
    })
}

/// The event of both hops.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hop {
    /// Which hop: 1 or 2.
    pub hop: u32,
}

impl Event for Hop {
    const TYPE: &'static str = "busbar.test.hop.v1";
}

/// The spans exported so far.
pub fn finished() -> Vec<SpanData> {
    exporter().get_finished_spans().unwrap_or_default()
}

/// The consume span of the first delivery on `topic`.
pub fn process_span_of(spans: &[SpanData], topic: &str) -> Option<SpanData> {
    spans
        .iter()
        .find(|span| {
            span.name == format!("process {topic}")
                && span.span_kind == SpanKind::Consumer
                && span.attributes.iter().any(|kv| {
                    kv.key.as_str() == "messaging.destination.name"
                        && kv.value == Value::from(topic.to_owned())
                })
        })
        .cloned()
}

/// Runs the scenario (see the module docs) on `transport`.
///
/// # Panics
///
/// When a span of the chain is missing or belongs to another trace, naming it.
pub async fn one_trace_across_two_hops(transport: Arc<dyn Transport>) {
    exporter();
    let bus = Bus::builder(transport).retry(fast_retry(3)).build();
    let (first, second, group) = (unique("otel-a"), unique("otel-b"), unique("g"));
    bus.declare(&first, &group).await.expect("declare");
    bus.declare(&second, &group).await.expect("declare");
    let seen: Arc<Mutex<Option<Text>>> = Arc::default();
    let record = Arc::clone(&seen);
    let last = bus
        .subscribe::<Hop>(&second, &group)
        .start(move |envelope: Envelope<Hop>, _: Context| {
            let record = Arc::clone(&record);
            async move {
                *crate::conformance::lock(&record) = envelope.traceparent.clone();
                Ok(())
            }
        })
        .await
        .expect("subscribe");
    let next = second.clone();
    let middle = bus
        .subscribe::<Hop>(&first, &group)
        .start(move |_: Envelope<Hop>, context: Context| {
            let next = next.clone();
            async move {
                context
                    .publish(&next, Hop { hop: 2 })
                    .await
                    .map_err(busbar_core::HandlerError::transient)?;
                Ok(())
            }
        })
        .await
        .expect("subscribe");
    middle.consuming(wait_limit()).await.expect("consuming");
    last.consuming(wait_limit()).await.expect("consuming");

    let root = tracing::info_span!("busbar.test.root");
    bus.publish(&first, Hop { hop: 1 })
        .instrument(root.clone())
        .await
        .expect("publish");
    drop(root);
    // busbar's `tracing` span, bridged by tracing-opentelemetry, is the consume span's child.
    let bridged = |spans: &[SpanData], hop: &SpanData| {
        spans.iter().any(|span| {
            span.name == "busbar.process" && span.parent_span_id == hop.span_context.span_id()
        })
    };
    wait_for("both hops handled and their spans exported", || {
        let spans = finished();
        [&first, &second]
            .iter()
            .all(|topic| process_span_of(&spans, topic).is_some_and(|hop| bridged(&spans, &hop)))
    })
    .await;

    let spans = finished();
    let hop_1 = process_span_of(&spans, &first).expect("the first hop's span");
    let hop_2 = process_span_of(&spans, &second).expect("the second hop's span");
    let trace: TraceId = hop_1.span_context.trace_id();
    let root_span = spans
        .iter()
        .find(|span| span.name == "busbar.test.root" && span.span_context.trace_id() == trace)
        .unwrap_or_else(|| {
            panic!("the first hop's trace {trace} is not the root span's: {spans:#?}")
        });
    assert_eq!(
        hop_1.parent_span_id,
        root_span.span_context.span_id(),
        "the first hop's consume span is the child of the span it was published in"
    );
    assert_eq!(
        hop_2.span_context.trace_id(),
        trace,
        "the second hop continues the same trace"
    );
    assert_eq!(
        hop_2.parent_span_id,
        hop_1.span_context.span_id(),
        "the second hop's consume span is the child of the first hop's handling"
    );
    assert_ne!(hop_2.parent_span_id, SpanId::INVALID);
    let carried = crate::conformance::lock(&seen)
        .clone()
        .expect("the second hop was handled");
    assert!(
        carried.contains(&trace.to_string()),
        "the envelope's traceparent {carried} carries the trace {trace}"
    );
    middle
        .shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
    last.shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
}
