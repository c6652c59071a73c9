//! Metric values after a scenario with retries and dead letters, on Kafka, and the consumer
//! lag it reports. (The recorder is process-wide, so this lives in its own binary.)

use std::sync::Arc;

use busbar_kafka::KafkaTransport;
use busbar_testkit::conformance::reachable;

fn url() -> String {
    std::env::var("BUSBAR_KAFKA_URL")
        .unwrap_or_else(|_| "kafka://127.0.0.1:9092?session_timeout_ms=6000".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_records_retries_and_dead_letters() {
    let connected = async { KafkaTransport::connect(&url().parse()?).await }.await;
    let Some(transport) = reachable(connected) else {
        return;
    };
    busbar_testkit::metrics::records_retries_and_dead_letters(Arc::new(transport)).await;
}
