//! The order-fulfilment saga and the services it coordinates: the event types, the topics, the
//! saga definition, and the inventory, payment and shipping subscriptions. The fulfilment
//! example runs them; its tests drive them with `TestBus`.
//!
//! Order placed → reserve inventory → charge payment → ship (confirm). A declined payment
//! releases the inventory and cancels the order; a payment that never answers times out and
//! compensates the same way.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use busbar::saga::{RunningSaga, Saga, SagaStore, Step};
use busbar::{Bus, Context, Envelope, Event, HandlerError, Subscription, Text};
use serde::{Deserialize, Serialize};

/// The topics, with a suffix so every run (and test) has its own.
#[derive(Debug, Clone)]
pub struct Topics {
    pub orders: String,
    pub replies: String,
    pub inventory: String,
    pub payments: String,
    pub shipping: String,
    suffix: String,
}

impl Topics {
    pub fn new(suffix: &str) -> Self {
        let topic = |name: &str| format!("{name}-{suffix}");
        Topics {
            orders: topic("orders"),
            replies: topic("replies"),
            inventory: topic("inventory"),
            payments: topic("payments"),
            shipping: topic("shipping"),
            suffix: suffix.to_string(),
        }
    }

    /// A subscription group of this run (Kafka shares a group across topics).
    pub fn group(&self, name: &str) -> String {
        format!("{name}-{}", self.suffix)
    }
}

macro_rules! keyed_event {
    ($name:ident, $type:literal { $($field:ident: $ty:ty),* $(,)? }) => {
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        pub struct $name { pub order_id: String, $(pub $field: $ty),* }
        impl Event for $name {
            const TYPE: &'static str = $type;
            fn key(&self) -> Option<Text> { Some(self.order_id.as_str().into()) }
        }
    };
}

keyed_event!(OrderPlaced, "shop.order_placed.v1" { sku: String, amount_cents: u64, card: String });
keyed_event!(ReserveInventory, "shop.reserve_inventory.v1" { sku: String });
keyed_event!(InventoryReserved, "shop.inventory_reserved.v1" {});
keyed_event!(ReleaseInventory, "shop.release_inventory.v1" { sku: String });
keyed_event!(ChargePayment, "shop.charge_payment.v1" { amount_cents: u64, card: String });
keyed_event!(PaymentCaptured, "shop.payment_captured.v1" {});
keyed_event!(PaymentDeclined, "shop.payment_declined.v1" { reason: String });
keyed_event!(ShipOrder, "shop.ship_order.v1" { sku: String });
keyed_event!(OrderCancelled, "shop.order_cancelled.v1" { reason: String });

/// What the saga keeps per order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Fulfilment {
    pub order_id: String,
    pub sku: String,
    pub amount_cents: u64,
    pub card: String,
}

/// The saga: one definition, read top to bottom.
pub fn fulfilment_saga(topics: &Topics, payment_timeout: Duration) -> Saga<Fulfilment> {
    let t = topics.clone();
    let (t2, t3, t4, t5) = (t.clone(), t.clone(), t.clone(), t.clone());
    Saga::<Fulfilment>::new("fulfilment")
        .group(&topics.group("fulfilment"))
        .listen(&topics.orders)
        .listen(&topics.replies)
        .own_topic(&format!("{}-saga", topics.orders))
        .initially(|s| {
            s.on(
                move |placed: Envelope<OrderPlaced>, mut step: Step<Fulfilment>| {
                    let t = t.clone();
                    async move {
                        let order = placed.payload;
                        *step.data_mut() = Fulfilment {
                            order_id: order.order_id.clone(),
                            sku: order.sku.clone(),
                            amount_cents: order.amount_cents,
                            card: order.card,
                        };
                        step.compensate_with("cancel_order")?;
                        step.send(
                            &t.inventory,
                            ReserveInventory {
                                order_id: order.order_id,
                                sku: order.sku,
                            },
                        )?;
                        step.transition_to("reserving");
                        Ok(step)
                    }
                },
            )
        })
        .during("reserving", |s| {
            s.on(
                move |_: Envelope<InventoryReserved>, mut step: Step<Fulfilment>| {
                    let t = t2.clone();
                    async move {
                        step.compensate_with("release_inventory")?;
                        let order = step.data().clone();
                        step.send(
                            &t.payments,
                            ChargePayment {
                                order_id: order.order_id,
                                amount_cents: order.amount_cents,
                                card: order.card,
                            },
                        )?;
                        step.schedule("payment", payment_timeout);
                        step.transition_to("charging");
                        Ok(step)
                    }
                },
            )
        })
        .during("charging", |s| {
            s.on(
                move |_: Envelope<PaymentCaptured>, mut step: Step<Fulfilment>| {
                    let t = t3.clone();
                    async move {
                        let order = step.data().clone();
                        step.send(
                            &t.shipping,
                            ShipOrder {
                                order_id: order.order_id,
                                sku: order.sku,
                            },
                        )?;
                        step.complete();
                        Ok(step)
                    }
                },
            )
            .on(
                |declined: Envelope<PaymentDeclined>, mut step: Step<Fulfilment>| async move {
                    step.fail(format!("payment declined: {}", declined.payload.reason));
                    Ok(step)
                },
            )
            .on_timeout("payment", |mut step: Step<Fulfilment>| async move {
                step.fail("payment not confirmed in time");
                Ok(step)
            })
        })
        .compensation(
            "release_inventory",
            move |order: Fulfilment, ctx: Context| {
                let t = t4.clone();
                async move {
                    ctx.publish(
                        &t.inventory,
                        ReleaseInventory {
                            order_id: order.order_id,
                            sku: order.sku,
                        },
                    )
                    .await?;
                    Ok(())
                }
            },
        )
        .compensation("cancel_order", move |order: Fulfilment, ctx: Context| {
            let t = t5.clone();
            async move {
                let reason = "could not be fulfilled".to_string();
                ctx.publish(
                    &t.orders,
                    OrderCancelled {
                        order_id: order.order_id,
                        reason,
                    },
                )
                .await?;
                Ok(())
            }
        })
}

/// Stock per SKU, kept by the inventory service.
#[derive(Debug, Clone, Default)]
pub struct Stock(Arc<Mutex<BTreeMap<String, i64>>>);

impl Stock {
    pub fn reserved(&self, sku: &str) -> i64 {
        let stock = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        stock.get(sku).copied().unwrap_or(0)
    }

    fn add(&self, sku: &str, delta: i64) {
        let mut stock = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        *stock.entry(sku.to_string()).or_default() += delta;
    }
}

/// The services the saga talks to. Card `declined` is declined; card `silent` never answers.
pub async fn start_services(
    bus: &Bus,
    topics: &Topics,
    stock: &Stock,
) -> busbar::Result<Vec<Subscription>> {
    let (replies, stock_reserve, stock_release) =
        (topics.replies.clone(), stock.clone(), stock.clone());
    let inventory = bus
        .route(&topics.inventory, &topics.group("inventory"))
        .on(move |reserve: Envelope<ReserveInventory>, ctx: Context| {
            let (replies, stock) = (replies.clone(), stock_reserve.clone());
            async move {
                stock.add(&reserve.payload.sku, 1);
                ctx.publish(
                    &replies,
                    InventoryReserved {
                        order_id: reserve.payload.order_id,
                    },
                )
                .await?;
                Ok::<(), HandlerError>(())
            }
        })
        .on(move |release: Envelope<ReleaseInventory>, _: Context| {
            let stock = stock_release.clone();
            async move {
                stock.add(&release.payload.sku, -1);
                Ok::<(), HandlerError>(())
            }
        })
        .start()
        .await?;
    let replies = topics.replies.clone();
    let payments = bus
        .subscribe::<ChargePayment>(&topics.payments, &topics.group("payments"))
        .start(move |charge: Envelope<ChargePayment>, ctx: Context| {
            let replies = replies.clone();
            async move {
                let order_id = charge.payload.order_id;
                match charge.payload.card.as_str() {
                    "silent" => {}
                    "declined" => {
                        let reason = "insufficient funds".to_string();
                        ctx.publish(&replies, PaymentDeclined { order_id, reason })
                            .await?;
                    }
                    _ => {
                        ctx.publish(&replies, PaymentCaptured { order_id }).await?;
                    }
                }
                Ok::<(), HandlerError>(())
            }
        })
        .await?;
    let shipping = bus
        .subscribe::<ShipOrder>(&topics.shipping, &topics.group("shipping"))
        .start(|_: Envelope<ShipOrder>, _: Context| async { Ok::<(), HandlerError>(()) })
        .await?;
    Ok(vec![inventory, payments, shipping])
}

/// Starts the saga on `store`.
pub async fn start_saga(
    bus: &Bus,
    topics: &Topics,
    store: Arc<dyn SagaStore>,
    payment_timeout: Duration,
) -> busbar::Result<RunningSaga<Fulfilment>> {
    fulfilment_saga(topics, payment_timeout)
        .start(bus, store)
        .await
}

pub fn order(order_id: &str, sku: &str, amount_cents: u64, card: &str) -> OrderPlaced {
    OrderPlaced {
        order_id: order_id.to_string(),
        sku: sku.to_string(),
        amount_cents,
        card: card.to_string(),
    }
}
