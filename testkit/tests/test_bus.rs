//! TestBus: assertions, run_until_idle and every fault it can inject.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use busbar_core::{Context, DeadLetterReason, Envelope, ErrorKind, Event, HandlerError};
use busbar_testkit::TestBus;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Placed {
    id: u32,
}
impl Event for Placed {
    const TYPE: &'static str = "t.placed.v1";
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Shipped {
    id: u32,
}
impl Event for Shipped {
    const TYPE: &'static str = "t.shipped.v1";
}

/// Starts a "shipping" subscription on `orders` that publishes `Shipped` for each `Placed`,
/// counting its calls.
async fn shipping(bus: &TestBus) -> (busbar_core::Subscription, Arc<AtomicU32>) {
    let calls = Arc::new(AtomicU32::new(0));
    let count = Arc::clone(&calls);
    let sub = bus
        .subscribe::<Placed>("orders", "shipping")
        .start(move |e: Envelope<Placed>, ctx: Context| {
            count.fetch_add(1, Ordering::SeqCst);
            async move {
                ctx.publish("shipments", Shipped { id: e.payload.id })
                    .await?;
                Ok(())
            }
        })
        .await
        .unwrap();
    (sub, calls)
}

fn panic_text(result: std::thread::Result<impl Sized>) -> String {
    let payload = result.err().expect("expected a panic");
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

#[tokio::test(start_paused = true)]
async fn run_until_idle_drives_a_chain_and_assertions_read_the_record() {
    let bus = TestBus::new();
    let (_sub, calls) = shipping(&bus).await;
    bus.declare("shipments", "nobody-consumes-this")
        .await
        .unwrap();
    let first = bus.envelope(Placed { id: 1 });
    bus.publish_envelope("orders", &first).await.unwrap();
    bus.publish("orders", Placed { id: 2 }).await.unwrap();
    bus.run_until_idle().await;

    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let shipped = bus.assert_published::<Shipped>(2);
    assert_eq!(
        shipped.iter().map(|s| s.payload.id).collect::<Vec<_>>(),
        [1, 2]
    );
    let chain = bus.published_in_conversation::<Shipped>(&first.id);
    assert_eq!(chain.len(), 1);
    assert_eq!(chain[0].causation_id.as_deref(), Some(first.id.as_str()));
    assert_eq!(bus.published_on::<Placed>("orders").len(), 2);
    assert!(bus.published_on::<Placed>("shipments").is_empty());
    assert_eq!(
        bus.assert_published_matching::<Shipped>(|s| s.payload.id == 2)
            .payload
            .id,
        2
    );
    assert_eq!(bus.settled("orders", "shipping").acked, 2);
    assert!(
        bus.is_idle(),
        "a declared group without consumers must not block idleness"
    );
}

#[tokio::test(start_paused = true)]
async fn failed_assertions_show_what_was_published_instead() {
    let bus = TestBus::new();
    bus.publish("orders", Placed { id: 9 }).await.unwrap();
    let text = panic_text(std::panic::catch_unwind(std::panic::AssertUnwindSafe(
        || bus.assert_published::<Shipped>(1),
    )));
    assert!(
        text.contains("expected 1 published t.shipped.v1 event(s), found 0"),
        "{text}"
    );
    assert!(text.contains("topic orders"), "{text}");
    assert!(text.contains("type t.placed.v1"), "{text}");
    let text = panic_text(std::panic::catch_unwind(std::panic::AssertUnwindSafe(
        || bus.assert_published_matching::<Placed>(|p| p.payload.id == 1),
    )));
    assert!(
        text.contains("no published t.placed.v1 event matches"),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn injected_handler_failures_take_the_retry_path_then_succeed() {
    let bus = TestBus::new();
    let (sub, calls) = shipping(&bus).await;
    bus.faults()
        .fail_next_handler_calls("orders", "shipping", 2);
    bus.publish("orders", Placed { id: 1 }).await.unwrap();
    bus.run_until_idle().await;
    // Failed attempts never reach the handler; the third attempt does and succeeds.
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let stats = sub.stats();
    assert_eq!(
        (stats.failed_attempts, stats.retried, stats.handled),
        (2, 2, 1)
    );
    assert_eq!(bus.settled("orders", "shipping").nacked, 2);
    bus.assert_published_one::<Shipped>();
}

#[tokio::test(start_paused = true)]
async fn injected_permanent_failures_dead_letter() {
    let bus = TestBus::new();
    let (_sub, calls) = shipping(&bus).await;
    bus.faults()
        .fail_next_handler_calls_permanently("orders", "shipping", 1);
    bus.publish("orders", Placed { id: 1 }).await.unwrap();
    bus.run_until_idle().await;
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    let dead = bus.dead_letters("orders", "shipping", 10).await.unwrap();
    assert_eq!(dead[0].info.reason, DeadLetterReason::Permanent);
    assert!(
        dead[0].info.error.contains("injected failure"),
        "{}",
        dead[0].info.error
    );
    bus.assert_not_published::<Shipped>();
}

#[tokio::test(start_paused = true)]
async fn duplicated_deliveries_reach_the_handler_twice() {
    let bus = TestBus::new();
    let (_sub, calls) = shipping(&bus).await;
    bus.faults().duplicate_every("orders", "shipping", 2);
    for id in 0..4 {
        bus.publish("orders", Placed { id }).await.unwrap();
    }
    bus.run_until_idle().await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        6,
        "every 2nd of 4 messages delivered twice"
    );
    assert_eq!(bus.settled("orders", "shipping").acked, 6);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_ack_makes_the_message_come_back() {
    let bus = TestBus::new();
    let (_sub, calls) = shipping(&bus).await;
    bus.faults().drop_next_acks("orders", "shipping", 1);
    bus.publish("orders", Placed { id: 1 }).await.unwrap();
    bus.run_until_idle().await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "handled, ack lost, redelivered, handled again"
    );
    let settled = bus.settled("orders", "shipping");
    assert_eq!((settled.abandoned, settled.acked), (1, 1));
    assert_eq!(bus.memory().pending("orders", "shipping"), 0);
}

#[tokio::test(start_paused = true)]
async fn delayed_deliveries_arrive_after_the_delay() {
    let bus = TestBus::new();
    let (_sub, calls) = shipping(&bus).await;
    bus.faults()
        .delay_deliveries("orders", "shipping", Duration::from_secs(5));
    let start = tokio::time::Instant::now();
    bus.publish("orders", Placed { id: 1 }).await.unwrap();
    bus.run_until_idle().await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(
        start.elapsed() >= Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn rejected_publishes_surface_to_the_publisher_and_are_not_recorded() {
    let bus = TestBus::new();
    bus.faults().reject_publishes(2);
    for _ in 0..2 {
        let err = bus.publish("orders", Placed { id: 1 }).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Connection);
        assert!(err.is_retryable());
    }
    bus.publish("orders", Placed { id: 2 }).await.unwrap();
    let placed = bus.assert_published_one::<Placed>();
    assert_eq!(placed.payload.id, 2);
}

#[tokio::test(start_paused = true)]
async fn run_until_idle_fails_with_the_busy_queue_when_a_handler_hangs() {
    let bus = Arc::new(TestBus::new());
    let _sub = bus
        .subscribe::<Placed>("orders", "stuck")
        .start(|_e: Envelope<Placed>, _c: Context| async {
            std::future::pending::<()>().await;
            Ok::<_, HandlerError>(())
        })
        .await
        .unwrap();
    bus.publish("orders", Placed { id: 1 }).await.unwrap();
    let waiting = Arc::clone(&bus);
    let result =
        tokio::spawn(async move { waiting.run_until_idle_within(Duration::from_secs(2)).await })
            .await;
    let err = result.expect_err("run_until_idle must fail when never idle");
    let text = panic_text(Err::<(), _>(err.into_panic()));
    assert!(text.contains("orders/stuck: 1 unsettled"), "{text}");
}
