//! The shop's services: the event types, the topics, and the three subscriptions (inventory,
//! payments, shipping) the order-flow example runs and its tests drive with `TestBus`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use busbar::{Bus, Context, Envelope, Event, HandlerError, MemoryIdempotencyStore, Subscription};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderPlaced {
    pub order_id: String,
    pub customer: String,
    pub amount_cents: u64,
    pub card: String,
}

impl Event for OrderPlaced {
    const TYPE: &'static str = "shop.order_placed.v1";
    fn key(&self) -> Option<String> {
        Some(self.order_id.clone())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InventoryReserved {
    pub order_id: String,
    pub amount_cents: u64,
    pub card: String,
}

impl Event for InventoryReserved {
    const TYPE: &'static str = "shop.inventory_reserved.v1";
    fn key(&self) -> Option<String> {
        Some(self.order_id.clone())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PaymentCaptured {
    pub order_id: String,
    pub amount_cents: u64,
}

impl Event for PaymentCaptured {
    const TYPE: &'static str = "shop.payment_captured.v1";
    fn key(&self) -> Option<String> {
        Some(self.order_id.clone())
    }
}

/// The conversation of each order: which steps happened under which correlation id.
pub type Journal = Arc<Mutex<BTreeMap<String, Vec<(String, &'static str)>>>>;

fn note(journal: &Journal, order: &str, ctx: &Context, step: &'static str) {
    if let Ok(mut journal) = journal.lock() {
        journal
            .entry(order.to_string())
            .or_default()
            .push((ctx.correlation_id().to_string(), step));
    }
}

/// A new order.
pub fn order(order_id: &str, customer: &str, amount_cents: u64, card: &str) -> OrderPlaced {
    OrderPlaced {
        order_id: order_id.into(),
        customer: customer.into(),
        amount_cents,
        card: card.into(),
    }
}

/// A payment provider: `flaky-N` cards fail their first N attempts, `declined` always fails.
fn charge(card: &str, attempt: u32) -> Result<(), HandlerError> {
    if card == "declined" {
        return Err(HandlerError::permanent("card declined by issuer (code 05)"));
    }
    if let Some(failures) = card
        .strip_prefix("flaky-")
        .and_then(|n| n.parse::<u32>().ok())
    {
        if attempt <= failures {
            return Err(HandlerError::transient(format!(
                "payment provider timed out (attempt {attempt})"
            )));
        }
    }
    Ok(())
}

/// The three topics of one run of the shop.
pub struct Topics {
    pub orders: String,
    pub inventory: String,
    pub payments: String,
}

impl Topics {
    /// Topic names suffixed with `run`, so a re-run on a durable broker starts clean.
    pub fn new(run: &str) -> Self {
        Topics {
            orders: format!("shop.orders.{run}"),
            inventory: format!("shop.inventory.{run}"),
            payments: format!("shop.payments.{run}"),
        }
    }
}

pub async fn start_services(
    bus: &Bus,
    topics: &Topics,
    journal: &Journal,
) -> busbar::Result<Vec<(&'static str, Subscription)>> {
    let (next, log) = (topics.inventory.clone(), journal.clone());
    let inventory = bus
        .subscribe::<OrderPlaced>(&topics.orders, "inventory")
        .idempotent(Arc::new(MemoryIdempotencyStore::new(100_000)))
        .start(move |order: Envelope<OrderPlaced>, ctx: Context| {
            let (next, log) = (next.clone(), log.clone());
            async move {
                note(&log, &order.payload.order_id, &ctx, "order placed");
                let reserved = InventoryReserved {
                    order_id: order.payload.order_id,
                    amount_cents: order.payload.amount_cents,
                    card: order.payload.card,
                };
                ctx.publish(&next, reserved).await?;
                Ok(())
            }
        })
        .await?;

    let (next, log) = (topics.payments.clone(), journal.clone());
    let payments = bus
        .subscribe::<InventoryReserved>(&topics.inventory, "payments")
        .start(move |reserved: Envelope<InventoryReserved>, ctx: Context| {
            let (next, log) = (next.clone(), log.clone());
            async move {
                charge(&reserved.payload.card, ctx.attempt())?;
                note(&log, &reserved.payload.order_id, &ctx, "inventory reserved");
                let captured = PaymentCaptured {
                    order_id: reserved.payload.order_id,
                    amount_cents: reserved.payload.amount_cents,
                };
                ctx.publish(&next, captured).await?;
                Ok(())
            }
        })
        .await?;

    let log = journal.clone();
    let shipping = bus
        .subscribe::<PaymentCaptured>(&topics.payments, "shipping")
        .start(move |paid: Envelope<PaymentCaptured>, ctx: Context| {
            let log = log.clone();
            async move {
                note(
                    &log,
                    &paid.payload.order_id,
                    &ctx,
                    "payment captured → shipped",
                );
                Ok(())
            }
        })
        .await?;

    Ok(vec![
        ("inventory", inventory),
        ("payments", payments),
        ("shipping", shipping),
    ])
}
