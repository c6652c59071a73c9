//! Metric values after a scenario with retries and dead letters, on SQS (LocalStack), and the
//! queue depths it reports. (The recorder is process-wide, so this lives in its own binary.)

use std::sync::Arc;

use busbar_sqs::SqsTransport;
use busbar_testkit::conformance::reachable;

const LOCAL: &str = "sqs://?endpoint=http://127.0.0.1:4566&region=us-east-1&access_key_id=test&secret_access_key=test&wait_time_s=1&visibility_timeout_s=10";

fn url() -> String {
    std::env::var("BUSBAR_SQS_URL").unwrap_or_else(|_| LOCAL.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_records_retries_and_dead_letters() {
    let connected = async { SqsTransport::connect(&url().parse()?).await }.await;
    let Some(transport) = reachable(connected) else {
        return;
    };
    busbar_testkit::metrics::records_retries_and_dead_letters(Arc::new(transport)).await;
}
