//! CloudEvents structured content mode on input: a message whose content type is
//! `application/cloudevents+json` carries the whole event (attributes and data) as one JSON
//! object (the JSON event format). It is read into the binary form every other part of busbar
//! works on: attributes become `ce_<name>` headers, `datacontenttype` the `content-type`
//! header, `data` / `data_base64` the payload.
//!
//! Binary-mode headers a structured message may also carry are replaced by the JSON's
//! attributes; free-form headers stay. A batch (`application/cloudevents-batch+json`) and other
//! event formats are refused with an error that says so.

use base64::Engine;
use bytes::Bytes;
use serde_json::Value;

use crate::envelope::attr;
use crate::error::{Error, ErrorKind, Result};
use crate::message::{HeaderName, Headers, Message, MAX_HEADERS};
use crate::text::Text;

/// The media type of the JSON event format (structured mode).
pub const STRUCTURED_JSON: &str = "application/cloudevents+json";
/// What every CloudEvents media type starts with (structured mode, any format).
const CLOUDEVENTS_MEDIA: &str = "application/cloudevents";
/// The media type of a batch of events in the JSON event format.
pub const BATCH_JSON: &str = "application/cloudevents-batch+json";

/// The media type of a content type: before any `;` parameters, trimmed.
fn media_type(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or_default().trim()
}

/// Whether data of `content_type` is JSON (then `data` holds it as a JSON value).
fn is_json(content_type: &str) -> bool {
    let media = media_type(content_type).to_ascii_lowercase();
    media == "application/json" || media == "text/json" || media.ends_with("+json")
}

/// At most this many characters of a received value go into an error.
const SHOWN: usize = 64;

/// `value` for an error message: at most [`SHOWN`] characters, control characters escaped.
pub(crate) fn shown(value: &str) -> String {
    let mut shown: String = value
        .chars()
        .take(SHOWN)
        .flat_map(char::escape_debug)
        .collect();
    if value.chars().nth(SHOWN).is_some() {
        shown.push('…');
    }
    shown
}

fn refused(message: &Message, what: String) -> Error {
    Error::new(ErrorKind::Decode, "decode", what)
        .with_resource(format!("message {} on topic {}", message.id, message.topic))
}

/// The binary form of `message` when it is a structured-mode CloudEvent; `None` when it is
/// not one (binary mode, or no CloudEvent at all).
///
/// ```
/// use busbar_core::Message;
///
/// let mut wire = Message::new("m-1", "orders", r#"{"specversion":"1.0","id":"e-1","type":"shop.order_placed.v1","source":"/shop","data":{"order":7}}"#);
/// wire.headers.insert("content-type", "application/cloudevents+json; charset=utf-8");
/// let binary = busbar_core::structured::from_structured(&wire)?.expect("structured");
/// assert_eq!(binary.id, "e-1");
/// assert_eq!(binary.header("ce_type"), Some("shop.order_placed.v1"));
/// assert_eq!(binary.header("content-type"), Some("application/json"));
/// assert_eq!(binary.payload.as_ref(), br#"{"order":7}"#);
/// # Ok::<(), busbar_core::Error>(())
/// ```
pub fn from_structured(message: &Message) -> Result<Option<Message>> {
    let Some(content_type) = message.header(attr::CONTENT_TYPE) else {
        return Ok(None);
    };
    // The common case first, cheaply: not a CloudEvents media type at all.
    let cloudevents = content_type
        .trim_start()
        .as_bytes()
        .get(..CLOUDEVENTS_MEDIA.len())
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case(CLOUDEVENTS_MEDIA.as_bytes()));
    if !cloudevents {
        return Ok(None);
    }
    let media = media_type(content_type);
    if media.eq_ignore_ascii_case(BATCH_JSON) {
        return Err(refused(
            message,
            format!(
                "a batch of CloudEvents (content type `{}`) is not supported; publish each event as a message of its own",
                shown(content_type)
            ),
        ));
    }
    if !media.eq_ignore_ascii_case(STRUCTURED_JSON) {
        return Err(refused(
            message,
            format!(
                "structured CloudEvents in the format `{}` are not supported; busbar reads `{STRUCTURED_JSON}` (or binary mode)",
                shown(content_type)
            ),
        ));
    }
    let event: serde_json::Map<String, Value> =
        serde_json::from_slice(&message.payload).map_err(|e| {
            refused(
                message,
                format!(
                    "structured CloudEvent (content type `{}`) is not a JSON object: {e}",
                    shown(content_type)
                ),
            )
        })?;
    if event.len() > MAX_HEADERS {
        return Err(refused(
            message,
            format!(
                "structured CloudEvent has {} attributes; busbar reads at most {MAX_HEADERS}",
                event.len()
            ),
        ));
    }
    // Free-form headers stay; binary-mode attributes give way to the JSON's.
    let mut headers: Headers = message
        .headers
        .iter()
        .filter(|(name, _)| {
            !name.starts_with(attr::CE_PREFIX) && name.as_str() != attr::CONTENT_TYPE
        })
        .map(|(name, value)| (name.clone(), value))
        .collect();
    let (mut data, mut data_base64, mut data_content_type) = (None, None, None);
    for (name, value) in event {
        match name.as_str() {
            "data" => data = Some(value),
            "data_base64" => data_base64 = Some(value),
            "datacontenttype" => match value {
                Value::String(text) => data_content_type = Some(text),
                Value::Null => {}
                other => {
                    return Err(refused(
                        message,
                        format!(
                            "`datacontenttype` is not a string: got `{}`",
                            shown(&other.to_string())
                        ),
                    ))
                }
            },
            _ => {
                let text = match value {
                    Value::String(text) => text,
                    Value::Number(number) => number.to_string(),
                    Value::Bool(flag) => flag.to_string(),
                    Value::Null => continue,
                    other => {
                        return Err(refused(
                            message,
                            format!(
                                "attribute `{}` is a JSON {}; CloudEvents attributes are strings, numbers or booleans",
                                shown(&name),
                                if other.is_array() { "array" } else { "object" }
                            ),
                        ))
                    }
                };
                headers.insert(HeaderName::from(format!("{}{name}", attr::CE_PREFIX)), text);
            }
        }
    }
    let json_data = data_content_type.as_deref().is_none_or(is_json);
    let payload = match (data, data_base64) {
        (Some(_), Some(_)) => {
            return Err(refused(
                message,
                "structured CloudEvent has both `data` and `data_base64`".into(),
            ))
        }
        (None, Some(Value::String(encoded))) => base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map(Bytes::from)
            .map_err(|e| refused(message, format!("`data_base64` is not base64: {e}")))?,
        (None, Some(other)) => {
            return Err(refused(
                message,
                format!(
                    "`data_base64` is not a string: got `{}`",
                    shown(&other.to_string())
                ),
            ))
        }
        (Some(Value::String(text)), None) if !json_data => Bytes::from(text),
        (Some(value), None) => Bytes::from(serde_json::to_vec(&value).map_err(|e| {
            Error::new(ErrorKind::Decode, "decode", "cannot re-encode `data`").with_source(e)
        })?),
        (None, None) => Bytes::new(),
    };
    headers.insert(
        HeaderName::from(attr::CONTENT_TYPE),
        data_content_type.map_or(Text::from_static("application/json"), Text::from),
    );
    let id = headers
        .get(attr::ID)
        .map_or_else(|| message.id.clone(), Text::new);
    let key = message
        .key
        .clone()
        .or_else(|| headers.get(PARTITION_KEY).map(Text::new));
    Ok(Some(Message {
        id,
        topic: message.topic.clone(),
        key,
        headers,
        payload,
    }))
}

/// The canonical string form of a CloudEvents `Binary` value (base64), for an adapter that
/// receives an attribute in its protocol's native binary type.
pub fn canonical_binary(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The canonical string form of a CloudEvents `Timestamp` (RFC 3339) given in seconds since
/// the Unix epoch, for an adapter that receives an attribute in its protocol's native
/// timestamp type. `None` for a time outside what RFC 3339 can write.
///
/// ```
/// assert_eq!(
///     busbar_core::structured::canonical_time_from_unix_seconds(1_767_323_045).as_deref(),
///     Some("2026-01-02T03:04:05Z")
/// );
/// ```
pub fn canonical_time_from_unix_seconds(seconds: u64) -> Option<String> {
    let seconds = i64::try_from(seconds).ok()?;
    chrono::DateTime::from_timestamp(seconds, 0)
        .map(|time| time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
}

/// The CloudEvents `partitionkey` extension as a header.
const PARTITION_KEY: &str = "ce_partitionkey";

#[cfg(test)]
mod tests {
    use super::*;

    fn structured(json: &str, content_type: &str) -> Message {
        let mut message = Message::new("wire-id", "t", json.to_string());
        message
            .headers
            .insert(attr::CONTENT_TYPE, content_type.to_string());
        message
    }

    #[test]
    fn binary_mode_and_plain_messages_are_left_alone() {
        assert!(from_structured(&Message::new("m", "t", "{}"))
            .unwrap()
            .is_none());
        assert!(from_structured(&structured("{}", "application/json"))
            .unwrap()
            .is_none());
    }

    #[test]
    fn attributes_become_headers_and_data_the_payload() {
        let mut message = structured(
            r#"{"specversion":"1.0","id":"e-1","type":"a.b","source":"/s","time":"2026-01-02T03:04:05Z",
                "correlationid":"c-1","count":3,"flag":true,"nothing":null,"partitionkey":"k-1",
                "datacontenttype":"application/vnd.x+json","data":{"n":[1,2]}}"#,
            "Application/CloudEvents+JSON ; charset=UTF-8",
        );
        message.headers.insert("ce_id", "stale");
        message.headers.insert("x-trace", "kept");
        let binary = from_structured(&message).unwrap().unwrap();
        assert_eq!(binary.id, "e-1");
        assert_eq!(binary.header("ce_id"), Some("e-1"));
        assert_eq!(binary.header("ce_correlationid"), Some("c-1"));
        assert_eq!(binary.header("ce_count"), Some("3"));
        assert_eq!(binary.header("ce_flag"), Some("true"));
        assert_eq!(binary.header("ce_nothing"), None);
        assert_eq!(binary.header("x-trace"), Some("kept"));
        assert_eq!(
            binary.header("content-type"),
            Some("application/vnd.x+json")
        );
        assert_eq!(binary.key.as_deref(), Some("k-1"));
        assert_eq!(binary.payload.as_ref(), br#"{"n":[1,2]}"#);
    }

    #[test]
    fn data_base64_and_text_data_are_the_bytes_themselves() {
        let binary = from_structured(&structured(
            r#"{"id":"e","data_base64":"AAEC/w==","datacontenttype":"application/octet-stream"}"#,
            STRUCTURED_JSON,
        ))
        .unwrap()
        .unwrap();
        assert_eq!(binary.payload.as_ref(), &[0, 1, 2, 255]);
        let binary = from_structured(&structured(
            r#"{"id":"e","data":"plain text","datacontenttype":"text/plain"}"#,
            STRUCTURED_JSON,
        ))
        .unwrap()
        .unwrap();
        assert_eq!(binary.payload.as_ref(), b"plain text");
        assert_eq!(binary.header("content-type"), Some("text/plain"));
    }

    #[test]
    fn batches_other_formats_and_malformed_events_are_refused_saying_what_was_seen() {
        let cases = [
            (r#"[{"id":"e"}]"#, BATCH_JSON, "batch of CloudEvents"),
            (
                "AAAA",
                "application/cloudevents+avro",
                "format `application/cloudevents+avro`",
            ),
            ("not json", STRUCTURED_JSON, "is not a JSON object"),
            (
                r#"{"id":"e","data":1,"data_base64":"AA=="}"#,
                STRUCTURED_JSON,
                "both `data` and `data_base64`",
            ),
            (
                r#"{"id":"e","data_base64":"***"}"#,
                STRUCTURED_JSON,
                "`data_base64` is not base64",
            ),
            (
                r#"{"id":"e","ext":{"a":1}}"#,
                STRUCTURED_JSON,
                "attribute `ext` is a JSON object",
            ),
            (
                r#"{"id":"e","datacontenttype":7}"#,
                STRUCTURED_JSON,
                "`datacontenttype` is not a string: got `7`",
            ),
        ];
        for (body, content_type, expected) in cases {
            let err = from_structured(&structured(body, content_type)).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Decode);
            assert!(
                err.to_string().contains(expected),
                "{err} lacks {expected:?}"
            );
            assert!(err.to_string().contains("message wire-id"), "{err}");
        }
    }

    #[test]
    fn shown_values_are_shortened_and_escaped() {
        assert_eq!(shown("a\nb"), "a\\nb");
        let long = "x".repeat(100);
        assert_eq!(shown(&long).chars().count(), SHOWN + 1);
    }
}
