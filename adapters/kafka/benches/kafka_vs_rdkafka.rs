//! busbar on Kafka against raw rdkafka (FutureProducer / StreamConsumer), same broker, same
//! settings, one run: 1 KiB records, acks=all + idempotence, batches of 100 awaited together,
//! 4 partitions, consumers with manual offset commits.
//!
//! `cargo bench -p busbar-kafka --bench kafka_vs_rdkafka` (Kafka on 127.0.0.1:9092, or
//! `BUSBAR_KAFKA_URL` with a kafka:// URL).

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

async fn raw(run: &str) -> (Duration, Duration) {
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
                let record = FutureRecord::to(&topic).payload(&payload).key(&key);
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

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let run = format!("{:x}", std::process::id());
        let (raw_publish, raw_e2e) = raw(&run).await;
        let (bb_publish, bb_e2e) = busbar(&run).await;
        println!(
            "Kafka ({}), {N} x 1 KiB, acks=all + idempotence, batches of {BATCH}",
            brokers()
        );
        println!(
            "publish     raw rdkafka {:>8.0} msg/s | busbar {:>8.0} msg/s | busbar/raw {:.2}",
            rate(raw_publish),
            rate(bb_publish),
            rate(bb_publish) / rate(raw_publish)
        );
        println!(
            "end-to-end  raw rdkafka {:>8.0} msg/s | busbar {:>8.0} msg/s | busbar/raw {:.2}",
            rate(raw_e2e),
            rate(bb_e2e),
            rate(bb_e2e) / rate(raw_e2e)
        );
    });
}
