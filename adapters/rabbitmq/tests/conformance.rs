//! The conformance suite against a real RabbitMQ (`scripts/local-brokers.sh rabbitmq`).
//!
//! `BUSBAR_RABBITMQ_URL` overrides the broker (default `amqp://guest:guest@127.0.0.1:5672/%2f`).
//! The transport fails fast when the broker is down: the suite then fails under `CI=true`.

use std::sync::Arc;

use busbar_core::Transport;
use busbar_rabbitmq::RabbitTransport;

/// The broker under test.
pub fn url() -> String {
    std::env::var("BUSBAR_RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f?queue_expires_ms=600000".into())
}

async fn rabbitmq() -> busbar_core::Result<Arc<dyn Transport>> {
    Ok(Arc::new(RabbitTransport::connect(&url().parse()?).await?))
}

busbar_testkit::conformance_suite!(rabbitmq);
