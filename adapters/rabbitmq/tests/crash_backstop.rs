//! A message that "crashes" its consumer on every delivery (dropped without ack each time)
//! ends in the group's DLQ through the quorum queue's delivery limit, with a reason.

use std::time::Duration;

use busbar_core::{ConsumeOptions, DeadLetterReason, Message, Transport};
use busbar_rabbitmq::RabbitTransport;
use busbar_testkit::conformance::{reachable, unique};
use futures::StreamExt;

fn url() -> String {
    std::env::var("BUSBAR_RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_kills_its_consumer_every_time_ends_in_the_dlq() {
    let url = format!("{}?delivery_limit=2&queue_expires_ms=600000", url());
    let Some(transport) = reachable(RabbitTransport::connect(&url.parse().unwrap()).await) else {
        return;
    };
    assert!(transport.capabilities().native_dead_letter);
    let (topic, group) = (unique("crash"), unique("g"));
    transport.declare(&topic, &group).await.unwrap();
    transport
        .publish(vec![Message::new("poison-1", topic.clone(), "{}")])
        .await
        .unwrap();

    let mut deliveries = 0;
    let mut last_attempt = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    // Until the message shows up in the DLQ, keep "crashing" on it with a fresh consumer each
    // time, as a restarted process would.
    while transport
        .dead_letters(&topic, &group, 10)
        .await
        .unwrap()
        .is_empty()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the delivery limit never stopped the crash loop"
        );
        let mut stream = transport
            .consume(&topic, &group, ConsumeOptions::default())
            .await
            .unwrap();
        if let Ok(Some(Ok(delivery))) =
            tokio::time::timeout(Duration::from_millis(200), stream.next()).await
        {
            deliveries += 1;
            // The count comes from the broker and only grows; a dying consumer can be
            // charged twice (nack + channel close), never less than once.
            assert!(
                delivery.attempt() > last_attempt && delivery.attempt() >= deliveries,
                "attempt {} on delivery {deliveries}",
                delivery.attempt()
            );
            last_attempt = delivery.attempt();
            drop(delivery); // the consumer dies mid-handler
        }
    }
    // RabbitMQ counts returns by nack and by channel close; how many a dying consumer is
    // charged is a race, so the loop ends within the limit (2) plus one.
    assert!(
        (1..=3).contains(&deliveries),
        "{deliveries} deliveries for a delivery limit of 2"
    );
    let dead = transport.dead_letters(&topic, &group, 10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].message.id, "poison-1");
    assert_eq!(dead[0].info.reason, DeadLetterReason::DeliveryLimit);
    assert!(
        dead[0].info.error.contains("delivery limit (2,"),
        "{}",
        dead[0].info.error
    );
    assert!(
        dead[0].info.error.contains("crashed or abandoned"),
        "{}",
        dead[0].info.error
    );
}
