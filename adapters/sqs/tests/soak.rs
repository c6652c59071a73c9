//! The soak with faults (see `busbar_testkit::soak`) against the local SQS/SNS server, on
//! standard queues (fan-out mode) and on FIFO queues, where per-key order is checked too.
//!
//! Sized for CI by LocalStack's speed (about 1,000 messages a second, one Python process):
//! 10,000 messages on standard queues and 1,000 on FIFO, where each key's messages go one at a
//! time and a retry holds its key for a whole second (SQS counts visibility in seconds).
//! `BUSBAR_SOAK_MESSAGES` sets both (20,000 passes on standard queues in about four minutes).

use std::sync::Arc;

use busbar_sqs::SqsTransport;
use busbar_testkit::conformance::reachable;
use busbar_testkit::soak::{soak_size, soak_with_faults, soak_with_faults_order_unchecked};

// Twelve attempts and the duplicates stay well under the redrive policy's receive count.
const LOCAL: &str = "sqs://?endpoint=http://127.0.0.1:4566&region=us-east-1&access_key_id=test&secret_access_key=test&wait_time_s=1&visibility_timeout_s=10&max_receive_count=40";

/// LocalStack keeps a FIFO group locked while one of its messages is in flight, but a message
/// whose visibility is reset (a nack, an abandoned delivery) becomes available at once even
/// while an earlier message of its group is in flight on another consumer. AWS keeps the group
/// locked. With competing consumers that lets LocalStack hand out a key's later message early.
const LOCALSTACK_FIFO: &str = "LocalStack hands out a FIFO group's reset messages while an earlier one is in flight elsewhere (AWS does not)";

async fn soak(extra: &str, messages: usize) {
    let url = std::env::var("BUSBAR_SQS_URL").unwrap_or_else(|_| LOCAL.to_string());
    let Some(transport) =
        reachable(SqsTransport::connect(&format!("{url}{extra}").parse().unwrap()).await)
    else {
        return;
    };
    let report = if extra.contains("fifo=true") && std::env::var("BUSBAR_SQS_URL").is_err() {
        soak_with_faults_order_unchecked(Arc::new(transport), soak_size(messages), LOCALSTACK_FIFO)
            .await
    } else {
        soak_with_faults(Arc::new(transport), soak_size(messages)).await
    };
    println!("{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_with_faults_accounts_for_every_message() {
    soak("", 10_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_with_faults_on_fifo_accounts_for_every_message() {
    soak("&fifo=true", 1_000).await;
}
