//! The metrics a transport's bus records, checked after a scenario with retries and dead
//! letters (feature `metrics`).
//!
//! [`records_retries_and_dead_letters`] installs [`Keeping`] as the process's recorder (once; keep such tests in their own test binary, since the recorder must be
//! installed before the bus is built), runs the scenario on a topic of its own, and checks
//! every value under that topic's labels.
//!
//! ```no_run
//! # async fn run(transport: std::sync::Arc<dyn busbar_core::Transport>) {
//! busbar_testkit::metrics::records_retries_and_dead_letters(transport).await;
//! # }
//! ```

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use busbar_core::metrics as m;
use busbar_core::{Bus, Context, Envelope, Event, HandlerError, Transport};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_util::registry::{AtomicStorage, Registry};
use serde::{Deserialize, Serialize};

use crate::conformance::{fast_retry, unique, wait_for};

/// A recorder that keeps every value (metrics-util's `DebuggingRecorder` resets
/// counters when read, which loses counts between two readers).
#[derive(Debug)]
pub struct Keeping {
    registry: Registry<Key, AtomicStorage>,
}

impl Recorder for Keeping {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.registry
            .get_or_create_counter(key, |c| Counter::from_arc(Arc::clone(c)))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.registry
            .get_or_create_gauge(key, |g| Gauge::from_arc(Arc::clone(g)))
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        self.registry
            .get_or_create_histogram(key, |h| Histogram::from_arc(Arc::clone(h)))
    }
}

/// The process's recorder, installed on first use.
///
/// # Panics
///
/// When another recorder is installed already.
pub fn recorder() -> &'static Keeping {
    static RECORDER: OnceLock<&'static Keeping> = OnceLock::new();
    RECORDER.get_or_init(|| {
        let recorder: &'static Keeping = Box::leak(Box::new(Keeping {
            registry: Registry::atomic(),
        }));
        ::metrics::set_global_recorder(recorder)
            .expect("no other metrics recorder is installed in this test binary");
        recorder
    })
}

/// One metric's value, as read from the recorder.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A counter's total.
    Counter(u64),
    /// A gauge's value.
    Gauge(f64),
    /// How many values a histogram recorded.
    Histogram(usize),
}

/// The values of every metric whose labels include `destination = topic`, by name and the
/// rest of its labels (sorted `key=value`, joined by `,`).
pub fn values_of(topic: &str) -> HashMap<(String, String), Value> {
    let registry = &recorder().registry;
    let mut values = HashMap::new();
    let mut keep = |key: &Key, value: Value| {
        let mut on_topic = false;
        let mut labels: Vec<String> = Vec::new();
        for label in key.labels() {
            if label.key() == m::DESTINATION {
                on_topic = label.value() == topic;
            } else {
                labels.push(format!("{}={}", label.key(), label.value()));
            }
        }
        if on_topic {
            labels.sort();
            values.insert((key.name().to_owned(), labels.join(",")), value);
        }
    };
    for (key, counter) in registry.get_counter_handles() {
        keep(&key, Value::Counter(counter.load(Ordering::Acquire)));
    }
    for (key, gauge) in registry.get_gauge_handles() {
        keep(
            &key,
            Value::Gauge(f64::from_bits(gauge.load(Ordering::Acquire))),
        );
    }
    for (key, histogram) in registry.get_histogram_handles() {
        keep(&key, Value::Histogram(histogram.data().len()));
    }
    values
}

/// The event of the scenario: `fate` says what the handler does with it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Metered {
    /// `ok`, `flaky` (fails its first attempt) or `poison` (fails permanently).
    pub fate: String,
}

impl Event for Metered {
    const TYPE: &'static str = "busbar.test.metered.v1";
}

/// An event of a type the scenario's subscription does not handle.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stranger;

impl Event for Stranger {
    const TYPE: &'static str = "busbar.test.stranger.v1";
}

/// Publishes 3 messages that succeed, 3 that fail once and then succeed, 3 that fail
/// permanently and 1 of a type the subscription does not handle; then checks every metric of
/// the topic, and the depth gauges where the transport reports depth.
///
/// # Panics
///
/// When a value is not what the scenario implies, naming the metric.
pub async fn records_retries_and_dead_letters(transport: Arc<dyn Transport>) {
    recorder();
    let system = transport.name();
    let bus = Bus::builder(transport).retry(fast_retry(3)).build();
    let (topic, group) = (unique("metrics"), unique("g"));
    bus.declare(&topic, &group).await.expect("declare");
    // Three messages wait before any consumer runs: the depth, where reported, says so.
    for _ in 0..3 {
        let event = Metered { fate: "ok".into() };
        bus.publish(&topic, event).await.expect("publish");
    }
    let limit = tokio::time::Instant::now() + crate::conformance::wait_limit();
    loop {
        match bus.depth(&topic, &group).await {
            Ok(depth) if depth.pending.is_some_and(|pending| pending != 3) => {
                // SQS counts are approximate and settle within a minute.
                assert!(
                    tokio::time::Instant::now() < limit,
                    "3 pending before consuming: {depth:?}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Ok(_) => break,
            Err(error) => {
                assert_eq!(error.kind(), busbar_core::ErrorKind::Unsupported, "{error}");
                break;
            }
        }
    }
    let failed_once = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let sub = bus
        .subscribe::<Metered>(&topic, &group)
        .start(move |envelope: Envelope<Metered>, _: Context| {
            let failed_once = Arc::clone(&failed_once);
            async move {
                match envelope.payload.fate.as_str() {
                    "poison" => Err(HandlerError::permanent("poison")),
                    "flaky"
                        if failed_once
                            .lock()
                            .is_ok_and(|mut seen| seen.insert(envelope.id.clone())) =>
                    {
                        Err(HandlerError::transient("flaky, first attempt"))
                    }
                    _ => Ok(()),
                }
            }
        })
        .await
        .expect("subscribe");
    sub.consuming(crate::conformance::wait_limit())
        .await
        .expect("consuming");
    for fate in ["flaky", "poison"] {
        let events = (0..3).map(|_| Metered { fate: fate.into() });
        bus.publish_batch(&topic, events).await.expect("publish");
    }
    bus.publish(&topic, Stranger).await.expect("publish");
    wait_for("6 handled and 4 dead-lettered", || {
        let stats = sub.stats();
        stats.handled == 6 && stats.dead_lettered == 4
    })
    .await;

    let consumer = format!("messaging.consumer.group.name={group},messaging.system={system}");
    // Counted before it is settled: the delivery leaves the in-flight gauge once its ack is done.
    let in_flight = (m::IN_FLIGHT.to_owned(), consumer.clone());
    wait_for("nothing in flight", || {
        values_of(&topic).get(&in_flight) == Some(&Value::Gauge(0.0))
    })
    .await;
    let values = values_of(&topic);
    let get = |name: &str, labels: &str| {
        values
            .get(&(name.to_owned(), labels.to_owned()))
            .cloned()
            .unwrap_or_else(|| panic!("no {name} {{{labels}}} among {values:#?}"))
    };
    let sent =
        |event_type: &str| format!("cloudevents.event_type={event_type},messaging.system={system}");
    let typed = |event_type: &str| {
        format!("cloudevents.event_type={event_type},messaging.consumer.group.name={group},messaging.system={system}")
    };
    let metered = typed(Metered::TYPE);
    let other = typed(m::OTHER);

    assert_eq!(
        get(m::SENT, &sent(Metered::TYPE)),
        Value::Counter(9),
        "{}",
        m::SENT
    );
    assert_eq!(
        get(m::SENT, &sent(Stranger::TYPE)),
        Value::Counter(1),
        "{}",
        m::SENT
    );
    let publish_duration = format!("messaging.operation.name=send,messaging.system={system}");
    assert_eq!(
        get(m::OPERATION_DURATION, &publish_duration),
        Value::Histogram(6),
        "one per publish: 3 single, 2 batches, the stranger"
    );
    // 10 first deliveries and 3 redeliveries of the flaky ones.
    assert_eq!(
        get(m::CONSUMED, &consumer),
        Value::Counter(13),
        "{}",
        m::CONSUMED
    );
    assert_eq!(
        get(m::HANDLED, &metered),
        Value::Counter(6),
        "{}",
        m::HANDLED
    );
    assert_eq!(
        get(m::FAILED_ATTEMPTS, &metered),
        Value::Counter(6),
        "{}",
        m::FAILED_ATTEMPTS
    );
    assert_eq!(
        get(m::RETRIED, &metered),
        Value::Counter(3),
        "{}",
        m::RETRIED
    );
    assert_eq!(
        get(m::DEAD_LETTERED, &metered),
        Value::Counter(3),
        "{}",
        m::DEAD_LETTERED
    );
    assert_eq!(
        get(m::DEAD_LETTERED, &other),
        Value::Counter(1),
        "the stranger, under {}",
        m::OTHER
    );
    assert_eq!(
        get(m::PROCESS_DURATION, &metered),
        Value::Histogram(12),
        "one per handler run: 9 first attempts and 3 retries"
    );
    assert_eq!(
        get(m::IN_FLIGHT, &consumer),
        Value::Gauge(0.0),
        "{}",
        m::IN_FLIGHT
    );
    let skipped = format!("{}=duplicate,{metered}", m::SKIP_REASON);
    assert_eq!(
        get(m::SKIPPED, &skipped),
        Value::Counter(0),
        "{}",
        m::SKIPPED
    );

    // A consumer's committed position may trail its acks for a moment (Kafka commits in the
    // background): wait until nothing is pending, where the transport reports depth.
    let limit = tokio::time::Instant::now() + crate::conformance::wait_limit();
    let depth = loop {
        let depth = bus.depth(&topic, &group).await;
        match &depth {
            Ok(d) if d.pending.is_some_and(|pending| pending > 0) => {
                assert!(tokio::time::Instant::now() < limit, "still pending: {d:?}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            _ => break depth,
        }
    };
    match depth {
        Ok(depth) => {
            if let Some(dead_letters) = depth.dead_letters {
                assert_eq!(dead_letters, 4, "dead-letter depth");
                let values = values_of(&topic);
                assert_eq!(
                    values.get(&(m::DEAD_LETTER_PENDING.to_owned(), consumer.clone())),
                    Some(&Value::Gauge(4.0)),
                    "{}",
                    m::DEAD_LETTER_PENDING
                );
            }
            if let Some(pending) = depth.pending {
                assert_eq!(pending, 0, "nothing waits once all is settled");
            }
        }
        Err(error) => assert_eq!(
            error.kind(),
            busbar_core::ErrorKind::Unsupported,
            "depth fails only as unsupported: {error}"
        ),
    }
    sub.shutdown(std::time::Duration::from_secs(5))
        .await
        .expect("shutdown");
}
