//! Lifecycle: closing, resubscribing, shutdown.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use busbar_core::{ConsumeOptions, ErrorKind, Message, StartFrom};
use futures::StreamExt;

use super::{bus_over, claims, probe, unique, wait_for, wait_limit, Harness, Ledger, Probe};

const GRACE: Duration = Duration::from_secs(10);

/// A closed subscription receives nothing more; subscribing the group again resumes with
/// exactly the messages published in between.
pub async fn closed_subscription_stops_and_resubscribing_resumes(h: Harness) {
    let Some(bus) = h.bus().await else { return };
    let caps = bus.capabilities();
    let (topic, group) = (unique("resume"), unique("g"));
    let first = Ledger::default();
    let sub = bus
        .subscribe::<Probe>(&topic, &group)
        .start(first.handler())
        .await
        .expect("subscribe");
    let before = bus
        .publish_batch(&topic, (0..10).map(|i| probe(i, "")))
        .await
        .expect("publish");
    wait_for("first ten handled", || first.distinct().len() == 10).await;
    sub.shutdown(GRACE).await.expect("shutdown");
    let seen_by_first = first.len();

    let after = bus
        .publish_batch(&topic, (10..20).map(|i| probe(i, "")))
        .await
        .expect("publish while closed");
    let second = Ledger::default();
    let sub = bus
        .subscribe::<Probe>(&topic, &group)
        .start(second.handler())
        .await
        .expect("resubscribe");
    wait_for("the ten published while closed", || {
        second.distinct().len() >= 10
    })
    .await;
    assert_eq!(
        first.len(),
        seen_by_first,
        "a closed subscription kept receiving"
    );
    second.assert_nothing_lost(&after);
    second.assert_nothing_duplicated(&caps);
    if !caps.may_duplicate {
        let replayed: Vec<_> = before
            .iter()
            .filter(|id| second.distinct().contains(*id))
            .collect();
        assert!(
            replayed.is_empty(),
            "acked messages were delivered again: {replayed:?}"
        );
    }
    let _ = sub.shutdown(GRACE).await;
}

/// Publishing through a closed bus, or a closed transport, is a `Closed` error.
pub async fn publishing_after_close_is_a_clear_error(h: Harness) {
    let Some(bus) = h.bus().await else { return };
    let topic = unique("closed");
    bus.close().await.expect("close");
    let err = bus
        .publish(&topic, probe(1, ""))
        .await
        .expect_err("publish after close must fail");
    assert_eq!(err.kind(), ErrorKind::Closed, "{err}");

    let Some(transport) = h.transport().await else {
        return;
    };
    transport.close().await.expect("close transport");
    let err = transport
        .publish(vec![Message::new("m", topic, "{}")])
        .await
        .expect_err("a closed transport must refuse publishes");
    assert_eq!(err.kind(), ErrorKind::Closed, "{err}");
}

/// Shutdown lets running handlers finish within the grace period and acks them: they are not
/// delivered again.
pub async fn shutdown_drains_in_flight_handlers(h: Harness) {
    let Some(bus) = h.bus().await else { return };
    let caps = bus.capabilities();
    let (topic, group) = (unique("drain"), unique("g"));
    let started = Arc::new(AtomicUsize::new(0));
    let ledger = Ledger::default();
    let sub = bus
        .subscribe::<Probe>(&topic, &group)
        .concurrency(4)
        .start(ledger.slow_handler(&started, Duration::from_millis(300)))
        .await
        .expect("subscribe");
    let ids = bus
        .publish_batch(&topic, (0..4).map(|i| probe(i, "")))
        .await
        .expect("publish");
    wait_for("four handlers running", || {
        started.load(Ordering::SeqCst) == 4
    })
    .await;
    let report = sub.shutdown(GRACE).await.expect("shutdown");
    assert_eq!((report.drained, report.abandoned), (4, 0), "{report:?}");
    ledger.assert_nothing_lost(&ids);

    // They were acked: a new consumer of the group gets only what comes next.
    let after = Ledger::default();
    let sub = bus
        .subscribe::<Probe>(&topic, &group)
        .start(after.handler())
        .await
        .expect("resubscribe");
    let marker = bus
        .publish(&topic, probe(99, ""))
        .await
        .expect("publish marker");
    wait_for("the marker", || after.distinct().contains(&marker)).await;
    if !caps.may_duplicate {
        assert_eq!(
            after.distinct().len(),
            1,
            "drained messages came back: {:?}",
            after.distinct()
        );
    }
    let _ = sub.shutdown(GRACE).await;
}

/// A group that starts at [`StartFrom::Latest`] gets only what is published once it consumes
/// (what `busbar tail` does); deleting it, twice, leaves the topic's other groups untouched.
pub async fn a_temporary_group_sees_only_new_messages_and_its_deletion_spares_the_others(
    h: Harness,
) {
    let Some(transport) = h.transport().await else {
        return;
    };
    let bus = bus_over(std::sync::Arc::clone(&transport));
    let caps = bus.capabilities();
    if !claims(&caps, caps.fan_out, "fan-out") {
        return;
    }
    let (topic, kept, temporary) = (unique("tail"), unique("kept"), unique("tmp"));
    bus.declare(&topic, &kept).await.expect("declare");
    let before = bus.publish(&topic, probe(0, "")).await.expect("publish");

    // From the earliest: the backlog where the broker keeps history, a clear refusal where not.
    let mut options = ConsumeOptions::new(4);
    options.start = StartFrom::Earliest;
    let history = unique("hist");
    let released = options.status.clone();
    match transport.consume(&topic, &history, options).await {
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
            assert!(e.to_string().contains("earliest"), "{e}");
        }
        Ok(mut stream) => {
            let delivery = next_delivery(&mut stream).await;
            assert_eq!(delivery.message().id, before, "the earliest message first");
            delivery.ack().await.expect("ack");
            drop(stream);
            assert!(released.wait_released(wait_limit()).await);
            bus.delete_group(&topic, &history).await.expect("delete");
        }
    }

    let mut options = ConsumeOptions::new(4);
    options.start = StartFrom::Latest;
    let status = options.status.clone();
    let mut stream = transport
        .consume(&topic, &temporary, options)
        .await
        .expect("consume from the latest");
    assert!(
        status.wait_consuming(wait_limit()).await,
        "the temporary group never started consuming"
    );
    let after = bus.publish(&topic, probe(1, "")).await.expect("publish");
    let delivery = next_delivery(&mut stream).await;
    assert_eq!(
        delivery.message().id,
        after,
        "the temporary group got {} first, published before it consumed ({before})",
        delivery.message().id
    );
    delivery.ack().await.expect("ack");
    drop(stream);
    assert!(
        status.wait_released(wait_limit()).await,
        "the temporary consumer never let go"
    );
    bus.delete_group(&topic, &temporary)
        .await
        .expect("delete the temporary group");
    bus.delete_group(&topic, &temporary)
        .await
        .expect("deleting a deleted group succeeds");
    let left = bus
        .dead_letters(&topic, &temporary, 10)
        .await
        .expect("list the deleted group's dead letters");
    assert!(left.is_empty(), "dead letters of a deleted group: {left:?}");

    let ledger = Ledger::default();
    let sub = bus
        .subscribe::<Probe>(&topic, &kept)
        .start(ledger.handler())
        .await
        .expect("subscribe the kept group");
    wait_for("the kept group gets both messages", || {
        ledger.distinct().len() == 2
    })
    .await;
    ledger.assert_nothing_lost(&[before, after]);
    let _ = sub.shutdown(GRACE).await;
}

async fn next_delivery(stream: &mut busbar_core::DeliveryStream) -> busbar_core::Delivery {
    loop {
        let next = tokio::time::timeout(wait_limit(), stream.next())
            .await
            .expect("a delivery in time")
            .expect("the stream goes on");
        match next {
            Ok(delivery) => break delivery,
            Err(e) if e.is_retryable() => continue,
            Err(e) => panic!("the stream failed: {e}"),
        }
    }
}
