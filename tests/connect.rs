//! The facade: choosing a transport by URL, and clear errors for what this build cannot do.

use std::time::Duration;

use busbar::{BusConfig, Context, Envelope, ErrorKind, Event, HandlerError};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Ping {
    n: u32,
}
impl Event for Ping {
    const TYPE: &'static str = "test.ping.v1";
}

#[tokio::test]
async fn memory_url_connects_and_round_trips_an_event() {
    let bus = busbar::connect("memory://?capacity=10&publish_timeout_ms=50")
        .await
        .unwrap();
    assert_eq!(bus.transport().name(), "memory");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let sub = bus
        .subscribe::<Ping>("pings", "g")
        .start(move |e: Envelope<Ping>, _c: Context| {
            let tx = tx.clone();
            async move {
                tx.send(e.payload.n).map_err(HandlerError::permanent)?;
                Ok(())
            }
        })
        .await
        .unwrap();
    bus.publish("pings", Ping { n: 42 }).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap();
    assert_eq!(got, Some(42));
    sub.shutdown(Duration::from_secs(1)).await.unwrap();
}

#[tokio::test]
async fn config_struct_sets_source_and_memory_options() {
    let config: BusConfig = serde_json::from_str(
        r#"{"url": "memory://?max_message_bytes=2048", "source": "/svc/a", "concurrency": 3}"#,
    )
    .unwrap();
    let bus = busbar::connect_with(&config).await.unwrap();
    assert_eq!(bus.source(), "/svc/a");
    assert_eq!(bus.capabilities().max_message_bytes, Some(2048));
    bus.declare("big", "g").await.unwrap();
    let err = bus
        .publish_messages(vec![busbar::Message::new("m", "big", vec![0u8; 4096])])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PayloadTooLarge);
}

#[tokio::test]
async fn brokers_without_their_feature_say_which_feature_to_enable() {
    let mut cases = Vec::new();
    if cfg!(not(feature = "sqs")) {
        cases.push((
            "sqs://?region=eu-west-1&endpoint=http://127.0.0.1:4566",
            "sqs",
        ));
    }
    if cfg!(not(feature = "kafka")) {
        cases.push(("kafka://h1:9092,h2:9092?sasl.password=hunter2", "kafka"));
    }
    if cfg!(not(feature = "rabbitmq")) {
        cases.push(("amqp://app:hunter2@localhost:5672/%2f", "rabbitmq"));
        cases.push(("amqps://app:hunter2@localhost/%2f", "rabbitmq"));
    }
    for (url, feature) in cases {
        let err = busbar::connect(url).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config, "{url}");
        let text = err.to_string();
        assert!(text.contains(&format!("`{feature}` feature")), "{text}");
        assert!(!text.contains("hunter2"), "secret leaked: {text}");
        assert!(
            !format!("{err:?}").contains("hunter2"),
            "secret leaked in Debug"
        );
    }
}

#[cfg(feature = "rabbitmq")]
#[tokio::test]
async fn amqp_urls_reach_the_rabbitmq_adapter_and_failures_keep_secrets() {
    // Nothing listens on port 1: a connection error that names the URL without its password.
    let err = busbar::connect("amqp://app:hunter2@127.0.0.1:1/%2f")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    assert!(
        err.to_string().contains("amqp://app:***@127.0.0.1:1"),
        "{err}"
    );
    assert!(!err.to_string().contains("hunter2") && !format!("{err:?}").contains("hunter2"));
    // TLS: amqps:// speaks TLS, so a plain AMQP port fails the handshake rather than silently
    // falling back to plain text.
    let err = busbar::connect("amqps://guest:guest@127.0.0.1:5672/%2f")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    // Bad settings are config errors before any network traffic.
    let err = busbar::connect("amqp://127.0.0.1/%2f?queue_type=lazy")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
}

#[tokio::test]
async fn unknown_schemes_and_bad_parameters_list_what_exists() {
    let err = busbar::connect("nats://localhost").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    let text = err.to_string();
    for scheme in ["memory://", "amqp://", "kafka://", "sqs://"] {
        assert!(text.contains(scheme), "{text}");
    }
    let err = busbar::connect("memory://?capacityy=10").await.unwrap_err();
    assert!(err.to_string().contains("known: capacity"), "{err}");
    let err = busbar::connect("memory://?capacity=zero")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("positive integer"), "{err}");
    let err = busbar::connect("no scheme here").await.unwrap_err();
    assert!(err.to_string().contains("scheme://"), "{err}");
}

#[cfg(feature = "kafka")]
#[tokio::test]
async fn kafka_urls_reach_the_kafka_adapter_and_failures_keep_secrets() {
    // Nothing listens on port 1: the metadata probe fails, with the password redacted.
    let err = busbar::connect("kafka://127.0.0.1:1?sasl.password=hunter2&socket.timeout.ms=1000")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    assert!(!err.to_string().contains("hunter2"), "{err}");
    assert!(!format!("{err:?}").contains("hunter2"));
    let err = busbar::connect("kafka://127.0.0.1:9092?acks=0")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
}

#[cfg(feature = "sqs")]
#[tokio::test]
async fn sqs_urls_reach_the_sqs_adapter_and_failures_keep_secrets() {
    // Nothing listens on port 1: the first call fails, with the secret key redacted.
    let err = busbar::connect("sqs://?endpoint=http://127.0.0.1:1&region=us-east-1&access_key_id=AKIA&secret_access_key=hunter2")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    assert!(
        !err.to_string().contains("hunter2") && !format!("{err:?}").contains("hunter2"),
        "{err}"
    );
    let err = busbar::connect("sqs://?mode=fifo").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
}
