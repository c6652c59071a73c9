//! Operations on RabbitMQ: metric values after a scenario with retries and dead letters (and
//! the depth the broker reports), acks written before a shutdown closes the channel, and one
//! trace across two hops (feature `otel`). The metrics recorder and the tracing subscriber are
//! process-wide, so these live in their own binary.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use busbar_core::{Context, Envelope, HandlerError, Transport};
use busbar_rabbitmq::RabbitTransport;
use busbar_testkit::conformance::{probe, reachable, unique, wait_for, Probe};

fn url() -> String {
    std::env::var("BUSBAR_RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f?queue_expires_ms=600000".into())
}

/// The broker under test, or `None` (the test skips) when it is unreachable and brokers are
/// not required.
async fn transport() -> Option<Arc<dyn Transport>> {
    let connected = async { RabbitTransport::connect(&url().parse()?).await }.await;
    reachable(connected).map(|transport| Arc::new(transport) as Arc<dyn Transport>)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_records_retries_and_dead_letters() {
    let Some(transport) = transport().await else {
        return;
    };
    busbar_testkit::metrics::records_retries_and_dead_letters(transport).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn depth_of_a_group_never_declared_says_to_declare_it() {
    let Some(transport) = transport().await else {
        return;
    };
    let bus = busbar_core::Bus::builder(transport).build();
    let topic = busbar_testkit::conformance::unique("undeclared");
    let error = bus
        .depth(&topic, "nobody")
        .await
        .expect_err("no such queue");
    assert_eq!(error.kind(), busbar_core::ErrorKind::Broker, "{error}");
    assert!(!error.is_retryable(), "{error}");
    assert!(
        error.to_string().contains("declare the group first"),
        "{error}"
    );
    // The channel the refusal closed does not break the bus.
    bus.declare(&topic, "somebody").await.expect("declare");
    let depth = bus.depth(&topic, "somebody").await.expect("depth");
    assert_eq!((depth.pending, depth.dead_letters), (Some(0), Some(0)));
}

/// An ack returns once lapin has it, and is written after: a subscription shut down as its
/// last handlers finish still has every ack written before its channel closes, so nothing it
/// handled is back in the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_are_written_before_shutdown_closes_the_channel() {
    let Some(transport) = transport().await else {
        return;
    };
    let bus = busbar_core::Bus::builder(transport).build();
    for round in 0..3 {
        let (topic, group) = (unique("acked"), unique("g"));
        bus.declare(&topic, &group).await.expect("declare");
        bus.publish_batch(&topic, (0..200).map(|seq| probe(seq, "")))
            .await
            .expect("publish");
        let handled = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&handled);
        let sub = bus
            .subscribe::<Probe>(&topic, &group)
            .start(move |_e: Envelope<Probe>, _c: Context| {
                count.fetch_add(1, Ordering::SeqCst);
                async { Ok::<_, HandlerError>(()) }
            })
            .await
            .expect("subscribe");
        wait_for("200 handled", || handled.load(Ordering::SeqCst) >= 200).await;
        sub.shutdown(Duration::from_secs(10))
            .await
            .expect("shutdown");
        let depth = bus.depth(&topic, &group).await.expect("depth");
        assert_eq!(
            depth.pending,
            Some(0),
            "round {round}: handled messages went back to the queue (their acks were lost)"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_one_trace_across_two_hops() {
    let Some(transport) = transport().await else {
        return;
    };
    busbar_testkit::otel::one_trace_across_two_hops(transport).await;
}
