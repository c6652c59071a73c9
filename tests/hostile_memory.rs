//! Malformed messages put straight onto the memory transport (its "raw client" is the
//! transport SPI): each ends in the DLQ with a clear reason, and the consumer keeps running.

use std::sync::Arc;

use busbar::{MemoryTransport, Message, Transport};
use busbar_testkit::hostile::foreign_messages_are_dead_lettered_clearly;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_and_malformed_messages_are_dead_lettered_with_a_clear_reason() {
    let transport = Arc::new(MemoryTransport::new());
    let raw = Arc::clone(&transport);
    // Memory headers are Rust strings (never invalid UTF-8), and its SPI refuses what busbar
    // would not publish (too many headers, too large), as the other transports' SPIs do.
    let refused = ["invalid-utf8-attribute", "many-headers", "oversize"];
    foreign_messages_are_dead_lettered_clearly(transport, &refused, |topic, cases| async move {
        for (i, case) in cases.into_iter().enumerate() {
            let mut message = Message::new(format!("raw-{i}"), topic.clone(), case.payload);
            message.headers = case.headers.into_iter().collect();
            raw.publish(vec![message]).await.expect("raw publish");
        }
    })
    .await;
}
