//! Order and idempotency.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use busbar_core::Text;
use busbar_core::{Bus, Context, Envelope, MemoryIdempotencyStore};

use super::{claims, fast_retry, lock, probe, unique, wait_for, Harness, Probe};
use crate::faults::FaultyTransport;

const GRACE: Duration = Duration::from_secs(10);

/// Messages with the same key are handled in publish order, while different keys run
/// concurrently (concurrency 8).
pub async fn per_key_order_holds(h: Harness) {
    let Some(bus) = h.bus().await else { return };
    let caps = bus.capabilities();
    if !claims(&caps, caps.ordered_by_key, "ordered_by_key") {
        return;
    }
    let failed = keyed_run(&bus, 50, |_| false).await;
    assert!(failed.is_empty());
}

/// Per-key order survives retries: while a message waits for its retry, the later messages
/// of its key wait too (other keys keep flowing). Every fifth message fails its first attempt.
pub async fn per_key_order_holds_across_retries(h: Harness) {
    let Some(transport) = h.transport().await else {
        return;
    };
    let caps = transport.capabilities();
    if !claims(&caps, caps.ordered_across_retries, "ordered_across_retries") {
        return;
    }
    let bus = Bus::builder(transport).retry(fast_retry(5)).build();
    const PER_KEY: u64 = 15;
    let failed = keyed_run(&bus, PER_KEY, |seq| seq % 5 == 2).await;
    assert_eq!(
        failed.len() as u64,
        KEYS * PER_KEY.div_ceil(5),
        "the first attempts that should fail did not all run"
    );
}

const KEYS: u64 = 4;

/// Publishes `per_key` probes on each of 4 keys, interleaved, to a subscription with
/// concurrency 8 whose handler fails the first attempt of the probes `fail_first` picks;
/// checks each key's probes were handled in publish order, and returns the ids that failed.
async fn keyed_run(
    bus: &Bus,
    per_key: u64,
    fail_first: impl Fn(u64) -> bool + Send + Sync + 'static,
) -> std::collections::HashSet<Text> {
    let caps = bus.capabilities();
    let (topic, group) = (unique("order"), unique("g"));
    let order = Arc::new(Mutex::new(HashMap::<String, Vec<u64>>::new()));
    let failed_once = Arc::new(Mutex::new(std::collections::HashSet::<Text>::new()));
    let (keep, failed) = (Arc::clone(&order), Arc::clone(&failed_once));
    let fail_first = Arc::new(fail_first);
    let sub = bus
        .subscribe::<Probe>(&topic, &group)
        .concurrency(8)
        .start(move |env: Envelope<Probe>, _ctx: Context| {
            let (keep, failed, fail_first) = (
                Arc::clone(&keep),
                Arc::clone(&failed),
                Arc::clone(&fail_first),
            );
            async move {
                tokio::time::sleep(Duration::from_micros(fastrand::u64(0..2000))).await;
                if fail_first(env.payload.seq) && lock(&failed).insert(env.id.clone()) {
                    return Err(busbar_core::HandlerError::transient("first attempt fails"));
                }
                lock(&keep)
                    .entry(env.payload.key.clone())
                    .or_default()
                    .push(env.payload.seq);
                Ok(())
            }
        })
        .await
        .expect("subscribe");
    let events: Vec<Probe> = (0..per_key)
        .flat_map(|s| (0..KEYS).map(move |k| probe(s, &format!("key-{k}"))))
        .collect();
    for chunk in events.chunks(20) {
        bus.publish_batch(&topic, chunk.to_vec())
            .await
            .expect("publish");
    }
    wait_for("all handled", || {
        lock(&order).values().map(Vec::len).sum::<usize>() >= (KEYS * per_key) as usize
    })
    .await;
    let order = lock(&order).clone();
    for (key, seqs) in &order {
        let mut deduped = seqs.clone();
        if caps.may_duplicate {
            deduped.dedup();
        }
        assert_eq!(
            deduped,
            (0..per_key).collect::<Vec<_>>(),
            "order broken for {key}"
        );
    }
    let _ = sub.shutdown(GRACE).await;
    let failed = lock(&failed_once).clone();
    failed
}

/// With every message delivered twice, an idempotent handler's effect still happens once per
/// message, and the duplicates are seen and skipped.
pub async fn duplicates_do_not_repeat_an_idempotent_effect(h: Harness) {
    let Some(transport) = h.transport().await else {
        return;
    };
    let faulty = FaultyTransport::new(transport);
    let bus = Bus::builder(Arc::new(faulty.clone()))
        .retry(fast_retry(5))
        .build();
    let (topic, group) = (unique("dup"), unique("g"));
    faulty.faults().duplicate_every(&topic, &group, 1);
    let effects = Arc::new(Mutex::new(HashMap::<Text, u32>::new()));
    let keep = Arc::clone(&effects);
    let sub = bus
        .subscribe::<Probe>(&topic, &group)
        .concurrency(4)
        .idempotent(Arc::new(MemoryIdempotencyStore::new(10_000)))
        .start(move |env: Envelope<Probe>, _ctx: Context| {
            *lock(&keep).entry(env.id.clone()).or_default() += 1;
            async { Ok(()) }
        })
        .await
        .expect("subscribe");
    let ids = bus
        .publish_batch(&topic, (0..50).map(|i| probe(i, &format!("k{}", i % 7))))
        .await
        .expect("publish");
    wait_for("every message and its duplicate settled", || {
        let settled = faulty.faults().settled(&topic, &group);
        lock(&effects).len() == ids.len() && settled.acked >= 2 * ids.len() as u64
    })
    .await;
    let effects = lock(&effects).clone();
    let repeated: Vec<_> = effects.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "effects repeated: {repeated:?}");
    assert!(
        ids.iter().all(|id| effects.contains_key(id)),
        "an effect never happened"
    );
    assert!(
        sub.stats().duplicates_skipped >= ids.len() as u64,
        "duplicates were not delivered: {:?}",
        sub.stats()
    );
    let _ = sub.shutdown(GRACE).await;
}
