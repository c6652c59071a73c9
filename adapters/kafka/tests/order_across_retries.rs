//! Per-key order survives retries on Kafka: while a message waits for its retry, later
//! messages of its key wait too (other keys keep flowing).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use busbar_core::{Bus, Context, Envelope, HandlerError, RetryPolicy};
use busbar_kafka::KafkaTransport;
use busbar_testkit::conformance::{brokers_required, probe, unique, wait_for, Probe};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_message_keeps_its_place_in_its_keys_order() {
    let url = std::env::var("BUSBAR_KAFKA_URL")
        .unwrap_or_else(|_| "kafka://127.0.0.1:9092?session_timeout_ms=6000".into());
    let transport = match KafkaTransport::connect(&url.parse().unwrap()).await {
        Ok(t) => t,
        Err(e) if !brokers_required() => return eprintln!("SKIPPED: {e}"),
        Err(e) => panic!("Kafka unreachable: {e}"),
    };
    let bus = Bus::builder(Arc::new(transport))
        .retry(
            RetryPolicy::exponential(5)
                .with_initial_backoff(Duration::from_millis(50))
                .with_jitter(0.0),
        )
        .build();
    let (topic, group) = (unique("order-retry"), unique("g"));
    let order = Arc::new(Mutex::new(HashMap::<String, Vec<u64>>::new()));
    let failed_once = Arc::new(Mutex::new(HashSet::<String>::new()));
    let (o, f) = (Arc::clone(&order), Arc::clone(&failed_once));
    let sub = bus
        .subscribe::<Probe>(&topic, &group)
        .concurrency(8)
        .start(move |e: Envelope<Probe>, _c: Context| {
            let (o, f) = (Arc::clone(&o), Arc::clone(&f));
            async move {
                if e.payload.seq % 5 == 2 && f.lock().unwrap().insert(e.id.clone()) {
                    return Err(HandlerError::transient("first attempt fails"));
                }
                o.lock()
                    .unwrap()
                    .entry(e.payload.key.clone())
                    .or_default()
                    .push(e.payload.seq);
                Ok(())
            }
        })
        .await
        .unwrap();
    const KEYS: u64 = 4;
    const PER_KEY: u64 = 25;
    let events: Vec<Probe> = (0..PER_KEY)
        .flat_map(|s| (0..KEYS).map(move |k| probe(s, &format!("key-{k}"))))
        .collect();
    bus.publish_batch(&topic, events).await.unwrap();
    wait_for("all handled", || {
        order.lock().unwrap().values().map(Vec::len).sum::<usize>() >= (KEYS * PER_KEY) as usize
    })
    .await;
    let order = order.lock().unwrap().clone();
    for (key, seqs) in &order {
        let mut seqs = seqs.clone();
        seqs.dedup(); // Kafka may redeliver after a rebalance
        assert_eq!(
            seqs,
            (0..PER_KEY).collect::<Vec<_>>(),
            "order broken for {key}"
        );
    }
    assert!(!failed_once.lock().unwrap().is_empty());
    sub.shutdown(Duration::from_secs(10)).await.unwrap();
}
