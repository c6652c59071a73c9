//! The order-flow example's services, unit-tested with `TestBus`: no broker, no sleeps.

#[path = "../examples/order_flow/shop.rs"]
mod shop;

use busbar::DeadLetterReason;
use busbar_testkit::TestBus;
use shop::{
    order, start_services, InventoryReserved, Journal, OrderPlaced, PaymentCaptured, Topics,
};

#[tokio::test(start_paused = true)]
async fn flaky_payments_are_retried_declined_cards_dead_letter_and_duplicates_are_ignored() {
    let bus = TestBus::new();
    let topics = Topics::new("test");
    let _services = start_services(&bus, &topics, &Journal::default())
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
