//! The soak with faults (see `busbar_testkit::soak`) against the local Kafka-protocol broker.

use std::sync::Arc;

use busbar_kafka::KafkaTransport;
use busbar_testkit::conformance::reachable;
use busbar_testkit::soak::{soak_size, soak_with_faults};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_with_faults_accounts_for_every_message() {
    let url = std::env::var("BUSBAR_KAFKA_URL")
        .unwrap_or_else(|_| "kafka://127.0.0.1:9092?session_timeout_ms=6000".into());
    let Some(transport) = reachable(KafkaTransport::connect(&url.parse().unwrap()).await) else {
        return;
    };
    let report = soak_with_faults(Arc::new(transport), soak_size(20_000)).await;
    println!("{report}");
}
