//! The outbox relay against direct publishing, on the same broker, same batch size.
//!
//! `cargo bench -p busbar-postgres --bench outbox_relay` (the local PostgreSQL, RabbitMQ and
//! Kafka; `BUSBAR_POSTGRES_URL`, `BUSBAR_RABBITMQ_URL`, `BUSBAR_KAFKA_URL` override them).
//!
//! - **Throughput**: `BUSBAR_BENCH_MESSAGES` (default 20,000) events of ~1 KiB, keyed, from
//!   committed outbox rows to broker-confirmed and marked (the relay's published count),
//!   against `Bus::publish_batch` of the same events in batches of the relay's size, one after
//!   another. `BUSBAR_BENCH_ROUNDS` (default 5) rounds, alternating; the medians are reported.
//! - **Latency** (memory transport, so only the outbox's part is measured): one event per
//!   transaction, 200 transactions 10 ms apart, from the commit returning to the handler
//!   running; with NOTIFY wake-ups, and polling only (every 100 ms).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use busbar_core::{Bus, Context, Envelope, Event, HandlerError, MemoryTransport, Text, Transport};
use busbar_postgres::sqlx::postgres::PgPoolOptions;
use busbar_postgres::sqlx::PgPool;
use busbar_postgres::PostgresOutbox;
use serde::{Deserialize, Serialize};

#[derive(Clone, Serialize, Deserialize)]
struct Sized {
    seq: u64,
    body: String,
}

impl Event for Sized {
    const TYPE: &'static str = "bench.sized.v1";
    fn key(&self) -> Option<Text> {
        Some(Text::from_display(&format_args!("k{}", self.seq % 16)))
    }
}

fn event(seq: u64) -> Sized {
    Sized {
        seq,
        body: "x".repeat(1_000),
    }
}

fn table() -> String {
    format!("outbox_bench_{:08x}", fastrand::u32(..))
}

fn topic(prefix: &str) -> String {
    format!("{prefix}-{:08x}", fastrand::u32(..))
}

const BATCH: usize = 500;

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

async fn throughput(
    name: &str,
    transport: Arc<dyn Transport>,
    pool: &PgPool,
    n: u64,
    rounds: usize,
) {
    let bus = Bus::builder(transport).build();
    let (mut direct, mut relayed) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let (d, r) = round(&bus, pool, n).await;
        direct.push(d);
        relayed.push(r);
    }
    let (direct, relayed) = (median(direct), median(relayed));
    println!(
        "{name}: {n} events of 1 KiB, batches of {BATCH}, median of {rounds}: direct publish_batch {direct:.0}/s | relay {relayed:.0}/s | relay/direct {:.2}",
        relayed / direct
    );
}

/// One round: events per second published directly, then through the relay.
async fn round(bus: &Bus, pool: &PgPool, n: u64) -> (f64, f64) {
    // Direct: publish_batch of BATCH events at a time.
    let direct_topic = topic("bench-direct");
    bus.publish_batch(&direct_topic, (0..10).map(event))
        .await
        .expect("warm-up");
    let started = Instant::now();
    let mut seq = 0;
    while seq < n {
        let end = (seq + BATCH as u64).min(n);
        bus.publish_batch(&direct_topic, (seq..end).map(event))
            .await
            .expect("direct publish");
        seq = end;
    }
    let direct = n as f64 / started.elapsed().as_secs_f64();

    // Relay: the same events as committed rows, then the relay drains them.
    let outbox = PostgresOutbox::with_table(bus, pool.clone(), &table()).expect("outbox");
    outbox.ensure_schema().await.expect("schema");
    let relay_topic = topic("bench-relay");
    let mut seq = 0;
    while seq < n {
        let end = (seq + BATCH as u64).min(n);
        let mut tx = pool.begin().await.expect("begin");
        outbox
            .publish_batch(&mut tx, &relay_topic, (seq..end).map(event))
            .await
            .expect("write");
        tx.commit().await.expect("commit");
        seq = end;
    }
    let started = Instant::now();
    let relay = outbox
        .relay()
        .batch_size(BATCH)
        .retention(Duration::ZERO)
        .start()
        .await
        .expect("relay");
    while relay.stats().published < n {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let relayed = n as f64 / started.elapsed().as_secs_f64();
    relay
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
    drop_table(pool, outbox.table()).await;
    (direct, relayed)
}

async fn latency(pool: &PgPool, listen: bool) {
    let bus = Bus::new(MemoryTransport::new());
    let (topic, group) = (topic("bench-latency"), "g");
    bus.declare(&topic, group).await.expect("declare");
    let handled_at: Arc<Mutex<HashMap<busbar_core::Text, Instant>>> = Arc::default();
    let sub = bus
        .subscribe::<Sized>(&topic, group)
        .start({
            let handled_at = Arc::clone(&handled_at);
            move |e: Envelope<Sized>, _c: Context| {
                let handled_at = Arc::clone(&handled_at);
                async move {
                    handled_at
                        .lock()
                        .expect("lock")
                        .insert(e.id, Instant::now());
                    Ok::<(), HandlerError>(())
                }
            }
        })
        .await
        .expect("subscribe");
    let outbox = PostgresOutbox::with_table(&bus, pool.clone(), &table()).expect("outbox");
    outbox.ensure_schema().await.expect("schema");
    let relay = outbox
        .relay()
        .listen(listen)
        .poll_interval(Duration::from_millis(100))
        .start()
        .await
        .expect("relay");
    while !relay.stats().active {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut committed = Vec::new();
    for i in 0..200 {
        let mut tx = pool.begin().await.expect("begin");
        let id = outbox
            .publish(&mut tx, &topic, event(i))
            .await
            .expect("write");
        tx.commit().await.expect("commit");
        committed.push((id, Instant::now()));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    while handled_at.lock().expect("lock").len() < committed.len() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let handled_at = handled_at.lock().expect("lock").clone();
    let mut latencies: Vec<Duration> = committed
        .iter()
        .map(|(id, at)| handled_at[id].saturating_duration_since(*at))
        .collect();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p) as usize];
    println!(
        "commit → handled, {}: p50 {:?} | p99 {:?} | max {:?}",
        if listen {
            "NOTIFY wake-up"
        } else {
            "polling only (100 ms)"
        },
        pct(0.5),
        pct(0.99),
        latencies[latencies.len() - 1]
    );
    relay
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
    sub.shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
    drop_table(pool, outbox.table()).await;
}

async fn drop_table(pool: &PgPool, table: &str) {
    busbar_postgres::sqlx::query(busbar_postgres::sqlx::AssertSqlSafe(format!(
        "DROP TABLE {table}"
    )))
    .execute(pool)
    .await
    .expect("drop");
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let env =
            |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.into());
        let n: u64 = env("BUSBAR_BENCH_MESSAGES", "20000")
            .parse()
            .expect("a number");
        let rounds: usize = env("BUSBAR_BENCH_ROUNDS", "5").parse().expect("a number");
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect(&env(
                "BUSBAR_POSTGRES_URL",
                "postgres://postgres@127.0.0.1:5432/test",
            ))
            .await
            .expect("PostgreSQL");
        latency(&pool, true).await;
        latency(&pool, false).await;
        // The outbox's own cost: a transport that costs next to nothing.
        throughput("memory", Arc::new(MemoryTransport::new()), &pool, n, rounds).await;
        let rabbitmq = env(
            "BUSBAR_RABBITMQ_URL",
            "amqp://guest:guest@127.0.0.1:5672/%2f",
        );
        let transport = busbar_rabbitmq::RabbitTransport::connect(&rabbitmq.parse().expect("url"))
            .await
            .expect("RabbitMQ");
        throughput("RabbitMQ", Arc::new(transport), &pool, n, rounds).await;
        let kafka = env("BUSBAR_KAFKA_URL", "kafka://127.0.0.1:9092");
        let transport = busbar_kafka::KafkaTransport::connect(&kafka.parse().expect("url"))
            .await
            .expect("Kafka");
        throughput("Kafka", Arc::new(transport), &pool, n, rounds).await;
    });
}
