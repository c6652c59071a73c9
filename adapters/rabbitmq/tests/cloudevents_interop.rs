//! busbar's AMQP messages are the CloudEvents AMQP protocol binding (binary mode), as the
//! official SDK's binding traits read and write it: a message busbar published is read by the
//! SDK with every attribute, and an event the SDK built is consumed by busbar as a typed event.

use std::sync::Arc;
use std::time::Duration;

use busbar_core::Bus;
use busbar_rabbitmq::RabbitTransport;
use busbar_testkit::conformance::{probe, reachable, unique};
use busbar_testkit::interop::{
    assert_sdk_read, busbar_consumes_the_sdk_event, busbar_consumes_the_structured_sdk_event,
    busbar_receives, sdk_event, AttributesReader, BindingMessage, AMQP_PREFIX, CONTENT_TYPE,
};
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

const RAW: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

async fn transport() -> Option<RabbitTransport> {
    let url = std::env::var("BUSBAR_RABBITMQ_URL")
        .unwrap_or_else(|_| format!("{RAW}?queue_expires_ms=600000"));
    reachable(RabbitTransport::connect(&url.parse().unwrap()).await)
}

async fn raw_channel() -> (Connection, Channel) {
    let connection = Connection::connect(RAW, ConnectionProperties::default())
        .await
        .expect("raw connection");
    let channel = connection.create_channel().await.expect("channel");
    (connection, channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_sdk_reads_what_busbar_publishes() {
    let Some(transport) = transport().await else {
        return;
    };
    let exchange = transport.config().exchange.clone();
    let bus = Bus::new(transport);
    let topic = unique("ce-out");
    bus.declare(&topic, "g").await.unwrap(); // makes sure the exchange exists
    let (connection, channel) = raw_channel().await;
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.name().as_str().into(),
            exchange.as_str().into(),
            topic.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let envelope = bus
        .envelope(probe(42, "order-7"))
        .with_causation_id("cause-1")
        .with_header("tenant", "acme");
    bus.publish_envelope(&topic, &envelope).await.unwrap();

    let mut consumer = channel
        .basic_consume(
            queue.name().as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("the message arrives")
        .expect("consumer open")
        .unwrap();
    let mut wire = BindingMessage::new(AMQP_PREFIX);
    if let Some(headers) = delivery.properties.headers() {
        for (name, value) in headers {
            if let AMQPValue::LongString(text) = value {
                wire.headers
                    .insert(name.as_str().to_string(), text.as_bytes().to_vec());
            }
        }
    }
    if let Some(content_type) = delivery.properties.content_type() {
        wire.headers.insert(
            CONTENT_TYPE.to_string(),
            content_type.as_str().as_bytes().to_vec(),
        );
    }
    wire.payload = Some(delivery.data.clone());
    let event = wire.to_event().expect("the SDK reads busbar's message");

    assert_sdk_read(&event, &envelope);
    assert_eq!(
        event
            .extension("partitionkey")
            .map(|v| v.to_string())
            .as_deref(),
        Some("order-7")
    );
    let _ = connection.close(200, "done".into()).await;
}

/// Publishes `wire` with raw lapin: attributes as long-string application properties, the
/// content type as the AMQP property.
async fn publish_raw(exchange: String, topic: String, wire: BindingMessage) {
    let mut headers = FieldTable::default();
    let mut properties = BasicProperties::default();
    for (name, value) in &wire.headers {
        let text = String::from_utf8(value.clone()).expect("the SDK writes text");
        if name == CONTENT_TYPE {
            properties = properties.with_content_type(ShortString::from(text));
        } else {
            headers.insert(
                ShortString::from(name.as_str()),
                AMQPValue::LongString(LongString::from(text)),
            );
        }
    }
    publish_raw_table(&exchange, &topic, &wire, properties.with_headers(headers)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busbar_consumes_an_event_the_official_sdk_wrote() {
    let Some(transport) = transport().await else {
        return;
    };
    let exchange = transport.config().exchange.clone();
    busbar_consumes_the_sdk_event(Arc::new(transport), AMQP_PREFIX, |topic, wire| {
        publish_raw(exchange, topic, wire)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busbar_consumes_an_event_the_official_sdk_wrote_in_structured_mode() {
    let Some(transport) = transport().await else {
        return;
    };
    let exchange = transport.config().exchange.clone();
    busbar_consumes_the_structured_sdk_event(Arc::new(transport), AMQP_PREFIX, |topic, wire| {
        publish_raw(exchange, topic, wire)
    })
    .await;
}

/// The SDK's event as a JMS-style AMQP producer sends it: the `cloudEvents_` prefix, `time` as
/// a native AMQP timestamp, and an extension as native binary. busbar reads each as the
/// binding's canonical string.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busbar_consumes_native_amqp_types_under_the_jms_prefix() {
    let Some(transport) = transport().await else {
        return;
    };
    let exchange = transport.config().exchange.clone();
    let wire = BindingMessage::from_event(AMQP_PREFIX, sdk_event()).unwrap();
    let event_time = sdk_event().time().copied().unwrap();
    let mut headers = FieldTable::default();
    let mut properties = BasicProperties::default();
    for (name, value) in &wire.headers {
        let text = String::from_utf8(value.clone()).unwrap();
        if name == CONTENT_TYPE {
            properties = properties.with_content_type(ShortString::from(text));
            continue;
        }
        let attribute = name.strip_prefix(AMQP_PREFIX).unwrap();
        let value = if attribute == "time" {
            AMQPValue::Timestamp(u64::try_from(event_time.timestamp()).unwrap())
        } else {
            AMQPValue::LongString(LongString::from(text))
        };
        headers.insert(ShortString::from(format!("cloudEvents_{attribute}")), value);
    }
    headers.insert(
        ShortString::from("cloudEvents_signature"),
        AMQPValue::ByteArray(vec![0xde, 0xad, 0xbe, 0xef].into()),
    );
    let properties = properties.with_headers(headers);
    let received = busbar_receives(Arc::new(transport), wire, |topic, wire| async move {
        publish_raw_table(&exchange, &topic, &wire, properties).await;
    })
    .await;
    assert_eq!(received.source, "https://example.com/sdk-producer");
    assert_eq!(received.correlation_id.as_deref(), Some("conversation-9"));
    assert_eq!(received.key.as_deref(), Some("k"));
    assert_eq!(
        received.time.map(|t| t.timestamp()),
        Some(event_time.timestamp()),
        "the AMQP timestamp (whole seconds) is the event's time"
    );
    assert_eq!(
        received.headers.get("ce_signature"),
        Some("3q2+7w=="),
        "binary reads as base64"
    );
    assert_eq!(received.payload, probe(9, "k"));
}

/// Publishes `wire`'s body with raw lapin and the given properties.
async fn publish_raw_table(
    exchange: &str,
    topic: &str,
    wire: &BindingMessage,
    properties: BasicProperties,
) {
    let (connection, channel) = raw_channel().await;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    channel
        .basic_publish(
            exchange.into(),
            topic.into(),
            BasicPublishOptions::default(),
            wire.payload.as_deref().unwrap_or_default(),
            properties,
        )
        .await
        .expect("raw publish")
        .await
        .expect("confirm");
    let _ = connection.close(200, "done".into()).await;
}
