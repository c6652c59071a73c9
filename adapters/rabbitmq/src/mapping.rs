//! busbar [`Message`] ⇄ AMQP 0-9-1 message, following the CloudEvents AMQP binding.
//!
//! CloudEvents attributes travel as application properties (headers) named `cloudEvents:<attr>`
//! (`cloudEvents_<attr>` is read too, for JMS-style producers); `datacontenttype` is the AMQP
//! `content-type` property. For tooling, `id`, `type`, `correlationid` and `time` are mirrored
//! into the `message-id`, `type`, `correlation-id` and `timestamp` properties; the headers stay
//! the source of truth, so nothing is lost to the properties' 255-byte and whole-second limits.
//! The key travels as the `cloudEvents:partitionkey` extension. Messages are persistent.

use busbar_core::envelope::attr;
use busbar_core::message::ReceivedHeaders;
use busbar_core::{Error, ErrorKind, HeaderName, Headers, Message, Result, Text};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;

/// The AMQP header prefix of CloudEvents attributes.
pub const CE_PREFIX: &str = "cloudEvents:";
/// The JMS-compatible spelling, accepted on input.
pub const CE_PREFIX_ALT: &str = "cloudEvents_";
/// The key's CloudEvents extension.
pub const PARTITION_KEY: &str = "ce_partitionkey";
/// busbar's attempt count, set when a message is republished for a delayed retry.
pub const ATTEMPT: &str = "busbar.attempt";
/// Headers the broker adds that are not part of the message.
const BROKER_HEADERS: [&str; 7] = [
    "x-death",
    "x-delivery-count",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
];

/// AMQP short strings hold at most 255 bytes.
const SHORT: usize = 255;

fn short(value: &str) -> Option<ShortString> {
    (value.len() <= SHORT).then(|| ShortString::from(value))
}

/// The AMQP properties of `message`; `attempt` (for retries) is recorded in a header.
pub fn to_amqp(message: &Message, attempt: Option<u32>) -> Result<BasicProperties> {
    let mut headers = FieldTable::default();
    for (name, value) in &message.headers {
        if name == attr::CONTENT_TYPE {
            continue;
        }
        let amqp_name = match name.strip_prefix(attr::CE_PREFIX) {
            // Not `format!`: this runs for every attribute of every message.
            Some(attribute) => {
                let mut amqp_name = String::with_capacity(CE_PREFIX.len() + attribute.len());
                amqp_name.push_str(CE_PREFIX);
                amqp_name.push_str(attribute);
                amqp_name
            }
            None if name.starts_with(CE_PREFIX) || name.starts_with(CE_PREFIX_ALT) => {
                return Err(Error::new(
                    ErrorKind::InvalidHeader,
                    "publish",
                    format!("header {name:?} uses the CloudEvents AMQP prefix; RabbitMQ would read it as an envelope attribute"),
                )
                .with_resource(format!("message {}", message.id)))
            }
            None => name.to_string(),
        };
        if amqp_name.len() > SHORT {
            return Err(Error::new(
                ErrorKind::InvalidHeader,
                "publish",
                format!("header name {amqp_name:?} is longer than AMQP's 255 bytes"),
            )
            .with_resource(format!("message {}", message.id)));
        }
        headers.insert(
            amqp_name.into(),
            AMQPValue::LongString(LongString::from(value.as_bytes())),
        );
    }
    if let Some(key) = &message.key {
        headers.insert(
            format!("{CE_PREFIX}partitionkey").into(),
            AMQPValue::LongString(LongString::from(key.as_bytes())),
        );
    }
    if let Some(attempt) = attempt {
        headers.insert(
            ATTEMPT.into(),
            AMQPValue::LongString(LongString::from(attempt.to_string())),
        );
    }
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers);
    if let Some(id) = short(&message.id) {
        properties = properties.with_message_id(id);
    }
    if let Some(content_type) = message.header(attr::CONTENT_TYPE) {
        let content_type = short(content_type).ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidHeader,
                "publish",
                "content-type is longer than 255 bytes",
            )
            .with_resource(format!("message {}", message.id))
        })?;
        properties = properties.with_content_type(content_type);
    }
    if let Some(kind) = message.header(attr::TYPE).and_then(short) {
        properties = properties.with_type(kind);
    }
    if let Some(correlation) = message.header(attr::CORRELATION_ID).and_then(short) {
        properties = properties.with_correlation_id(correlation);
    }
    if let Some(time) = message
        .header(attr::TIME)
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .and_then(|t| u64::try_from(t.timestamp()).ok())
    {
        properties = properties.with_timestamp(time);
    }
    Ok(properties)
}

/// A received AMQP message as a busbar message of `topic`, and its attempt number.
///
/// The attempt is busbar's own count (set on delayed retries) plus the broker's redeliveries:
/// `x-delivery-count` on quorum queues, the `redelivered` flag on classic ones.
pub fn from_amqp(
    topic: &str,
    properties: &BasicProperties,
    payload: Vec<u8>,
    redelivered: bool,
) -> (Message, u32) {
    let mut received = ReceivedHeaders::default();
    // busbar's name of a CloudEvents attribute, written here for each one (a known name is
    // then stored without allocating).
    let mut attribute_name = String::new();
    let mut attempt = 1u32;
    let mut delivery_count = None;
    if let Some(table) = properties.headers() {
        received = ReceivedHeaders::with_capacity(table.inner().len() + 1);
        for (name, value) in table {
            let name = name.as_str();
            if name == ATTEMPT {
                attempt = text(value).parse().unwrap_or(1).max(1);
            } else if name == "x-delivery-count" {
                delivery_count = text(value).parse::<u32>().ok();
            } else if BROKER_HEADERS.contains(&name) {
                // Broker bookkeeping, not part of the message.
            } else if let Some(attribute) = name
                .strip_prefix(CE_PREFIX)
                .or_else(|| name.strip_prefix(CE_PREFIX_ALT))
            {
                attribute_name.clear();
                attribute_name.push_str(attr::CE_PREFIX);
                attribute_name.push_str(attribute);
                insert_attribute(&mut received, &attribute_name, value);
            } else {
                insert_value(&mut received, name, value);
            }
        }
    }
    let mut headers = received.finish();
    let redeliveries = delivery_count.unwrap_or(u32::from(redelivered));
    if let Some(content_type) = properties.content_type() {
        headers.get_or_insert_with(HeaderName::from_static(attr::CONTENT_TYPE), || {
            Text::new(content_type.as_str())
        });
    }
    let key = headers.remove(PARTITION_KEY);
    let id = headers
        .get(attr::ID)
        .map(Text::new)
        .or_else(|| {
            properties
                .message_id()
                .as_ref()
                .map(|id| Text::new(id.as_str()))
        })
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| content_id(&headers, &payload));
    let message = Message {
        id,
        topic: Text::new(topic),
        key,
        headers,
        payload: bytes::Bytes::from(payload),
    };
    (message, attempt.saturating_add(redeliveries))
}

/// The id of a foreign message that carries none (no `ce_id`, no `message-id`): a hash of
/// its headers and body, so a redelivery keeps its id and the idempotency store recognises it,
/// where AMQP has no broker-assigned id to fall back on.
fn content_id(headers: &Headers, payload: &[u8]) -> Text {
    let hash = |basis: u64| {
        let mut hash = basis;
        let mut eat = |bytes: &[u8]| {
            for byte in bytes.iter().chain(&[0xff]) {
                hash = (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3);
            }
        };
        for (name, value) in headers {
            eat(name.as_bytes());
            eat(value.as_bytes());
        }
        eat(payload);
        hash
    };
    Text::from_display(&format_args!(
        "amqp-{:016x}{:016x}",
        hash(0xcbf2_9ce4_8422_2325),
        hash(0x6c62_272e_07bb_0142)
    ))
}

/// Adds a received CloudEvents attribute. The binding lets a sender use the native AMQP type
/// instead of the canonical string, and a receiver must read both: a timestamp becomes RFC
/// 3339, binary becomes base64; integers and booleans are already their canonical text.
fn insert_attribute(headers: &mut ReceivedHeaders, name: &str, value: &AMQPValue) {
    let canonical = match value {
        AMQPValue::Timestamp(seconds) => {
            busbar_core::structured::canonical_time_from_unix_seconds(*seconds)
        }
        AMQPValue::ByteArray(bytes) => {
            Some(busbar_core::structured::canonical_binary(bytes.as_slice()))
        }
        _ => None,
    };
    match canonical {
        Some(text) => headers.text(name, text),
        None => insert_value(headers, name, value),
    }
}

/// Adds a received header; byte values that are not UTF-8 are decoded lossily and named in
/// [`busbar_core::message::INVALID_UTF8_HEADERS`].
fn insert_value(headers: &mut ReceivedHeaders, name: &str, value: &AMQPValue) {
    match value {
        AMQPValue::LongString(s) => headers.bytes(name, s.as_bytes()),
        AMQPValue::ByteArray(b) => headers.bytes(name, b.as_slice()),
        other => headers.text(name, text(other)),
    }
}

/// A header value as text; foreign producers may send numbers, booleans or bytes.
fn text(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_string(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        AMQPValue::ByteArray(b) => String::from_utf8_lossy(b.as_slice()).into_owned(),
        AMQPValue::Void => String::new(),
        other => format!("{other:?}"),
    }
}

/// The number of times the broker dead-lettered the message (from `x-death`), for dead letters
/// that RabbitMQ moved on its own.
pub fn death_count(properties: &BasicProperties) -> Option<u32> {
    let table = properties.headers().as_ref()?;
    let AMQPValue::FieldArray(deaths) = table.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    u32::try_from(text(first.inner().get("count")?).parse::<u64>().ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use busbar_core::codec::Json;
    use busbar_core::{Envelope, Event};
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Ping {
        n: u32,
    }
    impl Event for Ping {
        const TYPE: &'static str = "test.ping.v1";
    }

    #[test]
    fn an_envelope_survives_the_amqp_mapping_losslessly() {
        let mut envelope = Envelope::new("/svc", Ping { n: 1 })
            .with_key("customer-7")
            .with_header("tenant", "äcme")
            .with_header("x-seq", "3");
        envelope.tracestate = Some("v=1".into());
        let message = envelope.to_message(&Json, "orders").unwrap();
        let properties = to_amqp(&message, None).unwrap();
        assert_eq!(properties.delivery_mode(), &Some(2));
        assert_eq!(
            properties.message_id().as_ref().map(|s| s.as_str()),
            Some(envelope.id.as_str())
        );
        assert_eq!(
            properties.content_type().as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        let table = properties.headers().as_ref().unwrap();
        assert!(table.inner().contains_key("cloudEvents:id"));
        assert!(table.inner().contains_key("cloudEvents:specversion"));
        let (back, attempt) = from_amqp("orders", &properties, message.payload.to_vec(), false);
        assert_eq!(back, message);
        assert_eq!(attempt, 1);
        assert_eq!(
            Envelope::<Ping>::from_message(&Json, &back).unwrap(),
            envelope
        );
    }

    #[test]
    fn attempts_add_busbars_count_and_the_brokers_redeliveries() {
        let message = Message::new("m", "t", "{}");
        let mut properties = to_amqp(&message, Some(3)).unwrap();
        assert_eq!(from_amqp("t", &properties, vec![], false).1, 3);
        assert_eq!(from_amqp("t", &properties, vec![], true).1, 4);
        let mut table = properties.headers().clone().unwrap();
        table.insert("x-delivery-count".into(), AMQPValue::LongLongInt(2));
        properties = properties.with_headers(table);
        let (back, attempt) = from_amqp("t", &properties, vec![], true);
        assert_eq!(attempt, 5);
        assert!(
            back.headers.is_empty(),
            "broker and busbar bookkeeping must not leak: {:?}",
            back.headers
        );
    }

    #[test]
    fn foreign_header_types_become_text() {
        let mut table = FieldTable::default();
        table.insert("n".into(), AMQPValue::LongInt(-4));
        table.insert("flag".into(), AMQPValue::Boolean(true));
        table.insert(
            "cloudEvents_type".into(),
            AMQPValue::ShortString("jms.style.v1".into()),
        );
        table.insert(
            "bad".into(),
            AMQPValue::LongString(LongString::from(vec![0xff, 0x61])),
        );
        let properties = BasicProperties::default()
            .with_headers(table)
            .with_message_id("legacy-1".into());
        let (message, _) = from_amqp("t", &properties, b"x".to_vec(), false);
        assert_eq!(message.header("n"), Some("-4"));
        assert_eq!(message.header("flag"), Some("true"));
        assert_eq!(message.header("ce_type"), Some("jms.style.v1"));
        assert_eq!(message.header("bad"), Some("\u{fffd}a"));
        assert_eq!(
            message.header(busbar_core::message::INVALID_UTF8_HEADERS),
            Some("bad"),
            "the lossy value is named"
        );
        assert_eq!(message.id, "legacy-1");
    }

    /// The binding's native AMQP types, under both prefixes, read as canonical strings.
    #[test]
    fn cloudevents_attributes_in_native_amqp_types_are_read() {
        let mut table = FieldTable::default();
        table.insert(
            "cloudEvents:time".into(),
            AMQPValue::Timestamp(1_767_323_045),
        );
        table.insert(
            "cloudEvents_sig".into(),
            AMQPValue::ByteArray(vec![0, 1, 2, 255].into()),
        );
        table.insert("cloudEvents:count".into(), AMQPValue::LongLongInt(-42));
        table.insert("cloudEvents_flag".into(), AMQPValue::Boolean(false));
        let (message, _) = from_amqp(
            "t",
            &BasicProperties::default().with_headers(table),
            b"{}".to_vec(),
            false,
        );
        assert_eq!(message.header("ce_time"), Some("2026-01-02T03:04:05Z"));
        assert_eq!(message.header("ce_sig"), Some("AAEC/w=="));
        assert_eq!(message.header("ce_count"), Some("-42"));
        assert_eq!(message.header("ce_flag"), Some("false"));
    }

    #[test]
    fn a_foreign_message_without_any_id_gets_a_stable_one_from_its_content() {
        let properties = BasicProperties::default();
        let (one, _) = from_amqp("t", &properties, b"hello".to_vec(), false);
        let (again, _) = from_amqp("t", &properties, b"hello".to_vec(), true);
        let (other, _) = from_amqp("t", &properties, b"hello!".to_vec(), false);
        assert!(one.id.starts_with("amqp-"), "{}", one.id);
        assert_eq!(one.id, again.id, "a redelivery keeps its id");
        assert_ne!(one.id, other.id, "another message gets another id");
    }

    #[test]
    fn headers_that_would_pose_as_cloudevents_attributes_are_refused() {
        let mut message = Message::new("m", "t", "{}");
        message.headers.insert("cloudEvents:id", "forged");
        assert_eq!(
            to_amqp(&message, None).unwrap_err().kind(),
            ErrorKind::InvalidHeader
        );
    }
}
