//! busbar on Kafka against raw rdkafka (FutureProducer / StreamConsumer), same broker, same
//! settings: 1 KiB records, acks=all + idempotence, batches of 100 awaited together, 4
//! partitions, consumers with manual offset commits.
//!
//! The raw client runs three times: **bare** writes a 1 KiB value only and its consumer only
//! reads; **raw** also writes the same CloudEvents headers busbar writes; **hand-rolled** does
//! what a service written on rdkafka does with its events: serializes the same event to JSON
//! with those headers, and its consumer reads the id and type headers and parses the JSON. The
//! four take turns over several rounds (the broker's speed drifts), and each reports its median.
//!
//! `cargo bench -p busbar-kafka --bench kafka_vs_rdkafka` (Kafka on 127.0.0.1:9092, or
//! `BUSBAR_KAFKA_URL` with a kafka:// URL; `BUSBAR_BENCH_ROUNDS`, default 5;
//! `BUSBAR_BENCH_ONLY=busbar,hand-rolled` runs only those clients (of `bare`, `raw`,
//! `hand-rolled`, `busbar`), e.g. one alone under a profiler; `BUSBAR_BENCH_MESSAGES`,
//! default 50,000, per timed run: long enough that the last fetch, 2-240 ms, weighs little;
//! `BUSBAR_BENCH_PUBLISHERS`, default 1: concurrent publishers, 8 for the throughput-bound
//! regime; `BUSBAR_BENCH_BYTES`, default 1,024: each record's value, e.g. 100 or 65536;
//! `BUSBAR_BENCH_CONCURRENCY`, default 16: busbar's handlers at once, e.g. 1, 8 or 64).
//! Prints the median rates and the process's CPU time per message (user + system, all
//! threads; the broker runs in its own process).

mod common;
#[path = "../../../benches/common/stage.rs"]
mod stage;

use std::sync::Arc;
use std::time::Duration;

use busbar_core::{Bus, Context, Envelope, Event, HandlerError, Text};
use busbar_kafka::KafkaTransport;
use futures::StreamExt;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};
use serde::{Deserialize, Serialize};

use common::hand_rolled_read;
use stage::{env, median, Stage};

/// Messages per timed run: `BUSBAR_BENCH_MESSAGES`, default 50,000 (a multiple of [`BATCH`]).
fn n() -> usize {
    env("BUSBAR_BENCH_MESSAGES", 50_000).max(BATCH) / BATCH * BATCH
}
const BATCH: usize = 100;

/// The size of each record's value: `BUSBAR_BENCH_BYTES`, default 1 KiB.
fn bytes() -> usize {
    env("BUSBAR_BENCH_BYTES", 1024)
}

/// Concurrent publishers, each with one batch in flight: `BUSBAR_BENCH_PUBLISHERS`, default 1
/// (latency-bound); 8 makes publishing throughput-bound.
fn publishers() -> usize {
    env("BUSBAR_BENCH_PUBLISHERS", 1).clamp(1, n() / BATCH)
}

/// The batch numbers publisher `p` of [`publishers`] sends.
fn batches_of(p: usize) -> impl Iterator<Item = usize> {
    (0..n() / BATCH).filter(move |b| b % publishers() == p)
}

#[derive(Clone, Serialize, Deserialize)]
struct Blob {
    key: String,
    data: String,
}
impl Event for Blob {
    const TYPE: &'static str = "bench.blob.v1";
    fn key(&self) -> Option<Text> {
        Some(self.key.as_str().into())
    }
}

fn brokers() -> String {
    std::env::var("BUSBAR_KAFKA_URL")
        .ok()
        .and_then(|u| {
            u.strip_prefix("kafka://")
                .map(|s| s.split('?').next().unwrap_or_default().to_string())
        })
        .unwrap_or_else(|| "127.0.0.1:9092".into())
}

/// Headers like the ones busbar writes for one event (CloudEvents Kafka binding).
fn cloudevents_headers(i: usize) -> rdkafka::message::OwnedHeaders {
    use rdkafka::message::{Header, OwnedHeaders};
    let id = format!("0193a5c2-7b1e-7c3d-9f00-{i:012x}");
    let trace = format!("00-{:032x}-{:016x}-01", i + 1, i + 1);
    [
        ("ce_specversion", "1.0"),
        ("ce_id", id.as_str()),
        ("ce_source", "/bench"),
        ("ce_type", "bench.blob.v1"),
        ("ce_time", "2026-11-22T10:00:00.000000Z"),
        ("content-type", "application/json"),
        ("ce_correlationid", id.as_str()),
        ("ce_traceparent", trace.as_str()),
    ]
    .into_iter()
    .fold(OwnedHeaders::new_with_capacity(8), |h, (key, value)| {
        h.insert(Header {
            key,
            value: Some(value),
        })
    })
}

/// What a raw client does besides sending and reading records.
#[derive(Clone, Copy, PartialEq)]
enum Raw {
    /// A value of [`bytes`], nothing else.
    Bare,
    /// The value and busbar's CloudEvents headers.
    Headers,
    /// The event as JSON with those headers; the consumer reads the id and type and parses it.
    HandRolled,
}

async fn raw(run: &str, mode: Raw) -> (Stage, Stage) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    let topic = format!("raw-bench-{run}");
    let payload = vec![b'x'; bytes()];
    let (producer_ref, topic_ref, payload_ref) = (&producer, &topic, &payload);
    let publish_some = move |p: usize| async move {
        for b in batches_of(p) {
            let mut pending = Vec::with_capacity(BATCH);
            for i in 0..BATCH {
                let key = format!("k{}", (b * BATCH + i) % 64);
                let json;
                let value = if mode == Raw::HandRolled {
                    json = serde_json::to_vec(&blob(b * BATCH + i)).expect("json");
                    &json
                } else {
                    payload_ref
                };
                let mut record = FutureRecord::to(topic_ref).payload(value).key(&key);
                if mode != Raw::Bare {
                    record = record.headers(cloudevents_headers(b * BATCH + i));
                }
                pending.push(
                    producer_ref
                        .send_result(record)
                        .map_err(|(e, _)| e)
                        .expect("queue"),
                );
            }
            for r in futures::future::join_all(pending).await {
                r.expect("canceled").expect("delivered");
            }
        }
    };
    let publish_all = || futures::future::join_all((0..publishers()).map(publish_some));
    // Warm-up (topic creation, connections), not timed; its records are consumed below.
    let warm = FutureRecord::to(&topic).payload(&payload).key("k0");
    producer
        .send(warm, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| e)
        .expect("warm-up");
    let (publish, _) = Stage::of(n(), publish_all()).await;

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", format!("raw-bench-{run}"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()
        .expect("consumer");
    consumer.subscribe(&[&topic]).expect("subscribe");
    // Drain the first n() (joins the group), then time n() published while consuming.
    let mut stream = consumer.stream();
    for _ in 0..n() + 1 {
        stream.next().await.expect("stream").expect("record");
    }
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let consuming = async {
        let mut received = 0;
        while received < n() {
            let record = stream.next().await.expect("stream").expect("record");
            if mode == Raw::HandRolled {
                std::hint::black_box(hand_rolled_read::<Blob>(&record));
            } else {
                std::hint::black_box(record.payload());
            }
            received += 1;
            if received % 1000 == 0 {
                consumer
                    .commit_message(&record, CommitMode::Async)
                    .expect("commit");
            }
        }
        let _ = done_tx.send(());
    };
    let (end_to_end, ()) = Stage::of(n(), async {
        let (_, _published) = tokio::join!(consuming, publish_all());
        done_rx.await.expect("done");
    })
    .await;
    (publish, end_to_end)
}

/// The event both busbar and the hand-rolled client send: [`bytes`] of JSON.
fn blob(i: usize) -> Blob {
    Blob {
        key: format!("k{}", i % 64),
        data: "x".repeat(bytes().saturating_sub(20)),
    }
}

async fn busbar(run: &str) -> (Stage, Stage) {
    let transport = KafkaTransport::connect(
        &format!("kafka://{}?session_timeout_ms=6000", brokers())
            .parse()
            .expect("url"),
    )
    .await
    .expect("connect");
    let bus = Bus::new(transport);
    let topic = format!("bb-bench-{run}");
    let publish_all = || {
        futures::future::join_all((0..publishers()).map(|p| {
            let (bus, topic) = (bus.clone(), topic.clone());
            async move {
                for b in batches_of(p) {
                    let batch: Vec<Blob> = (0..BATCH).map(|i| blob(b * BATCH + i)).collect();
                    bus.publish_batch(&topic, batch).await.expect("publish");
                }
            }
        }))
    };
    // Warm-up (topic creation, connections), not timed; consumed below.
    bus.publish(&topic, blob(0)).await.expect("warm-up");
    let (publish, _) = Stage::of(n(), publish_all()).await;

    let handled = Arc::new(tokio::sync::Semaphore::new(0));
    let done = Arc::clone(&handled);
    let sub = bus
        .subscribe::<Blob>(&topic, &format!("bb-bench-{run}"))
        .concurrency(env("BUSBAR_BENCH_CONCURRENCY", 16))
        .max_in_flight(256)
        .key_ordered(false)
        .start(move |_e: Envelope<Blob>, _c: Context| {
            done.add_permits(1);
            async { Ok::<_, HandlerError>(()) }
        })
        .await
        .expect("subscribe");
    let _drained = handled.acquire_many(n() as u32 + 1).await.expect("drain");
    let (end_to_end, ()) = Stage::of(n(), async {
        publish_all().await;
        let _all = handled.acquire_many(n() as u32).await.expect("count");
    })
    .await;
    sub.shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
    (publish, end_to_end)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let rounds = env("BUSBAR_BENCH_ROUNDS", 5);
    // The clients to run, by name, comma-separated; all four when unset.
    let only: Option<Vec<usize>> = std::env::var("BUSBAR_BENCH_ONLY").ok().map(|names| {
        names
            .split(',')
            .filter_map(|name| {
                ["bare", "raw", "hand-rolled", "busbar"]
                    .iter()
                    .position(|c| *c == name.trim())
            })
            .collect()
    });
    runtime.block_on(async {
        let pid = std::process::id();
        // [bare, raw, hand-rolled, busbar] x [publish, end-to-end], per round.
        let mut stages = vec![(Vec::new(), Vec::new()); 4];
        for round in 0..rounds {
            // Rotate who goes first, so drift does not favour one client.
            for turn in 0..4 {
                let client = (round + turn) % 4;
                if only.as_ref().is_some_and(|only| !only.contains(&client)) {
                    continue;
                }
                let run = format!("{pid:x}-{round}-{client}");
                let (publish, e2e) = match client {
                    0 => raw(&run, Raw::Bare).await,
                    1 => raw(&run, Raw::Headers).await,
                    2 => raw(&run, Raw::HandRolled).await,
                    _ => busbar(&run).await,
                };
                stages[client].0.push(publish);
                stages[client].1.push(e2e);
            }
        }
        let of = |c: usize, e2e: bool, figure: fn(Stage) -> f64| {
            let runs = if e2e { &stages[c].1 } else { &stages[c].0 };
            median(runs.iter().copied().map(figure).collect())
        };
        println!(
            "Kafka ({}), {} x {} B, acks=all + idempotence, batches of {BATCH}, {} publisher(s), busbar at concurrency {}, median of {rounds} rounds",
            brokers(),
            n(),
            bytes(),
            publishers(),
            env("BUSBAR_BENCH_CONCURRENCY", 16)
        );
        println!("| | bare | raw | hand-rolled | busbar | busbar/raw | busbar/hand-rolled | busbar/bare |");
        println!("|---|---|---|---|---|---|---|---|");
        for (what, e2e) in [("publish", false), ("end-to-end", true)] {
            let [b, r, h, x] = [0, 1, 2, 3].map(|c| of(c, e2e, Stage::rate));
            println!(
                "| {what} | {b:.0} msg/s | {r:.0} msg/s | {h:.0} msg/s | {x:.0} msg/s | {:.2} | {:.2} | {:.2} |",
                x / r,
                x / h,
                x / b
            );
        }
        for (what, e2e) in [("publish", false), ("end-to-end", true)] {
            let [b, r, h, x] = [0, 1, 2, 3].map(|c| of(c, e2e, Stage::cpu_us));
            println!(
                "| {what}, CPU µs/msg | {b:.1} | {r:.1} | {h:.1} | {x:.1} | {:.2} | {:.2} | {:.2} |",
                x / r,
                x / h,
                x / b
            );
        }
    });
}
