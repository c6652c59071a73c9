//! Churn: subscriptions of one group started and stopped often (autoscaling, deploys, crash
//! loops) never wedge the group, and never hide its messages for long.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use busbar_core::Text;
use busbar_core::{Context, Envelope, HandlerError, Subscription};
use tokio::time::Instant;

use super::{fast_retry, probe, unique, wait_for, wait_limit, Harness, Ledger, Probe};

const GRACE: Duration = Duration::from_secs(10);

/// Subscriptions started and stopped together in one storm.
const STORM_SIZE: usize = 8;

/// Storms in a row.
const STORMS: usize = 3;

/// How soon deliveries a stopped subscription held but never started must reach the next
/// subscription of the group: far below the visibility timeout (SQS, 10 s in the suite, 30 s
/// by default) or session timeout (Kafka) that would bring them back if they were not given
/// back.
pub const GIVE_BACK_LIMIT: Duration = Duration::from_secs(6);

/// `STORM_SIZE` subscriptions of one group, each on its own transport (service instances),
/// start together and stop together at staggered moments (some in the middle of joining the
/// group), several times over; then one more subscription receives everything published
/// afterwards. Nothing published during the storms is lost either.
pub async fn a_storm_of_starts_and_stops_does_not_wedge_the_group(h: Harness) {
    let mut instances = Vec::new();
    for _ in 0..STORM_SIZE {
        let Some(bus) = h.bus().await else { return };
        instances.push(bus);
    }
    let Some(publisher) = h.bus().await else {
        return;
    };
    let (topic, group) = (unique("storm"), unique("g"));
    let ledger = Ledger::default();
    let mut published = Vec::new();
    for storm in 0..STORMS {
        let started = futures::future::join_all(instances.iter().map(|bus| {
            bus.subscribe::<Probe>(&topic, &group)
                .start(ledger.handler())
        }))
        .await;
        let subs: Vec<Subscription> = started
            .into_iter()
            .collect::<busbar_core::Result<_>>()
            .expect("subscribe");
        let during = publisher
            .publish_batch(&topic, (0..5).map(|i| probe((storm * 100 + i) as u64, "")))
            .await
            .expect("publish during the storm");
        published.extend(during);
        // Stop them at moments spread over the first two seconds: some while the broker is
        // still forming the group.
        let stops = subs.into_iter().enumerate().map(|(i, sub)| async move {
            tokio::time::sleep(Duration::from_millis((i as u64 * 250) % 2000)).await;
            sub.shutdown(GRACE).await
        });
        for stopped in futures::future::join_all(stops).await {
            stopped.expect("shutdown");
        }
    }
    let Some(last) = h.bus().await else { return };
    let sub = last
        .subscribe::<Probe>(&topic, &group)
        .start(ledger.handler())
        .await
        .expect("subscribe after the storms");
    let after = publisher
        .publish_batch(&topic, (1000..1010).map(|i| probe(i, "")))
        .await
        .expect("publish after the storms");
    published.extend(after.iter().cloned());
    wait_for(
        "the subscription after the storms receives everything",
        || {
            let seen = ledger.distinct();
            published.iter().all(|id| seen.contains(id))
        },
    )
    .await;
    ledger.assert_nothing_lost(&published);
    let _ = sub.shutdown(GRACE).await;
}

/// A subscription shut down while holding deliveries it had not started gives them back, and
/// leaves no receive behind that could take what is published while and after it stops (an
/// SQS long poll still open at the broker would hide those for the visibility timeout): the
/// next subscription of the group receives all of them within [`GIVE_BACK_LIMIT`].
pub async fn unstarted_deliveries_come_back_promptly_after_shutdown(h: Harness) {
    let (Some(first_bus), Some(next_bus)) = (h.bus().await, h.bus().await) else {
        return;
    };
    let (topic, group) = (unique("giveback"), unique("g"));
    let ledger = Ledger::default();
    let started = Arc::new(AtomicUsize::new(0));
    // Room for more than is published: the consumer keeps asking the broker while it holds
    // deliveries it has not started.
    let first = first_bus
        .subscribe::<Probe>(&topic, &group)
        .concurrency(1)
        .max_in_flight(20)
        .start(ledger.slow_handler(&started, Duration::from_millis(300)))
        .await
        .expect("subscribe");
    let mut ids = first_bus
        .publish_batch(&topic, (0..5).map(|i| probe(i, "")))
        .await
        .expect("publish");
    wait_for("a handler running and deliveries waiting behind it", || {
        started.load(Ordering::SeqCst) >= 1 && first.stats().received >= 3
    })
    .await;
    // Publish all through the shutdown and a second past it.
    let publishing = {
        let (bus, topic) = (first_bus.clone(), topic.clone());
        tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut until: Option<Instant> = None;
            for seq in 100u64.. {
                if until.is_some_and(|until| Instant::now() >= until) {
                    break;
                }
                ids.push(bus.publish(&topic, probe(seq, "")).await.expect("publish"));
                tokio::time::sleep(Duration::from_millis(20)).await;
                if until.is_none() && seq >= 105 {
                    until = Some(Instant::now() + Duration::from_secs(1));
                }
            }
            ids
        })
    };
    let report = first.shutdown(GRACE).await.expect("shutdown");
    assert!(
        report.returned >= 1,
        "the scenario needs unstarted deliveries at shutdown: {report:?}"
    );
    ids.extend(publishing.await.expect("publisher"));
    let published = Instant::now();
    let next = next_bus
        .subscribe::<Probe>(&topic, &group)
        .start(ledger.handler())
        .await
        .expect("subscribe the next");
    wait_for("every message handled", || {
        let seen = ledger.distinct();
        ids.iter().all(|id| seen.contains(id))
    })
    .await;
    let took = published.elapsed();
    assert!(
        took < GIVE_BACK_LIMIT,
        "the next subscription got everything only after {took:?} (limit {GIVE_BACK_LIMIT:?}): \
         the stopped subscription held on to messages"
    );
    let _ = next.shutdown(GRACE).await;
}

/// Five subscriptions of one group in turn whose handler fails every message (a crash-looping
/// deploy), each stopped after some failures, then a healthy one with a smaller attempt limit:
/// every message ends handled or dead-lettered, none stuck.
pub async fn failing_subscriptions_in_turn_leave_nothing_stuck(h: Harness) {
    let Some(bus) = h.bus().await else { return };
    let caps = bus.capabilities();
    let (topic, group) = (unique("crashloop"), unique("g"));
    bus.declare(&topic, &group).await.expect("declare");
    let ids = bus
        .publish_batch(&topic, (0..20).map(|i| probe(i, "")))
        .await
        .expect("publish");
    let mut dead_lettered = 0;
    for _ in 0..5 {
        let Some(instance) = h.bus().await else {
            return;
        };
        // Many attempts: each instance fails some messages and stops long before they run out.
        let sub = instance
            .subscribe::<Probe>(&topic, &group)
            .retry(fast_retry(100))
            .start(|_env: Envelope<Probe>, _ctx: Context| async {
                Err::<(), _>(HandlerError::transient("the database is down"))
            })
            .await
            .expect("subscribe a failing instance");
        wait_for("the failing instance fails some attempts", || {
            sub.stats().failed_attempts >= 3
        })
        .await;
        dead_lettered += sub.stats().dead_lettered;
        let report = sub.shutdown(Duration::from_millis(50)).await;
        report.expect("shutdown");
    }
    let healthy = Ledger::default();
    let sub = bus
        .subscribe::<Probe>(&topic, &group)
        .retry(fast_retry(5))
        .start(healthy.handler())
        .await
        .expect("subscribe the healthy instance");
    if caps.redrive {
        let deadline = Instant::now() + wait_limit();
        loop {
            let dead = bus
                .dead_letters(&topic, &group, 100)
                .await
                .expect("list dead letters");
            let seen = healthy.distinct();
            let stuck: Vec<&Text> = ids
                .iter()
                .filter(|id| !seen.contains(*id) && !dead.iter().any(|d| &d.message.id == *id))
                .collect();
            if stuck.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "neither handled nor dead-lettered after {:?}: {stuck:?}",
                wait_limit()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    } else {
        wait_for("every message handled or dead-lettered", || {
            let done = healthy.distinct().len() as u64 + dead_lettered + sub.stats().dead_lettered;
            done >= ids.len() as u64
        })
        .await;
    }
    let _ = sub.shutdown(GRACE).await;
}
