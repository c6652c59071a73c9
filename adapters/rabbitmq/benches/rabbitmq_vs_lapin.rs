//! busbar on RabbitMQ against an expert raw lapin client, same broker, same settings:
//! persistent messages (1 KiB of JSON by default) to a quorum queue through a topic exchange,
//! publisher confirms, consumers with prefetch 64 acking each message.
//!
//! The raw client does what a service written on lapin does with its events: it serializes
//! the event to JSON, writes the same CloudEvents application properties and AMQP properties
//! busbar writes, and sends a batch's messages before awaiting their confirms together; its
//! consumer reads the id and type, parses the JSON and acks each message without waiting for
//! the ack to be written before taking the next delivery.
//!
//! Two regimes:
//! - **latency-bound**: one publisher, one batch of 100 in flight at a time;
//! - **throughput-bound**: 8 publishers, so 8 batches are in flight at once.
//!
//! `cargo bench -p busbar-rabbitmq --bench rabbitmq_vs_lapin` (RabbitMQ on 127.0.0.1:5672, or
//! `BUSBAR_RABBITMQ_URL`; `BUSBAR_BENCH_ROUNDS`, default 5; `BUSBAR_BENCH_MESSAGES`, default
//! 20,000 a run; `BUSBAR_BENCH_BYTES`, default 1,024: the event's JSON size, e.g. 100 or
//! 65536; `BUSBAR_BENCH_CONCURRENCY`, default 16: busbar's handlers at once, e.g. 1, 8 or 64;
//! `BUSBAR_BENCH_PARAMS` adds parameters to busbar's URL, e.g. `&publish_channels=1`). Prints
//! the median messages per second of the rounds (single runs drift by ±20 %), the process's
//! CPU time per message (user + system, all threads) and the busbar/raw ratios.

use std::sync::Arc;
use std::time::Duration;

use busbar_core::{Bus, Context, Envelope, Event, HandlerError};
use busbar_rabbitmq::RabbitTransport;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde::{Deserialize, Serialize};

#[path = "../../../benches/common/stage.rs"]
mod stage;
use stage::{env, median, Stage};

const BATCH: usize = 100;

/// Messages per timed run: `BUSBAR_BENCH_MESSAGES`, default 20,000 (a multiple of 8 batches).
fn n() -> usize {
    env("BUSBAR_BENCH_MESSAGES", 20_000).max(8 * BATCH) / (8 * BATCH) * (8 * BATCH)
}
const PREFETCH: u16 = 64;

#[derive(Clone, Serialize, Deserialize)]
struct Blob {
    data: String,
}
impl Event for Blob {
    const TYPE: &'static str = "bench.blob.v1";
}

/// The event: `BUSBAR_BENCH_BYTES` (default 1 KiB) of JSON.
fn blob() -> Blob {
    Blob {
        data: "x".repeat(env("BUSBAR_BENCH_BYTES", 1024).saturating_sub(11)),
    }
}

fn url() -> String {
    std::env::var("BUSBAR_RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Publishers publishing at once: 1 (latency-bound) or 8 (throughput-bound).
#[derive(Clone, Copy)]
enum Regime {
    Latency,
    Throughput,
}

impl Regime {
    fn publishers(self) -> usize {
        match self {
            Regime::Latency => 1,
            Regime::Throughput => 8,
        }
    }
}

/// The properties busbar writes for one event (CloudEvents AMQP binding, mirrored AMQP
/// properties), for message `i`.
fn properties(i: usize) -> BasicProperties {
    let id = format!("0193a5c2-7b1e-7c3d-9f00-{i:012x}");
    let trace = format!("00-{:032x}-{:016x}-01", i + 1, i + 1);
    let mut headers = FieldTable::default();
    for (name, value) in [
        ("cloudEvents:specversion", "1.0"),
        ("cloudEvents:id", id.as_str()),
        ("cloudEvents:source", "/bench"),
        ("cloudEvents:type", Blob::TYPE),
        ("cloudEvents:time", "2026-11-29T10:00:00.000000Z"),
        ("cloudEvents:correlationid", id.as_str()),
        ("cloudEvents:traceparent", trace.as_str()),
    ] {
        headers.insert(
            name.into(),
            AMQPValue::LongString(LongString::from(value.as_bytes())),
        );
    }
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers)
        .with_message_id(id.as_str().into())
        .with_content_type("application/json".into())
        .with_type(Blob::TYPE.into())
        .with_correlation_id(id.as_str().into())
        .with_timestamp(1_795_000_000)
}

async fn raw_publish(ch: &Channel, exchange: &str, first: usize, count: usize) {
    for b in 0..count / BATCH {
        let mut confirms = Vec::with_capacity(BATCH);
        for i in 0..BATCH {
            let payload = serde_json::to_vec(&blob()).expect("json");
            confirms.push(
                ch.basic_publish(
                    exchange.into(),
                    "bench".into(),
                    BasicPublishOptions::default(),
                    &payload,
                    properties(first + b * BATCH + i),
                )
                .await
                .expect("publish"),
            );
        }
        for c in futures::future::join_all(confirms).await {
            assert!(c.expect("confirm").is_ack());
        }
    }
}

/// The expert raw client: publish N (timed), purge, then publish N while a consumer takes
/// them (timed until all are consumed).
async fn raw(run: &str, regime: Regime) -> (Stage, Stage) {
    let conn = Connection::connect(&url(), ConnectionProperties::default())
        .await
        .expect("connect");
    let exchange = format!("raw-bench-{run}");
    let queue = format!("raw-bench-{run}");
    let admin = conn.create_channel().await.expect("channel");
    admin
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("exchange");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    admin
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .expect("queue");
    admin
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "bench".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    // One confirming channel per publisher, as a service with concurrent publishers has.
    let mut channels = Vec::new();
    for _ in 0..regime.publishers() {
        let ch = conn.create_channel().await.expect("channel");
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        channels.push(ch);
    }
    let per_publisher = n() / regime.publishers();
    let publish_all = || {
        futures::future::join_all(
            channels
                .iter()
                .enumerate()
                .map(|(p, ch)| raw_publish(ch, &exchange, p * per_publisher, per_publisher)),
        )
    };
    let (publish, ()) = Stage::of(n(), async {
        publish_all().await;
    })
    .await;
    admin
        .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
        .await
        .expect("purge");

    let consumer_ch = conn.create_channel().await.expect("channel");
    consumer_ch
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = consumer_ch
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let count = n();
    let consuming = async move {
        let mut acks = FuturesUnordered::new();
        let mut received = 0;
        while received < count {
            tokio::select! {
                Some(acked) = acks.next(), if !acks.is_empty() => {
                    let () = acked;
                }
                delivery = consumer.next() => {
                    let d = delivery.expect("stream").expect("delivery");
                    let header = |name: &str| {
                        d.properties.headers().as_ref().and_then(|h| match h.inner().get(name) {
                            Some(AMQPValue::LongString(s)) => {
                                Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                            }
                            _ => None,
                        })
                    };
                    let (id, kind) = (header("cloudEvents:id"), header("cloudEvents:type"));
                    assert_eq!(kind.as_deref(), Some(Blob::TYPE));
                    let event: Blob = serde_json::from_slice(&d.data).expect("json");
                    std::hint::black_box((id, event));
                    received += 1;
                    let acker = d.acker;
                    acks.push(async move {
                        acker.ack(BasicAckOptions::default()).await.expect("ack");
                    });
                }
            }
        }
        while acks.next().await.is_some() {}
    };
    let consuming = tokio::spawn(consuming);
    let (end_to_end, ()) = Stage::of(n(), async {
        publish_all().await;
        consuming.await.expect("consumer");
    })
    .await;
    let _ = admin
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = admin
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await;
    let _ = conn.close(200, "done".into()).await;
    (publish, end_to_end)
}

/// busbar: the same through `Bus::publish_batch` (from as many tasks as the raw client has
/// publishers) and a subscription with a no-op handler and the raw consumer's prefetch.
async fn busbar(run: &str, regime: Regime) -> (Stage, Stage) {
    let transport = RabbitTransport::connect(
        &format!(
            "{}?exchange=bb-bench-{run}&queue_expires_ms=600000{}",
            url(),
            // More of busbar's URL parameters, e.g. `&publish_channels=1`.
            std::env::var("BUSBAR_BENCH_PARAMS").unwrap_or_default()
        )
        .parse()
        .expect("url"),
    )
    .await
    .expect("connect");
    let bus = Bus::new(transport);
    let topic = "bench";
    let group = format!("g-{run}");
    bus.declare(topic, &group).await.expect("declare");
    let per_publisher = n() / regime.publishers();
    let publish_all = || {
        futures::future::join_all((0..regime.publishers()).map(|_| {
            let bus = bus.clone();
            async move {
                for _ in 0..per_publisher / BATCH {
                    bus.publish_batch(topic, vec![blob(); BATCH])
                        .await
                        .expect("publish");
                }
            }
        }))
    };
    let (publish, ()) = Stage::of(n(), async {
        publish_all().await;
    })
    .await;

    let handled = Arc::new(tokio::sync::Semaphore::new(0));
    let done = Arc::clone(&handled);
    // The N messages above are consumed first; then N more are published while consuming.
    let sub = bus
        .subscribe::<Blob>(topic, &group)
        .concurrency(env("BUSBAR_BENCH_CONCURRENCY", 16))
        .max_in_flight(usize::from(PREFETCH))
        .key_ordered(false)
        .start(move |_e: Envelope<Blob>, _c: Context| {
            done.add_permits(1);
            async { Ok::<_, HandlerError>(()) }
        })
        .await
        .expect("subscribe");
    let count = n() as u32;
    let _drained = handled.acquire_many(count).await.expect("drain");
    let (end_to_end, ()) = Stage::of(n(), async {
        publish_all().await;
        let _all = handled.acquire_many(count).await.expect("count");
    })
    .await;
    sub.shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
    bus.close().await.expect("close");
    (publish, end_to_end)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let rounds = env("BUSBAR_BENCH_ROUNDS", 5);
    runtime.block_on(async {
        println!(
            "RabbitMQ, {} x {} B of JSON, persistent, quorum queue, confirms per batch of {BATCH}, prefetch {PREFETCH}, busbar at concurrency {}, median of {rounds} rounds\n",
            n(),
            env("BUSBAR_BENCH_BYTES", 1024),
            env("BUSBAR_BENCH_CONCURRENCY", 16)
        );
        println!("| regime | | expert raw lapin | busbar | busbar/raw | raw CPU µs/msg | busbar CPU µs/msg | busbar/raw CPU |");
        println!("|---|---|---|---|---|---|---|---|");
        for (name, regime) in [
            ("latency-bound (1 batch in flight)", Regime::Latency),
            ("throughput-bound (8 batches in flight)", Regime::Throughput),
        ] {
            // [raw, busbar] x [publish, end-to-end], per round; who goes first alternates.
            let mut stages = [[Vec::new(), Vec::new()], [Vec::new(), Vec::new()]];
            for round in 0..rounds {
                let run = format!("{:x}-{}-{round}", std::process::id(), regime.publishers());
                let (raw_run, bb_run) = if round % 2 == 0 {
                    let raw_run = raw(&run, regime).await;
                    (raw_run, busbar(&run, regime).await)
                } else {
                    let bb_run = busbar(&run, regime).await;
                    (raw(&run, regime).await, bb_run)
                };
                for (client, (publish, e2e)) in [raw_run, bb_run].into_iter().enumerate() {
                    stages[client][0].push(publish);
                    stages[client][1].push(e2e);
                }
            }
            for (stage, what) in ["publish", "end-to-end"].into_iter().enumerate() {
                let of = |client: usize, figure: fn(Stage) -> f64| {
                    median(stages[client][stage].iter().copied().map(figure).collect())
                };
                let (raw, bb) = (of(0, Stage::rate), of(1, Stage::rate));
                let (raw_cpu, bb_cpu) = (of(0, Stage::cpu_us), of(1, Stage::cpu_us));
                println!(
                    "| {name} | {what} | {raw:.0} msg/s | {bb:.0} msg/s | {:.2} | {raw_cpu:.1} | {bb_cpu:.1} | {:.2} |",
                    bb / raw,
                    bb_cpu / raw_cpu
                );
            }
        }
    });
}
