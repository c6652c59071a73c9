//! One trace across two hops on the memory transport (feature `otel`; the tracing subscriber
//! is process-wide, so this lives in its own binary).

use std::sync::Arc;

use busbar::MemoryTransport;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_across_two_hops_on_memory() {
    busbar_testkit::otel::one_trace_across_two_hops(Arc::new(MemoryTransport::new())).await;
}
