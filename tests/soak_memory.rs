//! The soak with faults (see `busbar_testkit::soak`) on the memory transport.

use std::sync::Arc;

use busbar::MemoryTransport;
use busbar_testkit::soak::{soak_size, soak_with_faults};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_with_faults_accounts_for_every_message() {
    let report = soak_with_faults(Arc::new(MemoryTransport::new()), soak_size(20_000)).await;
    println!("{report}");
}
