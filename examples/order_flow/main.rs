//! An order flow across three services: orders are placed, inventory is reserved, payments are
//! captured, orders are shipped. Some payments fail transiently and succeed on retry, one card
//! is declined for good and lands in the dead-letter queue, and a duplicated order is ignored by
//! the idempotent inventory service. Every order's events share one correlation id.
//!
//! The orders topic carries two event types: the customer with the declined card cancels the
//! order, and the inventory service, which handles both types in one subscription, releases
//! its stock. Both events have the order id as key, so the cancellation is handled after the
//! placement on every broker that orders by key.
//!
//! Runs on the in-process memory transport by default; set `BUSBAR_URL` to run it on a broker.
//!
//! ```text
//! cargo run --example order_flow
//! ```

mod shop;

use std::time::Duration;

use busbar::{BusConfig, Envelope, RetryPolicy};
use shop::{start_services, InventoryReserved, Journal, OrderCancelled, Reservations, Topics};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .init();

    let url = std::env::var("BUSBAR_URL").unwrap_or_else(|_| "memory://".to_string());
    let config = BusConfig {
        source: "/shop/order-flow".to_string(),
        retry: RetryPolicy::exponential(4)
            .with_initial_backoff(Duration::from_millis(50))
            .with_max_backoff(Duration::from_millis(500)),
        ..BusConfig::from_url(&url)?
    };
    let bus = busbar::connect_with(&config).await?;
    // Fresh topic names per run, so a re-run on a durable broker starts clean.
    let topics = Topics::new(&run_suffix());
    println!("busbar order flow on {}", config.url);

    let journal = Journal::default();
    let reserved = Reservations::default();
    let subscriptions = start_services(&bus, &topics, &journal, &reserved).await?;

    // Place the orders. Order o-4 is published twice with the same id, as a producer that
    // retried after a timeout would: the idempotent inventory service handles it once.
    let orders = [
        ("o-1", "ada", 4_200, "visa-ok"),
        ("o-2", "grace", 1_999, "flaky-2"),
        ("o-3", "alan", 15_000, "declined"),
        ("o-4", "barbara", 750, "visa-ok"),
        ("o-5", "edsger", 3_100, "flaky-1"),
    ];
    for (order_id, customer, amount_cents, card) in orders {
        let envelope = bus.envelope(shop::order(order_id, customer, amount_cents, card));
        bus.publish_envelope(&topics.orders, &envelope).await?;
        if order_id == "o-4" {
            bus.publish_envelope(&topics.orders, &envelope).await?;
        }
        if card == "declined" {
            // Another event type on the same topic, continuing the order's conversation.
            let cancelled = OrderCancelled {
                order_id: order_id.to_string(),
                reason: "customer changed their mind".to_string(),
            };
            let cancelled = bus
                .envelope(cancelled)
                .with_correlation_id(envelope.conversation_id())
                .with_causation_id(envelope.id.clone());
            bus.publish_envelope(&topics.orders, &cancelled).await?;
        }
    }

    // Wait (with a deadline) until every order reached its end: shipped or dead-lettered.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let [inventory, payments, shipping] = [0, 1, 2].map(|i| subscriptions[i].1.stats());
        let done = shipping.handled == 4 && payments.dead_lettered == 1 && inventory.handled == 6;
        if done {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err("the order flow did not finish within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The second copy of o-4 is skipped by the idempotent inventory service, unless the broker
    // deduplicated the publish itself (SQS FIFO does, by message id): give it a moment to show.
    let copy_deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let copy_skipped = loop {
        if subscriptions[0].1.stats().duplicates_skipped >= 1 {
            break true;
        }
        if tokio::time::Instant::now() > copy_deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!(
        "o-4 published twice: {}",
        if copy_skipped {
            "the idempotent inventory service skipped the second copy"
        } else {
            "the broker kept one copy (it deduplicates publishes by message id)"
        }
    );

    println!();
    println!(
        "{:<10} {:>8} {:>16} {:>8} {:>14} {:>19}",
        "service", "handled", "failed attempts", "retried", "dead-lettered", "duplicates skipped"
    );
    for (name, subscription) in &subscriptions {
        let s = subscription.stats();
        println!(
            "{name:<10} {:>8} {:>16} {:>8} {:>14} {:>19}",
            s.handled, s.failed_attempts, s.retried, s.dead_lettered, s.duplicates_skipped
        );
    }

    let held = reserved
        .lock()
        .map_err(|_| "reservations poisoned")?
        .clone();
    println!(
        "\nstock held for: {} (o-3 was cancelled and released)",
        held.into_iter().collect::<Vec<_>>().join(", ")
    );

    println!("\ndead letters:");
    let mut dead_orders = Vec::new();
    for dead in bus.dead_letters(&topics.inventory, "payments", 100).await? {
        let order =
            Envelope::<InventoryReserved>::from_message(&busbar::codec::Json, &dead.message)
                .map(|e| e.payload.order_id)
                .unwrap_or_else(|_| dead.message.id.to_string());
        dead_orders.push(order.clone());
        println!(
            "  group {} on {}: order {order}, {} after {} attempt(s): {}",
            dead.info.group, dead.info.topic, dead.info.reason, dead.info.attempts, dead.info.error
        );
    }

    println!("\nconversations (one correlation id per order):");
    let journal = journal.lock().map_err(|_| "journal poisoned")?.clone();
    for (order, steps) in &journal {
        let correlation = &steps[0].0;
        let shared = steps.iter().all(|(c, _)| c == correlation);
        let mut path: Vec<&str> = steps.iter().map(|(_, step)| *step).collect();
        if dead_orders.contains(order) {
            path.push("payment dead-lettered");
        }
        println!(
            "  {order}  {correlation}  {}{}",
            path.join(" → "),
            if shared {
                ""
            } else {
                "  (correlation broken!)"
            }
        );
    }

    for (_, subscription) in subscriptions {
        subscription.shutdown(Duration::from_secs(5)).await?;
    }
    bus.close().await?;
    Ok(())
}

fn run_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{:x}", nanos & 0xffff_ffff_ffff)
}
