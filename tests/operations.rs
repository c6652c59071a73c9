//! Operations on the memory transport: metric values after a scenario with retries and dead
//! letters, a failed publish's count, one trace across two hops (feature `otel`), and what a
//! health probe reads. The metrics recorder and the tracing subscriber are process-wide, so
//! these live in their own binary. (Across real broker restarts: the adapters' tests.)

use std::sync::Arc;
use std::time::Duration;

use busbar::{
    metrics, Bus, ConnectionState, Context, Envelope, ErrorKind, Event, HandlerError,
    MemoryTransport,
};
use busbar_testkit::metrics::{values_of, Value};
use serde::{Deserialize, Serialize};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_transport_records_retries_and_dead_letters() {
    busbar_testkit::metrics::records_retries_and_dead_letters(Arc::new(MemoryTransport::new()))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_publish_counts_under_its_error_kind() {
    busbar_testkit::metrics::recorder();
    let transport = MemoryTransport::new();
    let bus = Bus::new(transport.clone());
    let topic = busbar_testkit::conformance::unique("failing");
    bus.publish_messages(vec![busbar::Message::new(
        busbar_testkit::conformance::unique("m"),
        &topic,
        "x",
    )])
    .await
    .expect("a first publish succeeds");
    busbar::Transport::close(&transport).await.expect("close");
    let error = bus
        .publish_messages(vec![busbar::Message::new(
            busbar_testkit::conformance::unique("m"),
            &topic,
            "x",
        )])
        .await
        .expect_err("the transport is closed");
    let values = values_of(&topic);
    let failed = format!(
        "cloudevents.event_type={},error.type={},messaging.system=memory",
        metrics::OTHER,
        error.kind().as_str()
    );
    assert_eq!(
        values.get(&(metrics::SENT.to_owned(), failed)),
        Some(&Value::Counter(1)),
        "{values:#?}"
    );
    let sent = format!(
        "cloudevents.event_type={},messaging.system=memory",
        metrics::OTHER
    );
    assert_eq!(
        values.get(&(metrics::SENT.to_owned(), sent)),
        Some(&Value::Counter(1))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_across_two_hops_on_memory() {
    busbar_testkit::otel::one_trace_across_two_hops(Arc::new(MemoryTransport::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attempt_marks_its_consume_span_as_an_error() {
    use busbar_testkit::conformance::{fast_retry, unique};
    use opentelemetry::trace::Status;
    use std::sync::atomic::{AtomicU32, Ordering};

    let exporter = busbar_testkit::otel::exporter();
    let bus = Bus::builder(Arc::new(MemoryTransport::new()))
        .retry(fast_retry(3))
        .build();
    let (topic, group) = (unique("otel-fail"), unique("g"));
    bus.declare(&topic, &group).await.expect("declare");
    let attempts = Arc::new(AtomicU32::new(0));
    let counted = Arc::clone(&attempts);
    let subscription = bus
        .subscribe::<Ping>(&topic, &group)
        .start(move |_: Envelope<Ping>, _: Context| {
            let first = counted.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                if first {
                    return Err(HandlerError::transient("the stock service timed out"));
                }
                Ok(())
            }
        })
        .await
        .expect("subscribe");
    let id = bus.publish(&topic, Ping).await.expect("publish");
    let name = format!("process {topic}");
    let spans_of_topic = || {
        let mut spans: Vec<_> = exporter
            .get_finished_spans()
            .unwrap_or_default()
            .into_iter()
            .filter(|span| span.name == name)
            .collect();
        spans.sort_by_key(|span| span.start_time);
        spans
    };
    wait_until("both attempts' spans exported", || {
        spans_of_topic().len() == 2
    })
    .await;
    let spans = spans_of_topic();
    let attribute = |span: &opentelemetry_sdk::trace::SpanData, key: &str| {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.clone())
    };
    match &spans[0].status {
        Status::Error { description } => assert!(
            description.contains("the stock service timed out"),
            "{description}"
        ),
        other => panic!("the failed attempt's span is {other:?}, not an error"),
    }
    assert_eq!(spans[1].status, Status::Unset, "the retry succeeded");
    for (attempt, span) in (1_i64..).zip(&spans) {
        assert_eq!(attribute(span, "busbar.attempt"), Some(attempt.into()));
        assert_eq!(
            attribute(span, "messaging.message.id"),
            Some(id.to_string().into())
        );
        assert_eq!(
            attribute(span, "busbar.event_type"),
            Some(Ping::TYPE.to_owned().into())
        );
        assert_eq!(
            span.span_context.trace_id(),
            spans[0].span_context.trace_id(),
            "both attempts belong to the message's trace"
        );
    }
    subscription
        .shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");

    // A permanent failure dead-letters at once: its one span is an error too.
    let refused = unique("otel-refused");
    bus.declare(&refused, &group).await.expect("declare");
    let subscription = bus
        .subscribe::<Ping>(&refused, &group)
        .start(|_: Envelope<Ping>, _: Context| async {
            Err(HandlerError::permanent("the order is malformed"))
        })
        .await
        .expect("subscribe");
    bus.publish(&refused, Ping).await.expect("publish");
    let name = format!("process {refused}");
    let dead_lettered = || {
        exporter
            .get_finished_spans()
            .unwrap_or_default()
            .into_iter()
            .find(|span| span.name == name)
    };
    wait_until("the dead-lettered message's span exported", || {
        dead_lettered().is_some()
    })
    .await;
    match dead_lettered().map(|span| span.status) {
        Some(Status::Error { description }) => assert!(
            description.contains("the order is malformed"),
            "{description}"
        ),
        other => panic!("the dead-lettered message's span is {other:?}, not an error"),
    }
    subscription
        .shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
}

#[derive(Serialize, Deserialize)]
struct Ping;

impl Event for Ping {
    const TYPE: &'static str = "test.ping.v1";
}

async fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A subscription of group `g` to `topic` whose handler takes every ping.
async fn ping_subscription(bus: &Bus, topic: &str) -> busbar::Subscription {
    bus.subscribe::<Ping>(topic, "g")
        .start(|_: Envelope<Ping>, _: Context| async { Ok::<_, HandlerError>(()) })
        .await
        .expect("subscribe")
}

/// Deliveries already waiting when a subscription starts are taken in one pass, without a
/// wait between them: the probe sees them too (the time is read once for the pass).
#[tokio::test]
async fn a_probe_sees_deliveries_that_were_waiting() {
    let bus = Bus::memory();
    let first = ping_subscription(&bus, "waiting").await;
    first
        .shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
    for _ in 0..3 {
        bus.publish("waiting", Ping).await.expect("publish");
    }
    let sub = ping_subscription(&bus, "waiting").await;
    wait_until("the waiting deliveries are handled", || {
        sub.stats().handled == 3
    })
    .await;
    let since = sub.health().since_last_delivery().expect("a delivery");
    assert!(since < Duration::from_secs(10), "{since:?}");
}

#[tokio::test]
async fn a_probe_sees_deliveries_and_a_closed_bus() {
    let bus = Bus::memory();
    let sub = ping_subscription(&bus, "pings").await;
    let before = sub.health();
    assert!(before.is_ready() && before.is_live(), "{before:?}");
    assert_eq!(before.last_delivery, None);
    assert_eq!(before.last_error, None);

    bus.publish("pings", Ping).await.expect("publish");
    wait_until("the delivery is seen", || {
        sub.health().last_delivery.is_some()
    })
    .await;
    let since = sub.health().since_last_delivery().expect("a delivery");
    assert!(since < Duration::from_secs(10), "{since:?}");

    bus.close().await.expect("close");
    let closed = bus.health();
    assert_eq!(closed.connection, ConnectionState::Closed);
    assert!(!closed.is_ready() && !closed.is_live(), "{closed:?}");
    wait_until("the subscription stops with its transport", || {
        !sub.health().is_live()
    })
    .await;
    assert!(!sub.health().is_ready());
}

#[tokio::test]
async fn depth_counts_what_waits_and_refuses_a_group_never_declared() {
    let bus = Bus::memory();
    bus.declare("jobs", "workers").await.expect("declare");
    for _ in 0..3 {
        bus.publish("jobs", Ping).await.expect("publish");
    }
    let depth = bus.depth("jobs", "workers").await.expect("depth");
    assert_eq!((depth.pending, depth.dead_letters), (Some(3), Some(0)));
    let error = bus.depth("jobs", "nobody").await.expect_err("not declared");
    assert_eq!(error.kind(), ErrorKind::Broker, "{error}");
    assert!(error.to_string().contains("declare it first"), "{error}");
    assert!(!error.is_retryable(), "{error}");
    let error = bus.depth("", "workers").await.expect_err("no topic");
    assert_eq!(error.kind(), ErrorKind::Config, "{error}");
}
