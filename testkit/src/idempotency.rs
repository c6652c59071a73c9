//! Scenarios every shared [`IdempotencyStore`] must pass, on the memory transport.
//!
//! A store crate runs them against its real server. The handler's effect is recorded by an
//! [`EffectLog`] the store crate provides (rows in a table), so "applied exactly once" is
//! checked where the effect really lands.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use busbar_core::idempotency::{Claim, IdempotencyStore};
use busbar_core::{Bus, Context, Envelope, ErrorKind, HandlerError, MemoryTransport, Result};
use tokio::time::Instant;

use crate::conformance::{fast_retry, probe, unique, wait_for, Probe};
use crate::faults::FaultyTransport;

/// Where a test handler's effect lands: one record per application.
#[async_trait]
pub trait EffectLog: Send + Sync + 'static {
    /// Records one application of the effect for message `id`.
    async fn apply(&self, id: &str) -> Result<()>;
    /// How many times the effect was applied, per message id.
    async fn counts(&self) -> Result<HashMap<String, usize>>;
}

fn acquired(claim: Claim) -> busbar_core::idempotency::Lease {
    match claim {
        Claim::Acquired(lease) => lease,
        other => panic!("expected to acquire the claim, got {other:?}"),
    }
}

/// Claims are exclusive leases: busy while held, done after completion, free after release or
/// expiry; an expired holder can no longer complete; scopes are separate.
pub async fn claims_are_exclusive_leases(store: Arc<dyn IdempotencyStore>) {
    let (scope, key) = (unique("scope"), unique("key"));
    let lease = Duration::from_millis(600);
    let first = acquired(store.claim(&scope, &key, lease).await.unwrap());
    match store.claim(&scope, &key, lease).await.unwrap() {
        Claim::Busy { retry_after } => assert!(retry_after <= lease, "{retry_after:?}"),
        other => panic!("a held key must be busy, got {other:?}"),
    }
    // Another scope (group) is independent.
    acquired(store.claim(&unique("other"), &key, lease).await.unwrap());
    // Released: free again.
    store.release(&scope, &key, &first).await.unwrap();
    let second = acquired(store.claim(&scope, &key, lease).await.unwrap());
    // Expired: a new holder takes it, and the old one cannot complete.
    let started = Instant::now();
    wait_for("the lease expires", || {
        started.elapsed() > lease + Duration::from_millis(100)
    })
    .await;
    let third = acquired(store.claim(&scope, &key, lease).await.unwrap());
    let err = store
        .complete(&scope, &key, &second, Duration::from_secs(60))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Store, "{err}");
    store.release(&scope, &key, &second).await.unwrap(); // a no-op for a lost lease
    store
        .complete(&scope, &key, &third, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(store.claim(&scope, &key, lease).await.unwrap(), Claim::Done);
    // Done marks expire after their retention.
    let short = unique("short");
    let lease4 = acquired(store.claim(&scope, &short, lease).await.unwrap());
    store
        .complete(&scope, &short, &lease4, Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(
        store.claim(&scope, &short, lease).await.unwrap(),
        Claim::Done
    );
    let started = Instant::now();
    wait_for("the done mark expires", || {
        started.elapsed() > Duration::from_millis(400)
    })
    .await;
    acquired(store.claim(&scope, &short, lease).await.unwrap());
}

/// Two service instances consume one group, each with its own handle on the shared store, and
/// duplicates arrive both within an instance and across them: every message's effect is
/// applied exactly once.
pub async fn two_instances_apply_each_effect_once(
    stores: [Arc<dyn IdempotencyStore>; 2],
    effects: Arc<dyn EffectLog>,
) {
    let broker = MemoryTransport::new();
    let (topic, group) = (unique("orders"), unique("billing"));
    let mut instances = Vec::new();
    for store in stores {
        let faulty = FaultyTransport::new(Arc::new(broker.connection()));
        faulty.faults().duplicate_every(&topic, &group, 3);
        let bus = Bus::builder(Arc::new(faulty.clone()))
            .retry(fast_retry(10))
            .build();
        let effects = Arc::clone(&effects);
        let sub = bus
            .subscribe::<Probe>(&topic, &group)
            .concurrency(4)
            .idempotent(store)
            .start(move |e: Envelope<Probe>, _c: Context| {
                let effects = Arc::clone(&effects);
                async move {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    effects.apply(&e.id).await.map_err(HandlerError::transient)
                }
            })
            .await
            .unwrap();
        instances.push((bus, faulty, sub));
    }
    let publisher = &instances[0].0;
    let mut ids = Vec::new();
    for i in 0..60 {
        let envelope = publisher.envelope(probe(i, ""));
        publisher.publish_envelope(&topic, &envelope).await.unwrap();
        if i % 4 == 0 {
            // A producer retry: the same message twice, which either instance may receive.
            publisher.publish_envelope(&topic, &envelope).await.unwrap();
        }
        ids.push(envelope.id);
    }
    wait_for("every delivery settled", || {
        broker.pending(&topic, &group) == 0
            && instances
                .iter()
                .all(|(_, f, _)| f.faults().outstanding() == 0)
    })
    .await;
    let counts = effects.counts().await.unwrap();
    for id in &ids {
        assert_eq!(
            counts.get(id.as_str()).copied().unwrap_or(0),
            1,
            "effect of {id} applied {:?} times",
            counts.get(id.as_str())
        );
    }
    let skipped: u64 = instances
        .iter()
        .map(|(_, _, s)| s.stats().duplicates_skipped)
        .sum();
    let worked: Vec<u64> = instances
        .iter()
        .map(|(_, _, s)| s.stats().handled)
        .collect();
    assert!(
        skipped > 0,
        "no duplicate reached a handler: the scenario tested nothing"
    );
    assert!(
        worked.iter().all(|&n| n > 0),
        "one instance did all the work: {worked:?}"
    );
    for (_, _, sub) in instances {
        sub.shutdown(Duration::from_secs(5)).await.unwrap();
    }
}

/// An instance dies while holding a claim (mid-handler, without releasing it): its lease
/// expires and the other instance handles the message, once.
pub async fn a_dead_holders_lease_expires_and_another_instance_takes_over(
    stores: [Arc<dyn IdempotencyStore>; 2],
    effects: Arc<dyn EffectLog>,
) {
    let broker = MemoryTransport::new();
    let (topic, group) = (unique("orders"), unique("billing"));
    let lease = Duration::from_secs(1);
    let [doomed_store, survivor_store] = stores;
    let doomed_bus = Bus::builder(Arc::new(broker.connection()))
        .retry(fast_retry(20))
        .build();
    let started = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&started);
    let doomed = doomed_bus
        .subscribe::<Probe>(&topic, &group)
        .idempotent(doomed_store)
        .lease(lease)
        .start(move |_e: Envelope<Probe>, _c: Context| {
            flag.store(true, Ordering::SeqCst);
            async {
                std::future::pending::<()>().await;
                Ok(())
            }
        })
        .await
        .unwrap();
    let id = doomed_bus.publish(&topic, probe(1, "")).await.unwrap();
    wait_for("the doomed handler holds the claim", || {
        started.load(Ordering::SeqCst)
    })
    .await;
    let claimed_at = Instant::now();
    drop(doomed); // the instance dies: no release, the message goes back to the group

    let survivor_bus = Bus::builder(Arc::new(broker.connection()))
        .retry(fast_retry(20))
        .build();
    let handled_at = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let (at, log) = (Arc::clone(&handled_at), Arc::clone(&effects));
    let survivor = survivor_bus
        .subscribe::<Probe>(&topic, &group)
        .idempotent(survivor_store)
        .lease(lease)
        .start(move |e: Envelope<Probe>, _c: Context| {
            let (at, log) = (Arc::clone(&at), Arc::clone(&log));
            async move {
                log.apply(&e.id).await.map_err(HandlerError::transient)?;
                *at.lock().unwrap() = Some(Instant::now());
                Ok(())
            }
        })
        .await
        .unwrap();
    wait_for("the survivor handled it", || {
        handled_at.lock().unwrap().is_some()
    })
    .await;
    let waited = handled_at.lock().unwrap().unwrap() - claimed_at;
    assert!(
        waited >= lease.mul_f64(0.9),
        "handled after {waited:?}, before the dead holder's {lease:?} lease expired"
    );
    wait_for("the survivor acked it", || survivor.stats().handled == 1).await;
    let counts = effects.counts().await.unwrap();
    assert_eq!(counts.get(id.as_str()).copied(), Some(1));
    survivor.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// Measures claim + complete throughput of `store`: `n` fresh keys spread over `workers`
/// concurrent tasks. Returns the elapsed time (for benchmarks, never for assertions).
pub async fn claim_complete_throughput(
    store: Arc<dyn IdempotencyStore>,
    n: usize,
    workers: usize,
) -> Duration {
    let scope = unique("bench");
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..workers.max(1) {
        let (store, scope) = (Arc::clone(&store), scope.clone());
        tasks.push(tokio::spawn(async move {
            for i in (w..n).step_by(workers.max(1)) {
                let key = format!("k{i}");
                let lease = acquired(
                    store
                        .claim(&scope, &key, Duration::from_secs(30))
                        .await
                        .unwrap(),
                );
                store
                    .complete(&scope, &key, &lease, Duration::from_secs(60))
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    start.elapsed()
}
