//! How fast a subscription with the default settings catches up with a backlog: N records
//! of 1 KiB are published first, then one subscription drains them with a no-op handler. Keyed
//! (64 keys, so per-key order holds records back behind their key) against unkeyed.
//!
//! `cargo bench -p busbar-kafka --bench kafka_backlog` (Kafka on 127.0.0.1:9092, or
//! `BUSBAR_KAFKA_URL`; `BUSBAR_BENCH_MESSAGES`, default 20,000).

use std::sync::Arc;
use std::time::{Duration, Instant};

use busbar_core::{Bus, Context, Envelope, Event, HandlerError};
use busbar_kafka::KafkaTransport;
use serde::{Deserialize, Serialize};

const BATCH: usize = 100;

#[derive(Clone, Serialize, Deserialize)]
struct Blob {
    key: String,
    data: String,
}

impl Event for Blob {
    const TYPE: &'static str = "bench.backlog.v1";
    fn key(&self) -> Option<String> {
        (!self.key.is_empty()).then(|| self.key.clone())
    }
}

async fn drain(bus: &Bus, run: &str, keyed: bool, n: usize) -> f64 {
    let topic = format!(
        "bb-backlog-{run}-{}",
        if keyed { "keyed" } else { "unkeyed" }
    );
    let group = format!("{topic}-g");
    bus.declare(&topic, &group).await.expect("declare");
    for b in 0..n / BATCH {
        let batch: Vec<Blob> = (0..BATCH)
            .map(|i| Blob {
                key: if keyed {
                    format!("k{}", (b * BATCH + i) % 64)
                } else {
                    String::new()
                },
                data: "x".repeat(1000),
            })
            .collect();
        bus.publish_batch(&topic, batch).await.expect("publish");
    }
    let handled = Arc::new(tokio::sync::Semaphore::new(0));
    let done = Arc::clone(&handled);
    let started = Instant::now();
    let sub = bus
        .subscribe::<Blob>(&topic, &group)
        .start(move |_e: Envelope<Blob>, _c: Context| {
            done.add_permits(1);
            async { Ok::<_, HandlerError>(()) }
        })
        .await
        .expect("subscribe");
    // The first record also waits for the group join (about 3 s on Tansu): timed from then.
    let _first = handled.acquire().await.expect("first");
    let first = Instant::now();
    let _rest = handled.acquire_many(n as u32 - 1).await.expect("drain");
    let rate = (n - 1) as f64 / first.elapsed().as_secs_f64();
    println!(
        "{:<8}: {n} records, joined after {:?}, then drained at {rate:>8.0} msg/s",
        if keyed { "keyed" } else { "unkeyed" },
        first - started
    );
    sub.shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
    rate
}

fn main() {
    let n: usize = std::env::var("BUSBAR_BENCH_MESSAGES")
        .ok()
        .and_then(|n| n.parse().ok())
        .map_or(20_000, |n: usize| n.max(BATCH) / BATCH * BATCH);
    let url = std::env::var("BUSBAR_KAFKA_URL")
        .unwrap_or_else(|_| "kafka://127.0.0.1:9092?session_timeout_ms=6000".into());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let transport = KafkaTransport::connect(&url.parse().expect("url"))
            .await
            .expect("connect");
        let bus = Bus::new(transport);
        let run = format!("{:x}", std::process::id());
        let unkeyed = drain(&bus, &run, false, n).await;
        let keyed = drain(&bus, &run, true, n).await;
        println!("keyed / unkeyed: {:.2}", keyed / unkeyed);
    });
}
