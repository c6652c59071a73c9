//! The order-flow example's services, unit-tested with `TestBus`: no broker, no sleeps.

#[path = "../examples/order_flow/shop.rs"]
mod shop;

use busbar::DeadLetterReason;
use busbar_testkit::TestBus;
use shop::{
    order, start_services, InventoryReserved, Journal, OrderCancelled, OrderPlaced,
    PaymentCaptured, Reservations, Topics,
};

#[tokio::test(start_paused = true)]
async fn flaky_payments_are_retried_declined_cards_dead_letter_and_duplicates_are_ignored() {
    let bus = TestBus::new();
    let topics = Topics::new("test");
    let _services = start_services(&bus, &topics, &Journal::default(), &Reservations::default())
        .await
        .unwrap();
    bus.faults().duplicate_every(&topics.orders, "inventory", 1);

    let flaky = bus.envelope(order("o-1", "grace", 1_999, "flaky-2"));
    bus.publish_envelope(&topics.orders, &flaky).await.unwrap();
    bus.publish(&topics.orders, order("o-2", "alan", 15_000, "declined"))
        .await
        .unwrap();
    bus.run_until_idle().await;

    let captured = bus.assert_published_one::<PaymentCaptured>();
    assert_eq!(captured.payload.order_id, "o-1");
    assert_eq!(captured.correlation_id, flaky.correlation_id);
    assert_eq!(bus.settled(&topics.inventory, "payments").nacked, 2);
    assert_eq!(
        bus.published_in_conversation::<OrderPlaced>(&flaky.id)
            .len(),
        1
    );
    assert_eq!(bus.settled(&topics.orders, "inventory").acked, 4); // two orders, each twice...
    assert_eq!(bus.assert_published::<InventoryReserved>(2).len(), 2); // ...reserved once each

    let dead = bus
        .dead_letters(&topics.inventory, "payments", 10)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].info.reason, DeadLetterReason::Permanent);
    assert!(dead[0].info.error.contains("card declined"));
}

#[tokio::test(start_paused = true)]
async fn the_inventory_handles_placed_and_cancelled_orders_from_one_topic_and_rejects_other_types()
{
    let bus = TestBus::new();
    let topics = Topics::new("test");
    let reserved = Reservations::default();
    let services = start_services(&bus, &topics, &Journal::default(), &reserved)
        .await
        .unwrap();
    bus.publish(&topics.orders, order("o-1", "ada", 100, "visa-ok"))
        .await
        .unwrap();
    bus.publish(&topics.orders, order("o-2", "alan", 200, "visa-ok"))
        .await
        .unwrap();
    let cancelled = OrderCancelled {
        order_id: "o-2".into(),
        reason: "changed their mind".into(),
    };
    bus.publish(&topics.orders, cancelled).await.unwrap();
    // A type the inventory does not handle, on its topic: dead-lettered, not lost.
    bus.publish(&topics.orders, busbar_testkit::conformance::probe(1, ""))
        .await
        .unwrap();
    bus.run_until_idle().await;

    let held: Vec<String> = reserved.lock().unwrap().iter().cloned().collect();
    assert_eq!(held, ["o-1"]);
    assert_eq!(bus.assert_published::<InventoryReserved>(2).len(), 2);
    let inventory = services[0].1.stats();
    assert_eq!((inventory.handled, inventory.dead_lettered), (3, 1));
    let dead = bus
        .dead_letters(&topics.orders, "inventory", 10)
        .await
        .unwrap();
    assert_eq!(dead[0].info.reason, DeadLetterReason::UnknownType);
    assert!(
        dead[0].info.error.contains("shop.order_cancelled.v1"),
        "{}",
        dead[0].info.error
    );
}
