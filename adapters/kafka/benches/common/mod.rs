//! What the Kafka benches' hand-rolled rdkafka consumer does with each record, shared by them.

use busbar_core::Event;
use rdkafka::message::{Headers, Message};

/// Reads a record as a service written on rdkafka would: the `ce_id` and `ce_type` headers
/// (the type must be `E`'s), then the JSON payload as an `E`. Returns the id and the event.
pub fn hand_rolled_read<E: Event>(record: &impl Message) -> (Option<String>, E) {
    let headers = record.headers().expect("headers");
    let header = |name: &str| {
        headers
            .iter()
            .find(|h| h.key == name)
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::to_owned)
    };
    let (id, kind) = (header("ce_id"), header("ce_type"));
    assert_eq!(kind.as_deref(), Some(E::TYPE));
    let event = serde_json::from_slice(record.payload().expect("value")).expect("json");
    (id, event)
}
