//! The order-fulfilment saga: order placed → reserve inventory → charge payment → ship. A
//! declined payment releases the inventory and cancels the order; a payment that never
//! answers times out (after 2 s here) and compensates the same way. Inventory, payment and
//! shipping run as separate subscriptions.
//!
//! ```sh
//! cargo run --example fulfilment                        # memory://, memory saga store
//! BUSBAR_URL=amqp://guest:guest@127.0.0.1:5672/%2f cargo run --example fulfilment --features rabbitmq
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/test cargo run --example fulfilment --features postgres
//! ```
//!
//! With `DATABASE_URL` (and the `postgres` feature) the saga's instances, timeouts and
//! messages live in PostgreSQL, the messages leaving through the outbox's relay.

mod shop;

use std::sync::Arc;
use std::time::Duration;

use busbar::saga::{MemorySagaStore, SagaStatus, SagaStore};
use busbar::Bus;
use shop::{order, start_saga, start_services, Stock, Topics};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .init();
    let url = std::env::var("BUSBAR_URL").unwrap_or_else(|_| "memory://".to_string());
    let bus = busbar::connect(&url).await?;
    let suffix = format!("{:08x}", fastrand::u32(..));
    let topics = Topics::new(&suffix);
    let (store, relay) = saga_store(&bus, &suffix).await?;
    println!(
        "fulfilment saga on {url}, {} store",
        if relay.is_some() {
            "PostgreSQL"
        } else {
            "memory"
        }
    );

    let stock = Stock::default();
    let services = start_services(&bus, &topics, &stock).await?;
    let saga = start_saga(&bus, &topics, store, Duration::from_secs(2)).await?;

    let orders = [
        ("o-1", "kettle", 4_200, "visa"),
        ("o-2", "toaster", 15_000, "declined"),
        ("o-3", "teapot", 900, "silent"),
    ];
    for (id, sku, cents, card) in orders {
        bus.publish(&topics.orders, order(id, sku, cents, card))
            .await?;
    }

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut finished = Vec::new();
    for (id, ..) in orders {
        loop {
            match saga.get(id).await? {
                Some(record) if record.status.is_finished() => {
                    finished.push(record);
                    break;
                }
                _ if tokio::time::Instant::now() > deadline => {
                    return Err(format!("order {id} did not finish within 60 s").into())
                }
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    println!(
        "\n{:<6} {:<12} {:<12} {:<34} why",
        "order", "status", "state", "compensations run"
    );
    for record in &finished {
        let run: Vec<&str> = record
            .compensations
            .iter()
            .rev()
            .take(record.compensated)
            .map(String::as_str)
            .collect();
        println!(
            "{:<6} {:<12} {:<12} {:<34} {}",
            record.instance_id,
            record.status.as_str(),
            record.state,
            if run.is_empty() {
                "-".to_string()
            } else {
                run.join(" → ")
            },
            record.failure.as_deref().unwrap_or("-"),
        );
    }
    println!(
        "\nstock reserved: kettle {}, toaster {}, teapot {} (released for the failed orders)",
        stock.reserved("kettle"),
        stock.reserved("toaster"),
        stock.reserved("teapot")
    );
    let stats = saga.stats();
    println!(
        "saga: {} started, {} completed, {} compensated, {} timeouts fired, {} transitions",
        stats.started, stats.completed, stats.compensated, stats.timeouts_fired, stats.transitions
    );
    let expected = [
        SagaStatus::Completed,
        SagaStatus::Compensated,
        SagaStatus::Compensated,
    ];
    if finished.iter().map(|r| r.status).ne(expected) {
        return Err("an order ended in an unexpected state".into());
    }

    saga.shutdown(Duration::from_secs(5)).await?;
    for subscription in services {
        subscription.shutdown(Duration::from_secs(5)).await?;
    }
    if let Some(relay) = relay {
        relay.shutdown().await?;
    }
    bus.close().await?;
    Ok(())
}

/// Stops the outbox relay of the PostgreSQL store, when there is one.
trait Stop {
    fn shutdown(self: Box<Self>) -> futures::future::BoxFuture<'static, busbar::Result<()>>;
}

#[cfg(feature = "postgres")]
async fn saga_store(
    bus: &Bus,
    suffix: &str,
) -> Result<(Arc<dyn SagaStore>, Option<Box<dyn Stop>>), Box<dyn std::error::Error>> {
    use busbar::postgres::sqlx::{self, PgPool};
    use busbar::postgres::{PostgresOutbox, PostgresSagaStore, Relay};

    /// The relay, and this run's tables to drop at the end.
    struct Postgres {
        relay: Relay,
        pool: PgPool,
        tables: Vec<String>,
    }

    impl Stop for Postgres {
        fn shutdown(self: Box<Self>) -> futures::future::BoxFuture<'static, busbar::Result<()>> {
            Box::pin(async move {
                self.relay.shutdown(Duration::from_secs(5)).await?;
                for table in &self.tables {
                    let drop = format!("DROP TABLE IF EXISTS {table}");
                    if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(drop))
                        .execute(&self.pool)
                        .await
                    {
                        eprintln!("could not drop {table}: {e}");
                    }
                }
                Ok(())
            })
        }
    }

    let Ok(database) = std::env::var("DATABASE_URL") else {
        return Ok((Arc::new(MemorySagaStore::new()), None));
    };
    let pool = busbar::postgres::sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&database)
        .await?;
    let outbox = PostgresOutbox::with_table(bus, pool, &format!("fulfilment_outbox_{suffix}"))?;
    outbox.ensure_schema().await?;
    let store = PostgresSagaStore::with_table(&outbox, &format!("fulfilment_saga_{suffix}"))?;
    store.ensure_schema().await?;
    let relay = outbox.relay().start().await?;
    let saga = store.table().to_string();
    let tables = vec![
        format!("{saga}_applied"),
        format!("{saga}_timeouts"),
        saga,
        outbox.table().to_string(),
    ];
    let pool = outbox.pool().clone();
    Ok((
        Arc::new(store),
        Some(Box::new(Postgres {
            relay,
            pool,
            tables,
        })),
    ))
}

#[cfg(not(feature = "postgres"))]
async fn saga_store(
    _bus: &Bus,
    _suffix: &str,
) -> Result<(Arc<dyn SagaStore>, Option<Box<dyn Stop>>), Box<dyn std::error::Error>> {
    if std::env::var_os("DATABASE_URL").is_some() {
        return Err(
            "DATABASE_URL is set: build with `--features postgres` for the PostgreSQL saga store"
                .into(),
        );
    }
    Ok((Arc::new(MemorySagaStore::new()), None))
}
