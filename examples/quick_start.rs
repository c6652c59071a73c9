//! The README's quick start (tests/readme.rs keeps the two the same). It serves until Ctrl-C:
//! `cargo run --example quick_start`.
use std::time::Duration;

use busbar::{Context, Envelope, Event};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct OrderPlaced {
    id: u64,
}

impl Event for OrderPlaced {
    const TYPE: &'static str = "shop.order_placed.v1"; // its CloudEvents `type`
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bus = busbar::connect("memory://").await?; // or amqp://, kafka://, sqs://
    bus.declare("shop.orders", "billing").await?; // the group gets every order from now on
    let billing = bus
        .subscribe::<OrderPlaced>("shop.orders", "billing")
        .start(|order: Envelope<OrderPlaced>, _: Context| async move {
            println!("billing order {}", order.payload.id);
            Ok(()) // an Err is retried, then dead-lettered
        })
        .await?;
    bus.publish("shop.orders", OrderPlaced { id: 1 }).await?;
    tokio::signal::ctrl_c().await?; // serve until Ctrl-C
    billing.shutdown(Duration::from_secs(10)).await?; // running handlers finish first
    bus.close().await?;
    Ok(())
}
