//! The untyped [`Message`] that crosses a transport, and name validation shared by every broker.

use std::borrow::{Borrow, Cow};
use std::fmt;
use std::ops::Deref;

use bytes::Bytes;

use crate::error::{Error, ErrorKind, Result};
use crate::text::Text;

/// Header names and string values of a [`Message`], sorted by name; later inserts of a name
/// replace earlier ones.
///
/// A message carries about ten headers, so they live in one vector kept sorted by name, not in
/// a tree: a look-up is a binary search over a few entries, and the headers of a message cost
/// one allocation for the vector (plus each value's). Building many at once (`collect`,
/// [`extend`](Extend::extend), [`ReceivedHeaders`]) sorts once, so even a hostile message with
/// thousands of headers is read in `n log n`.
///
/// ```
/// use busbar_core::Headers;
/// let mut headers = Headers::new();
/// headers.insert("tenant", "acme");
/// assert_eq!(headers.get("tenant"), Some("acme"));
/// assert_eq!(headers.insert("tenant", "globex").as_deref(), Some("acme"));
/// assert_eq!(headers.len(), 1);
///
/// let more: Headers = [("b", "2"), ("a", "1"), ("b", "3")].into_iter().collect();
/// let pairs: Vec<(&str, &str)> = more.iter().map(|(n, v)| (n.as_str(), v)).collect();
/// assert_eq!(pairs, [("a", "1"), ("b", "3")]);
/// ```
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Headers(Vec<(HeaderName, Text)>);

/// Up to how many headers a look-up scans rather than searches.
const SCANNED: usize = 16;

impl Headers {
    /// No headers.
    pub const fn new() -> Self {
        Headers(Vec::new())
    }

    /// No headers, with room for `capacity` without reallocating.
    pub fn with_capacity(capacity: usize) -> Self {
        Headers(Vec::with_capacity(capacity))
    }

    /// Room for `additional` more headers without reallocating.
    pub fn reserve(&mut self, additional: usize) {
        self.0.reserve(additional);
    }

    /// How many headers there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn find(&self, name: &str) -> std::result::Result<usize, usize> {
        self.0.binary_search_by(|(n, _)| n.as_str().cmp(name))
    }

    /// Where header `name` is. Among the ten or so headers of a usual message, a scan that
    /// compares lengths first (most differ) costs about a third of the binary search's string
    /// comparisons; a long list is searched.
    fn position(&self, name: &str) -> Option<usize> {
        if self.0.len() > SCANNED {
            return self.find(name).ok();
        }
        self.0
            .iter()
            .position(|(n, _)| n.len() == name.len() && n.as_str() == name)
    }

    /// The value of header `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.position(name).map(|i| self.0[i].1.as_str())
    }

    /// The value of header `name`, to change in place.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut Text> {
        self.position(name).map(|i| &mut self.0[i].1)
    }

    /// Whether header `name` is present.
    pub fn contains_key(&self, name: &str) -> bool {
        self.position(name).is_some()
    }

    /// Sets header `name` to `value`; returns the value it replaces.
    pub fn insert(&mut self, name: impl Into<HeaderName>, value: impl Into<Text>) -> Option<Text> {
        let name = name.into();
        match self.find(&name) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value.into())),
            Err(i) => {
                self.0.insert(i, (name, value.into()));
                None
            }
        }
    }

    /// The value of header `name`, first set to `value()` when it is absent.
    pub fn get_or_insert_with(
        &mut self,
        name: impl Into<HeaderName>,
        value: impl FnOnce() -> Text,
    ) -> &mut Text {
        let name = name.into();
        let i = match self.find(&name) {
            Ok(i) => i,
            Err(i) => {
                self.0.insert(i, (name, value()));
                i
            }
        };
        &mut self.0[i].1
    }

    /// Removes header `name`; returns its value.
    pub fn remove(&mut self, name: &str) -> Option<Text> {
        self.find(name).ok().map(|i| self.0.remove(i).1)
    }

    /// Keeps only the headers `keep` accepts.
    pub fn retain(&mut self, mut keep: impl FnMut(&HeaderName, &str) -> bool) {
        self.0.retain(|(name, value)| keep(name, value));
    }

    /// Removes every header.
    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// The headers, by name.
    pub fn iter(&self) -> Iter<'_> {
        Iter(self.0.iter())
    }

    /// The entries, by name, with their values as [`Text`] (cheap to clone).
    pub(crate) fn entries(&self) -> impl Iterator<Item = (&HeaderName, &Text)> {
        self.0.iter().map(|(name, value)| (name, value))
    }

    /// The names, in order.
    pub fn names(&self) -> impl DoubleEndedIterator<Item = &HeaderName> + ExactSizeIterator {
        self.0.iter().map(|(name, _)| name)
    }

    /// Entries already in the order of their names, each name once (checked in debug builds):
    /// no comparisons, where checking the order of an envelope's ten attributes cost about 300
    /// instructions a message.
    pub(crate) fn from_sorted(entries: Vec<(HeaderName, Text)>) -> Self {
        debug_assert!(entries.windows(2).all(|pair| pair[0].0 < pair[1].0));
        Headers(entries)
    }

    /// Sorts entries pushed in any order by name; of equal names the last pushed stays.
    pub(crate) fn from_unsorted(mut entries: Vec<(HeaderName, Text)>) -> Self {
        if !entries.windows(2).all(|pair| pair[0].0 < pair[1].0) {
            // Stable, so equal names keep their order; the later value moves into the one kept.
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            entries.dedup_by(|later, kept| {
                let same = later.0 == kept.0;
                if same {
                    std::mem::swap(&mut later.1, &mut kept.1);
                }
                same
            });
        }
        Headers(entries)
    }
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<N: Into<HeaderName>, V: Into<Text>> FromIterator<(N, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (N, V)>>(iter: I) -> Self {
        Headers::from_unsorted(
            iter.into_iter()
                .map(|(name, value)| (name.into(), value.into()))
                .collect(),
        )
    }
}

impl<N: Into<HeaderName>, V: Into<Text>> Extend<(N, V)> for Headers {
    fn extend<I: IntoIterator<Item = (N, V)>>(&mut self, iter: I) {
        let mut entries = std::mem::take(&mut self.0);
        entries.extend(
            iter.into_iter()
                .map(|(name, value)| (name.into(), value.into())),
        );
        *self = Headers::from_unsorted(entries);
    }
}

/// The headers of a [`Headers`], by name: see [`Headers::iter`].
#[derive(Clone, Debug)]
pub struct Iter<'a>(std::slice::Iter<'a, (HeaderName, Text)>);

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a HeaderName, &'a str);

    fn next(&mut self) -> Option<Self::Item> {
        self.0.next().map(|(name, value)| (name, value.as_str()))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl DoubleEndedIterator for Iter<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        self.0
            .next_back()
            .map(|(name, value)| (name, value.as_str()))
    }
}

impl ExactSizeIterator for Iter<'_> {}

impl<'a> IntoIterator for &'a Headers {
    type Item = (&'a HeaderName, &'a str);
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

/// The headers of a [`Headers`], by name, taken out of it.
#[derive(Debug)]
pub struct IntoIter(std::vec::IntoIter<(HeaderName, Text)>);

impl Iterator for IntoIter {
    type Item = (HeaderName, Text);

    fn next(&mut self) -> Option<Self::Item> {
        self.0.next()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl DoubleEndedIterator for IntoIter {
    fn next_back(&mut self) -> Option<Self::Item> {
        self.0.next_back()
    }
}

impl ExactSizeIterator for IntoIter {}

impl IntoIterator for Headers {
    type Item = (HeaderName, Text);
    type IntoIter = IntoIter;

    fn into_iter(self) -> IntoIter {
        IntoIter(self.0.into_iter())
    }
}

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

/// The static copy of `name` when it is one of the names busbar writes (the names
/// [`HeaderName::new`] shares instead of copying). A `match`, which compiles to a switch on the
/// length and a comparison or two, where a list searched in turn cost about 100 instructions
/// per header received.
fn known_name(name: &str) -> Option<&'static str> {
    use crate::dead_letter::header as dead;
    use crate::envelope::attr;
    Some(match name {
        attr::ID => attr::ID,
        attr::TYPE => attr::TYPE,
        attr::SOURCE => attr::SOURCE,
        attr::SPECVERSION => attr::SPECVERSION,
        attr::TIME => attr::TIME,
        attr::CONTENT_TYPE => attr::CONTENT_TYPE,
        attr::CORRELATION_ID => attr::CORRELATION_ID,
        attr::CAUSATION_ID => attr::CAUSATION_ID,
        attr::TRACEPARENT => attr::TRACEPARENT,
        attr::TRACESTATE => attr::TRACESTATE,
        dead::REASON => dead::REASON,
        dead::ERROR => dead::ERROR,
        dead::ATTEMPTS => dead::ATTEMPTS,
        dead::TOPIC => dead::TOPIC,
        dead::GROUP => dead::GROUP,
        dead::FAILED_AT => dead::FAILED_AT,
        INVALID_UTF8_HEADERS => INVALID_UTF8_HEADERS,
        _ => return None,
    })
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
    pub id: Text,
    /// The topic the message is published to.
    pub topic: Text,
    /// The ordering/partition key, if any.
    pub key: Option<Text>,
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
    pub fn new(id: impl Into<Text>, topic: impl Into<Text>, payload: impl Into<Bytes>) -> Self {
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
        self.headers.get(name)
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
            + self.key.as_deref().map_or(0, str::len)
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

/// A received value as text, and whether it was valid UTF-8 (else decoded lossily).
fn received_text(value: &[u8]) -> (Text, bool) {
    match std::str::from_utf8(value) {
        Ok(text) => (Text::new(text), true),
        Err(_) => (Text::from(String::from_utf8_lossy(value)), false),
    }
}

/// The headers of a received message, read from the broker's in one pass and sorted once (where
/// inserting each would cost `n²` for a hostile message with thousands). Values received as
/// bytes are read as text when they are UTF-8, otherwise lossily, and then named in
/// [`INVALID_UTF8_HEADERS`].
///
/// ```
/// use busbar_core::message::{ReceivedHeaders, INVALID_UTF8_HEADERS};
/// let mut received = ReceivedHeaders::with_capacity(3);
/// received.bytes("note", b"caf\xe9");
/// received.bytes("ce_id", b"42");
/// received.text("count", "3".to_string());
/// let headers = received.finish();
/// assert_eq!(headers.get("ce_id"), Some("42"));
/// assert_eq!(headers.get("note"), Some("caf\u{fffd}"));
/// assert_eq!(headers.get(INVALID_UTF8_HEADERS), Some("note"));
/// assert_eq!(headers.len(), 4);
/// ```
#[derive(Debug, Default)]
pub struct ReceivedHeaders {
    entries: Vec<(HeaderName, Text)>,
    invalid: Vec<HeaderName>,
}

impl ReceivedHeaders {
    /// Room for `capacity` headers.
    pub fn with_capacity(capacity: usize) -> Self {
        ReceivedHeaders {
            entries: Vec::with_capacity(capacity),
            invalid: Vec::new(),
        }
    }

    /// A header whose value is already text.
    pub fn text(&mut self, name: impl Into<HeaderName>, value: impl Into<Text>) {
        self.entries.push((name.into(), value.into()));
    }

    /// A header whose value came as bytes: as text when it is UTF-8, otherwise lossily, with
    /// its name recorded in [`INVALID_UTF8_HEADERS`].
    pub fn bytes(&mut self, name: &str, value: &[u8]) {
        let (text, valid) = received_text(value);
        let name = HeaderName::new(name);
        if !valid {
            self.invalid.push(name.clone());
        }
        self.entries.push((name, text));
    }

    /// The headers, sorted by name; of a name received twice, the later value.
    pub fn finish(mut self) -> Headers {
        if !self.invalid.is_empty() {
            let mut seen = std::collections::HashSet::new();
            let names: Vec<&str> = self
                .invalid
                .iter()
                .map(HeaderName::as_str)
                .filter(|name| seen.insert(*name))
                .collect();
            let list = names.join(",");
            self.entries
                .push((HeaderName::from_static(INVALID_UTF8_HEADERS), list.into()));
        }
        Headers::from_unsorted(self.entries)
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
        // Byte by byte (every message published is checked); a character outside ASCII
        // starts with a byte that is not allowed, so the first such byte starts the character
        // to report.
        let allowed = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
        name.bytes()
            .position(|b| !allowed(&b))
            .and_then(|at| name.get(at..)?.chars().next())
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
        let mut received = ReceivedHeaders::default();
        for (name, value) in [
            ("ce_type", "t"),
            ("b-custom", "x"),
            ("ce_id", "1"),
            ("A", "up"),
            ("content-type", "application/json"),
        ] {
            received.bytes(name, value.as_bytes());
        }
        let mut headers = received.finish();
        let names: Vec<&str> = headers.names().map(HeaderName::as_str).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(names, sorted, "a map of names orders as their text");
        let name = |text: &str| headers.names().find(|n| *n == text).unwrap().clone();
        for known in ["ce_type", "ce_id", "content-type"] {
            assert!(name(known).is_static(), "{known} was copied");
        }
        assert!(!name("b-custom").is_static());
        use crate::envelope::attr;
        let written = [
            attr::ID,
            attr::TYPE,
            attr::SOURCE,
            attr::SPECVERSION,
            attr::TIME,
            attr::CONTENT_TYPE,
            attr::CORRELATION_ID,
            attr::CAUSATION_ID,
            attr::TRACEPARENT,
            attr::TRACESTATE,
            INVALID_UTF8_HEADERS,
        ];
        for known in written.iter().chain(&crate::dead_letter::header::ALL) {
            assert!(HeaderName::new(known).is_static(), "{known} is copied");
        }
        assert_eq!(headers.get("A"), Some("up"));
        // An owned and a shared name of the same text are the same key.
        headers.insert(HeaderName::from(String::from("ce_id")), "2");
        assert_eq!(headers.len(), 5);
        assert_eq!(headers.get("ce_id"), Some("2"));
    }

    #[test]
    fn headers_built_in_any_order_sort_once_and_keep_the_last_value_of_a_name() {
        // Received in reverse order, with a repeated name and two invalid values of one name.
        let mut received = ReceivedHeaders::with_capacity(1_002);
        for i in (0..1_000).rev() {
            received.bytes(&format!("h{i:04}"), format!("v{i}").as_bytes());
        }
        received.bytes("h0500", b"later");
        received.bytes("bad", b"\xff");
        received.bytes("bad", b"\xfe");
        let headers = received.finish();
        assert_eq!(
            headers.len(),
            1_002,
            "1,000 names, `bad` and the invalid-UTF-8 list"
        );
        let names: Vec<&str> = headers.names().map(HeaderName::as_str).collect();
        assert!(
            names.windows(2).all(|pair| pair[0] < pair[1]),
            "sorted, no repeats"
        );
        assert_eq!(headers.get("h0500"), Some("later"));
        assert_eq!(headers.get("h0999"), Some("v999"));
        assert_eq!(headers.get(INVALID_UTF8_HEADERS), Some("bad"));

        let mut more: Headers = [("b", "1"), ("a", "2")].into_iter().collect();
        more.extend([("c", "3"), ("a", "4")]);
        let pairs: Vec<(&str, &str)> = more.iter().map(|(n, v)| (n.as_str(), v)).collect();
        assert_eq!(pairs, [("a", "4"), ("b", "1"), ("c", "3")]);
        assert_eq!(more.remove("b").as_deref(), Some("1"));
        assert_eq!(more.remove("b"), None);
        more.retain(|name, _| name != "c");
        assert_eq!(format!("{more:?}"), r#"{"a": "4"}"#);
    }

    #[test]
    fn names_outside_the_portable_alphabet_are_rejected_with_the_reason() {
        assert!(validate_name("group", "billing-v2_eu.1").is_ok());
        let err = validate_name("group", "").unwrap_err();
        assert!(err.to_string().contains("group name is empty"), "{err}");
        let err = validate_name("topic", "a b").unwrap_err();
        assert!(err.to_string().contains("contains ' '"), "{err}");
        // A character outside ASCII is named whole, not by its first byte.
        let err = validate_name("topic", "commandé").unwrap_err();
        assert!(err.to_string().contains("contains 'é'"), "{err}");
        let long = "x".repeat(MAX_NAME_LEN + 1);
        let err = validate_name("topic", &long).unwrap_err();
        assert!(err.to_string().contains("limit is 200"), "{err}");
    }

    #[test]
    fn wire_size_counts_payload_key_and_headers() {
        let mut msg = Message::new("1", "t", vec![0u8; 10]);
        msg.key = Some("kk".into());
        msg.headers.insert("ab", "cde");
        assert_eq!(msg.wire_size(), 10 + 2 + 5);
    }
}
