//! Records written by a plain rdkafka producer, not busbar, that are malformed in every way
//! `busbar_testkit::hostile` lists: each ends in the DLQ with a clear reason, and the consumer
//! keeps running.

use std::sync::Arc;
use std::time::Duration;

use busbar_kafka::KafkaTransport;
use busbar_testkit::conformance::reachable;
use busbar_testkit::hostile::foreign_messages_are_dead_lettered_clearly;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_and_malformed_records_are_dead_lettered_with_a_clear_reason() {
    let url = std::env::var("BUSBAR_KAFKA_URL")
        .unwrap_or_else(|_| "kafka://127.0.0.1:9092?session_timeout_ms=6000".into());
    let Some(transport) = reachable(KafkaTransport::connect(&url.parse().unwrap()).await) else {
        return;
    };
    let servers = transport.config().bootstrap_servers();
    foreign_messages_are_dead_lettered_clearly(
        Arc::new(transport),
        &[],
        |topic, cases| async move {
            let producer: FutureProducer = ClientConfig::new()
                .set("bootstrap.servers", &servers)
                .create()
                .expect("raw producer");
            for case in cases {
                // The CloudEvents Kafka binding's names are busbar's neutral names.
                let text = case.headers.iter().map(|(k, v)| (k, v.as_bytes()));
                let binary = case.binary_headers.iter().map(|(k, v)| (k, v.as_slice()));
                let headers = text.chain(binary).fold(OwnedHeaders::new(), |h, (k, v)| {
                    h.insert(Header {
                        key: k,
                        value: Some(v),
                    })
                });
                producer
                    .send(
                        FutureRecord::<(), _>::to(&topic)
                            .payload(&case.payload)
                            .headers(headers),
                        Duration::from_secs(10),
                    )
                    .await
                    .expect("raw send");
            }
        },
    )
    .await;
}
