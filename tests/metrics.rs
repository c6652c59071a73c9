//! Metric values after a scenario with retries and dead letters, on the memory transport.
//! (The recorder is process-wide, so these tests live in their own binary.)

use std::sync::Arc;

use busbar::{metrics, Bus, MemoryTransport};
use busbar_testkit::metrics::{values_of, Value};

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
