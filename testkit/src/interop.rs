//! CloudEvents interoperability checks with the official SDK (`cloudevents-sdk`, feature
//! `cloudevents`): read what busbar wrote with the SDK, and write with the SDK what busbar
//! must read.
//!
//! The SDK's own Kafka binding pins an rdkafka that cannot be linked beside busbar's, and it
//! has no AMQP binding, so [`BindingMessage`] applies the SDK's binding traits
//! ([`BinaryDeserializer`], [`BinarySerializer`]) to raw headers, for both protocol bindings:
//!
//! - Kafka: attributes and extensions as `ce_<name>` headers, `datacontenttype` as the
//!   `content-type` header;
//! - AMQP: `cloudEvents:<name>` application properties, `datacontenttype` as the
//!   `content-type` property (kept here under the `content-type` key).
//!
//! The SDK then checks the attributes: the spec version, the required ones, the time format,
//! extension names. A look-alike wire format fails here.

use std::collections::BTreeMap;

use ::cloudevents::event::SpecVersion;
use ::cloudevents::message::{
    BinaryDeserializer, BinarySerializer, Encoding, Error, MessageAttributeValue,
    MessageDeserializer, Result, StructuredDeserializer, StructuredSerializer,
};
pub use ::cloudevents::{AttributesReader, Data, Event, EventBuilder, EventBuilderV10};

/// The header prefix of the Kafka protocol binding.
pub const KAFKA_PREFIX: &str = "ce_";
/// The application-property prefix of the AMQP protocol binding.
pub const AMQP_PREFIX: &str = "cloudEvents:";
/// Where the content type travels (a header on Kafka, a property on AMQP).
pub const CONTENT_TYPE: &str = "content-type";

/// A message in a CloudEvents protocol binding's binary mode: headers (attributes under
/// `prefix`, the content type under [`CONTENT_TYPE`]) and a body.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BindingMessage {
    /// The binding's attribute prefix: [`KAFKA_PREFIX`] or [`AMQP_PREFIX`].
    pub prefix: &'static str,
    /// Every header, as bytes.
    pub headers: BTreeMap<String, Vec<u8>>,
    /// The body.
    pub payload: Option<Vec<u8>>,
}

fn other(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Other {
        source: Box::new(e),
    }
}

impl BindingMessage {
    /// A message of the binding with `prefix`.
    pub fn new(prefix: &'static str) -> Self {
        BindingMessage {
            prefix,
            ..BindingMessage::default()
        }
    }

    /// Reads the message as a CloudEvent, with the SDK's checks.
    pub fn to_event(self) -> Result<Event> {
        MessageDeserializer::into_event(self)
    }

    /// Writes `event` in the binding's binary mode, with the SDK's serializer.
    pub fn from_event(prefix: &'static str, event: Event) -> Result<Self> {
        BinaryDeserializer::deserialize_binary(event, BindingMessage::new(prefix))
    }

    fn spec_header(&self) -> String {
        format!("{}specversion", self.prefix)
    }
}

impl BinaryDeserializer for BindingMessage {
    fn deserialize_binary<R: Sized, V: BinarySerializer<R>>(mut self, mut visitor: V) -> Result<R> {
        let spec = self
            .headers
            .remove(&self.spec_header())
            .ok_or(Error::WrongEncoding {})?;
        let spec = SpecVersion::try_from(String::from_utf8(spec).map_err(other)?.as_str())?;
        let attributes = spec.attribute_names();
        visitor = visitor.set_spec_version(spec)?;
        if let Some(content_type) = self.headers.remove(CONTENT_TYPE) {
            visitor = visitor.set_attribute(
                "datacontenttype",
                MessageAttributeValue::String(String::from_utf8(content_type).map_err(other)?),
            )?;
        }
        for (name, value) in self.headers {
            let Some(name) = name.strip_prefix(self.prefix) else {
                continue; // not a CloudEvents attribute
            };
            let value = MessageAttributeValue::String(String::from_utf8(value).map_err(other)?);
            visitor = if attributes.contains(&name) {
                visitor.set_attribute(name, value)?
            } else {
                visitor.set_extension(name, value)?
            };
        }
        match self.payload {
            Some(payload) => visitor.end_with_data(payload),
            None => visitor.end(),
        }
    }
}

impl StructuredDeserializer for BindingMessage {
    fn deserialize_structured<R: Sized, V: StructuredSerializer<R>>(self, _: V) -> Result<R> {
        Err(Error::WrongEncoding {})
    }
}

impl MessageDeserializer for BindingMessage {
    fn encoding(&self) -> Encoding {
        if self.headers.contains_key(&self.spec_header()) {
            Encoding::BINARY
        } else {
            Encoding::UNKNOWN
        }
    }
}

impl BinarySerializer<BindingMessage> for BindingMessage {
    fn set_spec_version(mut self, spec: SpecVersion) -> Result<Self> {
        let name = self.spec_header();
        self.headers.insert(name, spec.to_string().into_bytes());
        Ok(self)
    }

    fn set_attribute(mut self, name: &str, value: MessageAttributeValue) -> Result<Self> {
        let name = if name == "datacontenttype" {
            CONTENT_TYPE.to_string()
        } else {
            format!("{}{name}", self.prefix)
        };
        self.headers.insert(name, value.to_string().into_bytes());
        Ok(self)
    }

    fn set_extension(self, name: &str, value: MessageAttributeValue) -> Result<Self> {
        self.set_attribute(name, value)
    }

    fn end_with_data(mut self, bytes: Vec<u8>) -> Result<Self> {
        self.payload = Some(bytes);
        Ok(self)
    }

    fn end(self) -> Result<Self> {
        Ok(self)
    }
}

/// The event both interop directions use when the SDK writes: built with the SDK's
/// `EventBuilderV10`, a [`Probe`](crate::conformance::Probe) as JSON data, a time with
/// milliseconds, a correlation id and a partition key as extensions.
pub fn sdk_event() -> Event {
    EventBuilderV10::new()
        .id(SDK_EVENT_ID)
        .ty(<crate::conformance::Probe as busbar_core::Event>::TYPE)
        .source("https://example.com/sdk-producer")
        .time(sdk_event_time())
        .extension("correlationid", "conversation-9")
        .extension("partitionkey", "k")
        .data(
            "application/json",
            serde_json::json!({ "seq": 9, "key": "k", "note": "" }),
        )
        .build()
        .unwrap_or_else(|e| panic!("the SDK refused the fixture event: {e}"))
}

/// The id of [`sdk_event`].
pub const SDK_EVENT_ID: &str = "sdk-event-1";

fn sdk_event_time() -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis(1_795_341_600_123).unwrap_or_default()
}

/// Asserts busbar received [`sdk_event`] intact as a typed envelope.
pub fn assert_received_sdk_event(received: &busbar_core::Envelope<crate::conformance::Probe>) {
    assert_eq!(received.id, SDK_EVENT_ID);
    assert_eq!(received.source, "https://example.com/sdk-producer");
    assert_eq!(received.time, Some(sdk_event_time()));
    assert_eq!(received.correlation_id.as_deref(), Some("conversation-9"));
    assert_eq!(received.payload, crate::conformance::probe(9, "k"));
    assert_eq!(received.key.as_deref(), Some("k"));
}

/// Asserts the SDK read `event` as the CloudEvent of `envelope` (published by busbar with the
/// causation id `cause-1`): id, type, source, time, content type, extensions and data.
pub fn assert_sdk_read(event: &Event, envelope: &busbar_core::Envelope<crate::conformance::Probe>) {
    assert_eq!(event.id(), envelope.id);
    assert_eq!(event.ty(), envelope.event_type);
    assert_eq!(event.source().to_string(), envelope.source);
    assert_eq!(event.time(), envelope.time.as_ref());
    assert_eq!(event.datacontenttype(), Some("application/json"));
    let extension = |name: &str| event.extension(name).map(|v| v.to_string());
    assert_eq!(
        extension("correlationid").as_deref(),
        envelope.correlation_id.as_deref()
    );
    assert_eq!(extension("causationid").as_deref(), Some("cause-1"));
    let data: crate::conformance::Probe = match event.data() {
        Some(Data::Binary(bytes)) => serde_json::from_slice(bytes),
        Some(Data::Json(value)) => serde_json::from_value(value.clone()),
        Some(Data::String(text)) => serde_json::from_str(text),
        None => panic!("the event has no data"),
    }
    .unwrap_or_else(|e| panic!("the data is not the probe: {e}"));
    assert_eq!(data, envelope.payload);
}

/// [`sdk_event`] in structured content mode, as the SDK writes it: the whole event as JSON
/// (the JSON event format), content type `application/cloudevents+json`, no attribute headers.
pub fn structured_sdk_message(prefix: &'static str) -> BindingMessage {
    let mut message = BindingMessage::new(prefix);
    message.headers.insert(
        CONTENT_TYPE.to_string(),
        b"application/cloudevents+json; charset=utf-8".to_vec(),
    );
    message.payload = Some(
        serde_json::to_vec(&sdk_event())
            .unwrap_or_else(|e| panic!("the SDK cannot write its event as JSON: {e}")),
    );
    message
}

/// As [`busbar_consumes_the_sdk_event`], with the event in structured content mode
/// ([`structured_sdk_message`]): `write` puts it on the topic with the raw client.
pub async fn busbar_consumes_the_structured_sdk_event<F, Fut>(
    transport: std::sync::Arc<dyn busbar_core::Transport>,
    prefix: &'static str,
    write: F,
) where
    F: FnOnce(String, BindingMessage) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let received = busbar_receives(transport, structured_sdk_message(prefix), write).await;
    assert_received_sdk_event(&received);
}

/// Subscribes to a fresh topic and group with a [`Probe`](crate::conformance::Probe) handler,
/// has `write` put [`sdk_event`] on the topic in the binding's binary mode with the raw client,
/// and checks busbar handles it intact ([`assert_received_sdk_event`]).
pub async fn busbar_consumes_the_sdk_event<F, Fut>(
    transport: std::sync::Arc<dyn busbar_core::Transport>,
    prefix: &'static str,
    write: F,
) where
    F: FnOnce(String, BindingMessage) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let wire = BindingMessage::from_event(prefix, sdk_event())
        .unwrap_or_else(|e| panic!("the SDK cannot write its event: {e}"));
    let received = busbar_receives(transport, wire, write).await;
    assert_received_sdk_event(&received);
}

/// Subscribes to a fresh topic and group with a [`Probe`](crate::conformance::Probe) handler,
/// has `write` put `wire` (a form of [`sdk_event`]) on the topic with the raw client, and
/// returns the envelope busbar handled, for the caller's checks.
pub async fn busbar_receives<F, Fut>(
    transport: std::sync::Arc<dyn busbar_core::Transport>,
    wire: BindingMessage,
    write: F,
) -> busbar_core::Envelope<crate::conformance::Probe>
where
    F: FnOnce(String, BindingMessage) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    use crate::conformance::{unique, wait_for, Ledger, Probe};
    let bus = busbar_core::Bus::builder(transport).build();
    let (topic, group) = (unique("ce-in"), unique("g"));
    bus.declare(&topic, &group).await.expect("declare");
    let ledger = Ledger::default();
    let sub = bus
        .subscribe::<Probe>(&topic, &group)
        .start(ledger.handler())
        .await
        .expect("subscribe");
    write(topic, wire).await;
    wait_for("busbar handles the SDK's event", || {
        ledger.distinct().contains(SDK_EVENT_ID)
    })
    .await;
    let received = ledger
        .envelopes()
        .into_iter()
        .find(|e| e.id == SDK_EVENT_ID)
        .unwrap_or_else(|| panic!("the SDK's event was not recorded"));
    sub.shutdown(std::time::Duration::from_secs(10))
        .await
        .expect("shutdown");
    received
}
