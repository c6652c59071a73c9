//! The untyped [`Message`] that crosses a transport, and name validation shared by every broker.

use std::borrow::{Borrow, Cow};
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Deref;

use bytes::Bytes;

use crate::error::{Error, ErrorKind, Result};

/// Header names and string values of a [`Message`], sorted by name.
///
/// Look a header up by `&str`; insert with `.into()` on both sides:
///
/// ```
/// use busbar_core::Headers;
/// let mut headers = Headers::new();
/// headers.insert("tenant".into(), "acme".into());
/// assert_eq!(headers.get("tenant").map(String::as_str), Some("acme"));
/// ```
pub type Headers = BTreeMap<HeaderName, String>;

/// The name of a header.
///
/// The names busbar itself reads and writes (the CloudEvents attributes, the dead-letter
/// headers) are kept as static strings, so the eight or so headers of every message published
/// or received cost no allocation for their names; any other name is an owned string.
/// It compares, orders and hashes as its text, and derefs to `&str`.
///
/// ```
/// use busbar_core::message::HeaderName;
/// let known = HeaderName::new("ce_id");
/// let other = HeaderName::from(String::from("tenant"));
/// assert_eq!(known, "ce_id");
/// assert!(known.is_static() && !other.is_static());
/// assert!(other.starts_with("ten"));
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HeaderName(Cow<'static, str>);

/// The names [`HeaderName::new`] shares instead of copying.
const KNOWN_NAMES: [&str; 17] = [
    crate::envelope::attr::ID,
    crate::envelope::attr::TYPE,
    crate::envelope::attr::SOURCE,
    crate::envelope::attr::SPECVERSION,
    crate::envelope::attr::TIME,
    crate::envelope::attr::CONTENT_TYPE,
    crate::envelope::attr::CORRELATION_ID,
    crate::envelope::attr::CAUSATION_ID,
    crate::envelope::attr::TRACEPARENT,
    crate::envelope::attr::TRACESTATE,
    crate::dead_letter::header::REASON,
    crate::dead_letter::header::ERROR,
    crate::dead_letter::header::ATTEMPTS,
    crate::dead_letter::header::TOPIC,
    crate::dead_letter::header::GROUP,
    crate::dead_letter::header::FAILED_AT,
    INVALID_UTF8_HEADERS,
];

/// The static copy of `name` when it is one of the names busbar writes.
fn known_name(name: &str) -> Option<&'static str> {
    KNOWN_NAMES.iter().copied().find(|known| *known == name)
}

impl HeaderName {
    /// A name from a static string, without allocating.
    pub const fn from_static(name: &'static str) -> Self {
        HeaderName(Cow::Borrowed(name))
    }

    /// A name read from the wire: one busbar knows is shared, any other copied.
    pub fn new(name: &str) -> Self {
        match known_name(name) {
            Some(known) => HeaderName(Cow::Borrowed(known)),
            None => HeaderName(Cow::Owned(name.to_owned())),
        }
    }

    /// The name's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the name is a static string (no allocation of its own).
    pub fn is_static(&self) -> bool {
        matches!(self.0, Cow::Borrowed(_))
    }
}

impl Deref for HeaderName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for HeaderName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for HeaderName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl From<&str> for HeaderName {
    fn from(name: &str) -> Self {
        HeaderName::new(name)
    }
}

impl From<String> for HeaderName {
    fn from(name: String) -> Self {
        match known_name(&name) {
            Some(known) => HeaderName(Cow::Borrowed(known)),
            None => HeaderName(Cow::Owned(name)),
        }
    }
}

impl From<HeaderName> for String {
    fn from(name: HeaderName) -> Self {
        name.0.into_owned()
    }
}

impl PartialEq<str> for HeaderName {
    fn eq(&self, other: &str) -> bool {
        *self.0 == *other
    }
}

impl PartialEq<&str> for HeaderName {
    fn eq(&self, other: &&str) -> bool {
        *self.0 == **other
    }
}

impl fmt::Display for HeaderName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for HeaderName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

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
            headers.insert(HeaderName::new(name), text.to_string());
        }
        Err(_) => {
            headers.insert(
                HeaderName::new(name),
                String::from_utf8_lossy(value).into_owned(),
            );
            note_invalid_utf8(headers, name);
        }
    }
}

/// Records in [`INVALID_UTF8_HEADERS`] that header `name` of a received message was not valid
/// UTF-8.
fn note_invalid_utf8(headers: &mut Headers, name: &str) {
    let list = headers
        .entry(HeaderName::from_static(INVALID_UTF8_HEADERS))
        .or_default();
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
    fn header_names_read_from_the_wire_share_the_known_ones_and_sort_as_text() {
        let mut headers = Headers::new();
        for (name, value) in [
            ("ce_type", "t"),
            ("b-custom", "x"),
            ("ce_id", "1"),
            ("A", "up"),
        ] {
            insert_received_header(&mut headers, name, value.as_bytes());
        }
        insert_received_header(&mut headers, "content-type", b"application/json");
        let names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(names, sorted, "a map of names orders as their text");
        for known in ["ce_type", "ce_id", "content-type"] {
            let (name, _) = headers.get_key_value(known).unwrap();
            assert!(name.is_static(), "{known} was copied");
        }
        assert!(!headers.get_key_value("b-custom").unwrap().0.is_static());
        assert_eq!(headers.get("A").map(String::as_str), Some("up"));
        // An owned and a shared name of the same text are the same key.
        headers.insert(HeaderName::from(String::from("ce_id")), "2".into());
        assert_eq!(headers.len(), 5);
        assert_eq!(headers.get("ce_id").map(String::as_str), Some("2"));
    }

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
