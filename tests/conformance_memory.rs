//! The conformance suite against the memory transport.
//!
//! Every transport the factory returns is a new connection to one in-process broker, as two
//! service instances would share one RabbitMQ.

use std::sync::{Arc, OnceLock};

use busbar::{MemoryTransport, Transport};

fn broker() -> &'static MemoryTransport {
    static BROKER: OnceLock<MemoryTransport> = OnceLock::new();
    BROKER.get_or_init(MemoryTransport::new)
}

async fn memory() -> busbar::Result<Arc<dyn Transport>> {
    Ok(Arc::new(broker().connection()))
}

busbar_testkit::conformance_suite!(memory);
