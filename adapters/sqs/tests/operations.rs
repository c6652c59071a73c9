//! Operations on SQS (LocalStack): metric values after a scenario with retries and dead letters (and
//! the depth the broker reports), and one trace across two hops (feature `otel`). The metrics
//! recorder and the tracing subscriber are process-wide, so these live in their own binary.

use std::sync::Arc;

use busbar_core::Transport;
use busbar_sqs::SqsTransport;
use busbar_testkit::conformance::reachable;

const LOCAL: &str = "sqs://?endpoint=http://127.0.0.1:4566&region=us-east-1&access_key_id=test&secret_access_key=test&wait_time_s=1&visibility_timeout_s=10";

fn url() -> String {
    std::env::var("BUSBAR_SQS_URL").unwrap_or_else(|_| LOCAL.to_string())
}

/// The broker under test, or `None` (the test skips) when it is unreachable and brokers are
/// not required.
async fn transport() -> Option<Arc<dyn Transport>> {
    let connected = async { SqsTransport::connect(&url().parse()?).await }.await;
    reachable(connected).map(|transport| Arc::new(transport) as Arc<dyn Transport>)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_records_retries_and_dead_letters() {
    let Some(transport) = transport().await else {
        return;
    };
    busbar_testkit::metrics::records_retries_and_dead_letters(transport).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_one_trace_across_two_hops() {
    let Some(transport) = transport().await else {
        return;
    };
    busbar_testkit::otel::one_trace_across_two_hops(transport).await;
}
