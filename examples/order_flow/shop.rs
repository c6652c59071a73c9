//! The shop's services: the event types, the topics, and the three subscriptions (inventory,
//! payments, shipping) the order-flow example runs and its tests drive with `TestBus`.
//!
//! The orders topic carries two event types, `OrderPlaced` and `OrderCancelled`, keyed by
//! order id so each order's events keep their order. The inventory service handles both with
//! one subscription (`bus.route`) and a handler struct that keeps the reservations.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use busbar::{
    BoxFuture, Bus, Context, Envelope, Event, Handler, HandlerError, MemoryIdempotencyStore,
    Subscription, Text,
};
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
    fn key(&self) -> Option<Text> {
        Some(self.order_id.as_str().into())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderCancelled {
    pub order_id: String,
    pub reason: String,
}

impl Event for OrderCancelled {
    const TYPE: &'static str = "shop.order_cancelled.v1";
    fn key(&self) -> Option<Text> {
        Some(self.order_id.as_str().into())
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
    fn key(&self) -> Option<Text> {
        Some(self.order_id.as_str().into())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PaymentCaptured {
    pub order_id: String,
    pub amount_cents: u64,
}

impl Event for PaymentCaptured {
    const TYPE: &'static str = "shop.payment_captured.v1";
    fn key(&self) -> Option<Text> {
        Some(self.order_id.as_str().into())
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

/// Orders whose stock the inventory service holds.
pub type Reservations = Arc<Mutex<BTreeSet<String>>>;

/// The inventory service: reserves stock for placed orders (and tells payments), releases it
/// for cancelled ones. A handler struct with its own state, one `Handler` impl per event type.
#[derive(Clone)]
struct Inventory {
    reserved: Reservations,
    next: String,
    journal: Journal,
}

impl Handler<OrderPlaced> for Inventory {
    fn handle(
        &self,
        order: Envelope<OrderPlaced>,
        ctx: Context,
    ) -> BoxFuture<'static, Result<(), HandlerError>> {
        let this = self.clone();
        Box::pin(async move {
            let order = order.payload;
            note(&this.journal, &order.order_id, &ctx, "order placed");
            if let Ok(mut reserved) = this.reserved.lock() {
                reserved.insert(order.order_id.clone());
            }
            let reserved = InventoryReserved {
                order_id: order.order_id,
                amount_cents: order.amount_cents,
                card: order.card,
            };
            ctx.publish(&this.next, reserved).await?;
            Ok(())
        })
    }
}

impl Handler<OrderCancelled> for Inventory {
    fn handle(
        &self,
        cancelled: Envelope<OrderCancelled>,
        ctx: Context,
    ) -> BoxFuture<'static, Result<(), HandlerError>> {
        let order_id = cancelled.payload.order_id;
        note(
            &self.journal,
            &order_id,
            &ctx,
            "order cancelled → stock released",
        );
        if let Ok(mut reserved) = self.reserved.lock() {
            reserved.remove(&order_id);
        }
        Box::pin(async { Ok(()) })
    }
}

pub async fn start_services(
    bus: &Bus,
    topics: &Topics,
    journal: &Journal,
    reserved: &Reservations,
) -> busbar::Result<Vec<(&'static str, Subscription)>> {
    let inventory = Inventory {
        reserved: Arc::clone(reserved),
        next: topics.inventory.clone(),
        journal: journal.clone(),
    };
    let inventory = bus
        .route(&topics.orders, "inventory")
        .on::<OrderPlaced>(inventory.clone())
        .on::<OrderCancelled>(inventory)
        .idempotent(Arc::new(MemoryIdempotencyStore::new(100_000)))
        .start()
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
