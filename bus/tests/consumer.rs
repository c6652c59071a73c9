//! The consumer runtime's guarantees, on the memory transport.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use busbar_core::{
    Bus, Capabilities, ConsumeOptions, Context, DeadLetterReason, Delivery, DeliveryStream,
    Envelope, HandlerError, MemoryIdempotencyStore, MemoryTransport, Message, RetryPolicy,
    ShutdownReport, Transport,
};
use common::{eventually, numbered, unique, Numbered};

const WAIT: Duration = Duration::from_secs(30);

/// The memory transport without its per-key lock: keys travel in a header it does not read,
/// and come back as keys on delivery, so messages of one key are handed out together.
#[derive(Debug)]
struct Unlocked(MemoryTransport);

const HIDDEN_KEY: &str = "test.key";

#[async_trait::async_trait]
impl Transport for Unlocked {
    fn name(&self) -> &'static str {
        "unlocked"
    }
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }
    async fn publish(&self, mut messages: Vec<Message>) -> busbar_core::Result<()> {
        for message in &mut messages {
            if let Some(key) = message.key.take() {
                message.headers.insert(HIDDEN_KEY, key);
            }
        }
        self.0.publish(messages).await
    }
    async fn declare(&self, topic: &str, group: &str) -> busbar_core::Result<()> {
        self.0.declare(topic, group).await
    }
    async fn consume(
        &self,
        topic: &str,
        group: &str,
        options: ConsumeOptions,
    ) -> busbar_core::Result<DeliveryStream> {
        use futures::StreamExt;
        let stream = self.0.consume(topic, group, options).await?;
        Ok(Box::pin(stream.map(|item| {
            item.map(|delivery| {
                let (message, attempt, acker) = delivery.into_parts();
                let mut message = Arc::unwrap_or_clone(message);
                message.key = message.headers.remove(HIDDEN_KEY);
                Delivery::new(Arc::new(message), attempt, acker)
            })
        })))
    }
    async fn close(&self) -> busbar_core::Result<()> {
        self.0.close().await
    }
}

fn fast_retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy::exponential(max_attempts)
        .with_initial_backoff(Duration::from_millis(5))
        .with_max_backoff(Duration::from_millis(20))
}

#[tokio::test(start_paused = true)]
async fn always_failing_handler_runs_exactly_max_attempts_then_is_dead_lettered_with_metadata() {
    let bus = Bus::memory();
    let (topic, group) = (unique("orders"), unique("billing"));
    let calls = Arc::new(AtomicU32::new(0));
    let seen = Arc::clone(&calls);
    let sub = bus
        .subscribe::<Numbered>(&topic, &group)
        .retry(fast_retry(4))
        .start(move |_e: Envelope<Numbered>, _c: Context| {
            seen.fetch_add(1, Ordering::SeqCst);
            async { Err(HandlerError::transient("database unavailable")) }
        })
        .await
        .unwrap();
    let envelope = bus.envelope(numbered("k", 1)).with_header("tenant", "acme");
    bus.publish_envelope(&topic, &envelope).await.unwrap();

    eventually(WAIT, "the message is dead-lettered", || async {
        sub.stats().dead_lettered == 1
    })
    .await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        4,
        "handler must run exactly max_attempts times"
    );
    let stats = sub.stats();
    assert_eq!(
        (stats.failed_attempts, stats.retried, stats.handled),
        (4, 3, 0)
    );

    let dead = bus.dead_letters(&topic, &group, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    let info = &dead[0].info;
    assert_eq!(info.reason, DeadLetterReason::RetriesExhausted);
    assert_eq!(info.error, "database unavailable");
    assert_eq!(info.attempts, 4);
    assert_eq!(
        (info.topic.as_str(), info.group.as_str()),
        (topic.as_str(), group.as_str())
    );
    // The original message, headers included, is what was dead-lettered.
    assert_eq!(dead[0].message.id, envelope.id);
    assert_eq!(dead[0].message.header("tenant"), Some("acme"));
    let back =
        Envelope::<Numbered>::from_message(&busbar_core::codec::Json, &dead[0].message).unwrap();
    assert_eq!(back, envelope);

    // Nothing is redelivered after dead-lettering.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    sub.shutdown(Duration::from_secs(1)).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn permanent_error_dead_letters_after_one_attempt() {
    let bus = Bus::memory();
    let (topic, group) = (unique("payments"), unique("psp"));
    let calls = Arc::new(AtomicU32::new(0));
    let seen = Arc::clone(&calls);
    let sub = bus
        .subscribe::<Numbered>(&topic, &group)
        .retry(fast_retry(5))
        .start(move |_e: Envelope<Numbered>, _c: Context| {
            seen.fetch_add(1, Ordering::SeqCst);
            async { Err(HandlerError::permanent("card declined")) }
        })
        .await
        .unwrap();
    bus.publish(&topic, numbered("k", 1)).await.unwrap();
    eventually(WAIT, "dead letter", || async {
        sub.stats().dead_lettered == 1
    })
    .await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let dead = bus.dead_letters(&topic, &group, 10).await.unwrap();
    assert_eq!(dead[0].info.reason, DeadLetterReason::Permanent);
    assert_eq!(dead[0].info.attempts, 1);
    assert_eq!(dead[0].info.error, "card declined");
}

#[tokio::test(start_paused = true)]
async fn undecodable_payload_is_dead_lettered_without_calling_the_handler() {
    let bus = Bus::memory();
    let (topic, group) = (unique("t"), unique("g"));
    let calls = Arc::new(AtomicU32::new(0));
    let seen = Arc::clone(&calls);
    let sub = bus
        .subscribe::<Numbered>(&topic, &group)
        .start(move |_e: Envelope<Numbered>, _c: Context| {
            seen.fetch_add(1, Ordering::SeqCst);
            async { Ok(()) }
        })
        .await
        .unwrap();
    // A valid envelope whose payload lacks a field, and a message with no envelope at all.
    let mut wrong_shape = bus
        .envelope(numbered("k", 1))
        .to_message(&busbar_core::codec::Json, &topic)
        .unwrap();
    wrong_shape.payload = bytes::Bytes::from_static(br#"{"key":"k"}"#);
    let foreign = Message::new("foreign-1", topic.clone(), "not json at all");
    bus.publish_messages(vec![wrong_shape.clone(), foreign])
        .await
        .unwrap();

    eventually(WAIT, "both dead-lettered", || async {
        sub.stats().dead_lettered == 2
    })
    .await;
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    let dead = bus.dead_letters(&topic, &group, 10).await.unwrap();
    let by_id: HashMap<_, _> = dead.iter().map(|d| (d.message.id.clone(), d)).collect();
    let shape = &by_id[&wrong_shape.id].info;
    assert_eq!(shape.reason, DeadLetterReason::Undecodable);
    assert!(
        shape.error.contains("missing field `seq`"),
        "{}",
        shape.error
    );
    assert_eq!(shape.attempts, 1);
    let foreign = &by_id["foreign-1"].info;
    assert!(
        foreign
            .error
            .contains("not a CloudEvent: no `specversion` attribute"),
        "{}",
        foreign.error
    );
}

#[tokio::test(start_paused = true)]
async fn a_panicking_handler_is_retried_like_an_error_and_the_consumer_survives() {
    let bus = Bus::memory();
    let (topic, group) = (unique("t"), unique("g"));
    let calls = Arc::new(AtomicU32::new(0));
    let seen = Arc::clone(&calls);
    let sub = bus
        .subscribe::<Numbered>(&topic, &group)
        .retry(fast_retry(5))
        .start(move |e: Envelope<Numbered>, _c: Context| {
            let call = seen.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                if e.payload.seq == 1 && call <= 2 {
                    panic!("bug in handler (call {call})");
                }
                Ok(())
            }
        })
        .await
        .unwrap();
    bus.publish(&topic, numbered("", 1)).await.unwrap();
    eventually(WAIT, "handled after two panics", || async {
        sub.stats().handled == 1
    })
    .await;
    let stats = sub.stats();
    assert_eq!(
        (
            stats.panics,
            stats.failed_attempts,
            stats.retried,
            stats.dead_lettered
        ),
        (2, 2, 2, 0)
    );
    // The consumer still runs: a later message is handled too.
    bus.publish(&topic, numbered("", 2)).await.unwrap();
    eventually(WAIT, "second message handled", || async {
        sub.stats().handled == 2
    })
    .await;

    // A handler that always panics ends in the dead-letter queue with the panic message.
    let group2 = unique("g2");
    let sub2 = bus
        .subscribe::<Numbered>(&topic, &group2)
        .retry(fast_retry(3))
        .start(|_e: Envelope<Numbered>, _c: Context| async move {
            if true {
                panic!("always broken");
            }
            Ok(())
        })
        .await
        .unwrap();
    bus.publish(&topic, numbered("", 3)).await.unwrap();
    eventually(WAIT, "panic loop dead-lettered", || async {
        sub2.stats().dead_lettered == 1
    })
    .await;
    let dead = bus.dead_letters(&topic, &group2, 10).await.unwrap();
    assert_eq!(dead[0].info.attempts, 3);
    assert!(
        dead[0]
            .info
            .error
            .contains("handler panicked: always broken"),
        "{}",
        dead[0].info.error
    );
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Reserved {
    order: u64,
}
impl busbar_core::Event for Reserved {
    const TYPE: &'static str = "test.reserved.v1";
}
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Charged {
    order: u64,
}
impl busbar_core::Event for Charged {
    const TYPE: &'static str = "test.charged.v1";
}

#[tokio::test(start_paused = true)]
async fn correlation_and_causation_propagate_across_two_hops() {
    let bus = Bus::memory();
    let (orders, reservations, charges) =
        (unique("orders"), unique("reservations"), unique("charges"));
    let r_topic = reservations.clone();
    let inventory = bus
        .subscribe::<Numbered>(&orders, "inventory")
        .start(move |e: Envelope<Numbered>, ctx: Context| {
            let topic = r_topic.clone();
            async move {
                ctx.publish(
                    &topic,
                    Reserved {
                        order: e.payload.seq,
                    },
                )
                .await?;
                Ok(())
            }
        })
        .await
        .unwrap();
    let seen_reserved = Arc::new(Mutex::new(HashMap::<u64, Envelope<Reserved>>::new()));
    let keep = Arc::clone(&seen_reserved);
    let c_topic = charges.clone();
    let payments = bus
        .subscribe::<Reserved>(&reservations, "payments")
        .start(move |e: Envelope<Reserved>, ctx: Context| {
            let (keep, topic) = (Arc::clone(&keep), c_topic.clone());
            async move {
                assert_eq!(
                    ctx.correlation_id(),
                    e.correlation_id.as_deref().unwrap_or_default()
                );
                ctx.publish(
                    &topic,
                    Charged {
                        order: e.payload.order,
                    },
                )
                .await?;
                keep.lock().unwrap().insert(e.payload.order, e);
                Ok(())
            }
        })
        .await
        .unwrap();
    let seen_charged = Arc::new(Mutex::new(HashMap::<u64, Envelope<Charged>>::new()));
    let keep = Arc::clone(&seen_charged);
    let audit = bus
        .subscribe::<Charged>(&charges, "audit")
        .start(move |e: Envelope<Charged>, _c: Context| {
            let keep = Arc::clone(&keep);
            async move {
                keep.lock().unwrap().insert(e.payload.order, e);
                Ok(())
            }
        })
        .await
        .unwrap();

    let first = bus.envelope(numbered("o-7", 7));
    bus.publish_envelope(&orders, &first).await.unwrap();
    // An unrelated fresh publish starts its own conversation.
    let other_id = bus.publish(&orders, numbered("o-8", 8)).await.unwrap();
    eventually(WAIT, "both chains reach audit", || async {
        audit.stats().handled == 2
    })
    .await;

    let reserved = seen_reserved.lock().unwrap()[&7].clone();
    let charged = seen_charged.lock().unwrap()[&7].clone();
    let other = seen_charged.lock().unwrap()[&8].clone();
    assert_eq!(first.correlation_id.as_deref(), Some(first.id.as_str()));
    assert_eq!(reserved.correlation_id, first.correlation_id);
    assert_eq!(reserved.causation_id.as_deref(), Some(first.id.as_str()));
    assert_eq!(charged.payload.order, 7);
    assert_eq!(charged.correlation_id, first.correlation_id);
    assert_eq!(charged.causation_id.as_deref(), Some(reserved.id.as_str()));
    // Same W3C trace across the hops, a new span each time.
    let trace = |tp: &Option<busbar_core::Text>| {
        tp.as_deref()
            .unwrap()
            .split('-')
            .nth(1)
            .unwrap()
            .to_string()
    };
    assert_eq!(trace(&charged.traceparent), trace(&first.traceparent));
    assert_ne!(charged.traceparent, first.traceparent);
    // The unrelated publish has its own conversation, shared along its own chain.
    assert_eq!(other.correlation_id.as_deref(), Some(other_id.as_str()));
    for s in [inventory, payments, audit] {
        s.shutdown(Duration::from_secs(1)).await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn idempotent_handler_applies_each_message_once_despite_duplicates() {
    let bus_transport = MemoryTransport::new();
    let bus = Bus::new(bus_transport.clone());
    for idempotent in [false, true] {
        let (topic, group) = (unique("t"), unique("g"));
        let effects = Arc::new(Mutex::new(HashMap::<busbar_core::Text, usize>::new()));
        let record = Arc::clone(&effects);
        let mut builder = bus
            .subscribe::<Numbered>(&topic, &group)
            .concurrency(8)
            .key_ordered(false);
        if idempotent {
            builder = builder.idempotent(Arc::new(MemoryIdempotencyStore::new(10_000)));
        }
        let sub = builder
            .start(move |e: Envelope<Numbered>, _c: Context| {
                let record = Arc::clone(&record);
                async move {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    *record.lock().unwrap().entry(e.id.clone()).or_default() += 1;
                    Ok(())
                }
            })
            .await
            .unwrap();
        for i in 0..200 {
            let env = bus.envelope(numbered("", i));
            // Each message is published twice with the same id, as a producer retry would.
            bus.publish_envelope(&topic, &env).await.unwrap();
            bus.publish_envelope(&topic, &env).await.unwrap();
        }
        eventually(WAIT, "all 400 deliveries settled", || async {
            bus_transport.pending(&topic, &group) == 0
        })
        .await;
        let stats = sub.stats();
        sub.shutdown(Duration::from_secs(1)).await.unwrap();
        let effects = effects.lock().unwrap().clone();
        assert_eq!(effects.len(), 200, "every message had its effect");
        let total: usize = effects.values().sum();
        if idempotent {
            assert!(
                effects.values().all(|&n| n == 1),
                "an effect happened twice: {effects:?}"
            );
            assert_eq!(stats.duplicates_skipped + stats.handled, 400);
            assert!(stats.duplicates_skipped > 0);
        } else {
            // The control: without a store the duplicates really do reach the handler.
            assert_eq!(total, 400);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_order_holds_under_concurrency_16_even_across_retries() {
    let bus = Bus::memory();
    let (topic, group) = (unique("t"), unique("g"));
    const KEYS: u64 = 24;
    const PER_KEY: u64 = 60;
    let order = Arc::new(Mutex::new(HashMap::<String, Vec<u64>>::new()));
    let running = Arc::new(AtomicUsize::new(0));
    let max_running = Arc::new(AtomicUsize::new(0));
    let failed_once = Arc::new(Mutex::new(HashSet::<busbar_core::Text>::new()));
    let (o, r, m, f) = (
        Arc::clone(&order),
        Arc::clone(&running),
        Arc::clone(&max_running),
        Arc::clone(&failed_once),
    );
    let sub = bus
        .subscribe::<Numbered>(&topic, &group)
        .concurrency(16)
        .max_in_flight(64)
        .retry(fast_retry(10).with_initial_backoff(Duration::from_millis(1)))
        .start(move |e: Envelope<Numbered>, _c: Context| {
            let (o, r, m, f) = (
                Arc::clone(&o),
                Arc::clone(&r),
                Arc::clone(&m),
                Arc::clone(&f),
            );
            async move {
                let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_micros(fastrand::u64(0..500))).await;
                r.fetch_sub(1, Ordering::SeqCst);
                // Every 7th message fails its first attempt: order must survive the retry.
                if e.payload.seq % 7 == 3 && f.lock().unwrap().insert(e.id.clone()) {
                    return Err(HandlerError::transient("first attempt fails"));
                }
                o.lock()
                    .unwrap()
                    .entry(e.payload.key.clone())
                    .or_default()
                    .push(e.payload.seq);
                Ok(())
            }
        })
        .await
        .unwrap();
    // Interleave keys as concurrent producers would.
    let events: Vec<Numbered> = (0..PER_KEY)
        .flat_map(|seq| (0..KEYS).map(move |k| numbered(&format!("key-{k}"), seq)))
        .collect();
    for chunk in events.chunks(100) {
        bus.publish_batch(&topic, chunk.to_vec()).await.unwrap();
    }
    let expected = KEYS * PER_KEY;
    eventually(WAIT, "all handled", || async {
        sub.stats().handled == expected
    })
    .await;
    let order = order.lock().unwrap().clone();
    assert_eq!(order.len(), KEYS as usize);
    for (key, seqs) in order.iter() {
        let want: Vec<u64> = (0..PER_KEY).collect();
        assert_eq!(seqs, &want, "order broken for {key}");
    }
    assert!(
        max_running.load(Ordering::SeqCst) > 1,
        "handlers never ran concurrently"
    );
    assert!(sub.stats().retried > 0);
    sub.shutdown(Duration::from_secs(1)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_ordering_in_the_runtime_sequences_keys_a_transport_hands_out_together() {
    // The memory transport hands out one message per key at a time; this one hands out every
    // message at once, as RabbitMQ does, so only the runtime's own sequencing keeps each key
    // sequential: at most one handler per key runs at any moment.
    let bus = Bus::builder(Arc::new(Unlocked(MemoryTransport::new()))).build();
    let (topic, group) = (unique("t"), unique("g"));
    let active = Arc::new(Mutex::new(HashSet::<String>::new()));
    let overlap = Arc::new(AtomicBool::new(false));
    let (a, ov) = (Arc::clone(&active), Arc::clone(&overlap));
    let sub = bus
        .subscribe::<Numbered>(&topic, &group)
        .concurrency(16)
        .start(move |e: Envelope<Numbered>, _c: Context| {
            let (a, ov) = (Arc::clone(&a), Arc::clone(&ov));
            async move {
                if !a.lock().unwrap().insert(e.payload.key.clone()) {
                    ov.store(true, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_micros(200)).await;
                a.lock().unwrap().remove(&e.payload.key);
                Ok(())
            }
        })
        .await
        .unwrap();
    let events: Vec<Numbered> = (0..400)
        .map(|i| numbered(&format!("k{}", i % 5), i))
        .collect();
    bus.publish_batch(&topic, events).await.unwrap();
    eventually(WAIT, "all handled", || async { sub.stats().handled == 400 }).await;
    assert!(
        !overlap.load(Ordering::SeqCst),
        "two handlers of one key ran at once"
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_drains_finished_handlers_and_acks_nothing_unfinished() {
    let transport = MemoryTransport::new();
    let bus = Bus::new(transport.clone());
    let (topic, group) = (unique("t"), unique("g"));
    let handled = Arc::new(Mutex::new(Vec::<u64>::new()));
    let started = Arc::new(AtomicUsize::new(0));
    let (h, s) = (Arc::clone(&handled), Arc::clone(&started));
    let sub = bus
        .subscribe::<Numbered>(&topic, &group)
        .concurrency(6)
        .start(move |e: Envelope<Numbered>, _c: Context| {
            let (h, s) = (Arc::clone(&h), Arc::clone(&s));
            async move {
                s.fetch_add(1, Ordering::SeqCst);
                if e.payload.seq < 3 {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                } else {
                    std::future::pending::<()>().await; // never finishes
                }
                h.lock().unwrap().push(e.payload.seq);
                Ok(())
            }
        })
        .await
        .unwrap();
    let events: Vec<Numbered> = (0..6).map(|i| numbered("", i)).collect();
    bus.publish_batch(&topic, events).await.unwrap();
    eventually(WAIT, "six handlers running", || async {
        started.load(Ordering::SeqCst) == 6
    })
    .await;

    let report = sub.shutdown(Duration::from_secs(1)).await.unwrap();
    assert_eq!(
        report,
        ShutdownReport {
            drained: 3,
            abandoned: 3,
            returned: 0
        }
    );
    let mut done = handled.lock().unwrap().clone();
    done.sort_unstable();
    assert_eq!(done, [0, 1, 2]);
    // The three unfinished messages were not acked: they are still pending for the group...
    assert_eq!(transport.pending(&topic, &group), 3);

    // ...and a new consumer of the group handles exactly them.
    let again = Arc::new(Mutex::new(Vec::<u64>::new()));
    let a = Arc::clone(&again);
    let sub = bus
        .subscribe::<Numbered>(&topic, &group)
        .start(move |e: Envelope<Numbered>, _c: Context| {
            let a = Arc::clone(&a);
            async move {
                a.lock().unwrap().push(e.payload.seq);
                Ok(())
            }
        })
        .await
        .unwrap();
    eventually(WAIT, "remaining three handled", || async {
        transport.pending(&topic, &group) == 0
    })
    .await;
    let mut rest = again.lock().unwrap().clone();
    rest.sort_unstable();
    assert_eq!(rest, [3, 4, 5]);
    sub.shutdown(Duration::from_secs(1)).await.unwrap();
}

/// At concurrency 1 the subscription's loop runs the handler itself: shutting down still waits
/// for it, gives back what it had not started, and (past the deadline) leaves it unacked.
#[tokio::test(start_paused = true)]
async fn at_concurrency_one_shutdown_drains_or_abandons_the_running_handler() {
    for finishes in [true, false] {
        let transport = MemoryTransport::new();
        let bus = Bus::new(transport.clone());
        let (topic, group) = (unique("t"), unique("g"));
        let started = Arc::new(AtomicUsize::new(0));
        let s = Arc::clone(&started);
        let sub = bus
            .subscribe::<Numbered>(&topic, &group)
            .concurrency(1)
            .start(move |_e: Envelope<Numbered>, _c: Context| {
                let s = Arc::clone(&s);
                async move {
                    s.fetch_add(1, Ordering::SeqCst);
                    if finishes {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    } else {
                        std::future::pending::<()>().await;
                    }
                    Ok(())
                }
            })
            .await
            .unwrap();
        let events: Vec<Numbered> = (0..40).map(|i| numbered("", i)).collect();
        bus.publish_batch(&topic, events).await.unwrap();
        eventually(WAIT, "the first handler running", || async {
            started.load(Ordering::SeqCst) == 1
        })
        .await;
        let report = sub.shutdown(Duration::from_secs(1)).await.unwrap();
        // The default prefetch at concurrency 1 is 32: one running, 31 given back unstarted.
        let (drained, abandoned) = if finishes { (1, 0) } else { (0, 1) };
        assert_eq!(
            report,
            ShutdownReport {
                drained,
                abandoned,
                returned: 31
            },
            "handler finishes: {finishes}"
        );
        assert_eq!(started.load(Ordering::SeqCst), 1, "nothing else started");
        assert_eq!(transport.pending(&topic, &group), 40 - drained);
    }
}

/// At concurrency 1 the subscription's loop runs the handler between fetches, so it must give
/// its thread back now and then: with handlers that never wait and a queue that is never
/// empty (each handled message publishes the next), the other tasks of a one-thread runtime
/// still run.
#[test]
fn at_concurrency_one_a_busy_subscription_lets_other_tasks_run() {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let bus = Bus::new(MemoryTransport::new());
            let (topic, group) = (unique("t"), unique("g"));
            let handled = Arc::new(AtomicUsize::new(0));
            let (h, next_topic) = (Arc::clone(&handled), topic.clone());
            let sub = bus
                .subscribe::<Numbered>(&topic, &group)
                .concurrency(1)
                .start(move |e: Envelope<Numbered>, c: Context| {
                    let (h, topic) = (Arc::clone(&h), next_topic.clone());
                    async move {
                        h.fetch_add(1, Ordering::SeqCst);
                        c.publish(&topic, numbered("", e.payload.seq + 1)).await?;
                        Ok(())
                    }
                })
                .await
                .unwrap();
            bus.publish(&topic, numbered("", 0)).await.unwrap();
            // This task runs again only when the subscription's loop yields.
            tokio::task::yield_now().await;
            eventually(WAIT, "messages handled", || async {
                handled.load(Ordering::SeqCst) >= 1_000
            })
            .await;
            sub.shutdown(Duration::from_secs(5)).await.unwrap();
        });
        let _ = done.send(());
    });
    assert!(
        finished.recv_timeout(WAIT).is_ok(),
        "the subscription kept its thread: the test's own task never ran again"
    );
}

#[tokio::test(start_paused = true)]
async fn redriven_dead_letters_return_to_their_group_and_are_handled() {
    let transport = MemoryTransport::new();
    let bus = Bus::new(transport.clone());
    let (topic, group) = (unique("t"), unique("g"));
    let fixed = Arc::new(AtomicBool::new(false));
    let handled = Arc::new(Mutex::new(Vec::<busbar_core::Text>::new()));
    let (f, h) = (Arc::clone(&fixed), Arc::clone(&handled));
    let sub = bus
        .subscribe::<Numbered>(&topic, &group)
        .retry(fast_retry(2))
        .start(move |e: Envelope<Numbered>, _c: Context| {
            let (f, h) = (Arc::clone(&f), Arc::clone(&h));
            async move {
                if !f.load(Ordering::SeqCst) {
                    return Err(HandlerError::transient("downstream is down"));
                }
                h.lock().unwrap().push(e.id);
                Ok(())
            }
        })
        .await
        .unwrap();
    let ids = bus
        .publish_batch(&topic, (0..3).map(|i| numbered(&format!("k{i}"), i)))
        .await
        .unwrap();
    eventually(WAIT, "all dead-lettered", || async {
        sub.stats().dead_lettered == 3
    })
    .await;
    assert_eq!(bus.dead_letters(&topic, &group, 10).await.unwrap().len(), 3);

    fixed.store(true, Ordering::SeqCst);
    // Redrive one by id, then the rest.
    let one = bus
        .redrive_selected(
            &topic,
            &group,
            busbar_core::RedriveSelection::Ids(vec![ids[1].to_string()]),
        )
        .await
        .unwrap();
    assert_eq!(one, 1);
    eventually(WAIT, "the selected one handled", || async {
        handled.lock().unwrap().len() == 1
    })
    .await;
    assert_eq!(handled.lock().unwrap()[0], ids[1]);
    assert_eq!(bus.redrive(&topic, &group).await.unwrap(), 2);
    eventually(WAIT, "all handled", || async { sub.stats().handled == 3 }).await;
    assert!(bus
        .dead_letters(&topic, &group, 10)
        .await
        .unwrap()
        .is_empty());
    let mut got = handled.lock().unwrap().clone();
    got.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(got, want);
    assert_eq!(transport.pending(&topic, &group), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_with_random_failures_are_all_accounted_for() {
    let transport = MemoryTransport::new();
    let bus = Bus::new(transport.clone());
    let (topic, group) = (unique("t"), unique("g"));
    const N: u64 = 10_000;
    let handled = Arc::new(Mutex::new(HashMap::<busbar_core::Text, u32>::new()));
    let h = Arc::clone(&handled);
    let sub = bus
        .subscribe::<Numbered>(&topic, &group)
        .concurrency(16)
        .retry(
            RetryPolicy::exponential(5)
                .with_initial_backoff(Duration::from_millis(1))
                .with_max_backoff(Duration::from_millis(5)),
        )
        .start(move |e: Envelope<Numbered>, _c: Context| {
            let h = Arc::clone(&h);
            async move {
                if e.payload.seq % 100 == 42 {
                    return Err(HandlerError::permanent("known bad order"));
                }
                if fastrand::u8(0..100) < 20 {
                    return Err(HandlerError::transient("flaky dependency"));
                }
                *h.lock().unwrap().entry(e.id.clone()).or_default() += 1;
                Ok(())
            }
        })
        .await
        .unwrap();
    let events: Vec<Numbered> = (0..N)
        .map(|i| numbered(&format!("k{}", i % 64), i))
        .collect();
    let mut published = HashSet::new();
    for chunk in events.chunks(500) {
        published.extend(bus.publish_batch(&topic, chunk.to_vec()).await.unwrap());
    }
    eventually(Duration::from_secs(60), "every message settled", || async {
        transport.pending(&topic, &group) == 0
    })
    .await;

    let handled = handled.lock().unwrap().clone();
    let dead: Vec<_> = bus.dead_letters(&topic, &group, usize::MAX).await.unwrap();
    let dead_ids: HashSet<busbar_core::Text> = dead.iter().map(|d| d.message.id.clone()).collect();
    let twice: Vec<_> = handled.iter().filter(|(_, &n)| n > 1).collect();
    assert!(twice.is_empty(), "handled more than once: {twice:?}");
    assert_eq!(
        dead_ids.len(),
        dead.len(),
        "a message was dead-lettered twice"
    );
    assert!(
        handled.keys().all(|id| !dead_ids.contains(id)),
        "an id was both handled and dead-lettered"
    );
    let accounted: HashSet<busbar_core::Text> = handled
        .keys()
        .cloned()
        .chain(dead_ids.iter().cloned())
        .collect();
    assert_eq!(accounted, published, "lost or unknown messages");
    assert_eq!(handled.len() + dead.len(), N as usize);
    // The 1% permanent failures are all there, with their reason.
    let permanent = dead
        .iter()
        .filter(|d| d.info.reason == DeadLetterReason::Permanent)
        .count();
    assert_eq!(permanent, 100);
    let stats = sub.stats();
    assert_eq!(stats.handled as usize, handled.len());
    assert_eq!(stats.dead_lettered as usize, dead.len());
    sub.shutdown(Duration::from_secs(1)).await.unwrap();
}

/// Waiting for a claim another consumer holds is not a failed attempt: a message whose claim
/// was held (by a consumer that then crashed) for many retry periods still gets the whole
/// retry policy once the claim is free.
#[tokio::test(start_paused = true)]
async fn waiting_for_a_claim_held_elsewhere_uses_up_no_attempts() {
    use busbar_core::idempotency::IdempotencyStore;
    let transport = MemoryTransport::new();
    let bus = Bus::new(transport.clone());
    let (topic, group) = (unique("t"), unique("g"));
    bus.declare(&topic, &group).await.unwrap();
    let store = Arc::new(MemoryIdempotencyStore::new(100));
    let envelope = bus.envelope(numbered("k", 1));
    // Another consumer holds the claim for 2 s (about 100 retry periods), then "crashes".
    let _held = store
        .claim(&group, &envelope.id, Duration::from_secs(2))
        .await
        .unwrap();
    let attempts_seen = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&attempts_seen);
    let sub = bus
        .subscribe::<Numbered>(&topic, &group)
        .retry(fast_retry(2))
        .idempotent(store)
        .start(move |_e: Envelope<Numbered>, c: Context| {
            let seen = Arc::clone(&seen);
            async move {
                let mut seen = seen.lock().unwrap();
                seen.push(c.attempt());
                if seen.len() == 1 {
                    return Err(HandlerError::transient("first real attempt fails"));
                }
                Ok(())
            }
        })
        .await
        .unwrap();
    bus.publish_envelope(&topic, &envelope).await.unwrap();
    eventually(WAIT, "handled after the claim expired", || async {
        sub.stats().handled == 1 || sub.stats().dead_lettered > 0
    })
    .await;
    let stats = sub.stats();
    assert_eq!(stats.dead_lettered, 0, "{stats:?}");
    assert_eq!(*attempts_seen.lock().unwrap(), vec![1, 2]);
    sub.shutdown(Duration::from_secs(1)).await.unwrap();
}

/// A structured-mode CloudEvent (the whole event as JSON, content type
/// `application/cloudevents+json`) is handled like its binary form: the envelope and the
/// handler's context carry the event's own id, correlation and key.
#[tokio::test]
async fn a_structured_mode_cloudevent_is_handled_like_its_binary_form() {
    let bus = Bus::memory();
    let (topic, group) = (unique("orders"), unique("g"));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    let sub = bus
        .subscribe::<Numbered>(&topic, &group)
        .start(move |e: Envelope<Numbered>, ctx: Context| {
            let record = Arc::clone(&record);
            async move {
                record.lock().unwrap().push((
                    e.id.clone(),
                    ctx.message_id().to_string(),
                    ctx.correlation_id().to_string(),
                    e.key.clone(),
                    e.payload.seq,
                ));
                Ok::<(), HandlerError>(())
            }
        })
        .await
        .unwrap();
    let mut wire = Message::new(
        "transport-id",
        topic.as_str(),
        r#"{"specversion":"1.0","id":"se-1","type":"test.numbered.v1","source":"/foreign",
            "correlationid":"conv-1","partitionkey":"k-9","data":{"key":"k-9","seq":5}}"#,
    );
    wire.headers.insert(
        "content-type",
        "application/cloudevents+json; charset=utf-8",
    );
    bus.publish_messages(vec![wire]).await.unwrap();
    eventually(WAIT, "handled", || async { sub.stats().handled == 1 }).await;
    assert_eq!(
        seen.lock().unwrap()[0],
        (
            "se-1".into(),
            "se-1".to_string(),
            "conv-1".to_string(),
            Some("k-9".into()),
            5
        )
    );
    sub.shutdown(WAIT).await.unwrap();
}

/// Handlers run on the runtime's threads, not one after another on one task: two CPU-bound
/// handlers, each blocking its thread until the other has started, meet; and no more than the
/// concurrency run at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_handlers_run_in_parallel_on_the_runtime_threads_up_to_the_concurrency() {
    let bus = Bus::memory();
    let (topic, group) = (unique("t"), unique("g"));
    let started = Arc::new((Mutex::new(0usize), std::sync::Condvar::new()));
    let (met, running, max_running) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let (s, m, r, mx) = (
        Arc::clone(&started),
        Arc::clone(&met),
        Arc::clone(&running),
        Arc::clone(&max_running),
    );
    let sub = bus
        .subscribe::<Numbered>(&topic, &group)
        .concurrency(2)
        .key_ordered(false)
        .start(move |_e: Envelope<Numbered>, _c: Context| {
            let (s, m, r, mx) = (
                Arc::clone(&s),
                Arc::clone(&m),
                Arc::clone(&r),
                Arc::clone(&mx),
            );
            async move {
                let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                mx.fetch_max(now, Ordering::SeqCst);
                let (count, other_started) = &*s;
                let mut count = count.lock().unwrap();
                *count += 1;
                other_started.notify_all();
                // The first two wait, blocking their thread, for each other.
                let (_count, wait) = other_started
                    .wait_timeout_while(count, Duration::from_secs(10), |n| *n < 2)
                    .unwrap();
                if !wait.timed_out() {
                    m.fetch_add(1, Ordering::SeqCst);
                }
                r.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, HandlerError>(())
            }
        })
        .await
        .unwrap();
    let events: Vec<Numbered> = (0..4).map(|i| numbered(&format!("k{i}"), i)).collect();
    bus.publish_batch(&topic, events).await.unwrap();
    eventually(WAIT, "all handled", || async { sub.stats().handled == 4 }).await;
    assert_eq!(
        met.load(Ordering::SeqCst),
        4,
        "blocking handlers did not run at the same time on the runtime's two threads"
    );
    assert_eq!(
        max_running.load(Ordering::SeqCst),
        2,
        "more handlers ran than the concurrency"
    );
    sub.shutdown(Duration::from_secs(1)).await.unwrap();
}
