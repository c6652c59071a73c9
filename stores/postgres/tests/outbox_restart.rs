//! RabbitMQ restarted (`rabbitmqctl stop_app` / `start_app`) while 10,000 events are written to
//! the outbox and relayed: the rows wait while the broker is away, the relay backs off and
//! drains them when it returns, and every committed event is handled (published = handled).
//!
//! It restarts the shared local broker, so it lives alone in this test binary and is skipped
//! unless brokers are required or `BUSBAR_RESTART_TESTS=1`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use busbar_core::{Bus, Context, Envelope, HandlerError, RetryPolicy};
use busbar_postgres::sqlx::postgres::PgPoolOptions;
use busbar_postgres::PostgresOutbox;
use busbar_rabbitmq::RabbitTransport;
use busbar_testkit::conformance::{probe, unique, Probe};
use busbar_testkit::restart::rabbitmqctl;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_during_an_outbox_run_loses_nothing() {
    if !busbar_testkit::restart::enabled("restarts the local RabbitMQ") {
        return;
    }
    const N: u64 = 10_000;
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(
            &std::env::var("BUSBAR_POSTGRES_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into()),
        )
        .await
        .expect("PostgreSQL reachable");
    // A publish fails after 1 s without the broker, so the relay backs off and retries.
    let url = format!(
        "{}?publish_timeout_ms=1000&reconnect_max_ms=500&queue_expires_ms=600000",
        std::env::var("BUSBAR_RABBITMQ_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
    );
    let transport = RabbitTransport::connect(&url.parse().unwrap())
        .await
        .expect("RabbitMQ reachable");
    let bus = Bus::builder(Arc::new(transport))
        .retry(
            RetryPolicy::exponential(20)
                .with_initial_backoff(Duration::from_millis(20))
                .with_max_backoff(Duration::from_millis(500)),
        )
        .build();
    let (topic, group) = (unique("outbox-restart"), unique("g"));
    bus.declare(&topic, &group).await.unwrap();
    let table = unique("outbox").replace('-', "_");
    let outbox = PostgresOutbox::with_table(&bus, pool.clone(), &table).unwrap();
    outbox.ensure_schema().await.unwrap();

    let handled = Arc::new(Mutex::new(HashSet::<busbar_core::Text>::new()));
    let sub = bus
        .subscribe::<Probe>(&topic, &group)
        .concurrency(8)
        .start({
            let handled = Arc::clone(&handled);
            move |e: Envelope<Probe>, _c: Context| {
                let handled = Arc::clone(&handled);
                async move {
                    handled.lock().unwrap().insert(e.id);
                    Ok::<(), HandlerError>(())
                }
            }
        })
        .await
        .unwrap();
    let relay = outbox
        .relay()
        .backoff(
            RetryPolicy::exponential(u32::MAX)
                .with_initial_backoff(Duration::from_millis(50))
                .with_max_backoff(Duration::from_millis(500)),
        )
        .start()
        .await
        .unwrap();

    // Writers commit 100 transactions of 100 events, while the broker goes away and back.
    let writer = {
        let (pool, outbox, topic) = (pool.clone(), outbox.clone(), topic.clone());
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for t in 0..N / 100 {
                let mut tx = pool.begin().await.unwrap();
                ids.extend(
                    outbox
                        .publish_batch(
                            &mut tx,
                            &topic,
                            (t * 100..(t + 1) * 100).map(|s| probe(s, &format!("k{}", s % 8))),
                        )
                        .await
                        .unwrap(),
                );
                tx.commit().await.unwrap();
                tokio::task::yield_now().await;
            }
            ids
        })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while handled.lock().unwrap().len() < 1_000 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the run did not reach 1,000 handled"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    rabbitmqctl(&["stop_app"]);
    tokio::time::sleep(Duration::from_secs(2)).await; // the outage itself
    let pending_during = outbox.stats().await.unwrap().pending;
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);

    let written: HashSet<busbar_core::Text> = writer.await.unwrap().into_iter().collect();
    assert_eq!(written.len() as u64, N);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let missing = written.difference(&handled.lock().unwrap()).count();
        if missing == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{missing} of {N} committed events never handled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stats = relay.shutdown(Duration::from_secs(10)).await.unwrap();
    let outbox_stats = outbox.stats().await.unwrap();
    println!(
        "committed {N} | handled {} | relay published {} in {} batches, {} retried | pending during the outage {pending_during}",
        handled.lock().unwrap().len(),
        stats.published,
        stats.batches,
        stats.retries,
    );
    assert_eq!((outbox_stats.pending, outbox_stats.failed), (0, 0));
    assert!(stats.retries > 0, "the outage never made the relay retry");
    assert_eq!(
        stats.failed, 0,
        "a row was failed because the broker was away"
    );
    sub.shutdown(Duration::from_secs(10)).await.unwrap();
    sqlx_drop(&pool, &table).await;
}

async fn sqlx_drop(pool: &busbar_postgres::sqlx::PgPool, table: &str) {
    busbar_postgres::sqlx::query(busbar_postgres::sqlx::AssertSqlSafe(format!(
        "DROP TABLE {table}"
    )))
    .execute(pool)
    .await
    .unwrap();
}
