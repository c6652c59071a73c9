//! busbar on RabbitMQ against raw lapin, same broker, same settings, one run:
//! 1 KiB persistent messages to a quorum queue through a topic exchange, publisher confirms
//! awaited per batch of 100, consumers with prefetch 64 acking each message.
//!
//! `cargo bench -p busbar-rabbitmq --bench rabbitmq_vs_lapin` (RabbitMQ on 127.0.0.1:5672, or
//! `BUSBAR_RABBITMQ_URL`). Prints messages per second and the busbar/raw ratio.

use std::sync::Arc;
use std::time::{Duration, Instant};

use busbar_core::{Bus, Context, Envelope, Event, HandlerError};
use busbar_rabbitmq::RabbitTransport;
use futures::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use serde::{Deserialize, Serialize};

const N: usize = 20_000;
const BATCH: usize = 100;
const PREFETCH: u16 = 64;

#[derive(Clone, Serialize, Deserialize)]
struct Blob {
    data: String,
}
impl Event for Blob {
    const TYPE: &'static str = "bench.blob.v1";
}

fn url() -> String {
    std::env::var("BUSBAR_RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn rate(took: Duration) -> f64 {
    N as f64 / took.as_secs_f64()
}

/// Raw lapin: publish N with confirms per batch; then (separately timed) publish N while a
/// consumer acks them, until all are consumed.
async fn raw(run: &str) -> (Duration, Duration) {
    let conn = Connection::connect(&url(), ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let exchange = format!("raw-bench-{run}");
    ch.exchange_declare(
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
    let queue = format!("raw-bench-{run}");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .expect("queue");
    ch.queue_bind(
        queue.as_str().into(),
        exchange.as_str().into(),
        "bench".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");
    let payload = vec![b'x'; 1024];
    let publish_all = || async {
        for _ in 0..N / BATCH {
            let mut confirms = Vec::with_capacity(BATCH);
            for _ in 0..BATCH {
                let props = BasicProperties::default().with_delivery_mode(2);
                confirms.push(
                    ch.basic_publish(
                        exchange.as_str().into(),
                        "bench".into(),
                        BasicPublishOptions::default(),
                        &payload,
                        props,
                    )
                    .await
                    .expect("publish"),
                );
            }
            for c in futures::future::join_all(confirms).await {
                assert!(c.expect("confirm").is_ack());
            }
        }
    };
    let start = Instant::now();
    publish_all().await;
    let publish = start.elapsed();
    ch.queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
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
    let start = Instant::now();
    let consuming = tokio::spawn(async move {
        for _ in 0..N {
            let d = consumer.next().await.expect("stream").expect("delivery");
            d.acker.ack(BasicAckOptions::default()).await.expect("ack");
        }
    });
    publish_all().await;
    consuming.await.expect("consumer");
    let end_to_end = start.elapsed();
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = ch
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await;
    let _ = conn.close(200, "done".into()).await;
    (publish, end_to_end)
}

/// busbar: the same through `Bus::publish_batch` and a subscription with a no-op handler.
async fn busbar(run: &str) -> (Duration, Duration) {
    let transport = RabbitTransport::connect(
        &format!("{}?exchange=bb-bench-{run}&queue_expires_ms=600000", url())
            .parse()
            .expect("url"),
    )
    .await
    .expect("connect");
    let bus = Bus::new(transport);
    let topic = "bench";
    let group = format!("g-{run}");
    bus.declare(topic, &group).await.expect("declare");
    let blob = Blob {
        data: "x".repeat(1024 - 11),
    }; // 1 KiB of JSON
    let publish_all = || async {
        for _ in 0..N / BATCH {
            bus.publish_batch(topic, vec![blob.clone(); BATCH])
                .await
                .expect("publish");
        }
    };
    let start = Instant::now();
    publish_all().await;
    let publish = start.elapsed();

    let handled = Arc::new(tokio::sync::Semaphore::new(0));
    let done = Arc::clone(&handled);
    // The N messages above are consumed first; then N more are published while consuming.
    let sub = bus
        .subscribe::<Blob>(topic, &group)
        .concurrency(16)
        .max_in_flight(usize::from(PREFETCH))
        .key_ordered(false)
        .start(move |_e: Envelope<Blob>, _c: Context| {
            done.add_permits(1);
            async { Ok::<_, HandlerError>(()) }
        })
        .await
        .expect("subscribe");
    let _drained = handled.acquire_many(N as u32).await.expect("drain");
    let start = Instant::now();
    publish_all().await;
    let _all = handled.acquire_many(N as u32).await.expect("count");
    let end_to_end = start.elapsed();
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
    runtime.block_on(async {
        let run = format!("{:x}", std::process::id());
        let (raw_publish, raw_e2e) = raw(&run).await;
        let (bb_publish, bb_e2e) = busbar(&run).await;
        println!("RabbitMQ, {N} x 1 KiB persistent, quorum queue, confirms per batch of {BATCH}, prefetch {PREFETCH}");
        println!("publish     raw lapin {:>8.0} msg/s | busbar {:>8.0} msg/s | busbar/raw {:.2}", rate(raw_publish), rate(bb_publish), rate(bb_publish) / rate(raw_publish));
        println!("end-to-end  raw lapin {:>8.0} msg/s | busbar {:>8.0} msg/s | busbar/raw {:.2}", rate(raw_e2e), rate(bb_e2e), rate(bb_e2e) / rate(raw_e2e));
    });
}
