//! Claim + complete throughput of the Redis store (16 concurrent workers, fresh keys), next to
//! the in-memory store for scale. `cargo bench -p busbar-redis --bench redis_claims`.

use std::sync::Arc;

use busbar_core::idempotency::{IdempotencyStore, MemoryIdempotencyStore};
use busbar_redis::RedisIdempotencyStore;
use busbar_testkit::idempotency::claim_complete_throughput;

const N: usize = 20_000;
const WORKERS: usize = 16;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let url =
            std::env::var("BUSBAR_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let stores: [(&str, Arc<dyn IdempotencyStore>); 2] = [
            (
                "Redis store",
                Arc::new(RedisIdempotencyStore::connect(&url).await.expect("connect")),
            ),
            (
                "in-memory store",
                Arc::new(MemoryIdempotencyStore::new(100_000)),
            ),
        ];
        for (name, store) in stores {
            let took = claim_complete_throughput(store, N, WORKERS).await;
            println!(
                "{name}: {N} claim+complete in {took:?} = {:.0} per second ({WORKERS} workers)",
                N as f64 / took.as_secs_f64()
            );
        }
    });
}
