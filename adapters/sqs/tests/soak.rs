//! The soak with faults (see `busbar_testkit::soak`) against the local SQS/SNS server, on
//! standard queues (fan-out mode) and on FIFO queues, where per-key order is checked too.

use std::sync::Arc;

use busbar_sqs::SqsTransport;
use busbar_testkit::conformance::brokers_required;
use busbar_testkit::soak::{soak_size, soak_with_faults};

// Twelve attempts and the duplicates stay well under the redrive policy's receive count.
const LOCAL: &str = "sqs://?endpoint=http://127.0.0.1:4566&region=us-east-1&access_key_id=test&secret_access_key=test&wait_time_s=1&visibility_timeout_s=10&max_receive_count=40";

async fn soak(extra: &str) {
    let url = std::env::var("BUSBAR_SQS_URL").unwrap_or_else(|_| LOCAL.to_string());
    let transport = match SqsTransport::connect(&format!("{url}{extra}").parse().unwrap()).await {
        Ok(t) => t,
        Err(e) if !brokers_required() => return eprintln!("SKIPPED: {e}"),
        Err(e) => panic!("SQS unreachable: {e}"),
    };
    let report = soak_with_faults(Arc::new(transport), soak_size(20_000)).await;
    println!("{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_with_faults_accounts_for_every_message() {
    soak("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_with_faults_on_fifo_keeps_order_and_accounts_for_every_message() {
    soak("&fifo=true").await;
}
