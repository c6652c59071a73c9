//! Tansu stopped and started again under a running bus (`scripts/local-brokers.sh
//! kafka-restart`): see `busbar_testkit::restart`. Tansu keeps its log in memory, so it comes
//! back empty (topics, group offsets) and the client side is what is tested.
//!
//! It restarts the shared local Tansu, so it lives alone in this test binary (cargo runs test
//! binaries one after another) and is skipped unless brokers are required or
//! `BUSBAR_RESTART_TESTS=1`.

use std::process::Command;
use std::sync::Arc;

use busbar_kafka::KafkaTransport;
use busbar_testkit::conformance::brokers_required;
use busbar_testkit::restart::recovers_from_an_empty_restart;

fn restart_tansu() {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../scripts/local-brokers.sh"
    );
    let status = Command::new("bash")
        .args([script, "kafka-restart"])
        .status()
        .expect("the broker script runs");
    assert!(status.success(), "local-brokers.sh kafka-restart failed");
}

// Blocked outside the project: when Tansu restarts under running clients, librdkafka 2.12.1
// (the newest rdkafka-sys bundles) segfaults in rd_kafka_metadata_update_op →
// rd_kafka_metadata_cache_find → strcmp on a null topic name (see adapters/kafka/README.md).
// Run it by hand with `cargo test -p busbar-kafka --test broker_restart -- --ignored`.
#[ignore = "librdkafka 2.12.1 segfaults when Tansu restarts under it; see adapters/kafka/README.md"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bus_recovers_from_a_broker_restart_by_itself() {
    if !brokers_required() && std::env::var("BUSBAR_RESTART_TESTS").is_err() {
        eprintln!("SKIPPED: restarts the local Tansu; set CI=true or BUSBAR_RESTART_TESTS=1");
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    let url = std::env::var("BUSBAR_KAFKA_RESTART_URL").unwrap_or_else(|_| {
        "kafka://127.0.0.1:9092?session_timeout_ms=6000&publish_timeout_ms=5000".into()
    });
    let transport = KafkaTransport::connect(&url.parse().unwrap())
        .await
        .expect("Kafka reachable");
    let report = recovers_from_an_empty_restart(Arc::new(transport), restart_tansu).await;
    println!("{report}");
}
