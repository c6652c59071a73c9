//! busbar [`Message`] ⇄ Kafka record, following the CloudEvents Kafka protocol binding.
//!
//! The binding's binary mode is busbar's neutral form already: attributes are `ce_*` headers,
//! `datacontenttype` is the `content-type` header, the payload is the record value. The key is
//! the record key, so one key stays in one partition and keeps its order, and also the
//! `ce_partitionkey` header: the binding maps the Partitioning extension's `partitionkey` to
//! the record key but says the attribute must still travel with the event. A record without a
//! key takes its key from `ce_partitionkey`.

use busbar_core::envelope::attr;
use busbar_core::message::ReceivedHeaders;
use busbar_core::{Headers, Message, Text};
use rdkafka::message::{Header, Headers as _, OwnedHeaders};

/// Carries the message id when no `ce_id` header does (a message that is not a CloudEvent).
pub const ID: &str = "busbar.id";

/// The Partitioning extension's attribute as a header.
pub const PARTITION_KEY: &str = "ce_partitionkey";

/// The record headers of `message`.
pub fn to_headers(message: &Message) -> OwnedHeaders {
    let mut headers = message.headers.iter().fold(
        OwnedHeaders::new_with_capacity(message.headers.len() + 1),
        |h, (k, v)| {
            h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            })
        },
    );
    if let (Some(key), None) = (&message.key, message.header(PARTITION_KEY)) {
        headers = headers.insert(Header {
            key: PARTITION_KEY,
            value: Some(key.as_bytes()),
        });
    }
    if message.header(attr::ID) != Some(message.id.as_str()) {
        headers = headers.insert(Header {
            key: ID,
            value: Some(message.id.as_bytes()),
        });
    }
    headers
}

/// A received record as a busbar message of `topic` (the busbar topic, which differs from the
/// record's for redriven messages).
pub fn from_record<M: rdkafka::Message>(topic: &str, record: &M) -> Message {
    let record_key = record.key();
    let (mut own_id, mut key_header) = (None, None);
    let headers = match record.headers() {
        Some(h) => {
            let mut received = ReceivedHeaders::with_capacity(h.count() + 1);
            for header in h.iter() {
                let value = header.value.unwrap_or_default();
                match header.key {
                    ID => own_id = Some(value),
                    // The attribute that only repeats the record key is the key, not a header.
                    PARTITION_KEY if record_key.is_none_or(|key| key == value) => {
                        key_header = Some(value);
                    }
                    name => received.bytes(name, value),
                }
            }
            received.finish()
        }
        None => Headers::new(),
    };
    // An empty id (a foreign producer's null `ce_id`) is no id: the record's place is.
    let id = match headers.get(attr::ID).filter(|id| !id.is_empty()) {
        Some(id) => Text::new(id),
        None => match own_id.filter(|id| !id.is_empty()) {
            Some(id) => lossy(id),
            None => Text::from_display(&format_args!(
                "{}/{}/{}",
                record.topic(),
                record.partition(),
                record.offset()
            )),
        },
    };
    let key = match (record_key, key_header) {
        (Some(key), _) | (None, Some(key)) => Some(lossy(key)),
        (None, None) => None,
    };
    Message {
        id,
        topic: Text::new(topic),
        key,
        headers,
        payload: bytes::Bytes::copy_from_slice(record.payload().unwrap_or_default()),
    }
}

/// Bytes as text, lossily when they are not UTF-8.
fn lossy(bytes: &[u8]) -> Text {
    Text::from(String::from_utf8_lossy(bytes))
}
