//! Two consumers of one group split a 4-partition topic; one is dropped mid-stream (as a
//! crashed instance would be) and the other takes over its partitions: nothing is lost.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use busbar_core::{Bus, Context, Envelope};
use busbar_kafka::KafkaTransport;
use busbar_testkit::conformance::{brokers_required, probe, unique, wait_for, Probe};

fn url() -> String {
    std::env::var("BUSBAR_KAFKA_URL")
        .unwrap_or_else(|_| "kafka://127.0.0.1:9092?session_timeout_ms=6000&partitions=4".into())
}

async fn bus() -> Option<Bus> {
    match KafkaTransport::connect(&url().parse().unwrap()).await {
        Ok(t) => Some(Bus::new(t)),
        Err(e) if !brokers_required() => {
            eprintln!("SKIPPED: {e}");
            None
        }
        Err(e) => panic!("Kafka unreachable: {e}"),
    }
}

type Seen = Arc<Mutex<Vec<busbar_core::Text>>>;

fn handler(
    seen: &Seen,
) -> impl Fn(
    Envelope<Probe>,
    Context,
) -> futures::future::BoxFuture<'static, Result<(), busbar_core::HandlerError>>
       + Send
       + Sync
       + 'static {
    let seen = Arc::clone(seen);
    move |e, _ctx| {
        let seen = Arc::clone(&seen);
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(2)).await;
            seen.lock().unwrap().push(e.id);
            Ok(())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_survivor_takes_over_a_dropped_consumers_partitions_with_nothing_lost() {
    let (Some(a), Some(b)) = (bus().await, bus().await) else {
        return;
    };
    let (topic, group) = (unique("takeover"), unique("g"));
    let (seen_a, seen_b): (Seen, Seen) = (Arc::default(), Arc::default());
    let sub_a = a
        .subscribe::<Probe>(&topic, &group)
        .concurrency(4)
        .start(handler(&seen_a))
        .await
        .unwrap();
    let sub_b = b
        .subscribe::<Probe>(&topic, &group)
        .concurrency(4)
        .start(handler(&seen_b))
        .await
        .unwrap();

    // Publish in the background for the whole test, across 40 keys (so all partitions get work).
    let publisher = {
        let (bus, topic) = (a.clone(), topic.clone());
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for round in 0..60u64 {
                let batch: Vec<Probe> = (0..20)
                    .map(|i| probe(round * 20 + i, &format!("k{}", (round * 20 + i) % 40)))
                    .collect();
                ids.extend(bus.publish_batch(&topic, batch).await.unwrap());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            ids
        })
    };
    wait_for("both consumers got partitions and work", || {
        !seen_a.lock().unwrap().is_empty() && !seen_b.lock().unwrap().is_empty()
    })
    .await;
    // Consumer A dies mid-stream: its subscription is dropped, in-flight handlers abandoned.
    drop(sub_a);
    let handled_by_a = seen_a.lock().unwrap().len();

    let published: Vec<busbar_core::Text> = publisher.await.unwrap();
    wait_for("every published message handled by someone", || {
        let all: HashSet<busbar_core::Text> = seen_a
            .lock()
            .unwrap()
            .iter()
            .chain(seen_b.lock().unwrap().iter())
            .cloned()
            .collect();
        published.iter().all(|id| all.contains(id))
    })
    .await;
    let (a_ids, b_ids) = (
        seen_a.lock().unwrap().clone(),
        seen_b.lock().unwrap().clone(),
    );
    let after_drop = seen_a.lock().unwrap().len() - handled_by_a;
    let b_distinct: HashSet<&busbar_core::Text> = b_ids.iter().collect();
    let duplicates = a_ids.len() + b_ids.len()
        - a_ids
            .iter()
            .chain(b_ids.iter())
            .collect::<HashSet<_>>()
            .len();
    println!(
        "published {} | consumer A handled {} before it was dropped | B handled {} ({} distinct) | duplicates {duplicates}",
        published.len(),
        handled_by_a,
        b_ids.len(),
        b_distinct.len()
    );
    assert!(
        after_drop <= 4,
        "the dropped consumer kept handling ({after_drop} more)"
    );
    assert!(
        b_distinct.len() > published.len() / 2,
        "B never took over A's partitions"
    );
    sub_b.shutdown(Duration::from_secs(10)).await.unwrap();
}
