//! Messages published by a plain lapin client, not busbar, that are malformed in every way
//! `busbar_testkit::hostile` lists: each ends in the DLQ with a clear reason, and the consumer
//! keeps running.

use std::sync::Arc;

use busbar_rabbitmq::RabbitTransport;
use busbar_testkit::conformance::reachable;
use busbar_testkit::hostile::foreign_messages_are_dead_lettered_clearly;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_and_malformed_messages_are_dead_lettered_with_a_clear_reason() {
    let url = std::env::var("BUSBAR_RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f?queue_expires_ms=600000".into());
    let Some(transport) = reachable(RabbitTransport::connect(&url.parse().unwrap()).await) else {
        return;
    };
    let exchange = transport.config().exchange.clone();
    foreign_messages_are_dead_lettered_clearly(
        Arc::new(transport),
        &[],
        |topic, cases| async move {
            let connection = Connection::connect(
                "amqp://guest:guest@127.0.0.1:5672/%2f",
                ConnectionProperties::default(),
            )
            .await
            .expect("raw connection");
            let channel = connection.create_channel().await.expect("channel");
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .expect("confirms");
            for case in cases {
                // The CloudEvents AMQP binding: `cloudEvents:<attribute>` application properties,
                // the content type as the AMQP property.
                let mut headers = FieldTable::default();
                let mut properties = BasicProperties::default();
                let text = case.headers.iter().map(|(k, v)| (k, v.as_bytes()));
                let binary = case.binary_headers.iter().map(|(k, v)| (k, v.as_slice()));
                for (name, value) in text.chain(binary) {
                    if name == "content-type" {
                        let value = String::from_utf8_lossy(value);
                        properties = properties.with_content_type(ShortString::from(&*value));
                        continue;
                    }
                    let name = match name.strip_prefix("ce_") {
                        Some(attribute) => format!("cloudEvents:{attribute}"),
                        None => name.clone(),
                    };
                    headers.insert(
                        ShortString::from(name),
                        AMQPValue::LongString(LongString::from(value)),
                    );
                }
                channel
                    .basic_publish(
                        exchange.as_str().into(),
                        topic.as_str().into(),
                        BasicPublishOptions::default(),
                        &case.payload,
                        properties.with_headers(headers),
                    )
                    .await
                    .expect("raw publish")
                    .await
                    .expect("confirm");
            }
            let _ = connection.close(200, "done".into()).await;
        },
    )
    .await;
}
