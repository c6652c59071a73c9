//! One trace across two hops on RabbitMQ (feature `otel`; the tracing subscriber is
//! process-wide, so this lives in its own binary).

use std::sync::Arc;

use busbar_rabbitmq::RabbitTransport;
use busbar_testkit::conformance::reachable;

fn url() -> String {
    std::env::var("BUSBAR_RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f?queue_expires_ms=600000".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_one_trace_across_two_hops() {
    let connected = async { RabbitTransport::connect(&url().parse()?).await }.await;
    let Some(transport) = reachable(connected) else {
        return;
    };
    busbar_testkit::otel::one_trace_across_two_hops(Arc::new(transport)).await;
}
