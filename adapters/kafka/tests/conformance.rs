//! The conformance suite against a Kafka-protocol broker (`scripts/local-brokers.sh kafka`
//! starts Tansu on 127.0.0.1:9092). `BUSBAR_KAFKA_URL` overrides it.
//!
//! Tansu holds a follower's JoinGroup for 3 s; the tests use a 6000 ms session timeout.

use std::sync::Arc;

use busbar_core::Transport;
use busbar_kafka::KafkaTransport;

/// The broker under test.
pub fn url() -> String {
    std::env::var("BUSBAR_KAFKA_URL")
        .unwrap_or_else(|_| "kafka://127.0.0.1:9092?session_timeout_ms=6000".into())
}

async fn kafka() -> busbar_core::Result<Arc<dyn Transport>> {
    Ok(Arc::new(KafkaTransport::connect(&url().parse()?).await?))
}

busbar_testkit::conformance_suite!(kafka);
