//! Saga transitions per second against a plain handler doing the same work, on the memory
//! transport (so only the saga's cost and its store's are measured).
//!
//! `cargo bench -p busbar-postgres --bench saga` (the local PostgreSQL;
//! `BUSBAR_POSTGRES_URL` overrides it).
//!
//! The work: `BUSBAR_BENCH_MESSAGES` (default 20,000) `Add` events keyed over 64 counters, each
//! adding to its counter's running total; concurrency 8, per-key order.
//! - **memory**: a plain handler updating a map in memory, against the saga on the
//!   [`MemorySagaStore`](busbar_core::saga::MemorySagaStore);
//! - **PostgreSQL**: a plain inbox handler (`PostgresInbox`: dedup record + an upsert of the
//!   counter row, one transaction per event), against the saga on [`PostgresSagaStore`]
//!   (applied-event record + versioned instance update, one transaction per event).
//!
//! `BUSBAR_BENCH_ROUNDS` (default 3) rounds; medians. `BUSBAR_BENCH_ONLY=memory` skips
//! PostgreSQL (for profiling).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use busbar_core::saga::{MemorySagaStore, Saga, SagaStore, Step};
use busbar_core::{Bus, Context, Envelope, Event, HandlerError, MemoryTransport, Text};
use busbar_postgres::sqlx::postgres::PgPoolOptions;
use busbar_postgres::sqlx::{self, PgPool};
use busbar_postgres::{PostgresIdempotencyStore, PostgresOutbox, PostgresSagaStore};
use serde::{Deserialize, Serialize};

#[derive(Clone, Serialize, Deserialize)]
struct Add {
    counter: u64,
    n: u64,
}

impl Event for Add {
    const TYPE: &'static str = "bench.add.v1";
    fn key(&self) -> Option<Text> {
        Some(Text::from_display(&format_args!("c{}", self.counter)))
    }
}

#[derive(Default, Serialize, Deserialize)]
struct Total {
    total: u64,
}

const COUNTERS: u64 = 64;
const CONCURRENCY: usize = 8;

fn messages() -> u64 {
    std::env::var("BUSBAR_BENCH_MESSAGES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000)
}

fn rounds() -> usize {
    std::env::var("BUSBAR_BENCH_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(3)
}

fn bus() -> Bus {
    Bus::new(MemoryTransport::new())
}

/// Publishes the events and waits until `done` reports them all; returns events per second.
async fn drive(bus: &Bus, topic: &str, done: impl Fn() -> u64) -> f64 {
    let n = messages();
    let started = Instant::now();
    let events: Vec<Add> = (0..n)
        .map(|i| Add {
            counter: i % COUNTERS,
            n: 1,
        })
        .collect();
    for chunk in events.chunks(500) {
        bus.publish_batch(topic, chunk.to_vec()).await.unwrap();
    }
    while done() < n {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "stuck at {} of {n}",
            done()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    n as f64 / started.elapsed().as_secs_f64()
}

fn saga(topic: &str) -> Saga<Total> {
    Saga::<Total>::new("totals")
        .listen(topic)
        .concurrency(CONCURRENCY)
        .initially(|s| {
            s.on(|add: Envelope<Add>, mut step: Step<Total>| async move {
                step.data_mut().total += add.payload.n;
                Ok(step)
            })
        })
}

async fn plain_memory() -> f64 {
    let bus = bus();
    let totals = Arc::new(Mutex::new(HashMap::<u64, u64>::new()));
    let seen = Arc::clone(&totals);
    let sub = bus
        .subscribe::<Add>("adds", "totals")
        .concurrency(CONCURRENCY)
        .start(move |add: Envelope<Add>, _: Context| {
            let totals = Arc::clone(&seen);
            async move {
                *totals
                    .lock()
                    .unwrap()
                    .entry(add.payload.counter)
                    .or_default() += add.payload.n;
                Ok::<(), HandlerError>(())
            }
        })
        .await
        .unwrap();
    let rate = drive(&bus, "adds", || sub.stats().handled).await;
    sub.shutdown(Duration::from_secs(5)).await.unwrap();
    rate
}

async fn saga_on(bus: &Bus, store: Arc<dyn SagaStore>) -> f64 {
    let running = saga("adds").start(bus, store).await.unwrap();
    let rate = drive(bus, "adds", || running.stats().transitions).await;
    running.shutdown(Duration::from_secs(5)).await.unwrap();
    rate
}

async fn plain_postgres(pool: &PgPool, table: &str) -> f64 {
    let bus = bus();
    let store = PostgresIdempotencyStore::new(pool.clone(), &format!("{table}_inbox")).unwrap();
    store.ensure_schema().await.unwrap();
    let counters = format!("{table}_counters");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {counters} (id bigint PRIMARY KEY, total bigint NOT NULL)"
    )))
    .execute(pool)
    .await
    .unwrap();
    let upsert = Arc::new(format!(
        "INSERT INTO {counters} (id, total) VALUES ($1, $2) \
         ON CONFLICT (id) DO UPDATE SET total = {counters}.total + EXCLUDED.total"
    ));
    let inbox = store.inbox(Duration::from_secs(3600));
    let sub = bus
        .subscribe::<Add>("adds", "totals")
        .concurrency(CONCURRENCY)
        .start(inbox.handler(move |add: Envelope<Add>, _ctx, mut tx| {
            let upsert = Arc::clone(&upsert);
            async move {
                sqlx::query(sqlx::AssertSqlSafe(upsert.as_str().to_string()))
                    .bind(add.payload.counter as i64)
                    .bind(add.payload.n as i64)
                    .execute(&mut *tx)
                    .await?;
                Ok(tx)
            }
        }))
        .await
        .unwrap();
    let rate = drive(&bus, "adds", || sub.stats().handled).await;
    sub.shutdown(Duration::from_secs(5)).await.unwrap();
    for t in [format!("{table}_inbox"), counters] {
        drop_table(pool, &t).await;
    }
    rate
}

async fn saga_postgres(pool: &PgPool, table: &str) -> f64 {
    let bus = bus();
    let outbox =
        PostgresOutbox::with_table(&bus, pool.clone(), &format!("{table}_outbox")).unwrap();
    outbox.ensure_schema().await.unwrap();
    let store = PostgresSagaStore::with_table(&outbox, &format!("{table}_saga")).unwrap();
    store.ensure_schema().await.unwrap();
    let rate = saga_on(&bus, Arc::new(store)).await;
    for suffix in ["saga_applied", "saga_timeouts", "saga", "outbox"] {
        drop_table(pool, &format!("{table}_{suffix}")).await;
    }
    rate
}

async fn drop_table(pool: &PgPool, table: &str) {
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE IF EXISTS {table}")))
        .execute(pool)
        .await
        .unwrap();
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let url = std::env::var("BUSBAR_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .connect(&url)
            .await
            .expect("PostgreSQL (scripts/local-brokers.sh postgres)");
        let mut results: HashMap<&str, Vec<f64>> = HashMap::new();
        for round in 0..rounds() {
            let table = format!("bench_saga_{}_{round}", std::process::id());
            results
                .entry("plain handler, memory")
                .or_default()
                .push(plain_memory().await);
            results
                .entry("saga, memory store")
                .or_default()
                .push(saga_on(&bus(), Arc::new(MemorySagaStore::new())).await);
            if std::env::var("BUSBAR_BENCH_ONLY").is_ok_and(|only| only == "memory") {
                continue;
            }
            results
                .entry("plain inbox handler, PostgreSQL")
                .or_default()
                .push(plain_postgres(&pool, &table).await);
            results
                .entry("saga, PostgreSQL store")
                .or_default()
                .push(saga_postgres(&pool, &table).await);
        }
        let m = |name: &str| results.get(name).map_or(f64::NAN, |r| median(r.clone()));
        println!(
            "{} events over {COUNTERS} instances, concurrency {CONCURRENCY}, medians of {} rounds:",
            messages(),
            rounds()
        );
        for name in [
            "plain handler, memory",
            "saga, memory store",
            "plain inbox handler, PostgreSQL",
            "saga, PostgreSQL store",
        ] {
            println!("  {name:<34} {:>9.0} events/s", m(name));
        }
        println!(
            "  ratio saga/plain: memory {:.2}, PostgreSQL {:.2}",
            m("saga, memory store") / m("plain handler, memory"),
            m("saga, PostgreSQL store") / m("plain inbox handler, PostgreSQL")
        );
    });
}
