//! The soak with faults (see `busbar_testkit::soak`) against the local RabbitMQ.

use std::sync::Arc;

use busbar_rabbitmq::RabbitTransport;
use busbar_testkit::conformance::reachable;
use busbar_testkit::soak::{soak_size, soak_with_faults};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_with_faults_accounts_for_every_message() {
    let url = std::env::var("BUSBAR_RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f?queue_expires_ms=600000".into());
    let Some(transport) = reachable(RabbitTransport::connect(&url.parse().unwrap()).await) else {
        return;
    };
    let report = soak_with_faults(Arc::new(transport), soak_size(20_000)).await;
    println!("{report}");
}
