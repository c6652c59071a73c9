//! The Redis store against the local server (`scripts/local-brokers.sh redis`);
//! `BUSBAR_REDIS_URL` overrides it (default `redis://127.0.0.1:6379`).

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use busbar_redis::RedisIdempotencyStore;
use busbar_testkit::conformance::{brokers_required, unique};
use busbar_testkit::idempotency::{self as scenarios, EffectLog};

fn url() -> String {
    std::env::var("BUSBAR_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

async fn store() -> Option<RedisIdempotencyStore> {
    match RedisIdempotencyStore::connect(&url()).await {
        Ok(store) => Some(store),
        Err(e) if !brokers_required() => {
            eprintln!("SKIPPED: Redis unreachable: {e}");
            None
        }
        Err(e) => panic!("Redis unreachable: {e}"),
    }
}

/// The effect: one entry per application in a Redis list of its own per test.
struct Entries {
    connection: redis::aio::ConnectionManager,
    list: String,
}

impl Entries {
    async fn new() -> Arc<Self> {
        let client = redis::Client::open(url()).unwrap();
        Arc::new(Entries {
            connection: client.get_connection_manager().await.unwrap(),
            list: unique("busbar-test-effects"),
        })
    }
}

#[async_trait]
impl EffectLog for Entries {
    async fn apply(&self, id: &str) -> busbar_core::Result<()> {
        let mut c = self.connection.clone();
        redis::cmd("RPUSH")
            .arg(&self.list)
            .arg(id)
            .query_async::<i64>(&mut c)
            .await
            .map(drop)
            .map_err(|e| {
                busbar_core::Error::new(busbar_core::ErrorKind::Store, "apply", e.to_string())
            })
    }

    async fn counts(&self) -> busbar_core::Result<HashMap<String, usize>> {
        let mut c = self.connection.clone();
        let ids: Vec<String> = redis::cmd("LRANGE")
            .arg(&self.list)
            .arg(0)
            .arg(-1)
            .query_async(&mut c)
            .await
            .map_err(|e| {
                busbar_core::Error::new(busbar_core::ErrorKind::Store, "count", e.to_string())
            })?;
        let mut counts = HashMap::new();
        for id in ids {
            *counts.entry(id).or_default() += 1;
        }
        Ok(counts)
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
    scenarios::two_instances_apply_each_effect_once(
        [Arc::new(a), Arc::new(b)],
        Entries::new().await,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_holders_lease_expires_and_another_instance_takes_over() {
    let Some(a) = store().await else { return };
    let Some(b) = store().await else { return };
    scenarios::a_dead_holders_lease_expires_and_another_instance_takes_over(
        [Arc::new(a), Arc::new(b)],
        Entries::new().await,
    )
    .await;
}
