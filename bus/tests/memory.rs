//! The memory transport's contract, exercised through the SPI.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use busbar_core::{
    Bus, ConsumeOptions, Delivery, ErrorKind, MemoryOptions, MemoryTransport, Message, Transport,
};
use common::unique;
use futures::StreamExt;
use tokio::time::{timeout, Instant};

const WAIT: Duration = Duration::from_secs(10);

fn msg(topic: &str, id: &str, key: Option<&str>) -> Message {
    let mut m = Message::new(id, topic, format!("payload of {id}"));
    m.key = key.map(Into::into);
    m
}

async fn next(stream: &mut busbar_core::DeliveryStream) -> Delivery {
    timeout(WAIT, stream.next())
        .await
        .expect("no delivery within the deadline")
        .expect("stream ended")
        .expect("delivery error")
}

async fn nothing_within(stream: &mut busbar_core::DeliveryStream, wait: Duration) {
    if let Ok(Some(item)) = timeout(wait, stream.next()).await {
        panic!(
            "unexpected delivery: {:?}",
            item.map(|d| d.message().id.clone())
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_declared_group_gets_what_was_published_before_its_consumer_started() {
    let t = MemoryTransport::new();
    let topic = unique("t");
    // No group yet: publishing is fine and reaches nobody.
    t.publish(vec![msg(&topic, "lost-to-nobody", None)])
        .await
        .unwrap();
    t.declare(&topic, "g").await.unwrap();
    t.publish(vec![msg(&topic, "m1", None), msg(&topic, "m2", None)])
        .await
        .unwrap();
    let mut s = t
        .consume(&topic, "g", ConsumeOptions::default())
        .await
        .unwrap();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let d = next(&mut s).await;
        ids.push(d.message().id.clone());
        d.ack().await.unwrap();
    }
    assert_eq!(ids, ["m1", "m2"]);
    nothing_within(&mut s, Duration::from_millis(100)).await;
}

#[tokio::test(start_paused = true)]
async fn every_group_gets_every_message_and_topics_are_isolated() {
    let t = MemoryTransport::new();
    let (a, b) = (unique("a"), unique("b"));
    for g in ["g1", "g2"] {
        t.declare(&a, g).await.unwrap();
    }
    t.declare(&b, "g1").await.unwrap();
    t.publish(vec![msg(&a, "x", None), msg(&b, "y", None)])
        .await
        .unwrap();
    for g in ["g1", "g2"] {
        let mut s = t.consume(&a, g, ConsumeOptions::default()).await.unwrap();
        let d = next(&mut s).await;
        assert_eq!(d.message().id, "x");
        assert_eq!(d.message().payload.as_ref(), b"payload of x");
        d.ack().await.unwrap();
        nothing_within(&mut s, Duration::from_millis(50)).await;
    }
    let mut s = t
        .consume(&b, "g1", ConsumeOptions::default())
        .await
        .unwrap();
    assert_eq!(next(&mut s).await.message().id, "y");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn competing_consumers_split_the_work_with_nothing_lost_or_doubled() {
    let t = MemoryTransport::new();
    let topic = unique("t");
    t.declare(&topic, "g").await.unwrap();
    let batch: Vec<Message> = (0..1000)
        .map(|i| msg(&topic, &format!("m{i}"), None))
        .collect();
    // The consumers start together once the messages are there, so none can take them all
    // before the others start (on a loaded machine the first one could).
    let started = std::sync::Arc::new(tokio::sync::Barrier::new(4));
    let mut workers = Vec::new();
    for _ in 0..3 {
        let mut s = t
            .consume(&topic, "g", ConsumeOptions::new(4))
            .await
            .unwrap();
        let t = t.clone();
        let topic = topic.clone();
        let started = std::sync::Arc::clone(&started);
        workers.push(tokio::spawn(async move {
            started.wait().await;
            let mut got = Vec::new();
            while t.pending(&topic, "g") > 0 {
                if let Ok(Some(Ok(d))) = timeout(Duration::from_millis(20), s.next()).await {
                    got.push(d.message().id.clone());
                    d.ack().await.unwrap();
                    tokio::task::yield_now().await;
                }
            }
            got
        }));
    }
    t.publish(batch).await.unwrap();
    started.wait().await;
    let mut all = Vec::new();
    let mut per_worker = Vec::new();
    for w in workers {
        let got = w.await.unwrap();
        per_worker.push(got.len());
        all.extend(got);
    }
    assert_eq!(all.len(), 1000, "duplicated or lost: {per_worker:?}");
    assert_eq!(all.iter().collect::<HashSet<_>>().len(), 1000);
    assert!(
        per_worker.iter().filter(|&&n| n > 0).count() >= 2,
        "one consumer did all the work: {per_worker:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_dropped_delivery_comes_back_to_another_consumer_with_the_next_attempt() {
    let t = MemoryTransport::new();
    let topic = unique("t");
    t.declare(&topic, "g").await.unwrap();
    t.publish(vec![msg(&topic, "m", None)]).await.unwrap();
    let mut crashing = t
        .consume(&topic, "g", ConsumeOptions::default())
        .await
        .unwrap();
    let d = next(&mut crashing).await;
    assert_eq!(d.attempt(), 1);
    drop(d);
    drop(crashing); // the consumer died without acking
    let mut other = t
        .consume(&topic, "g", ConsumeOptions::default())
        .await
        .unwrap();
    let d = next(&mut other).await;
    assert_eq!((d.message().id.as_str(), d.attempt()), ("m", 2));
    d.ack().await.unwrap();
    assert_eq!(t.pending(&topic, "g"), 0);
}

#[tokio::test(start_paused = true)]
async fn nack_redelivers_after_its_delay_and_not_before() {
    let t = MemoryTransport::new();
    let topic = unique("t");
    t.declare(&topic, "g").await.unwrap();
    t.publish(vec![msg(&topic, "m", None)]).await.unwrap();
    let mut s = t
        .consume(&topic, "g", ConsumeOptions::default())
        .await
        .unwrap();
    let d = next(&mut s).await;
    let nacked_at = Instant::now();
    d.nack(Duration::from_secs(3)).await.unwrap();
    let d = next(&mut s).await;
    assert!(
        nacked_at.elapsed() >= Duration::from_secs(3),
        "redelivered after {:?}",
        nacked_at.elapsed()
    );
    assert_eq!(d.attempt(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_key_is_handed_out_one_message_at_a_time_in_order_even_across_a_nack() {
    let t = MemoryTransport::new();
    let topic = unique("t");
    t.declare(&topic, "g").await.unwrap();
    t.publish(vec![
        msg(&topic, "a1", Some("a")),
        msg(&topic, "a2", Some("a")),
        msg(&topic, "b1", Some("b")),
    ])
    .await
    .unwrap();
    let mut s = t
        .consume(&topic, "g", ConsumeOptions::new(10))
        .await
        .unwrap();
    let a1 = next(&mut s).await;
    let b1 = next(&mut s).await;
    assert_eq!(
        (a1.message().id.as_str(), b1.message().id.as_str()),
        ("a1", "b1")
    );
    // a2 waits while a1 is in flight, and while a1 waits for its delayed redelivery.
    nothing_within(&mut s, Duration::from_millis(100)).await;
    a1.nack(Duration::from_millis(500)).await.unwrap();
    let again = next(&mut s).await;
    assert_eq!((again.message().id.as_str(), again.attempt()), ("a1", 2));
    again.ack().await.unwrap();
    assert_eq!(next(&mut s).await.message().id, "a2");
    b1.ack().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn in_flight_limit_bounds_what_a_consumer_holds() {
    let t = MemoryTransport::new();
    let topic = unique("t");
    t.declare(&topic, "g").await.unwrap();
    t.publish(
        (0..5)
            .map(|i| msg(&topic, &format!("m{i}"), None))
            .collect(),
    )
    .await
    .unwrap();
    let mut s = t
        .consume(&topic, "g", ConsumeOptions::new(2))
        .await
        .unwrap();
    let first = next(&mut s).await;
    let _second = next(&mut s).await;
    nothing_within(&mut s, Duration::from_millis(100)).await;
    first.ack().await.unwrap();
    next(&mut s).await;
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_makes_publishers_wait_then_fail_with_a_timeout_naming_the_group() {
    let t = MemoryTransport::with_options(MemoryOptions {
        queue_capacity: 2,
        publish_timeout: Duration::from_secs(1),
        ..MemoryOptions::default()
    });
    let topic = unique("t");
    t.declare(&topic, "slow").await.unwrap();
    t.publish(vec![msg(&topic, "1", None), msg(&topic, "2", None)])
        .await
        .unwrap();
    let err = t.publish(vec![msg(&topic, "3", None)]).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert!(err.to_string().contains("group slow"), "{err}");
    assert_eq!(
        t.pending(&topic, "slow"),
        2,
        "the rejected message must not be half-published"
    );

    // A waiting publisher succeeds as soon as a consumer frees space.
    let mut s = t
        .consume(&topic, "slow", ConsumeOptions::default())
        .await
        .unwrap();
    let publisher = {
        let t = t.clone();
        let topic = topic.clone();
        tokio::spawn(async move { t.publish(vec![msg(&topic, "3", None)]).await })
    };
    tokio::task::yield_now().await;
    next(&mut s).await.ack().await.unwrap();
    publisher.await.unwrap().unwrap();
    assert_eq!(t.pending(&topic, "slow"), 2);
}

#[tokio::test(start_paused = true)]
async fn a_batch_goes_to_every_group_or_to_none() {
    let t = MemoryTransport::with_options(MemoryOptions {
        queue_capacity: 3,
        publish_timeout: Duration::from_secs(1),
        ..MemoryOptions::default()
    });
    let topic = unique("t");
    t.declare(&topic, "fast").await.unwrap();
    t.declare(&topic, "slow").await.unwrap();
    t.publish(vec![msg(&topic, "1", None), msg(&topic, "2", None)])
        .await
        .unwrap();
    let mut fast = t
        .consume(&topic, "fast", ConsumeOptions::default())
        .await
        .unwrap();
    for _ in 0..2 {
        next(&mut fast).await.ack().await.unwrap();
    }
    // Room for two more in `fast`, for one in `slow`.
    let err = t
        .publish(vec![msg(&topic, "3", None), msg(&topic, "4", None)])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert!(err.to_string().contains("group slow"), "{err}");
    assert_eq!(t.pending(&topic, "fast"), 0, "half a batch went to `fast`");
    assert_eq!(t.pending(&topic, "slow"), 2);
    t.publish(vec![msg(&topic, "3", None)]).await.unwrap();
    assert_eq!(
        (t.pending(&topic, "fast"), t.pending(&topic, "slow")),
        (1, 3)
    );
}

#[tokio::test]
async fn oversize_messages_and_bad_topic_names_are_clear_errors() {
    let t = MemoryTransport::with_options(MemoryOptions {
        max_message_bytes: 1024,
        ..MemoryOptions::default()
    });
    assert_eq!(t.capabilities().max_message_bytes, Some(1024));
    let topic = unique("t");
    t.declare(&topic, "g").await.unwrap();
    let mut fits = Message::new("ok", topic.clone(), vec![0u8; 1024]);
    fits.headers.clear();
    t.publish(vec![fits]).await.unwrap();
    let err = t
        .publish(vec![Message::new("big", topic.clone(), vec![0u8; 1025])])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PayloadTooLarge);
    assert!(err.to_string().contains("1025 bytes"), "{err}");
    assert!(err.to_string().contains("message big"), "{err}");
    let err = t
        .publish(vec![Message::new("x", "has space", "")])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert_eq!(t.pending(&topic, "g"), 1);
}

#[tokio::test(start_paused = true)]
async fn closing_ends_streams_and_rejects_publishes() {
    let t = MemoryTransport::new();
    let topic = unique("t");
    let mut s = t
        .consume(&topic, "g", ConsumeOptions::default())
        .await
        .unwrap();
    t.close().await.unwrap();
    assert!(
        timeout(WAIT, s.next()).await.unwrap().is_none(),
        "stream must end on close"
    );
    let err = t
        .publish(vec![msg(&topic, "late", None)])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);

    let bus = Bus::memory();
    bus.close().await.unwrap();
    let err = bus
        .publish_messages(vec![msg(&topic, "late", None)])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
    assert!(err.to_string().contains("bus is closed"), "{err}");
}

#[tokio::test]
async fn a_batch_with_one_bad_topic_name_is_refused_whole() {
    let t = MemoryTransport::new();
    let bus = Bus::new(t.clone());
    let topic = unique("t");
    t.declare(&topic, "g").await.unwrap();
    // The bad name comes after two messages to a good one: each topic of the batch is checked.
    let batch = vec![
        msg(&topic, "1", None),
        msg(&topic, "2", None),
        msg("no spaces", "3", None),
        msg(&topic, "4", None),
    ];
    let err = bus.publish_messages(batch).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("\"no spaces\""), "{err}");
    assert_eq!(
        t.pending(&topic, "g"),
        0,
        "nothing of the batch was published"
    );
}
