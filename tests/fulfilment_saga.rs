//! The fulfilment saga and its services, unit-tested with `TestBus` and the memory saga store:
//! no broker, paused clock, no sleeps.

#[path = "../examples/fulfilment/shop.rs"]
mod shop;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use busbar::saga::{MemorySagaStore, MissingInstance, Saga, SagaFilter, SagaStatus, Step};
use busbar::{Context, Envelope, Event, HandlerError, Message, Text};
use busbar_testkit::TestBus;
use serde::{Deserialize, Serialize};
use shop::{
    order, start_saga, start_services, ChargePayment, Fulfilment, InventoryReserved,
    OrderCancelled, PaymentCaptured, ReleaseInventory, ReserveInventory, ShipOrder, Stock, Topics,
};

const PAYMENT_TIMEOUT: Duration = Duration::from_secs(15 * 60);

struct World {
    bus: TestBus,
    topics: Topics,
    stock: Stock,
    saga: busbar::saga::RunningSaga<Fulfilment>,
    _services: Vec<busbar::Subscription>,
}

async fn world() -> World {
    let bus = TestBus::new();
    let topics = Topics::new("test");
    let stock = Stock::default();
    let services = start_services(&bus, &topics, &stock).await.unwrap();
    let saga = start_saga(
        &bus,
        &topics,
        Arc::new(MemorySagaStore::new()),
        PAYMENT_TIMEOUT,
    )
    .await
    .unwrap();
    World {
        bus,
        topics,
        stock,
        saga,
        _services: services,
    }
}

/// The types of the commands and events on the shop's topics (not the saga's own), in order.
fn sent(bus: &TestBus, topics: &Topics) -> Vec<(String, String)> {
    let ours = [
        &topics.inventory,
        &topics.payments,
        &topics.shipping,
        &topics.orders,
    ];
    bus.published_messages()
        .iter()
        .filter(|m| ours.iter().any(|t| **t == m.topic))
        .map(|m: &Message| {
            let short = m
                .header("ce_type")
                .unwrap_or("?")
                .trim_start_matches("shop.");
            (
                m.topic.to_string(),
                short.trim_end_matches(".v1").to_string(),
            )
        })
        .collect()
}

fn names(pairs: &[(String, String)]) -> Vec<&str> {
    pairs.iter().map(|(_, t)| t.as_str()).collect()
}

#[tokio::test(start_paused = true)]
async fn a_paid_order_reserves_charges_and_ships_in_order_and_completes() {
    let w = world().await;
    let placed = w.bus.envelope(order("o-1", "sku-1", 4_200, "visa"));
    w.bus
        .publish_envelope(&w.topics.orders, &placed)
        .await
        .unwrap();
    w.bus.run_until_idle().await;

    let record = w
        .saga
        .get("o-1")
        .await
        .unwrap()
        .expect("the order started a saga");
    assert_eq!(record.status, SagaStatus::Completed);
    assert_eq!(record.correlation_id, placed.id);
    assert!(
        record.timeouts.is_empty(),
        "completing cancels the payment timeout"
    );
    assert_eq!(
        names(&sent(&w.bus, &w.topics)),
        [
            "order_placed",
            "reserve_inventory",
            "charge_payment",
            "ship_order"
        ]
    );
    // Every message of the saga continues the order's conversation.
    assert_eq!(
        w.bus
            .published_in_conversation::<ShipOrder>(&placed.id)
            .len(),
        1
    );
    assert_eq!(w.stock.reserved("sku-1"), 1);

    // The payment timeout was cancelled: it never fires.
    tokio::time::advance(PAYMENT_TIMEOUT * 2).await;
    assert_eq!(w.saga.fire_due_timeouts().await.unwrap(), 0);
    let stats = w.saga.stats();
    assert_eq!(
        (stats.started, stats.completed, stats.timeouts_fired),
        (1, 1, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn a_declined_payment_releases_the_inventory_then_cancels_the_order() {
    let w = world().await;
    w.bus
        .publish(&w.topics.orders, order("o-2", "sku-2", 15_000, "declined"))
        .await
        .unwrap();
    w.bus.run_until_idle().await;

    let record = w.saga.get("o-2").await.unwrap().unwrap();
    assert_eq!(record.status, SagaStatus::Compensated);
    assert_eq!(
        record.failure.as_deref(),
        Some("payment declined: insufficient funds")
    );
    assert_eq!(record.compensations, ["cancel_order", "release_inventory"]);
    assert_eq!(record.compensated, 2);
    // Compensations run last registered first.
    assert_eq!(
        names(&sent(&w.bus, &w.topics)),
        [
            "order_placed",
            "reserve_inventory",
            "charge_payment",
            "release_inventory",
            "order_cancelled"
        ]
    );
    w.bus.assert_not_published::<ShipOrder>();
    assert_eq!(w.stock.reserved("sku-2"), 0, "the reservation was released");
    assert_eq!(w.saga.stats().compensated, 1);
}

#[tokio::test(start_paused = true)]
async fn a_payment_that_never_answers_times_out_and_compensates() {
    let w = world().await;
    w.bus
        .publish(&w.topics.orders, order("o-3", "sku-3", 900, "silent"))
        .await
        .unwrap();
    w.bus.run_until_idle().await;

    let waiting = w.saga.get("o-3").await.unwrap().unwrap();
    assert_eq!(
        (waiting.status, waiting.state.as_str()),
        (SagaStatus::Running, "charging")
    );
    assert_eq!(waiting.timeouts.len(), 1);
    assert_eq!(waiting.timeouts[0].name, "payment");

    // Not due a minute early.
    tokio::time::advance(PAYMENT_TIMEOUT - Duration::from_secs(60)).await;
    assert_eq!(w.saga.fire_due_timeouts().await.unwrap(), 0);
    assert_eq!(
        w.saga.get("o-3").await.unwrap().unwrap().status,
        SagaStatus::Running
    );

    tokio::time::advance(Duration::from_secs(61)).await;
    w.saga.fire_due_timeouts().await.unwrap();
    w.bus.run_until_idle().await;
    let record = w.saga.get("o-3").await.unwrap().unwrap();
    assert_eq!(record.status, SagaStatus::Compensated);
    assert_eq!(
        record.failure.as_deref(),
        Some("payment not confirmed in time")
    );
    assert!(record.timeouts.is_empty());
    assert_eq!(
        w.bus
            .assert_published_one::<ReleaseInventory>()
            .payload
            .order_id,
        "o-3"
    );
    assert_eq!(
        w.bus
            .assert_published_one::<OrderCancelled>()
            .payload
            .order_id,
        "o-3"
    );
    assert_eq!(w.saga.stats().timeouts_fired, 1);
}

#[tokio::test(start_paused = true)]
async fn the_poller_fires_a_due_timeout_by_itself() {
    let w = world().await;
    w.bus
        .publish(&w.topics.orders, order("o-4", "sku-4", 900, "silent"))
        .await
        .unwrap();
    w.bus.run_until_idle().await;
    // The paused clock jumps to the timeout when everything else is idle.
    let deadline = tokio::time::Instant::now() + PAYMENT_TIMEOUT * 2;
    while w.saga.get("o-4").await.unwrap().unwrap().status == SagaStatus::Running {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the payment timeout never fired"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    w.bus.run_until_idle().await;
    assert_eq!(
        w.saga.get("o-4").await.unwrap().unwrap().status,
        SagaStatus::Compensated
    );
}

#[tokio::test(start_paused = true)]
async fn redelivered_events_are_applied_once_and_failed_steps_are_retried() {
    let w = world().await;
    w.bus
        .faults()
        .duplicate_every(&w.topics.replies, &w.topics.group("fulfilment"), 1);
    w.bus
        .faults()
        .fail_next_handler_calls(&w.topics.orders, &w.topics.group("fulfilment"), 2);
    w.bus
        .publish(&w.topics.orders, order("o-5", "sku-5", 100, "visa"))
        .await
        .unwrap();
    w.bus.run_until_idle().await;

    assert_eq!(
        w.saga.get("o-5").await.unwrap().unwrap().status,
        SagaStatus::Completed
    );
    // Each reply arrived twice; each step ran once.
    w.bus.assert_published_one::<ReserveInventory>();
    w.bus.assert_published_one::<ChargePayment>();
    w.bus.assert_published_one::<ShipOrder>();
    assert_eq!(
        w.bus
            .settled(&w.topics.orders, &w.topics.group("fulfilment"))
            .nacked,
        2
    );
    assert!(w.saga.stats().duplicates >= 2, "{:?}", w.saga.stats());
}

#[tokio::test(start_paused = true)]
async fn an_event_for_a_finished_instance_is_ignored_and_one_for_no_instance_dead_letters() {
    let w = world().await;
    w.bus
        .publish(
            &w.topics.replies,
            PaymentCaptured {
                order_id: "nobody".into(),
            },
        )
        .await
        .unwrap();
    w.bus
        .publish(&w.topics.orders, order("o-6", "sku-6", 100, "visa"))
        .await
        .unwrap();
    w.bus.run_until_idle().await;
    w.bus
        .publish(
            &w.topics.replies,
            InventoryReserved {
                order_id: "o-6".into(),
            },
        )
        .await
        .unwrap();
    w.bus.run_until_idle().await;

    assert!(w.saga.get("nobody").await.unwrap().is_none());
    assert_eq!(
        w.saga.get("o-6").await.unwrap().unwrap().status,
        SagaStatus::Completed
    );
    w.bus.assert_published_one::<ChargePayment>();
    // The late reply of a finished order is ignored.
    assert_eq!(w.saga.stats().ignored, 1);
    // A reply for an order that never started is retried (its start may be on its way), then
    // dead-lettered with the reason: nothing is dropped silently.
    let group = w.topics.group("fulfilment");
    let dead = w
        .bus
        .dead_letters(&w.topics.replies, &group, 10)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].info.attempts, 5);
    assert!(
        dead[0].info.error.contains("no such instance"),
        "{}",
        dead[0].info.error
    );
}

#[tokio::test(start_paused = true)]
async fn operations_list_stuck_instances_and_fail_one_by_hand() {
    let w = world().await;
    for id in ["o-7", "o-8"] {
        w.bus
            .publish(&w.topics.orders, order(id, "sku-7", 100, "silent"))
            .await
            .unwrap();
    }
    w.bus
        .publish(&w.topics.orders, order("o-9", "sku-7", 100, "visa"))
        .await
        .unwrap();
    w.bus.run_until_idle().await;

    let charging = SagaFilter {
        status: Some(SagaStatus::Running),
        state: Some("charging".into()),
        ..SagaFilter::default()
    };
    let stuck: Vec<String> = w
        .saga
        .list(&charging)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.instance_id)
        .collect();
    assert_eq!(stuck.len(), 2);
    assert!(stuck.contains(&"o-7".to_string()) && stuck.contains(&"o-8".to_string()));
    let completed = SagaFilter {
        status: Some(SagaStatus::Completed),
        ..SagaFilter::default()
    };
    assert_eq!(w.saga.list(&completed).await.unwrap().len(), 1);

    let placed = &w.bus.published_on::<shop::OrderPlaced>(&w.topics.orders)[0];
    let found = w
        .saga
        .find_by_correlation(placed.conversation_id())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.instance_id, "o-7");

    let failed = w
        .saga
        .fail("o-7", "operator: customer called")
        .await
        .unwrap();
    assert_eq!(failed.status, SagaStatus::Compensating);
    assert!(failed.timeouts.is_empty());
    w.bus.run_until_idle().await;
    assert_eq!(
        w.saga.get("o-7").await.unwrap().unwrap().status,
        SagaStatus::Compensated
    );

    // Failing a finished instance, or one that does not exist, says why.
    let error = w.saga.fail("o-9", "too late").await.unwrap_err();
    assert!(
        error.to_string().contains("the instance is completed"),
        "{error}"
    );
    let error = w.saga.fail("o-404", "?").await.unwrap_err();
    assert!(error.to_string().contains("missing"), "{error}");
    let error = w.saga.resume("o-8").await.unwrap_err();
    assert!(
        error.to_string().contains("only a failed instance"),
        "{error}"
    );
}

// A saga of its own, to make a compensation fail and then recover.

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Opened {
    account: String,
}
impl Event for Opened {
    const TYPE: &'static str = "test.opened.v1";
    fn key(&self) -> Option<Text> {
        Some(self.account.as_str().into())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Rejected {
    account: String,
}
impl Event for Rejected {
    const TYPE: &'static str = "test.rejected.v1";
    fn key(&self) -> Option<Text> {
        Some(self.account.as_str().into())
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Account {
    account: String,
}

#[tokio::test(start_paused = true)]
async fn a_compensation_that_keeps_failing_is_dead_lettered_with_the_saga_and_shown_on_the_instance(
) {
    let bus = TestBus::new(); // 5 attempts
    let broken = Arc::new(AtomicBool::new(true));
    let runs = Arc::new(AtomicU32::new(0));
    let (b, r) = (Arc::clone(&broken), Arc::clone(&runs));
    let saga = Saga::<Account>::new("accounts")
        .listen("accounts")
        .initially(|s| {
            s.on(
                |opened: Envelope<Opened>, mut step: Step<Account>| async move {
                    step.data_mut().account = opened.payload.account;
                    step.compensate_with("close")?;
                    step.transition_to("open");
                    Ok(step)
                },
            )
        })
        .during("open", |s| {
            s.on(
                |_: Envelope<Rejected>, mut step: Step<Account>| async move {
                    step.fail("rejected");
                    Ok(step)
                },
            )
        })
        .compensation("close", move |_: Account, _: Context| {
            let (broken, runs) = (Arc::clone(&b), Arc::clone(&r));
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                if broken.load(Ordering::SeqCst) {
                    return Err(HandlerError::transient("the account service is down"));
                }
                Ok(())
            }
        })
        .start(&bus, Arc::new(MemorySagaStore::new()))
        .await
        .unwrap();
    bus.publish(
        "accounts",
        Opened {
            account: "a-1".into(),
        },
    )
    .await
    .unwrap();
    bus.publish(
        "accounts",
        Rejected {
            account: "a-1".into(),
        },
    )
    .await
    .unwrap();
    bus.run_until_idle().await;

    assert_eq!(runs.load(Ordering::SeqCst), 5, "retried by the policy");
    let record = saga.get("a-1").await.unwrap().unwrap();
    assert_eq!(record.status, SagaStatus::Failed);
    let failed = record.failed_compensation.clone().unwrap();
    assert_eq!((failed.name.as_str(), failed.attempts), ("close", 5));
    assert!(
        failed.error.contains("the account service is down"),
        "{}",
        failed.error
    );
    assert_eq!(saga.stats().failed, 1);

    let dead = bus
        .dead_letters(saga.own_topic(), "accounts", 10)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    let body: serde_json::Value = serde_json::from_slice(&dead[0].message.payload).unwrap();
    assert_eq!(body["saga"], "accounts");
    assert_eq!(body["instance_id"], "a-1");
    assert_eq!(body["state"], "open");
    assert_eq!(body["data"]["account"], "a-1");

    // Fixed: resume runs it again and the saga ends compensated.
    broken.store(false, Ordering::SeqCst);
    let resumed = saga.resume("a-1").await.unwrap();
    assert_eq!(resumed.status, SagaStatus::Compensating);
    bus.run_until_idle().await;
    let record = saga.get("a-1").await.unwrap().unwrap();
    assert_eq!(record.status, SagaStatus::Compensated);
    assert_eq!(record.failed_compensation, None);
}

// Optimistic concurrency: events of one instance applied concurrently lose no update.

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Add {
    counter: String,
    n: u64,
}
impl Event for Add {
    const TYPE: &'static str = "test.add.v1";
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Sum {
    total: u64,
    adds: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_events_for_one_instance_lose_no_update() {
    let bus = TestBus::new();
    let add = |add: Envelope<Add>, mut step: Step<Sum>| async move {
        tokio::task::yield_now().await; // widen the window between load and commit
        step.data_mut().total += add.payload.n;
        step.data_mut().adds += 1;
        Ok(step)
    };
    let saga = Saga::<Sum>::new("sums")
        .listen("adds")
        .concurrency(16)
        .correlate(|add: &Envelope<Add>| add.payload.counter.clone())
        .initially(|s| s.on(add))
        .start(&bus, Arc::new(MemorySagaStore::new()))
        .await
        .unwrap();
    // Unkeyed events run concurrently; they all correlate to one instance.
    let adds: Vec<Add> = (1..=200)
        .map(|n| Add {
            counter: "c".into(),
            n,
        })
        .collect();
    bus.publish_batch("adds", adds).await.unwrap();
    bus.run_until_idle().await;

    let sum: Sum = saga.get("c").await.unwrap().unwrap().data().unwrap();
    assert_eq!((sum.adds, sum.total), (200, 200 * 201 / 2));
    assert_eq!(saga.stats().transitions, 200);
    assert!(
        saga.stats().conflicts > 0,
        "the test did not race: {:?}",
        saga.stats()
    );
}

#[tokio::test]
async fn an_incomplete_definition_is_refused_with_what_to_add() {
    let bus = TestBus::new();
    let store = || Arc::new(MemorySagaStore::new());
    let error = Saga::<Sum>::new("s")
        .start(&bus, store())
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("add `.listen(topic)`"),
        "{error}"
    );
    let error = Saga::<Sum>::new("s")
        .listen("t")
        .start(&bus, store())
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("no event starts an instance"),
        "{error}"
    );
    let noop = |_: Envelope<Add>, step: Step<Sum>| async move { Ok(step) };
    let error = Saga::<Sum>::new("s")
        .listen("t")
        .initially(|s| s.on(noop).on(noop))
        .start(&bus, store())
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("two transitions for test.add.v1"),
        "{error}"
    );
    let error = Saga::<Sum>::new("s")
        .listen("t")
        .initially(|s| s.on(noop))
        .correlate(|e: &Envelope<Opened>| e.payload.account.clone())
        .start(&bus, store())
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("test.opened.v1 are correlated but no state"),
        "{error}"
    );
    // A step that registers a compensation the saga does not define fails, and says so.
    let saga = Saga::<Sum>::new("s")
        .listen("t")
        .correlate(|add: &Envelope<Add>| add.payload.counter.clone())
        .initially(|s| {
            s.on(|_: Envelope<Add>, mut step: Step<Sum>| async move {
                step.compensate_with("undo")?;
                Ok(step)
            })
        })
        .start(&bus, store())
        .await
        .unwrap();
    bus.publish(
        "t",
        Add {
            counter: "c".into(),
            n: 1,
        },
    )
    .await
    .unwrap();
    bus.run_until_idle().await;
    let dead = bus.dead_letters("t", "s", 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    let why = &dead[0].info.error;
    assert!(why.contains("defines no compensation \"undo\""), "{why}");
    assert!(saga.get("c").await.unwrap().is_none(), "nothing was stored");
}

#[tokio::test(start_paused = true)]
async fn an_event_delivered_twice_is_applied_once_even_where_the_state_does_not_change() {
    let bus = TestBus::new();
    let saga = Saga::<Sum>::new("sums")
        .listen("adds")
        .correlate(|add: &Envelope<Add>| add.payload.counter.clone())
        .initially(|s| {
            s.on(|add: Envelope<Add>, mut step: Step<Sum>| async move {
                step.data_mut().total += add.payload.n;
                step.data_mut().adds += 1;
                Ok(step)
            })
        })
        .start(&bus, Arc::new(MemorySagaStore::new()))
        .await
        .unwrap();
    bus.faults().duplicate_every("adds", "sums", 1);
    let adds: Vec<Add> = (1..=10)
        .map(|n| Add {
            counter: "c".into(),
            n,
        })
        .collect();
    bus.publish_batch("adds", adds).await.unwrap();
    bus.run_until_idle().await;

    assert_eq!(
        bus.settled("adds", "sums").acked,
        20,
        "every event came twice"
    );
    let sum: Sum = saga.get("c").await.unwrap().unwrap().data().unwrap();
    assert_eq!((sum.adds, sum.total), (10, 55));
    assert_eq!(saga.stats().duplicates, 10);
}

// Correlation by conversation: replies that carry no order id find their instance by the
// conversation the saga's own messages started.

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Quote {
    amount: u64,
}
impl Event for Quote {
    const TYPE: &'static str = "test.quote.v1";
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Accepted {}
impl Event for Accepted {
    const TYPE: &'static str = "test.accepted.v1";
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Quoted {
    amount: u64,
}

#[tokio::test(start_paused = true)]
async fn events_can_find_their_instance_by_conversation() {
    let bus = TestBus::new();
    let saga = Saga::<Quoted>::new("quotes")
        .listen("quotes")
        .missing_instance(MissingInstance::Ignore)
        .correlate_by_conversation::<Quote>()
        .correlate_by_conversation::<Accepted>()
        .initially(|s| {
            s.on(
                |quote: Envelope<Quote>, mut step: Step<Quoted>| async move {
                    step.data_mut().amount = quote.payload.amount;
                    step.transition_to("offered");
                    Ok(step)
                },
            )
        })
        .during("offered", |s| {
            s.on(|_: Envelope<Accepted>, mut step: Step<Quoted>| async move {
                step.complete();
                Ok(step)
            })
        })
        .start(&bus, Arc::new(MemorySagaStore::new()))
        .await
        .unwrap();
    let quote = bus.envelope(Quote { amount: 7 });
    bus.publish_envelope("quotes", &quote).await.unwrap();
    bus.run_until_idle().await;
    // The instance's id is the conversation's.
    let record = saga.get(&quote.id).await.unwrap().unwrap();
    assert_eq!(
        (record.state.as_str(), record.correlation_id.as_str()),
        ("offered", quote.id.as_str())
    );

    // A reply in that conversation, and one in another.
    let accepted = bus
        .envelope(Accepted {})
        .with_correlation_id(quote.id.clone());
    bus.publish_envelope("quotes", &accepted).await.unwrap();
    bus.publish("quotes", Accepted {}).await.unwrap();
    bus.run_until_idle().await;
    assert_eq!(
        saga.get(&quote.id).await.unwrap().unwrap().status,
        SagaStatus::Completed
    );
    assert_eq!(
        saga.stats().ignored,
        1,
        "the reply of another conversation has no instance"
    );
}

#[tokio::test(start_paused = true)]
async fn a_timeout_far_in_the_future_is_kept_not_a_panic() {
    let bus = TestBus::new();
    let saga = Saga::<Sum>::new("far")
        .listen("far")
        .correlate(|add: &Envelope<Add>| add.payload.counter.clone())
        .initially(|s| {
            s.on(|_: Envelope<Add>, mut step: Step<Sum>| async move {
                step.schedule("never", Duration::MAX);
                step.transition_to("waiting");
                Ok(step)
            })
        })
        .start(&bus, Arc::new(MemorySagaStore::new()))
        .await
        .unwrap();
    bus.publish(
        "far",
        Add {
            counter: "c".into(),
            n: 1,
        },
    )
    .await
    .unwrap();
    bus.run_until_idle().await;
    let record = saga.get("c").await.unwrap().unwrap();
    assert_eq!(record.state, "waiting");
    assert_eq!(record.timeouts.len(), 1);
    let in_99_years = chrono::Utc::now() + chrono::Duration::days(99 * 365);
    assert!(record.timeouts[0].due_at > in_99_years);
}
