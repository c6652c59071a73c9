//! SQS-specific guarantees against LocalStack: the size limit, redelivery after a crash, the
//! redrive policy as crash backstop.

use std::sync::Arc;
use std::time::Duration;

use busbar_core::{Bus, ConsumeOptions, DeadLetterReason, ErrorKind, Message, Transport};
use busbar_sqs::{SqsTransport, SQS_MAX_BYTES};
use busbar_testkit::conformance::{reachable, unique};
use futures::StreamExt;

const LOCAL: &str = "sqs://?endpoint=http://127.0.0.1:4566&region=us-east-1&access_key_id=test&secret_access_key=test&wait_time_s=1";

async fn transport(extra: &str) -> Option<SqsTransport> {
    let url = std::env::var("BUSBAR_SQS_URL").unwrap_or_else(|_| LOCAL.to_string());
    reachable(SqsTransport::connect(&format!("{url}{extra}").parse().unwrap()).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_one_byte_over_256_kib_is_a_clear_error_and_nothing_is_sent() {
    let Some(t) = transport("").await else { return };
    let (topic, group) = (unique("big"), unique("g"));
    t.declare(&topic, &group).await.unwrap();
    let too_big = Message::new("big-1", topic.clone(), "x".repeat(SQS_MAX_BYTES + 1));
    let err = t.publish(vec![too_big]).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PayloadTooLarge, "{err}");
    assert!(err.to_string().contains("big-1"), "{err}");
    let mut stream = t
        .consume(&topic, &group, ConsumeOptions::default())
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(3), stream.next())
            .await
            .is_err(),
        "a refused message was delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_crashes_mid_handler_has_its_message_redelivered_after_the_visibility_timeout(
) {
    let Some(crashing) = transport("&visibility_timeout_s=2").await else {
        return;
    };
    let Some(survivor) = transport("&visibility_timeout_s=2").await else {
        return;
    };
    let (topic, group) = (unique("crash"), unique("g"));
    crashing.declare(&topic, &group).await.unwrap();
    crashing
        .publish(vec![Message::new("m-1", topic.clone(), "{}")])
        .await
        .unwrap();
    let mut stream = crashing
        .consume(&topic, &group, ConsumeOptions::default())
        .await
        .unwrap();
    let delivery = stream.next().await.unwrap().unwrap();
    let taken_at = tokio::time::Instant::now();
    // A crash: no settle, no drop handler, and the process (transport) is gone.
    std::mem::forget(delivery);
    drop(stream);
    crashing.close().await.unwrap();

    let mut stream = survivor
        .consume(&topic, &group, ConsumeOptions::default())
        .await
        .unwrap();
    let again = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("redelivered")
        .unwrap()
        .unwrap();
    assert_eq!(again.message().id, "m-1");
    assert!(
        again.attempt() >= 2,
        "ApproximateReceiveCount counts the crashed receive"
    );
    assert!(
        taken_at.elapsed() >= Duration::from_millis(1800),
        "redelivered before the visibility timeout: {:?}",
        taken_at.elapsed()
    );
    again.ack().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_never_acked_ends_in_the_dlq_through_the_redrive_policy() {
    let Some(t) = transport("&max_receive_count=2").await else {
        return;
    };
    assert!(t.capabilities().native_dead_letter);
    let (topic, group) = (unique("poison"), unique("g"));
    t.declare(&topic, &group).await.unwrap();
    t.publish(vec![Message::new("poison-1", topic.clone(), "{}")])
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut receives = 0;
    while t.dead_letters(&topic, &group, 10).await.unwrap().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the redrive policy never moved the message"
        );
        let mut stream = t
            .consume(&topic, &group, ConsumeOptions::default())
            .await
            .unwrap();
        if let Ok(Some(Ok(delivery))) =
            tokio::time::timeout(Duration::from_secs(2), stream.next()).await
        {
            receives += 1;
            drop(delivery); // abandoned: visible again at once, never deleted
        }
    }
    let dead = t.dead_letters(&topic, &group, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message.id, "poison-1");
    assert_eq!(dead[0].info.reason, DeadLetterReason::DeliveryLimit);
    // Receives the test saw; SQS may count more (a receive cut short by dropping the stream).
    assert!(receives >= 1, "{receives}");
    // It can be redriven like any dead letter.
    let bus = Bus::builder(Arc::new(t.clone())).build();
    assert_eq!(bus.redrive(&topic, &group).await.unwrap(), 1);
    assert!(bus
        .dead_letters(&topic, &group, 10)
        .await
        .unwrap()
        .is_empty());
}

/// FIFO: the message id is the deduplication id, so a publish sent again (say, after a timeout
/// that hid its success) is stored once; a key that SQS would refuse as a group id is hashed
/// into a valid one and the message still arrives with its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_publish_sent_twice_is_stored_once() {
    let Some(t) = transport("&fifo=true&mode=queue").await else {
        return;
    };
    let (topic, group) = (unique("dedup"), unique("g"));
    t.declare(&topic, &group).await.unwrap();
    let mut once = Message::new("m-1", topic.clone(), "{}");
    once.key = Some("clé avec espaces".into());
    t.publish(vec![once.clone()]).await.unwrap();
    t.publish(vec![once.clone()]).await.unwrap();
    let other = Message::new("m-2", topic.clone(), "{}");
    t.publish(vec![other]).await.unwrap();
    let mut stream = t
        .consume(&topic, &group, ConsumeOptions::default())
        .await
        .unwrap();
    let mut seen = Vec::new();
    while let Ok(Some(delivery)) = tokio::time::timeout(Duration::from_secs(3), stream.next()).await
    {
        let delivery = delivery.unwrap();
        seen.push((
            delivery.message().id.clone(),
            delivery.message().key.clone(),
        ));
        delivery.ack().await.unwrap();
    }
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("m-1".into(), Some("clé avec espaces".into())),
            ("m-2".into(), None)
        ],
        "the second send of m-1 must be deduplicated"
    );
}
