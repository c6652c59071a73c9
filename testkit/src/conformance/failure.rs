//! Failure: retries, redelivery, dead letters and redrive.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use busbar_core::codec::Json;
use busbar_core::Text;
use busbar_core::{Context, DeadLetterReason, Envelope, HandlerError, Message, RedriveSelection};
use tokio::time::Instant;

use super::{bus_over, claims, fast_retry, lock, probe, unique, wait_for, Harness, Ledger, Probe};

const GRACE: Duration = Duration::from_secs(10);

/// A failed attempt is delivered again (after its backoff, where the transport delays nacks),
/// with the attempt number counting up.
pub async fn nacked_message_is_redelivered(h: Harness) {
    let Some(bus) = h.bus().await else { return };
    let caps = bus.capabilities();
    let (topic, group) = (unique("nack"), unique("g"));
    let backoff = Duration::from_millis(300);
    let attempts = Arc::new(Mutex::new(Vec::<(u32, Instant)>::new()));
    let seen = Arc::clone(&attempts);
    let sub = bus
        .subscribe::<Probe>(&topic, &group)
        .retry(
            fast_retry(3)
                .with_initial_backoff(backoff)
                .with_max_backoff(backoff),
        )
        .start(move |_env: Envelope<Probe>, ctx: Context| {
            let seen = Arc::clone(&seen);
            async move {
                lock(&seen).push((ctx.attempt(), Instant::now()));
                if ctx.attempt() == 1 {
                    return Err(HandlerError::transient("first attempt fails"));
                }
                Ok(())
            }
        })
        .await
        .expect("subscribe");
    bus.publish(&topic, probe(1, "")).await.expect("publish");
    wait_for("the retry succeeded", || sub.stats().handled == 1).await;
    let attempts = lock(&attempts).clone();
    assert_eq!(
        attempts.iter().map(|a| a.0).collect::<Vec<_>>(),
        [1, 2],
        "attempt numbers"
    );
    if caps.delayed_nack {
        let gap = attempts[1].1 - attempts[0].1;
        assert!(
            gap >= backoff.mul_f64(0.9),
            "redelivered after {gap:?}, before the {backoff:?} backoff"
        );
    }
    let _ = sub.shutdown(GRACE).await;
}

/// A consumer that goes away mid-handler without acking: another consumer of the group gets
/// the message.
pub async fn abandoned_delivery_is_redelivered_to_another_consumer(h: Harness) {
    let Some(crashing) = h.transport().await else {
        return;
    };
    let Some(survivor) = h.transport().await else {
        return;
    };
    let (topic, group) = (unique("abandon"), unique("g"));
    let (crash_bus, ok_bus) = (bus_over(crashing), bus_over(survivor));
    crash_bus.declare(&topic, &group).await.expect("declare");
    let started = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&started);
    let doomed = crash_bus
        .subscribe::<Probe>(&topic, &group)
        .start(move |_env: Envelope<Probe>, _ctx: Context| {
            flag.store(true, Ordering::SeqCst);
            async {
                std::future::pending::<()>().await;
                Ok(())
            }
        })
        .await
        .expect("subscribe the doomed consumer");
    let id = crash_bus
        .publish(&topic, probe(1, ""))
        .await
        .expect("publish");
    wait_for("the doomed handler started", || {
        started.load(Ordering::SeqCst)
    })
    .await;
    // The process "crashes": the subscription is dropped mid-handler and its connection closed.
    drop(doomed);
    crash_bus
        .close()
        .await
        .expect("close the crashed connection");

    let ledger = Ledger::default();
    let sub = ok_bus
        .subscribe::<Probe>(&topic, &group)
        .start(ledger.handler())
        .await
        .expect("subscribe survivor");
    wait_for("the survivor handled the abandoned message", || {
        !ledger.is_empty()
    })
    .await;
    ledger.assert_nothing_lost(&[id]);
    let _ = sub.shutdown(GRACE).await;
}

/// A handler that always fails runs exactly `max_attempts` times; the message then sits in the
/// dead-letter queue with reason, error text, attempts, topic, group and the original message.
pub async fn exhausted_attempts_go_to_dead_letter_with_reason(h: Harness) {
    let Some(bus) = h.bus().await else { return };
    let caps = bus.capabilities();
    let (topic, group) = (unique("exhaust"), unique("g"));
    let calls = Arc::new(AtomicU32::new(0));
    let count = Arc::clone(&calls);
    let sub = bus
        .subscribe::<Probe>(&topic, &group)
        .retry(fast_retry(3))
        .start(move |_env: Envelope<Probe>, _ctx: Context| {
            count.fetch_add(1, Ordering::SeqCst);
            async { Err(HandlerError::transient("inventory service unavailable")) }
        })
        .await
        .expect("subscribe");
    let envelope = bus.envelope(probe(7, "k")).with_header("tenant", "acme");
    bus.publish_envelope(&topic, &envelope)
        .await
        .expect("publish");
    wait_for("dead-lettered", || sub.stats().dead_lettered == 1).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "the handler must run exactly max_attempts times"
    );
    if caps.redrive {
        let dead = bus
            .dead_letters(&topic, &group, 10)
            .await
            .expect("list dead letters");
        assert_eq!(dead.len(), 1, "{dead:?}");
        let info = &dead[0].info;
        assert_eq!(info.reason, DeadLetterReason::RetriesExhausted);
        assert_eq!(info.error, "inventory service unavailable");
        assert_eq!(info.attempts, 3);
        assert_eq!(
            (info.topic.as_str(), info.group.as_str()),
            (topic.as_str(), group.as_str())
        );
        let original =
            Envelope::<Probe>::from_message(&Json, &dead[0].message).expect("original decodes");
        assert_eq!(
            original, envelope,
            "the dead letter must carry the original message"
        );
    }
    let _ = sub.shutdown(GRACE).await;
}

/// Permanent errors dead-letter after one attempt; payloads that do not decode, and messages
/// with no envelope at all, dead-letter without calling the handler.
pub async fn permanent_errors_and_undecodable_payloads_dead_letter_at_once(h: Harness) {
    let Some(bus) = h.bus().await else { return };
    let caps = bus.capabilities();
    let (topic, group) = (unique("poison"), unique("g"));
    let calls = Arc::new(AtomicU32::new(0));
    let count = Arc::clone(&calls);
    let sub = bus
        .subscribe::<Probe>(&topic, &group)
        .retry(fast_retry(5))
        .start(move |_env: Envelope<Probe>, _ctx: Context| {
            count.fetch_add(1, Ordering::SeqCst);
            async { Err(HandlerError::permanent("order does not exist")) }
        })
        .await
        .expect("subscribe");
    let permanent = bus.publish(&topic, probe(1, "")).await.expect("publish");
    let mut wrong_shape = bus
        .envelope(probe(2, ""))
        .to_message(&Json, &topic)
        .expect("encode");
    wrong_shape.payload = bytes::Bytes::from_static(br#"{"seq":"two"}"#);
    let no_envelope = Message::new(
        unique("raw"),
        topic.clone(),
        "plain text, no CloudEvents headers",
    );
    bus.publish_messages(vec![wrong_shape.clone(), no_envelope.clone()])
        .await
        .expect("publish raw");
    wait_for("three dead letters", || sub.stats().dead_lettered == 3).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "only the decodable message reaches the handler, once"
    );
    if caps.redrive {
        let dead = bus.dead_letters(&topic, &group, 10).await.expect("list");
        let reason = |id: &str| {
            let d = dead
                .iter()
                .find(|d| d.message.id == id)
                .unwrap_or_else(|| panic!("{id} not dead-lettered: {dead:?}"));
            (d.info.reason, d.info.attempts, d.info.error.clone())
        };
        let (r, attempts, error) = reason(&permanent);
        assert_eq!(
            (r, attempts, error.as_str()),
            (DeadLetterReason::Permanent, 1, "order does not exist")
        );
        let (r, _, error) = reason(&wrong_shape.id);
        assert_eq!(r, DeadLetterReason::Undecodable);
        assert!(
            error.contains("seq"),
            "the error should name the bad field: {error}"
        );
        let (r, _, error) = reason(&no_envelope.id);
        assert_eq!(r, DeadLetterReason::Undecodable);
        assert!(
            error.contains("not a CloudEvent: no `specversion` attribute"),
            "the error should say it is not a CloudEvent: {error}"
        );
    }
    let _ = sub.shutdown(GRACE).await;
}

/// A subscription whose handler rejects every message (a permanent error, so it is
/// dead-lettered at once) until `fixed` is set; then it records them in the ledger.
async fn rejecting_until_fixed(
    bus: &busbar_core::Bus,
    topic: &str,
    group: &str,
) -> (busbar_core::Subscription, Arc<AtomicBool>, Ledger) {
    let fixed = Arc::new(AtomicBool::new(false));
    let ledger = Ledger::default();
    let (flag, record) = (Arc::clone(&fixed), ledger.clone());
    let sub = bus
        .subscribe::<Probe>(topic, group)
        .start(move |env: Envelope<Probe>, _ctx: Context| {
            let ok = flag.load(Ordering::SeqCst);
            if ok {
                record.record(env);
            }
            async move {
                if ok {
                    Ok(())
                } else {
                    Err(HandlerError::permanent("downstream rejected it"))
                }
            }
        })
        .await
        .expect("subscribe");
    (sub, fixed, ledger)
}

/// Dead letters can be listed, then redriven; the group handles them and the DLQ empties.
pub async fn dead_letters_are_listed_and_redriven_then_handled(h: Harness) {
    let Some(bus) = h.bus().await else { return };
    let caps = bus.capabilities();
    if !claims(&caps, caps.redrive, "redrive") {
        return;
    }
    let (topic, group) = (unique("redrive"), unique("g"));
    let (sub, fixed, ledger) = rejecting_until_fixed(&bus, &topic, &group).await;
    let ids = bus
        .publish_batch(&topic, (0..3).map(|i| probe(i, "")))
        .await
        .expect("publish");
    wait_for("three dead letters", || sub.stats().dead_lettered == 3).await;
    let listed = bus.dead_letters(&topic, &group, 100).await.expect("list");
    assert_eq!(listed.len(), 3, "{listed:?}");
    fixed.store(true, Ordering::SeqCst);
    let moved = bus.redrive(&topic, &group).await.expect("redrive");
    assert_eq!(moved, 3);
    wait_for("redriven messages handled", || ledger.distinct().len() == 3).await;
    ledger.assert_nothing_lost(&ids);
    ledger.assert_nothing_duplicated(&caps);
    let left = bus
        .dead_letters(&topic, &group, 100)
        .await
        .expect("list again");
    assert!(left.is_empty(), "dead letters left after redrive: {left:?}");
    let _ = sub.shutdown(GRACE).await;
}

/// Chosen dead letters are redriven and purged by id; the others stay listed until purged
/// with the rest. Only the redriven one is handled again.
pub async fn chosen_dead_letters_are_redriven_or_purged(h: Harness) {
    let Some(bus) = h.bus().await else { return };
    let caps = bus.capabilities();
    if !claims(&caps, caps.redrive, "redrive") {
        return;
    }
    let (topic, group) = (unique("purge"), unique("g"));
    let (sub, fixed, ledger) = rejecting_until_fixed(&bus, &topic, &group).await;
    let ids = bus
        .publish_batch(&topic, (0..4).map(|i| probe(i, "")))
        .await
        .expect("publish");
    wait_for("four dead letters", || sub.stats().dead_lettered == 4).await;
    fixed.store(true, Ordering::SeqCst);

    let one = RedriveSelection::Ids(vec![ids[0].to_string()]);
    let moved = bus
        .redrive_selected(&topic, &group, one)
        .await
        .expect("redrive");
    assert_eq!(moved, 1, "only the chosen dead letter is redriven");
    wait_for("the redriven one handled", || ledger.distinct().len() == 1).await;

    let two = RedriveSelection::Ids(vec![ids[1].to_string(), "no-such-id".to_string()]);
    let purged = bus
        .purge_dead_letters(&topic, &group, two)
        .await
        .expect("purge one");
    assert_eq!(purged, 1, "only the chosen dead letter is purged");
    let mut left: Vec<Text> = bus
        .dead_letters(&topic, &group, 100)
        .await
        .expect("list")
        .into_iter()
        .map(|dead| dead.message.id)
        .collect();
    left.sort();
    let mut expected = vec![ids[2].clone(), ids[3].clone()];
    expected.sort();
    assert_eq!(
        left, expected,
        "the dead letters neither redriven nor purged stay"
    );

    let purged = bus
        .purge_dead_letters(&topic, &group, RedriveSelection::All)
        .await
        .expect("purge all");
    assert_eq!(purged, 2);
    let left = bus.dead_letters(&topic, &group, 100).await.expect("list");
    assert!(
        left.is_empty(),
        "dead letters left after purging all: {left:?}"
    );
    let redriven = bus.redrive(&topic, &group).await.expect("redrive the rest");
    assert_eq!(redriven, 0, "purged dead letters cannot be redriven");
    let handled = ledger.distinct();
    assert_eq!(
        handled,
        std::iter::once(ids[0].clone()).collect(),
        "only the redriven message is handled"
    );
    let _ = sub.shutdown(GRACE).await;
}
