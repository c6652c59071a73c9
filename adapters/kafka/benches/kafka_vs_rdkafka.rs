//! busbar on Kafka against raw rdkafka (FutureProducer / StreamConsumer), same broker, same
//! settings: 1 KiB records, acks=all + idempotence, batches of 100 awaited together, 4
//! partitions, consumers with manual offset commits.
//!
//! The raw client runs twice: **raw** writes the same CloudEvents headers busbar writes (the
//! fair comparison: a hand-written service carries its event's id, type and time too), **bare**
//! writes the value only. The three take turns over several rounds (the broker's speed drifts),
//! and each reports its median.
//!
//! `cargo bench -p busbar-kafka --bench kafka_vs_rdkafka` (Kafka on 127.0.0.1:9092, or
//! `BUSBAR_KAFKA_URL` with a kafka:// URL; `BUSBAR_BENCH_ROUNDS`, default 5;
//! `BUSBAR_BENCH_ONLY=busbar`, `raw` or `bare` runs that client alone, e.g. under a profiler).

use std::sync::Arc;
use std::time::{Duration, Instant};

use busbar_core::{Bus, Context, Envelope, Event, HandlerError};
use busbar_kafka::KafkaTransport;
use futures::StreamExt;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};
use serde::{Deserialize, Serialize};

const N: usize = 20_000;
const BATCH: usize = 100;

#[derive(Clone, Serialize, Deserialize)]
struct Blob {
    key: String,
    data: String,
}
impl Event for Blob {
    const TYPE: &'static str = "bench.blob.v1";
    fn key(&self) -> Option<String> {
        Some(self.key.clone())
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

fn rate(d: Duration) -> f64 {
    N as f64 / d.as_secs_f64()
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

async fn raw(run: &str, with_headers: bool) -> (Duration, Duration) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    let topic = format!("raw-bench-{run}");
    let payload = vec![b'x'; 1024];
    let publish_all = || async {
        for b in 0..N / BATCH {
            let mut pending = Vec::with_capacity(BATCH);
            for i in 0..BATCH {
                let key = format!("k{}", (b * BATCH + i) % 64);
                let mut record = FutureRecord::to(&topic).payload(&payload).key(&key);
                if with_headers {
                    record = record.headers(cloudevents_headers(b * BATCH + i));
                }
                pending.push(
                    producer
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
    // Warm-up (topic creation, connections), not timed; its records are consumed below.
    let warm = FutureRecord::to(&topic).payload(&payload).key("k0");
    producer
        .send(warm, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| e)
        .expect("warm-up");
    let start = Instant::now();
    publish_all().await;
    let publish = start.elapsed();

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", format!("raw-bench-{run}"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()
        .expect("consumer");
    consumer.subscribe(&[&topic]).expect("subscribe");
    // Drain the first N (joins the group), then time N published while consuming.
    let mut stream = consumer.stream();
    for _ in 0..N + 1 {
        stream.next().await.expect("stream").expect("record");
    }
    let start = Instant::now();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let consuming = async {
        let mut n = 0;
        while n < N {
            let record = stream.next().await.expect("stream").expect("record");
            std::hint::black_box(record.payload());
            n += 1;
            if n % 1000 == 0 {
                consumer
                    .commit_message(&record, CommitMode::Async)
                    .expect("commit");
            }
        }
        let _ = done_tx.send(());
    };
    let (_, ()) = tokio::join!(consuming, publish_all());
    done_rx.await.expect("done");
    (publish, start.elapsed())
}

async fn busbar(run: &str) -> (Duration, Duration) {
    let transport = KafkaTransport::connect(
        &format!("kafka://{}?session_timeout_ms=6000", brokers())
            .parse()
            .expect("url"),
    )
    .await
    .expect("connect");
    let bus = Bus::new(transport);
    let topic = format!("bb-bench-{run}");
    let blob = |i: usize| Blob {
        key: format!("k{}", i % 64),
        data: "x".repeat(1024 - 20),
    };
    let publish_all = || async {
        for b in 0..N / BATCH {
            let batch: Vec<Blob> = (0..BATCH).map(|i| blob(b * BATCH + i)).collect();
            bus.publish_batch(&topic, batch).await.expect("publish");
        }
    };
    // Warm-up (topic creation, connections), not timed; consumed below.
    bus.publish(&topic, blob(0)).await.expect("warm-up");
    let start = Instant::now();
    publish_all().await;
    let publish = start.elapsed();

    let handled = Arc::new(tokio::sync::Semaphore::new(0));
    let done = Arc::clone(&handled);
    let sub = bus
        .subscribe::<Blob>(&topic, &format!("bb-bench-{run}"))
        .concurrency(16)
        .max_in_flight(256)
        .key_ordered(false)
        .start(move |_e: Envelope<Blob>, _c: Context| {
            done.add_permits(1);
            async { Ok::<_, HandlerError>(()) }
        })
        .await
        .expect("subscribe");
    let _drained = handled.acquire_many(N as u32 + 1).await.expect("drain");
    let start = Instant::now();
    publish_all().await;
    let _all = handled.acquire_many(N as u32).await.expect("count");
    let end_to_end = start.elapsed();
    sub.shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
    (publish, end_to_end)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let rounds: usize = std::env::var("BUSBAR_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let only = std::env::var("BUSBAR_BENCH_ONLY")
        .ok()
        .and_then(|name| ["bare", "raw", "busbar"].iter().position(|c| *c == name));
    runtime.block_on(async {
        let pid = std::process::id();
        // [bare, raw, busbar] x [publish, end-to-end], msg/s per round.
        let mut rates = vec![(Vec::new(), Vec::new()); 3];
        for round in 0..rounds {
            // Rotate who goes first, so drift does not favour one client.
            for turn in 0..3 {
                let client = (round + turn) % 3;
                if only.is_some_and(|only| only != client) {
                    continue;
                }
                let run = format!("{pid:x}-{round}-{client}");
                let (publish, e2e) = match client {
                    0 => raw(&run, false).await,
                    1 => raw(&run, true).await,
                    _ => busbar(&run).await,
                };
                rates[client].0.push(rate(publish));
                rates[client].1.push(rate(e2e));
            }
        }
        let [bare, raw, bb] = [0, 1, 2].map(|c| {
            (
                median(rates[c].0.clone()),
                median(rates[c].1.clone()),
            )
        });
        println!(
            "Kafka ({}), {N} x 1 KiB, acks=all + idempotence, batches of {BATCH}, median of {rounds} rounds",
            brokers()
        );
        println!("| | bare | raw | busbar | busbar/raw | busbar/bare |");
        println!("|---|---|---|---|---|---|");
        for (what, b, r, x) in [
            ("publish", bare.0, raw.0, bb.0),
            ("end-to-end", bare.1, raw.1, bb.1),
        ] {
            println!(
                "| {what} | {b:.0} msg/s | {r:.0} msg/s | {x:.0} msg/s | {:.2} | {:.2} |",
                x / r,
                x / b
            );
        }
    });
}
