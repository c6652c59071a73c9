//! Events in and out: envelopes built from the command line and standard input, and received
//! messages printed as one human-readable line or as CloudEvents JSON.

use std::io::Write;

use base64::Engine;
use busbar::codec::{Codec, Json};
use busbar::routing::Payload;
use busbar::{Bus, Envelope, EventSet, HeaderName, Headers, Message, Text};
use serde_json::{json, Map, Value};
use tokio::io::AsyncBufReadExt;

use crate::{Failure, Outcome, DATA_ERROR};

/// Lines of standard input published in one batch.
const BATCH: usize = 100;

/// `busbar publish`.
#[derive(clap::Args)]
pub struct PublishArgs {
    /// The topic.
    topic: String,
    /// The CloudEvents type, e.g. `shop.order_placed.v1`.
    #[arg(long = "type", value_name = "TYPE")]
    event_type: String,
    /// The ordering key (events with one key are delivered in order).
    #[arg(long)]
    key: Option<String>,
    /// A free-form header, `name=value`; repeat for more.
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// The correlation id (default: each event starts its own conversation).
    #[arg(long)]
    correlation_id: Option<String>,
    /// The event's data as JSON; `-` or nothing reads one JSON value per line of standard input.
    #[arg(long, value_name = "JSON")]
    data: Option<String>,
}

fn parse_header(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_string(), value.to_string())),
        _ => Err(format!("expected NAME=VALUE, got {text:?}")),
    }
}

impl PublishArgs {
    fn envelope(&self, data: Value) -> Envelope<Value> {
        let id = Text::from_display(&uuid::Uuid::now_v7());
        let mut headers = Headers::new();
        for (name, value) in &self.headers {
            headers.insert(HeaderName::new(name), value.clone());
        }
        Envelope {
            correlation_id: Some(
                self.correlation_id
                    .as_deref()
                    .map_or_else(|| id.clone(), Text::new),
            ),
            id,
            event_type: Text::new(&self.event_type),
            source: Text::from_static("/busbar-cli"),
            time: Some(chrono::Utc::now()),
            causation_id: None,
            content_type: Text::from_static(Json.content_type()),
            traceparent: None,
            tracestate: None,
            headers,
            key: self.key.as_deref().map(Text::new),
            payload: data,
        }
    }

    fn message(&self, data: Value) -> Result<Message, Failure> {
        Ok(self.envelope(data).into_message(&Json, &self.topic)?)
    }
}

/// Publishes `--data`, or each line of standard input, printing the ids.
pub async fn publish(bus: &Bus, args: PublishArgs) -> Outcome {
    if let Some(data) = args.data.as_deref().filter(|d| *d != "-") {
        let value: Value = serde_json::from_str(data)
            .map_err(|e| Failure::new(DATA_ERROR, format!("--data is not JSON: {e}")))?;
        let message = args.message(value)?;
        let id = message.id.clone();
        bus.publish_messages(vec![message]).await?;
        println!("{id}");
        return Ok(());
    }
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut batch = Vec::new();
    let mut number = 0usize;
    let mut published = 0usize;
    loop {
        let line = lines
            .next_line()
            .await
            .map_err(|e| Failure::new(1, format!("cannot read standard input: {e}")))?;
        let Some(line) = line else { break };
        number += 1;
        if line.trim().is_empty() {
            continue;
        }
        let value = match serde_json::from_str::<Value>(&line) {
            Ok(value) => value,
            Err(e) => {
                flush(bus, &mut batch).await?;
                return Err(Failure::new(
                    DATA_ERROR,
                    format!(
                        "line {number} is not JSON ({e}); the {published} events before it were \
                         published (their ids are printed), none after it"
                    ),
                ));
            }
        };
        batch.push(args.message(value)?);
        published += 1;
        if batch.len() == BATCH {
            flush(bus, &mut batch).await?;
        }
    }
    flush(bus, &mut batch).await
}

async fn flush(bus: &Bus, batch: &mut Vec<Message>) -> Outcome {
    if batch.is_empty() {
        return Ok(());
    }
    let ids: Vec<Text> = batch.iter().map(|m| m.id.clone()).collect();
    bus.publish_messages(std::mem::take(batch)).await?;
    let mut out = std::io::stdout().lock();
    for id in ids {
        writeln!(out, "{id}")?;
    }
    Ok(())
}

/// The message `busbar check` sends round.
pub fn check_message() -> Result<Message, Failure> {
    let args = PublishArgs {
        topic: crate::CHECK_TOPIC.to_string(),
        event_type: "busbar.check.v1".to_string(),
        key: None,
        headers: Vec::new(),
        correlation_id: None,
        data: None,
    };
    args.message(json!({ "check": true }))
}

/// Any event, its data as received.
struct Raw(Vec<u8>);

impl EventSet for Raw {
    fn event_types() -> Vec<&'static str> {
        Vec::new()
    }

    fn decode<C: Codec>(payload: Payload<'_, C>) -> Option<busbar::Result<Self>> {
        Some(Ok(Raw(payload.bytes().to_vec())))
    }
}

/// A codec that reads every content type: the tool shows data, it does not interpret it.
struct AnyContent;

impl Codec for AnyContent {
    fn content_type(&self) -> &'static str {
        Json.content_type()
    }

    fn accepts(&self, _content_type: &str) -> bool {
        true
    }

    fn encode<T: serde::Serialize>(
        &self,
        event_type: &str,
        value: &T,
    ) -> busbar::Result<bytes::Bytes> {
        Json.encode(event_type, value)
    }

    fn decode<T: serde::de::DeserializeOwned>(
        &self,
        event_type: &str,
        bytes: &[u8],
    ) -> busbar::Result<T> {
        Json.decode(event_type, bytes)
    }
}

/// A received message as the tool shows it.
pub struct Shown {
    json: Value,
    /// The event's time to the millisecond, for the one-line form.
    time: Option<String>,
}

fn headers_json(headers: &Headers) -> Value {
    Value::Object(
        headers
            .iter()
            .map(|(name, value)| (name.to_string(), json!(value)))
            .collect(),
    )
}

/// The data of a message: JSON when it is JSON, text when it is UTF-8, base64 otherwise
/// (then under `data_base64`, as the CloudEvents JSON format does).
fn data_fields(content_type: Option<&str>, bytes: &[u8], into: &mut Map<String, Value>) {
    let is_json = content_type.is_none_or(|t| {
        let media = t
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        media == "application/json" || media.ends_with("+json") || media == "text/json"
    });
    if is_json {
        if let Ok(value) = serde_json::from_slice::<Value>(bytes) {
            into.insert("data".into(), value);
            return;
        }
    }
    match std::str::from_utf8(bytes) {
        Ok(text) => into.insert("data".into(), Value::String(text.to_string())),
        Err(_) => into.insert(
            "data_base64".into(),
            Value::String(base64::engine::general_purpose::STANDARD.encode(bytes)),
        ),
    };
}

impl Shown {
    /// Reads `message`: a CloudEvent (binary or structured mode) with its attributes, or,
    /// when it is not one, its id, headers and data with the reason.
    pub fn new(message: &Message) -> Shown {
        let mut fields = Map::new();
        let mut short_time = None;
        match Envelope::<Raw>::from_message(&AnyContent, message) {
            Ok(envelope) => {
                short_time = envelope
                    .time
                    .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
                fields.insert("specversion".into(), json!("1.0"));
                fields.insert("id".into(), json!(envelope.id));
                fields.insert("type".into(), json!(envelope.event_type));
                fields.insert("source".into(), json!(envelope.source));
                if let Some(time) = envelope.time {
                    fields.insert(
                        "time".into(),
                        json!(time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
                    );
                }
                fields.insert("datacontenttype".into(), json!(envelope.content_type));
                for (name, value) in [
                    ("correlationid", &envelope.correlation_id),
                    ("causationid", &envelope.causation_id),
                    ("traceparent", &envelope.traceparent),
                    ("partitionkey", &envelope.key),
                ] {
                    if let Some(value) = value {
                        fields.insert(name.into(), json!(value));
                    }
                }
                if !envelope.headers.is_empty() {
                    fields.insert("headers".into(), headers_json(&envelope.headers));
                }
                data_fields(
                    Some(&envelope.content_type),
                    &envelope.payload.0,
                    &mut fields,
                );
            }
            Err(e) => {
                fields.insert("id".into(), json!(message.id));
                fields.insert("not_a_cloudevent".into(), json!(e.message()));
                if let Some(key) = &message.key {
                    fields.insert("partitionkey".into(), json!(key));
                }
                fields.insert("headers".into(), headers_json(&message.headers));
                data_fields(
                    message.header("content-type"),
                    &message.payload,
                    &mut fields,
                );
            }
        }
        Shown {
            json: Value::Object(fields),
            time: short_time,
        }
    }

    /// The CloudEvents JSON format of the event (free-form headers under `headers`).
    pub fn json(&self) -> &Value {
        &self.json
    }

    /// One line: time, type, id, key, then the data.
    pub fn line(&self) -> String {
        let field = |name: &str| self.json.get(name).and_then(Value::as_str);
        let mut line = String::new();
        if let Some(time) = &self.time {
            line.push_str(time);
            line.push_str("  ");
        }
        line.push_str(field("type").unwrap_or("(not a CloudEvent)"));
        line.push_str("  id=");
        line.push_str(field("id").unwrap_or_default());
        if let Some(key) = field("partitionkey") {
            line.push_str("  key=");
            line.push_str(key);
        }
        if let Some(headers) = self.json.get("headers").and_then(Value::as_object) {
            for (name, value) in headers {
                line.push_str(&format!("  {name}={}", value.as_str().unwrap_or_default()));
            }
        }
        line.push_str("  ");
        match (self.json.get("data"), self.json.get("data_base64")) {
            (Some(Value::String(text)), _) => line.push_str(&format!("{text:?}")),
            (Some(data), _) => line.push_str(&data.to_string()),
            (None, Some(Value::String(b64))) => line.push_str(&format!("base64:{b64}")),
            _ => {}
        }
        line
    }
}
