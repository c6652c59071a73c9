//! The PostgreSQL store against the local server (`scripts/local-brokers.sh postgres`);
//! `BUSBAR_POSTGRES_URL` overrides it (default `postgres://postgres@127.0.0.1:5432/test`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use busbar_core::idempotency::IdempotencyStore;
use busbar_core::{Bus, Context, Envelope, HandlerError, MemoryTransport, RetryPolicy};
use busbar_postgres::sqlx::{self, PgPool, Row};
use busbar_postgres::PostgresIdempotencyStore;
use busbar_testkit::conformance::{brokers_required, probe, unique, wait_for, Probe};
use busbar_testkit::idempotency::{self as scenarios, EffectLog};

fn url() -> String {
    std::env::var("BUSBAR_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

async fn store() -> Option<PostgresIdempotencyStore> {
    match PostgresIdempotencyStore::connect(&url()).await {
        Ok(store) => {
            store.ensure_schema().await.unwrap();
            store.ensure_schema().await.unwrap(); // idempotent
            Some(store)
        }
        Err(e) if !brokers_required() => {
            eprintln!("SKIPPED: PostgreSQL unreachable: {e}");
            None
        }
        Err(e) => panic!("PostgreSQL unreachable: {e}"),
    }
}

/// The effect: one row per application, in a table of its own per test.
struct Rows {
    pool: PgPool,
    table: String,
}

impl Rows {
    async fn new(pool: &PgPool) -> Arc<Self> {
        let table = unique("effects").replace('-', "_");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE TABLE {table} (message_id text NOT NULL)"
        )))
        .execute(pool)
        .await
        .unwrap();
        Arc::new(Rows {
            pool: pool.clone(),
            table,
        })
    }
}

#[async_trait]
impl EffectLog for Rows {
    async fn apply(&self, id: &str) -> busbar_core::Result<()> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {} (message_id) VALUES ($1)",
            self.table
        )))
        .bind(id)
        .execute(&self.pool)
        .await
        .map(drop)
        .map_err(|e| busbar_core::Error::new(busbar_core::ErrorKind::Store, "apply", e.to_string()))
    }

    async fn counts(&self) -> busbar_core::Result<HashMap<String, usize>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT message_id, count(*) AS n FROM {} GROUP BY message_id",
            self.table
        )))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| {
            busbar_core::Error::new(busbar_core::ErrorKind::Store, "count", e.to_string())
        })?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get::<String, _>("message_id"),
                    usize::try_from(r.get::<i64, _>("n")).unwrap(),
                )
            })
            .collect())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_are_exclusive_leases() {
    let Some(store) = store().await else { return };
    scenarios::claims_are_exclusive_leases(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_apply_each_effect_once() {
    let Some(a) = store().await else { return };
    let Some(b) = store().await else { return };
    let effects = Rows::new(a.pool()).await;
    scenarios::two_instances_apply_each_effect_once([Arc::new(a), Arc::new(b)], effects).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_holders_lease_expires_and_another_instance_takes_over() {
    let Some(a) = store().await else { return };
    let Some(b) = store().await else { return };
    let effects = Rows::new(a.pool()).await;
    scenarios::a_dead_holders_lease_expires_and_another_instance_takes_over(
        [Arc::new(a), Arc::new(b)],
        effects,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbox_commits_the_effect_and_the_done_mark_together_or_not_at_all() {
    let Some(store) = store().await else { return };
    let pool = store.pool().clone();
    let effects = Rows::new(&pool).await;
    let table = effects.table.clone();
    let bus = Bus::builder(Arc::new(MemoryTransport::new()))
        .retry(RetryPolicy::exponential(2).with_initial_backoff(Duration::from_millis(10)))
        .build();
    let (topic, group) = (unique("ledger"), unique("g"));
    let inbox = store.inbox(Duration::from_secs(3600));
    let insert = format!("INSERT INTO {table} (message_id) VALUES ($1)");
    let sub = bus
        .subscribe::<Probe>(&topic, &group)
        .start(
            inbox.handler(move |e: Envelope<Probe>, _ctx: Context, mut tx| {
                let insert = insert.clone();
                async move {
                    sqlx::query(sqlx::AssertSqlSafe(insert))
                        .bind(e.id.as_str())
                        .execute(&mut *tx)
                        .await?;
                    if e.payload.note == "fail after writing" {
                        return Err(HandlerError::transient("downstream failed after the write"));
                    }
                    Ok(tx)
                }
            }),
        )
        .await
        .unwrap();

    // A handler that fails after writing leaves neither its write nor the done mark.
    let failing = bus.envelope(Probe {
        note: "fail after writing".into(),
        ..probe(1, "")
    });
    bus.publish_envelope(&topic, &failing).await.unwrap();
    wait_for("dead-lettered after its attempts", || {
        sub.stats().dead_lettered == 1
    })
    .await;
    assert_eq!(
        effects.counts().await.unwrap().get(failing.id.as_str()),
        None,
        "the failed attempts' writes were kept"
    );
    let marks: i64 = sqlx::query(
        "SELECT count(*) FROM busbar_idempotency WHERE scope = $1 AND key = $2 AND done",
    )
    .bind(&group)
    .bind(failing.id.as_str())
    .fetch_one(&pool)
    .await
    .unwrap()
    .get(0);
    assert_eq!(marks, 0, "a failed handler left a done mark");

    // A handler that succeeds commits both; the same message again is skipped.
    let ok = bus.envelope(probe(2, ""));
    bus.publish_envelope(&topic, &ok).await.unwrap();
    bus.publish_envelope(&topic, &ok).await.unwrap();
    wait_for("both deliveries handled", || sub.stats().handled == 2).await;
    assert_eq!(
        effects.counts().await.unwrap().get(ok.id.as_str()),
        Some(&1)
    );
    let marks: i64 = sqlx::query(
        "SELECT count(*) FROM busbar_idempotency WHERE scope = $1 AND key = $2 AND done",
    )
    .bind(&group)
    .bind(ok.id.as_str())
    .fetch_one(&pool)
    .await
    .unwrap()
    .get(0);
    assert_eq!(marks, 1);
    sub.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_records_are_purged() {
    let Some(store) = store().await else { return };
    // A table of its own: the shared one holds other runs' expired records too.
    let table = unique("busbar_purge_test").replace('-', "_");
    let store = PostgresIdempotencyStore::new(store.pool().clone(), &table).unwrap();
    store.ensure_schema().await.unwrap();
    let scope = unique("purge");
    for i in 0..5 {
        let key = format!("k{i}");
        if let busbar_core::idempotency::Claim::Acquired(lease) = store
            .claim(&scope, &key, Duration::from_secs(60))
            .await
            .unwrap()
        {
            store
                .complete(&scope, &key, &lease, Duration::from_millis(1))
                .await
                .unwrap();
        }
    }
    let started = tokio::time::Instant::now();
    wait_for("retention passes", || {
        started.elapsed() > Duration::from_millis(20)
    })
    .await;
    let purged = store.purge_expired(10_000).await.unwrap();
    assert!(purged >= 5, "purged {purged}");
    assert_eq!(purged, 5);
    let left: i64 = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
        .fetch_one(store.pool())
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {table}")))
        .execute(store.pool())
        .await
        .unwrap();
}
