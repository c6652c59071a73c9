//! How fast a subscription with the default settings catches up with a backlog: N records
//! of 1 KiB are published first, then one subscription drains them with a no-op handler. Keyed
//! (64 keys, so per-key order holds records back behind their key) against unkeyed, and both
//! against a hand-rolled rdkafka consumer draining the same records in a group of its own
//! (reads the id and type headers, parses the JSON, commits every 1,000 records).
//!
//! `cargo bench -p busbar-kafka --bench kafka_backlog` (Kafka on 127.0.0.1:9092, or
//! `BUSBAR_KAFKA_URL`; `BUSBAR_BENCH_MESSAGES`, default 20,000; `BUSBAR_BENCH_ROUNDS`,
//! default 5: the broker shares the machine and its speed drifts, so each figure is the
//! median of the rounds, and who drains first alternates; `BUSBAR_BENCH_ONLY=busbar` or `raw`
//! drains with that client alone, e.g. under a profiler; `BUSBAR_BENCH_KEYED=keyed` or
//! `unkeyed` runs that backlog alone).

mod common;
#[path = "../../../benches/common/stage.rs"]
#[allow(dead_code)] // The timed stages are the broker benches'.
mod stage;

use std::sync::Arc;
use std::time::{Duration, Instant};

use busbar_core::{Bus, Context, Envelope, Event, HandlerError, Text};
use busbar_kafka::KafkaTransport;
use futures::StreamExt;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};

use common::hand_rolled_read;
use stage::{cpu, env, median};

const BATCH: usize = 100;

#[derive(Clone, Serialize, Deserialize)]
struct Blob {
    key: String,
    data: String,
}

impl Event for Blob {
    const TYPE: &'static str = "bench.backlog.v1";
    fn key(&self) -> Option<Text> {
        (!self.key.is_empty()).then(|| self.key.as_str().into())
    }
}

fn label(keyed: bool) -> &'static str {
    if keyed {
        "keyed"
    } else {
        "unkeyed"
    }
}

/// Publishes the backlog to a fresh topic, declared for busbar's group; returns the topic.
async fn backlog(bus: &Bus, run: &str, keyed: bool, n: usize) -> String {
    let topic = format!("bb-backlog-{run}-{}", label(keyed));
    bus.declare(&topic, &format!("{topic}-g"))
        .await
        .expect("declare");
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
    topic
}

/// How fast a client drained the backlog, after its first record (which waits for the group
/// join): messages per second, and the process's CPU µs per message meanwhile (less disturbed
/// than the rate by the broker sharing the machine; the broker's own CPU is not in it).
struct Drain {
    rate: f64,
    cpu_us: f64,
}

impl Drain {
    /// The drain of `n` records whose first came at `first` (and the CPU clock read then).
    fn since(first: Option<(Instant, Duration)>, n: usize) -> Drain {
        let (at, cpu_at) = first.unwrap_or_else(|| (Instant::now(), cpu()));
        Drain {
            rate: (n - 1) as f64 / at.elapsed().as_secs_f64(),
            cpu_us: (cpu() - cpu_at).as_secs_f64() * 1e6 / (n - 1) as f64,
        }
    }
}

/// A hand-rolled rdkafka consumer drains the topic in a group of its own.
async fn raw_drain(brokers: &str, topic: &str, n: usize) -> Drain {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{topic}-raw"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut stream = consumer.stream();
    let mut first = None;
    for received in 1..=n {
        let record = stream.next().await.expect("stream").expect("record");
        first.get_or_insert_with(|| (Instant::now(), cpu()));
        std::hint::black_box(hand_rolled_read::<Blob>(&record));
        if received % 1000 == 0 {
            consumer
                .commit_message(&record, CommitMode::Async)
                .expect("commit");
        }
    }
    Drain::since(first, n)
}

/// A busbar subscription with the default settings drains the topic.
async fn busbar_drain(bus: &Bus, topic: &str, n: usize) -> Drain {
    let handled = Arc::new(tokio::sync::Semaphore::new(0));
    let done = Arc::clone(&handled);
    let mut subscription = bus.subscribe::<Blob>(topic, &format!("{topic}-g"));
    if let Some(n) = std::env::var("BUSBAR_BENCH_CONCURRENCY")
        .ok()
        .and_then(|n| n.parse().ok())
    {
        subscription = subscription.concurrency(n);
    }
    let sub = subscription
        .start(move |_e: Envelope<Blob>, _c: Context| {
            done.add_permits(1);
            async { Ok::<_, HandlerError>(()) }
        })
        .await
        .expect("subscribe");
    let _first = handled.acquire().await.expect("first");
    let first = (Instant::now(), cpu());
    let _rest = handled.acquire_many(n as u32 - 1).await.expect("drain");
    let drain = Drain::since(Some(first), n);
    sub.shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
    drain
}

fn main() {
    let n = env("BUSBAR_BENCH_MESSAGES", 20_000).max(BATCH) / BATCH * BATCH;
    let url = std::env::var("BUSBAR_KAFKA_URL")
        .unwrap_or_else(|_| "kafka://127.0.0.1:9092?session_timeout_ms=6000".into());
    let brokers = url
        .strip_prefix("kafka://")
        .and_then(|rest| rest.split(['?', '/']).next())
        .unwrap_or("127.0.0.1:9092")
        .to_string();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let transport = KafkaTransport::connect(&url.parse().expect("url"))
            .await
            .expect("connect");
        let bus = Bus::new(transport);
        let rounds = env("BUSBAR_BENCH_ROUNDS", 5);
        let only = std::env::var("BUSBAR_BENCH_ONLY").ok();
        println!("| backlog of {n} x 1 KiB, median of {rounds} | busbar | hand-rolled rdkafka | busbar/raw rate | busbar/raw CPU |");
        println!("|---|---|---|---|---|");
        let keyed_only = std::env::var("BUSBAR_BENCH_KEYED").ok();
        for keyed in [false, true] {
            if keyed_only.as_deref().is_some_and(|only| only != label(keyed)) {
                continue;
            }
            let (mut busbar, mut raw) = (Vec::new(), Vec::new());
            for round in 0..rounds {
                let run = format!("{:x}-{round}", std::process::id());
                let topic = backlog(&bus, &run, keyed, n).await;
                let (first, second) = if round % 2 == 0 { ("raw", "busbar") } else { ("busbar", "raw") };
                for client in [first, second] {
                    if only.as_deref().is_some_and(|only| !only.contains(client)) {
                        continue;
                    }
                    if client == "raw" {
                        raw.push(raw_drain(&brokers, &topic, n).await);
                    } else {
                        busbar.push(busbar_drain(&bus, &topic, n).await);
                    }
                }
            }
            let rate = |drains: &[Drain]| median(drains.iter().map(|d| d.rate).collect());
            let cpu_us = |drains: &[Drain]| median(drains.iter().map(|d| d.cpu_us).collect());
            let (busbar_cpu, raw_cpu) = (cpu_us(&busbar), cpu_us(&raw));
            let (busbar, raw) = (rate(&busbar), rate(&raw));
            println!(
                "| {} | {busbar:.0} msg/s, {busbar_cpu:.2} µs CPU | {raw:.0} msg/s, {raw_cpu:.2} µs CPU | {:.2} | {:.2} |",
                if keyed { "keyed (64 keys)" } else { "unkeyed" },
                busbar / raw,
                busbar_cpu / raw_cpu,
            );
        }
    });
}
