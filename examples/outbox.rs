//! The transactional outbox, end to end: an order row and its `OrderPlaced` event commit in
//! one transaction; shipping handles the event in an inbox (its shipment row, the done mark and
//! its follow-up `ShipmentScheduled` commit together, through the consumer outbox); a
//! notifier sees the follow-up.
//!
//! ```sh
//! cargo run --example outbox --features postgres   # memory:// and the local PostgreSQL
//! BUSBAR_URL=amqp://guest:guest@127.0.0.1:5672/%2f cargo run --example outbox --features postgres,rabbitmq
//! ```
//!
//! `DATABASE_URL` chooses the database (default `postgres://postgres@127.0.0.1:5432/test`).

use std::time::Duration;

use busbar::postgres::sqlx::{self, postgres::PgPoolOptions};
use busbar::postgres::{PostgresIdempotencyStore, PostgresOutbox};
use busbar::{Context, Envelope, Event, HandlerError, Text};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct OrderPlaced {
    order_id: i64,
    item: String,
}

impl Event for OrderPlaced {
    const TYPE: &'static str = "shop.order_placed.v1";
    fn key(&self) -> Option<Text> {
        Some(Text::from_display(&self.order_id))
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct ShipmentScheduled {
    order_id: i64,
}

impl Event for ShipmentScheduled {
    const TYPE: &'static str = "shop.shipment_scheduled.v1";
    fn key(&self) -> Option<Text> {
        Some(Text::from_display(&self.order_id))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let url = std::env::var("BUSBAR_URL").unwrap_or_else(|_| "memory://".into());
    let database = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let bus = busbar::connect(&url).await?;
    let pool = PgPoolOptions::new()
        .max_connections(5)
        .connect(&database)
        .await?;
    for table in [
        "CREATE TABLE IF NOT EXISTS example_orders (id bigint PRIMARY KEY, item text NOT NULL)",
        "CREATE TABLE IF NOT EXISTS example_shipments (order_id bigint PRIMARY KEY)",
    ] {
        sqlx::query(table).execute(&pool).await?;
    }

    // The outbox and its relay (run one per service instance; one at a time is active).
    let outbox = PostgresOutbox::new(&bus, pool.clone())?;
    outbox.ensure_schema().await?;
    let relay = outbox.relay().start().await?;
    bus.declare("shop.orders", "shipping").await?;
    bus.declare("shop.shipments", "notifications").await?;

    // Shipping: an inbox handler; what it publishes through `ctx` goes into the outbox in its
    // transaction.
    let store = PostgresIdempotencyStore::new(pool.clone(), "busbar_idempotency")?;
    store.ensure_schema().await?;
    let inbox = store
        .inbox(Duration::from_secs(7 * 24 * 3600))
        .with_outbox(&outbox);
    let shipping = bus
        .subscribe::<OrderPlaced>("shop.orders", "shipping")
        .start(inbox.handler(
            |order: Envelope<OrderPlaced>, ctx: Context, mut tx| async move {
                sqlx::query(
                    "INSERT INTO example_shipments (order_id) VALUES ($1) ON CONFLICT DO NOTHING",
                )
                .bind(order.payload.order_id)
                .execute(&mut *tx)
                .await?;
                let follow_up = ShipmentScheduled {
                    order_id: order.payload.order_id,
                };
                ctx.publish("shop.shipments", follow_up).await?;
                Ok(tx) // the shipment, the follow-up and the done mark commit together
            },
        ))
        .await?;

    let (seen, mut notified) = tokio::sync::mpsc::unbounded_channel();
    let notifications = bus
        .subscribe::<ShipmentScheduled>("shop.shipments", "notifications")
        .start(
            move |shipment: Envelope<ShipmentScheduled>, _ctx: Context| {
                let seen = seen.clone();
                async move {
                    let _ = seen.send((shipment.payload.order_id, shipment.correlation_id));
                    Ok::<(), HandlerError>(())
                }
            },
        )
        .await?;

    // The order row and its event: one transaction.
    let order_id = i64::from(fastrand::u32(..));
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO example_orders (id, item) VALUES ($1, $2)")
        .bind(order_id)
        .bind("teapot")
        .execute(&mut *tx)
        .await?;
    let event_id = outbox
        .publish(
            &mut tx,
            "shop.orders",
            OrderPlaced {
                order_id,
                item: "teapot".into(),
            },
        )
        .await?;
    tx.commit().await?;
    println!("order {order_id} committed with its event {event_id}");

    loop {
        let next = tokio::time::timeout(Duration::from_secs(30), notified.recv()).await;
        let Ok(Some((shipped, correlation))) = next else {
            return Err("no shipment notification within 30 s".into());
        };
        if shipped == order_id {
            println!(
                "shipment for order {shipped} scheduled (conversation {})",
                correlation.as_deref().unwrap_or("?")
            );
            break;
        }
    }

    notifications.shutdown(Duration::from_secs(5)).await?;
    shipping.shutdown(Duration::from_secs(5)).await?;
    let stats = relay.shutdown(Duration::from_secs(5)).await?;
    println!("relay published {} events", stats.published);
    bus.close().await?;
    Ok(())
}
