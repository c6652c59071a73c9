//! LocalStack stopped and started again under a running bus (`scripts/local-brokers.sh
//! sqs-restart`): see `busbar_testkit::restart`. LocalStack's community build keeps no state,
//! so it comes back empty and the client side is what is tested.
//!
//! It restarts the shared local LocalStack, so it lives alone in this test binary (cargo runs
//! test binaries one after another) and is skipped unless brokers are required or
//! `BUSBAR_RESTART_TESTS=1`.

use std::sync::Arc;

use busbar_sqs::SqsTransport;
use busbar_testkit::restart::{broker_script, enabled, recovers_from_an_empty_restart};

const URL: &str = "sqs://?endpoint=http://127.0.0.1:4566&region=us-east-1&access_key_id=test&secret_access_key=test&wait_time_s=1&visibility_timeout_s=5&mode=queue";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bus_recovers_from_a_broker_restart_by_itself() {
    if !enabled("restarts the local LocalStack") {
        return;
    }
    let transport = SqsTransport::connect(&URL.parse().unwrap())
        .await
        .expect("LocalStack reachable");
    let report =
        recovers_from_an_empty_restart(Arc::new(transport), || broker_script("sqs-restart")).await;
    println!("{report}");
}
