//! Payload codecs: how an event value becomes bytes and back.
//!
//! busbar ships JSON ([`Json`]). Decode errors name the event type and the path of the field
//! that failed (`items[0].sku: missing field`), so a dead letter explains itself.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, ErrorKind, Result};

/// Encodes event values to bytes and decodes them back.
pub trait Codec: Send + Sync + 'static {
    /// The MIME type written to the envelope's `datacontenttype`.
    fn content_type(&self) -> &'static str;

    /// Whether this codec can read payloads of `content_type`.
    fn accepts(&self, content_type: &str) -> bool;

    /// Encodes `value`, an event of type `event_type`.
    fn encode<T: Serialize>(&self, event_type: &str, value: &T) -> Result<Bytes>;

    /// Decodes `bytes` as an event of type `event_type`.
    fn decode<T: DeserializeOwned>(&self, event_type: &str, bytes: &[u8]) -> Result<T>;
}

thread_local! {
    /// Where [`Json::encode`] writes before copying the payload out.
    static ENCODE_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The largest encode buffer a thread keeps between payloads; a larger one (after an unusually
/// big event) is freed.
const MAX_KEPT_BUFFER: usize = 1024 * 1024;

/// The JSON codec (`application/json`).
///
/// Encodes with the event's `Serialize` and decodes with serde_json: the bytes written are
/// exactly serde_json's compact output (`RawValue` and arbitrary-precision numbers included),
/// through a writer of busbar's that scans strings for escapes eight bytes at a time.
///
/// ```
/// use busbar_core::codec::{Codec, Json};
///
/// let bytes = Json.encode("demo.v1", &vec![1, 2, 3]).unwrap();
/// let back: Vec<u32> = Json.decode("demo.v1", &bytes).unwrap();
/// assert_eq!(back, [1, 2, 3]);
///
/// let err = Json.decode::<Vec<u32>>("demo.v1", b"[1, \"x\"]").unwrap_err();
/// assert!(err.to_string().contains("demo.v1"));
/// assert!(err.to_string().contains("[1]"));
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct Json;

impl Codec for Json {
    fn content_type(&self) -> &'static str {
        "application/json"
    }

    fn accepts(&self, content_type: &str) -> bool {
        // What busbar writes, first: the split and trims below cost about 100 instructions.
        if content_type == "application/json" {
            return true;
        }
        // `application/json; charset=utf-8`, `application/cloudevents+json`, `text/json`, in
        // any case, compared in place: this runs for every message received.
        let essence = content_type.split(';').next().unwrap_or_default().trim();
        let ends_with = |suffix: &str| {
            essence.len() >= suffix.len()
                && essence.as_bytes()[essence.len() - suffix.len()..]
                    .eq_ignore_ascii_case(suffix.as_bytes())
        };
        essence.eq_ignore_ascii_case("application/json")
            || essence.eq_ignore_ascii_case("text/json")
            || ends_with("+json")
    }

    fn encode<T: Serialize>(&self, event_type: &str, value: &T) -> Result<Bytes> {
        // Written into this thread's buffer, then copied once into a payload of exactly its
        // size: one allocation, where growing a fresh vector reallocates about log2(size / 128)
        // times, copying each time. A nested encode (a `Serialize` impl that publishes)
        // finds the buffer taken and uses a vector of its own.
        ENCODE_BUFFER
            .with(|buffer| match buffer.try_borrow_mut() {
                Ok(mut buffer) => {
                    buffer.clear();
                    let written = crate::json::write(&mut buffer, value);
                    let payload = written.map(|()| Bytes::copy_from_slice(&buffer));
                    if buffer.capacity() > MAX_KEPT_BUFFER {
                        *buffer = Vec::new();
                    }
                    payload
                }
                Err(_) => {
                    let mut payload = Vec::new();
                    crate::json::write(&mut payload, value).map(|()| Bytes::from(payload))
                }
            })
            .map_err(|e| {
                Error::new(
                    ErrorKind::Encode,
                    "encode",
                    "cannot encode the payload as JSON",
                )
                .with_resource(format!("event type {event_type}"))
                .with_source(e)
            })
    }

    fn decode<T: DeserializeOwned>(&self, event_type: &str, bytes: &[u8]) -> Result<T> {
        // Tracking the path costs about as much as the parse itself, and only an error needs
        // it: a payload that fails is parsed a second time, to say where.
        if let Ok(value) = serde_json::from_slice(bytes) {
            return Ok(value);
        }
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let at = if path == "." {
                String::new()
            } else {
                format!(" at `{path}`")
            };
            Error::new(
                ErrorKind::Decode,
                "decode",
                format!("payload is not a valid {event_type}{at}: {inner}"),
            )
            .with_resource(format!("event type {event_type}"))
            .with_source(inner)
        })?;
        de.end().map_err(|e| {
            Error::new(
                ErrorKind::Decode,
                "decode",
                format!("payload has trailing data after the {event_type} value: {e}"),
            )
            .with_resource(format!("event type {event_type}"))
            .with_source(e)
        })?;
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Order {
        id: u64,
        items: Vec<Item>,
    }
    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Item {
        sku: String,
    }

    #[test]
    fn decode_error_names_type_and_field_path() {
        let err = Json
            .decode::<Order>(
                "orders.order_created.v1",
                br#"{"id":1,"items":[{"qty":2}]}"#,
            )
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Decode);
        let text = err.to_string();
        assert!(text.contains("orders.order_created.v1"), "{text}");
        assert!(text.contains("items[0]"), "{text}");
        assert!(text.contains("missing field `sku`"), "{text}");
    }

    /// A value whose serialization encodes another value, as a `Serialize` impl that embeds
    /// an encoded event would.
    struct Nested(u32);

    impl Serialize for Nested {
        fn serialize<S: serde::Serializer>(
            &self,
            serializer: S,
        ) -> std::result::Result<S::Ok, S::Error> {
            let inner = Json
                .encode("inner.v1", &vec![self.0; 3])
                .map_err(serde::ser::Error::custom)?;
            serializer
                .serialize_str(std::str::from_utf8(&inner).map_err(serde::ser::Error::custom)?)
        }
    }

    #[test]
    fn encoding_matches_serde_json_also_nested_and_after_a_large_payload() {
        let big = "x".repeat(2 * MAX_KEPT_BUFFER);
        let encoded = Json.encode("big.v1", &big).unwrap();
        assert_eq!(
            encoded.as_ref(),
            serde_json::to_vec(&big).unwrap().as_slice()
        );
        ENCODE_BUFFER.with(|b| assert!(b.borrow().capacity() <= MAX_KEPT_BUFFER, "not kept"));
        let small = Json.encode("small.v1", &[1, 2]).unwrap();
        assert_eq!(
            small.as_ref(),
            b"[1,2]",
            "nothing of the big payload is left"
        );
        let nested = Json
            .encode("outer.v1", &vec![Nested(7), Nested(8)])
            .unwrap();
        assert_eq!(nested.as_ref(), br#"["[7,7,7]","[8,8,8]"]"#);
    }

    #[test]
    fn non_json_and_trailing_garbage_are_decode_errors() {
        assert!(Json.decode::<Vec<u8>>("t", b"not json").is_err());
        assert!(Json.decode::<Vec<u8>>("t", b"[1] [2]").is_err());
        assert!(Json.decode::<Vec<u8>>("t", b"").is_err());
    }

    #[test]
    fn accepts_json_content_types_only() {
        assert!(Json.accepts("application/json"));
        assert!(Json.accepts("Application/JSON; charset=utf-8"));
        assert!(Json.accepts("application/cloudevents+json"));
        assert!(Json.accepts(" APPLICATION/CLOUDEVENTS+JSON ;v=1"));
        assert!(Json.accepts("TEXT/JSON"));
        assert!(!Json.accepts("json"));
        assert!(!Json.accepts("+jso"));
        assert!(!Json.accepts("application/jsonx"));
        assert!(!Json.accepts("application/avro"));
        assert!(!Json.accepts("text/plain"));
    }
}
