//! busbar's Kafka records are the CloudEvents Kafka protocol binding (binary mode), as the
//! official SDK reads and writes it: a record busbar published is read by the SDK with every
//! attribute, and an event the SDK built is consumed by busbar as a typed event.

use std::sync::Arc;
use std::time::Duration;

use busbar_core::Bus;
use busbar_kafka::KafkaTransport;
use busbar_testkit::conformance::{probe, reachable, unique};
use busbar_testkit::interop::{
    assert_sdk_read, busbar_consumes_the_sdk_event, busbar_consumes_the_structured_sdk_event,
    BindingMessage, KAFKA_PREFIX,
};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};

async fn transport() -> Option<KafkaTransport> {
    let url = std::env::var("BUSBAR_KAFKA_URL")
        .unwrap_or_else(|_| "kafka://127.0.0.1:9092?session_timeout_ms=6000".into());
    reachable(KafkaTransport::connect(&url.parse().unwrap()).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_sdk_reads_what_busbar_publishes() {
    let Some(transport) = transport().await else {
        return;
    };
    let servers = transport.config().bootstrap_servers();
    let bus = Bus::new(transport);
    let topic = unique("ce-out");
    bus.declare(&topic, "g").await.unwrap();
    let envelope = bus
        .envelope(probe(42, "order-7"))
        .with_causation_id("cause-1")
        .with_header("tenant", "acme");
    bus.publish_envelope(&topic, &envelope).await.unwrap();

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &servers)
        .set("group.id", unique("sdk-reader"))
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()
        .unwrap();
    consumer.subscribe(&[topic.as_str()]).unwrap();
    let record = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .expect("the record arrives")
        .unwrap();
    let mut wire = BindingMessage::new(KAFKA_PREFIX);
    if let Some(headers) = record.headers() {
        for header in headers.iter() {
            wire.headers.insert(
                header.key.to_string(),
                header.value.unwrap_or_default().to_vec(),
            );
        }
    }
    wire.payload = record.payload().map(<[u8]>::to_vec);
    let event = wire.to_event().expect("the SDK reads busbar's record");

    assert_sdk_read(&event, &envelope);
    assert_eq!(
        record.key().map(<[u8]>::to_vec),
        Some(b"order-7".to_vec()),
        "the key is the record key"
    );
    assert_eq!(
        event
            .extension("partitionkey")
            .map(|v| v.to_string())
            .as_deref(),
        Some("order-7"),
        "the binding keeps the partitionkey attribute beside the record key"
    );
}

/// Sends `wire` with a raw rdkafka producer: headers as they are, the record key `key`.
async fn send_raw(servers: String, topic: String, wire: BindingMessage, key: Option<&str>) {
    let headers = wire.headers.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
        h.insert(Header {
            key: k,
            value: Some(v),
        })
    });
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &servers)
        .create()
        .expect("raw producer");
    let mut record = FutureRecord::to(&topic)
        .payload(wire.payload.as_deref().unwrap_or_default())
        .headers(headers);
    if let Some(key) = key {
        record = record.key(key);
    }
    producer
        .send(record, Duration::from_secs(10))
        .await
        .expect("raw send");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busbar_consumes_an_event_the_official_sdk_wrote() {
    let Some(transport) = transport().await else {
        return;
    };
    let servers = transport.config().bootstrap_servers();
    busbar_consumes_the_sdk_event(Arc::new(transport), KAFKA_PREFIX, |topic, wire| {
        send_raw(servers, topic, wire, Some("k"))
    })
    .await;
}

/// Structured mode with no record key: the key comes from the event's `partitionkey`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busbar_consumes_an_event_the_official_sdk_wrote_in_structured_mode() {
    let Some(transport) = transport().await else {
        return;
    };
    let servers = transport.config().bootstrap_servers();
    busbar_consumes_the_structured_sdk_event(Arc::new(transport), KAFKA_PREFIX, |topic, wire| {
        send_raw(servers, topic, wire, None)
    })
    .await;
}
