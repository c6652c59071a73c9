//! One trace across two hops on Kafka (feature `otel`; the tracing subscriber is
//! process-wide, so this lives in its own binary).

use std::sync::Arc;

use busbar_kafka::KafkaTransport;
use busbar_testkit::conformance::reachable;

fn url() -> String {
    std::env::var("BUSBAR_KAFKA_URL")
        .unwrap_or_else(|_| "kafka://127.0.0.1:9092?session_timeout_ms=6000".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_one_trace_across_two_hops() {
    let connected = async { KafkaTransport::connect(&url().parse()?).await }.await;
    let Some(transport) = reachable(connected) else {
        return;
    };
    busbar_testkit::otel::one_trace_across_two_hops(Arc::new(transport)).await;
}
