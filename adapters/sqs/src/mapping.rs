//! busbar [`Message`] ⇄ SQS/SNS message within SQS's limit of 10 message attributes.
//!
//! SQS carries at most 10 message attributes, so busbar spends them on what consumers filter
//! and trace on, and packs the rest:
//!
//! 1. the CloudEvents core, each as an attribute of its own (`ce_specversion`, `ce_id`,
//!    `ce_type`, `ce_source`, `ce_time`, `content-type`), and the key as `busbar.key`;
//! 2. then, while there is room, `ce_correlationid`, `ce_causationid` and `ce_traceparent`, in
//!    that order, each as an attribute of its own (an SNS filter policy or a plain SQS consumer
//!    sees them);
//! 3. every other header (free-form, dead-letter, whichever of those three found no room) is
//!    packed into one JSON attribute, `busbar.headers`.
//!
//! A payload that is not UTF-8 (SQS bodies are text) is sent base64-encoded with
//! `busbar.encoding = base64`; a message id that is not its `ce_id` travels as `busbar.id`.
//! Whatever the number of headers, that is at most 10 attributes, and nothing is lost. On
//! input, any attribute is a header of the same name, so a plain SQS or SNS producer that sets
//! `ce_correlationid` is read like busbar.

use std::collections::BTreeMap;

use busbar_core::envelope::attr;
use busbar_core::message::ReceivedHeaders;
use busbar_core::{Error, ErrorKind, HeaderName, Headers, Message, Result, Text};

/// Headers sent as attributes of their own.
const OWN_ATTRIBUTES: [&str; 6] = [
    attr::SPECVERSION,
    attr::ID,
    attr::TYPE,
    attr::SOURCE,
    attr::TIME,
    attr::CONTENT_TYPE,
];
/// Headers that get attributes of their own when there is room, in this order.
const PROMOTED: [&str; 3] = [attr::CORRELATION_ID, attr::CAUSATION_ID, attr::TRACEPARENT];
/// The most message attributes SQS (and SNS raw delivery) carries.
pub const MAX_ATTRIBUTES: usize = 10;
/// The attribute holding every other header, as a JSON object.
pub const PACKED: &str = "busbar.headers";
/// The attribute holding the key.
pub const KEY: &str = "busbar.key";
/// The message id when no `ce_id` carries it.
pub const ID: &str = "busbar.id";
/// How the body is encoded when it is not UTF-8.
pub const ENCODING: &str = "busbar.encoding";

/// A message ready for SQS/SNS: a text body and string attributes.
#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    /// The body.
    pub body: String,
    /// The message attributes (all of type `String`).
    pub attributes: BTreeMap<String, String>,
    /// The FIFO `MessageGroupId` (see [`message_group_id`]); unused on standard queues.
    pub group_id: String,
}

impl Packed {
    /// The size SQS counts: body plus each attribute's name, type (`String`) and value.
    pub fn sqs_size(&self) -> usize {
        self.body.len()
            + self
                .attributes
                .iter()
                .map(|(k, v)| k.len() + "String".len() + v.len())
                .sum::<usize>()
    }
}

/// Packs `message`.
pub fn pack(message: &Message) -> Result<Packed> {
    let mut attributes = BTreeMap::new();
    let mut rest = BTreeMap::new();
    for (name, value) in &message.headers {
        // SQS refuses empty attribute values and some characters: those go into the packed
        // object, where JSON escapes them.
        if OWN_ATTRIBUTES.contains(&name.as_str()) && !value.is_empty() && sqs_text(value) {
            attributes.insert(name.to_string(), value.to_string());
        } else {
            rest.insert(name.as_str(), value);
        }
    }
    if let Some(key) = &message.key {
        if !key.is_empty() && sqs_text(key) {
            attributes.insert(KEY.to_string(), key.to_string());
        } else {
            rest.insert(KEY, key.as_str());
        }
    }
    if message.header(attr::ID) != Some(message.id.as_str()) && !message.id.is_empty() {
        if sqs_text(&message.id) {
            attributes.insert(ID.to_string(), message.id.to_string());
        } else {
            rest.insert(ID, message.id.as_str());
        }
    }
    let body = match std::str::from_utf8(&message.payload) {
        Ok(text) if !text.is_empty() && sqs_text(text) => text.to_string(),
        // SQS bodies must be non-empty text.
        _ => {
            attributes.insert(ENCODING.to_string(), "base64".to_string());
            base64(&message.payload)
        }
    };
    for name in PROMOTED {
        let Some(value) = rest.get(name).filter(|v| !v.is_empty() && sqs_text(v)) else {
            continue;
        };
        // Room for it, and for the packed attribute if anything is left to pack.
        let packed_after = rest.len() > 1;
        if attributes.len() + 1 + usize::from(packed_after) <= MAX_ATTRIBUTES {
            attributes.insert(name.to_string(), (*value).to_string());
            rest.remove(name);
        }
    }
    if !rest.is_empty() {
        let json = serde_json::to_string(&rest).map_err(|e| {
            Error::new(
                ErrorKind::Encode,
                "publish",
                format!("cannot pack headers: {e}"),
            )
            .with_source(e)
        })?;
        // JSON escapes control characters but not U+FFFE/U+FFFF, which SQS refuses; inside a
        // JSON string their escapes read back as the same characters.
        let json = if json.contains(['\u{fffe}', '\u{ffff}']) {
            json.replace('\u{fffe}', "\\ufffe")
                .replace('\u{ffff}', "\\uffff")
        } else {
            json
        };
        attributes.insert(PACKED.to_string(), json);
    }
    Ok(Packed {
        body,
        attributes,
        group_id: message_group_id(message),
    })
}

/// Whether SQS accepts `text` as a body or attribute value: it allows tab, newline, carriage
/// return and the characters from U+0020 on, except the surrogates and U+FFFE/U+FFFF.
pub fn sqs_text(text: &str) -> bool {
    text.chars().all(|c| {
        matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
    })
}

/// The `MessageGroupId` of a message on a FIFO queue or topic: its key, so a key's messages
/// are delivered in order one at a time, or its id when it has no key (no order to keep).
///
/// SQS allows 1 to 128 characters from ASCII letters, digits and punctuation; anything else
/// is replaced by a stable 128-bit hash (`h-` and 32 hex digits), so the same key always
/// lands in the same group.
///
/// ```
/// use busbar_sqs::mapping::fifo_id;
/// assert_eq!(fifo_id("order-17"), "order-17");
/// assert_eq!(fifo_id("clé à molette"), fifo_id("clé à molette"));
/// assert!(fifo_id("clé à molette").starts_with("h-"));
/// ```
pub fn fifo_id(value: &str) -> String {
    let allowed = |c: char| c.is_ascii_graphic();
    if !value.is_empty() && value.len() <= 128 && value.chars().all(allowed) {
        value.to_string()
    } else {
        format!(
            "h-{:016x}{:016x}",
            fnv1a(value, 0xcbf2_9ce4_8422_2325),
            fnv1a(value, 0x6c62_272e_07bb_0142)
        )
    }
}

/// The group id of `message` on a FIFO queue or topic (see [`fifo_id`]): its key, or its id
/// when it has none.
pub fn message_group_id(message: &Message) -> String {
    fifo_id(message.key.as_deref().unwrap_or(&message.id))
}

/// A deduplication id no earlier send used: for dead-lettering and redrive, which must not
/// be swallowed by SQS's five-minute deduplication window of the original publish.
pub fn fresh_deduplication_id(message_id: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(
        "r-{:016x}-{nanos:x}-{n:x}-{:x}",
        fnv1a(message_id, 0xcbf2_9ce4_8422_2325),
        std::process::id()
    )
}

/// 64-bit FNV-1a from `basis`: stable across processes and versions, unlike std's hasher.
fn fnv1a(value: &str, basis: u64) -> u64 {
    value.bytes().fold(basis, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The message attributes of a received SQS message as text: `String` and `Number` values as
/// they are, `Binary` ones (a foreign producer's) as UTF-8 text, or lossily when they are not
/// UTF-8, named then in [`busbar_core::message::INVALID_UTF8_HEADERS`].
pub fn received_attributes(received: &aws_sdk_sqs::types::Message) -> Headers {
    let attributes = received.message_attributes();
    let mut headers = ReceivedHeaders::with_capacity(attributes.map_or(0, |a| a.len() + 1));
    for (name, value) in attributes.into_iter().flatten() {
        if let Some(text) = value.string_value() {
            headers.text(name.as_str(), text.to_string());
        } else if let Some(bytes) = value.binary_value() {
            headers.bytes(name, bytes.as_ref());
        }
    }
    headers.finish()
}

/// Unpacks a received message of `topic`; `fallback_id` (the SQS message id) names a message
/// that carries no id of its own. The attributes move into the message's headers.
pub fn unpack<K: AsRef<str> + Into<HeaderName>, V: AsRef<str> + Into<Text>>(
    topic: &str,
    body: &str,
    attributes: impl IntoIterator<Item = (K, V)>,
    fallback_id: &str,
) -> Message {
    let mut headers = Headers::new();
    let mut key = None;
    let mut id = None;
    let mut base64_body = false;
    for (name, value) in attributes {
        match name.as_ref() {
            PACKED => match serde_json::from_str::<BTreeMap<String, String>>(value.as_ref()) {
                Ok(mut packed) => {
                    // A key or id SQS could not carry as an attribute travels in here.
                    if let Some(packed_key) = packed.remove(KEY) {
                        key = Some(Text::from(packed_key));
                    }
                    if let Some(packed_id) = packed.remove(ID) {
                        id = Some(Text::from(packed_id));
                    }
                    headers.extend(packed.into_iter().map(|(k, v)| (HeaderName::from(k), v)));
                }
                // A foreign producer's attribute of that name: keep it as it is.
                Err(_) => {
                    headers.insert(name.into(), value);
                }
            },
            KEY => key = Some(value.into()),
            ID => id = Some(value.into()),
            ENCODING => base64_body = value.as_ref() == "base64",
            _ => {
                headers.insert(name.into(), value);
            }
        }
    }
    let payload = if base64_body {
        unbase64(body).unwrap_or_else(|| body.as_bytes().to_vec())
    } else {
        body.as_bytes().to_vec()
    };
    // An empty id is no id: the SQS message id is.
    let id = headers
        .get(attr::ID)
        .filter(|id| !id.is_empty())
        .map(Text::new)
        .or(id.filter(|id| !id.is_empty()))
        .unwrap_or_else(|| Text::new(fallback_id));
    Message {
        id,
        topic: Text::new(topic),
        key,
        headers,
        payload: bytes::Bytes::from(payload),
    }
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4 + 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    if out.is_empty() {
        out.push('=');
    }
    out
}

fn unbase64(text: &str) -> Option<Vec<u8>> {
    if text == "=" {
        return Some(Vec::new());
    }
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.bytes().filter(|c| *c != b'=') {
        let v = ALPHABET.iter().position(|a| *a == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits & 0xff) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use busbar_core::codec::Json;
    use busbar_core::{Envelope, Event};

    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Ping {
        n: u32,
    }
    impl Event for Ping {
        const TYPE: &'static str = "test.ping.v1";
    }

    #[test]
    fn correlation_causation_and_trace_context_get_attributes_of_their_own_when_there_is_room() {
        let envelope = Envelope::new("/svc", Ping { n: 1 })
            .with_key("k-1")
            .with_correlation_id("conv-1")
            .with_causation_id("cause-1")
            .with_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        let message = envelope.to_message(&Json, "t").unwrap();
        let packed = pack(&message).unwrap();
        for name in ["ce_correlationid", "ce_causationid", "ce_traceparent", KEY] {
            assert!(
                packed.attributes.contains_key(name),
                "{name}: {:?}",
                packed.attributes.keys()
            );
        }
        assert!(!packed.attributes.contains_key(PACKED));
        assert!(packed.attributes.len() <= MAX_ATTRIBUTES);
        assert_eq!(
            unpack("t", &packed.body, packed.attributes, "sqs-id"),
            message
        );

        // With free-form headers and a binary body, the packed object takes what finds no room.
        let mut crowded = envelope
            .with_header("tenant", "acme")
            .to_message(&Json, "t")
            .unwrap();
        crowded.payload = vec![0xff, 0x00].into();
        let packed = pack(&crowded).unwrap();
        assert_eq!(
            packed.attributes.len(),
            MAX_ATTRIBUTES,
            "{:?}",
            packed.attributes.keys()
        );
        assert!(packed.attributes.contains_key("ce_correlationid"));
        assert!(packed.attributes.contains_key(PACKED));
        assert_eq!(
            unpack("t", &packed.body, packed.attributes, "sqs-id"),
            crowded
        );
    }

    #[test]
    fn a_plain_sqs_producers_correlation_attribute_is_read() {
        let attributes = BTreeMap::from([
            ("ce_specversion".to_string(), "1.0".to_string()),
            ("ce_id".to_string(), "e-1".to_string()),
            ("ce_type".to_string(), Ping::TYPE.to_string()),
            ("ce_source".to_string(), "/plain".to_string()),
            ("ce_correlationid".to_string(), "conv-9".to_string()),
        ]);
        let message = unpack("t", r#"{"n":3}"#, attributes, "sqs-id");
        let envelope = Envelope::<Ping>::from_message(&Json, &message).unwrap();
        assert_eq!(envelope.correlation_id.as_deref(), Some("conv-9"));
        assert_eq!(envelope.payload, Ping { n: 3 });
    }

    #[test]
    fn twenty_headers_fit_in_at_most_ten_attributes_and_round_trip() {
        let mut envelope = Envelope::new("/svc", Ping { n: 1 })
            .with_key("k-1")
            .with_causation_id("c");
        for i in 0..20 {
            envelope = envelope.with_header(format!("h{i}-ü"), format!("v{i} \"q\" \t"));
        }
        let message = envelope.to_message(&Json, "t").unwrap();
        let packed = pack(&message).unwrap();
        assert!(
            packed.attributes.len() <= MAX_ATTRIBUTES,
            "{:?}",
            packed.attributes.keys()
        );
        let back = unpack("t", &packed.body, packed.attributes.clone(), "sqs-id");
        assert_eq!(back, message);
        assert_eq!(
            Envelope::<Ping>::from_message(&Json, &back).unwrap(),
            envelope
        );
    }

    #[test]
    fn fifo_ids_are_valid_stable_and_distinct() {
        let valid = |id: &str| {
            !id.is_empty() && id.len() <= 128 && id.chars().all(|c| c.is_ascii_graphic())
        };
        let long = "k".repeat(200);
        for key in ["k-1", "with space", "ünïcode", "", long.as_str()] {
            let id = fifo_id(key);
            assert!(valid(&id), "{key:?} -> {id:?}");
            assert_eq!(fifo_id(key), id, "stable");
        }
        assert_ne!(fifo_id("a b"), fifo_id("a  b"));
        let (a, b) = (fresh_deduplication_id("m"), fresh_deduplication_id("m"));
        assert!(valid(&a) && valid(&b));
        assert_ne!(a, b, "every dead-letter or redrive send is new to SQS");
        let mut message = Message::new("m-1", "t", b"x".to_vec());
        message.key = Some("order-7".into());
        assert_eq!(pack(&message).unwrap().group_id, "order-7");
        let keyless = Message::new("m-2", "t", b"x".to_vec());
        assert_eq!(pack(&keyless).unwrap().group_id, "m-2");
    }

    #[test]
    fn binary_and_empty_payloads_and_foreign_ids_survive() {
        for payload in [
            vec![0xff, 0x00, 0x10, 0x80],
            Vec::new(),
            b"ab".to_vec(),
            b"abc".to_vec(),
        ] {
            let message = Message::new("m-1", "t", payload.clone());
            let packed = pack(&message).unwrap();
            let back = unpack("t", &packed.body, packed.attributes.clone(), "sqs-id");
            assert_eq!(back.payload.to_vec(), payload);
            assert_eq!(back.id, "m-1");
        }
        let foreign = unpack("t", "hello", Headers::new(), "sqs-id");
        assert_eq!(foreign.id, "sqs-id");
    }
}
