//! The untyped [`Message`] that crosses a transport, and name validation shared by every broker.

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::error::{Error, ErrorKind, Result};

/// Header names and string values of a [`Message`], sorted by name.
pub type Headers = BTreeMap<String, String>;

/// The untyped form of an event that crosses a transport.
///
/// Envelope attributes travel in `headers` under the CloudEvents Kafka-binding names
/// (`ce_id`, `ce_type`, …, and `content-type`, see [`crate::envelope::attr`]); an adapter only
/// translates those names to its broker's binding. `payload` is the encoded event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The message id (the envelope's `id`).
    pub id: String,
    /// The topic the message is published to.
    pub topic: String,
    /// The ordering/partition key, if any.
    pub key: Option<String>,
    /// CloudEvents attributes and free-form headers.
    pub headers: Headers,
    /// The encoded event.
    pub payload: Bytes,
}

impl Message {
    /// A message with no key and no headers.
    ///
    /// ```
    /// let msg = busbar_core::Message::new("id-1", "orders", "{}");
    /// assert_eq!(msg.payload.as_ref(), b"{}");
    /// ```
    pub fn new(id: impl Into<String>, topic: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Message {
            id: id.into(),
            topic: topic.into(),
            key: None,
            headers: Headers::new(),
            payload: payload.into(),
        }
    }

    /// The value of header `name`, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// Checks the message against a transport's size limit (and its topic name), with an error
    /// that names the message, its size and the limit. Adapters call it before sending.
    ///
    /// ```
    /// let msg = busbar_core::Message::new("m-1", "orders", vec![0u8; 100]);
    /// assert!(msg.check_publishable(100, "test").is_ok());
    /// let err = msg.check_publishable(99, "test").unwrap_err();
    /// assert_eq!(err.kind(), busbar_core::ErrorKind::PayloadTooLarge);
    /// assert!(err.to_string().contains("message m-1"));
    /// ```
    pub fn check_publishable(&self, max_bytes: usize, transport: &str) -> Result<()> {
        validate_name("topic", &self.topic)?;
        if self.headers.len() > MAX_HEADERS {
            return Err(Error::new(
                ErrorKind::InvalidHeader,
                "publish",
                format!(
                    "message has {} headers; busbar carries at most {MAX_HEADERS}",
                    self.headers.len()
                ),
            )
            .with_resource(format!("message {} on topic {}", self.id, self.topic)));
        }
        let size = self.wire_size();
        if size > max_bytes {
            return Err(Error::new(
                ErrorKind::PayloadTooLarge,
                "publish",
                format!("message is {size} bytes; the {transport} transport accepts at most {max_bytes}"),
            )
            .with_resource(format!("message {} on topic {}", self.id, self.topic)));
        }
        Ok(())
    }

    /// Approximate size on the wire: payload plus header names and values plus key.
    pub fn wire_size(&self) -> usize {
        self.payload.len()
            + self.key.as_ref().map_or(0, String::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

/// The most headers (CloudEvents attributes included) one message may carry. Publishing more is
/// an error; a received message with more is dead-lettered as undecodable, so a hostile
/// producer's huge header map cannot reach a handler.
pub const MAX_HEADERS: usize = 1_000;

/// Set by an adapter on a received message whose broker headers were not all valid UTF-8: the
/// names of those headers, comma-separated. Their values were decoded lossily (each invalid
/// sequence became U+FFFD). When one of them is a CloudEvents attribute the message cannot be
/// trusted and is dead-lettered as undecodable; free-form headers only are handled, with this
/// header telling the handler which values were altered.
pub const INVALID_UTF8_HEADERS: &str = "busbar.invalid-utf8";

/// Adds a header received as bytes (see [`INVALID_UTF8_HEADERS`]): as text when it is UTF-8,
/// otherwise lossily, with its name recorded in [`INVALID_UTF8_HEADERS`].
///
/// ```
/// use busbar_core::message::{insert_received_header, Headers, INVALID_UTF8_HEADERS};
/// let mut headers = Headers::new();
/// insert_received_header(&mut headers, "ce_source", b"/shop");
/// insert_received_header(&mut headers, "note", b"caf\xe9");
/// assert_eq!(headers["ce_source"], "/shop");
/// assert_eq!(headers["note"], "caf\u{fffd}");
/// assert_eq!(headers[INVALID_UTF8_HEADERS], "note");
/// ```
pub fn insert_received_header(headers: &mut Headers, name: &str, value: &[u8]) {
    match std::str::from_utf8(value) {
        Ok(text) => {
            headers.insert(name.to_string(), text.to_string());
        }
        Err(_) => {
            headers.insert(
                name.to_string(),
                String::from_utf8_lossy(value).into_owned(),
            );
            note_invalid_utf8(headers, name);
        }
    }
}

/// Records in [`INVALID_UTF8_HEADERS`] that header `name` of a received message was not valid
/// UTF-8.
fn note_invalid_utf8(headers: &mut Headers, name: &str) {
    let list = headers.entry(INVALID_UTF8_HEADERS.to_string()).or_default();
    if !list.split(',').any(|n| n == name) {
        if !list.is_empty() {
            list.push(',');
        }
        list.push_str(name);
    }
}

/// The longest topic or group name busbar accepts; it fits every supported broker.
pub const MAX_NAME_LEN: usize = 200;

/// Checks a topic or group name: 1 to [`MAX_NAME_LEN`] ASCII letters, digits, `.`, `_`, `-`.
///
/// That alphabet is the intersection of what Kafka topics, AMQP routing keys and queue names,
/// and SQS queue names (with `.` mapped by the adapter) accept, so a name valid on one broker is
/// valid on all of them.
///
/// ```
/// use busbar_core::message::validate_name;
/// assert!(validate_name("topic", "orders.v1").is_ok());
/// assert!(validate_name("topic", "orders/v1").is_err());
/// ```
pub fn validate_name(what: &'static str, name: &str) -> Result<()> {
    let problem = if name.is_empty() {
        Some("is empty".to_string())
    } else if name.len() > MAX_NAME_LEN {
        Some(format!(
            "is {} bytes long; the limit is {MAX_NAME_LEN}",
            name.len()
        ))
    } else {
        name.chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
            .map(|c| format!("contains {c:?}; use ASCII letters, digits, '.', '_' or '-'"))
    };
    match problem {
        None => Ok(()),
        Some(problem) => Err(Error::new(
            ErrorKind::Config,
            "validate name",
            format!("{what} name {problem}"),
        )
        .with_resource(format!("{what} {name:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_outside_the_portable_alphabet_are_rejected_with_the_reason() {
        assert!(validate_name("group", "billing-v2_eu.1").is_ok());
        let err = validate_name("group", "").unwrap_err();
        assert!(err.to_string().contains("group name is empty"), "{err}");
        let err = validate_name("topic", "a b").unwrap_err();
        assert!(err.to_string().contains("contains ' '"), "{err}");
        let long = "x".repeat(MAX_NAME_LEN + 1);
        let err = validate_name("topic", &long).unwrap_err();
        assert!(err.to_string().contains("limit is 200"), "{err}");
    }

    #[test]
    fn wire_size_counts_payload_key_and_headers() {
        let mut msg = Message::new("1", "t", vec![0u8; 10]);
        msg.key = Some("kk".into());
        msg.headers.insert("ab".into(), "cde".into());
        assert_eq!(msg.wire_size(), 10 + 2 + 5);
    }
}
