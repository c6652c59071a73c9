//! Claim + complete throughput of the PostgreSQL store (16 concurrent workers, fresh keys).
//! `cargo bench -p busbar-postgres --bench postgres_claims` (PostgreSQL on 127.0.0.1:5432 or
//! `BUSBAR_POSTGRES_URL`).

use std::sync::Arc;

use busbar_postgres::PostgresIdempotencyStore;
use busbar_testkit::idempotency::claim_complete_throughput;

const N: usize = 10_000;
const WORKERS: usize = 16;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let url = std::env::var("BUSBAR_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let pool = busbar_postgres::sqlx::postgres::PgPoolOptions::new()
            .max_connections(u32::try_from(WORKERS).expect("workers"))
            .connect(&url)
            .await
            .expect("connect");
        let store = PostgresIdempotencyStore::new(pool, "busbar_idempotency").expect("store");
        store.ensure_schema().await.expect("schema");
        let took = claim_complete_throughput(Arc::new(store), N, WORKERS).await;
        println!("PostgreSQL store: {N} claim+complete in {took:?} = {:.0} per second ({WORKERS} workers)", N as f64 / took.as_secs_f64());
    });
}
