//! A message the tracer provider's sampler leaves out (feature `otel`): nothing of it is
//! exported, yet the handler's work stays in the message's trace, not sampled: a span the
//! handler starts and the `traceparent` of what it publishes follow the left-out consume span,
//! so a trace sampled out upstream never comes back as a new root trace downstream. The tracer
//! provider is process-wide, so this lives in its own binary.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use busbar::{Bus, Context, Envelope, Event, HandlerError, MemoryTransport, Text};
use busbar_testkit::conformance::{lock, unique, wait_for, wait_limit};
use opentelemetry::trace::{Span as _, Tracer as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, Sampler, SdkTracerProvider};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Step {
    /// Which publication this is: `sampled` or `left-out`.
    name: String,
}

impl Event for Step {
    const TYPE: &'static str = "busbar.test.step.v1";
}

/// What the first hop's handler saw of its own span: its trace id and whether it records.
#[derive(Debug, Clone, PartialEq)]
struct Work {
    trace: String,
    recording: bool,
}

/// A step's name and the `traceparent` it reached the second hop with.
type Carried = (String, Option<Text>);

const LEFT_OUT: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const SAMPLED: &str = "5c3a2b1f9e8d7c6b5a4f3e2d1c0b0a09";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sampled_out_message_keeps_its_handlers_work_in_its_trace() {
    // Parent-based, as most services sample: a child follows its parent's decision.
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
        .with_simple_exporter(exporter.clone())
        .build();
    opentelemetry::global::set_tracer_provider(provider);

    let bus = Bus::new(MemoryTransport::new());
    let (first, second, group) = (unique("sampling-a"), unique("sampling-b"), unique("g"));
    bus.declare(&first, &group).await.expect("declare");
    bus.declare(&second, &group).await.expect("declare");

    let carried: Arc<Mutex<Vec<Carried>>> = Arc::default();
    let record = Arc::clone(&carried);
    let last = bus
        .subscribe::<Step>(&second, &group)
        .start(move |envelope: Envelope<Step>, _: Context| {
            lock(&record).push((envelope.payload.name.clone(), envelope.traceparent.clone()));
            async { Ok::<_, HandlerError>(()) }
        })
        .await
        .expect("subscribe");
    let works: Arc<Mutex<Vec<(String, Work)>>> = Arc::default();
    let seen = Arc::clone(&works);
    let next = second.clone();
    let middle = bus
        .subscribe::<Step>(&first, &group)
        .start(move |envelope: Envelope<Step>, context: Context| {
            let (seen, next) = (Arc::clone(&seen), next.clone());
            async move {
                let mut work = opentelemetry::global::tracer("handler").start("work");
                let made = work.span_context().clone();
                lock(&seen).push((
                    envelope.payload.name.clone(),
                    Work {
                        trace: made.trace_id().to_string(),
                        recording: work.is_recording(),
                    },
                ));
                work.end();
                context
                    .publish(&next, envelope.payload)
                    .await
                    .map_err(HandlerError::transient)?;
                Ok(())
            }
        })
        .await
        .expect("subscribe");
    middle.consuming(wait_limit()).await.expect("consuming");
    last.consuming(wait_limit()).await.expect("consuming");

    for (name, trace, flags) in [("left-out", LEFT_OUT, "00"), ("sampled", SAMPLED, "01")] {
        let envelope = Envelope::new("/test", Step { name: name.into() })
            .with_traceparent(format!("00-{trace}-00f067aa0ba902b7-{flags}"));
        bus.publish_envelope(&first, &envelope)
            .await
            .expect("publish");
    }
    wait_for("both steps reach the second hop", || {
        lock(&carried).len() == 2
    })
    .await;
    let consume_of = |topic: &str, trace: &str| {
        exporter
            .get_finished_spans()
            .unwrap_or_default()
            .into_iter()
            .find(|span| {
                span.name == format!("process {topic}")
                    && span.span_context.trace_id().to_string() == trace
            })
    };
    wait_for("the sampled step's second consume span exported", || {
        consume_of(&second, SAMPLED).is_some()
    })
    .await;

    let works = lock(&works).clone();
    let work_of = |name: &str| {
        works
            .iter()
            .find(|(step, _)| step == name)
            .map(|(_, work)| work.clone())
    };
    assert_eq!(
        work_of("left-out"),
        Some(Work {
            trace: LEFT_OUT.into(),
            recording: false
        }),
        "the handler of a left-out message works in its trace, not sampled (not in a new root trace)"
    );
    assert_eq!(
        work_of("sampled"),
        Some(Work {
            trace: SAMPLED.into(),
            recording: true
        })
    );
    let carried = lock(&carried).clone();
    let traceparent_of = |name: &str| {
        carried
            .iter()
            .find(|(step, _)| step == name)
            .and_then(|(_, traceparent)| traceparent.as_ref().map(|tp| tp.to_string()))
            .unwrap_or_default()
    };
    let left_out = traceparent_of("left-out");
    assert!(
        left_out.starts_with(&format!("00-{LEFT_OUT}-")) && left_out.ends_with("-00"),
        "a publish from a left-out message's handler continues its trace, not sampled: {left_out}"
    );
    assert!(
        !left_out.contains("00f067aa0ba902b7"),
        "its parent is the consume span, not the producer's: {left_out}"
    );
    let sampled = traceparent_of("sampled");
    assert!(
        sampled.starts_with(&format!("00-{SAMPLED}-")) && sampled.ends_with("-01"),
        "{sampled}"
    );
    let spans = exporter.get_finished_spans().unwrap_or_default();
    assert!(
        spans
            .iter()
            .all(|span| span.span_context.trace_id().to_string() != LEFT_OUT),
        "nothing of the left-out trace is exported: {spans:#?}"
    );
    let hop = consume_of(&first, SAMPLED).expect("the sampled step's first consume span");
    assert!(
        spans
            .iter()
            .any(|span| span.name == "work" && span.parent_span_id == hop.span_context.span_id()),
        "the sampled handler's span is the consume span's child"
    );
    assert!(hop.span_context.is_sampled());

    middle
        .shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
    last.shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
}
