//! Metrics, under OpenTelemetry's messaging semantic-convention names, through the
//! [`metrics`](https://docs.rs/metrics) facade.
//!
//! busbar records into whatever recorder the service installed (Prometheus, OpenTelemetry,
//! StatsD, … each is a `metrics` exporter crate); with none installed, recording is a check of
//! an empty handle. Install the recorder before building the [`Bus`](crate::Bus): handles are
//! made once, when a subscription starts or a topic is first published to, and a handle made
//! before the recorder was installed records nothing.
//!
//! | metric | kind | labels | what |
//! |---|---|---|---|
//! | [`SENT`] | counter | system, destination, event type, `error.type` on failure | messages published |
//! | [`OPERATION_DURATION`] | histogram (s) | system, destination, operation name `send` | time to publish a batch until the broker accepted it |
//! | [`CONSUMED`] | counter | system, destination, group | deliveries received (redeliveries included) |
//! | [`PROCESS_DURATION`] | histogram (s) | system, destination, group, event type | handler run time |
//! | [`HANDLED`] | counter | system, destination, group, event type | handled and acked |
//! | [`FAILED_ATTEMPTS`] | counter | same | handler attempts that failed (errors and panics) |
//! | [`RETRIED`] | counter | same | failed attempts scheduled for another try |
//! | [`DEAD_LETTERED`] | counter | same | messages sent to the dead-letter queue |
//! | [`SKIPPED`] | counter | same, and [`SKIP_REASON`] (`duplicate`, `unknown_type`) | acked without running the handler |
//! | [`IN_FLIGHT`] | gauge | system, destination, group | deliveries being handled now |
//! | [`PENDING`] | gauge | system, destination, group | messages waiting for the group at the broker (queue depth; Kafka: consumer lag), set by [`Bus::depth`](crate::Bus::depth) |
//! | [`DEAD_LETTER_PENDING`] | gauge | system, destination, group | messages in the group's dead-letter queue, set by [`Bus::depth`](crate::Bus::depth) |
//!
//! Cardinality is bounded: a subscription labels only the event types it handles (others are
//! [`OTHER`]), and publishing labels at most [`MAX_PUBLISH_LABELS`] (topic, type) pairs per bus,
//! the rest as [`OTHER`].
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use busbar_core::{metrics, Bus};
//! # use serde::{Deserialize, Serialize};
//! # #[derive(Serialize, Deserialize)] struct Ping;
//! # impl busbar_core::Event for Ping { const TYPE: &'static str = "ping.v1"; }
//! // A service installs its exporter's recorder first (e.g. metrics-exporter-prometheus);
//! // with none installed, the bus records nothing and costs next to nothing.
//! let bus = Bus::memory();
//! bus.declare("pings", "g").await?;
//! bus.publish("pings", Ping).await?;
//! assert_eq!(metrics::SENT, "messaging.client.sent.messages");
//! # Ok::<(), busbar_core::Error>(())
//! # }).unwrap();
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use ::metrics::{Counter, Gauge, Histogram, Label, Unit};

/// Messages published (OpenTelemetry `messaging.client.sent.messages`).
pub const SENT: &str = "messaging.client.sent.messages";
/// Time a publish took, in seconds (OpenTelemetry `messaging.client.operation.duration`).
pub const OPERATION_DURATION: &str = "messaging.client.operation.duration";
/// Deliveries received (OpenTelemetry `messaging.client.consumed.messages`).
pub const CONSUMED: &str = "messaging.client.consumed.messages";
/// Handler run time, in seconds (OpenTelemetry `messaging.process.duration`).
pub const PROCESS_DURATION: &str = "messaging.process.duration";
/// Messages handled and acked.
pub const HANDLED: &str = "busbar.messages.handled";
/// Handler attempts that failed.
pub const FAILED_ATTEMPTS: &str = "busbar.messages.failed_attempts";
/// Failed attempts scheduled for another try.
pub const RETRIED: &str = "busbar.messages.retried";
/// Messages sent to the dead-letter queue.
pub const DEAD_LETTERED: &str = "busbar.messages.dead_lettered";
/// Messages acked without running the handler (see [`SKIP_REASON`]).
pub const SKIPPED: &str = "busbar.messages.skipped";
/// Deliveries being handled now.
pub const IN_FLIGHT: &str = "busbar.messages.in_flight";
/// Messages waiting for a group at the broker (queue depth, or Kafka consumer lag).
pub const PENDING: &str = "busbar.messages.pending";
/// Messages in a group's dead-letter queue.
pub const DEAD_LETTER_PENDING: &str = "busbar.dead_letters.pending";

/// Label: the transport (`memory`, `rabbitmq`, `kafka`, `sqs`).
pub const SYSTEM: &str = "messaging.system";
/// Label: the topic.
pub const DESTINATION: &str = "messaging.destination.name";
/// Label: the subscription group.
pub const GROUP: &str = "messaging.consumer.group.name";
/// Label: the CloudEvents type.
pub const EVENT_TYPE: &str = "cloudevents.event_type";
/// Label: the operation (`send`).
pub const OPERATION: &str = "messaging.operation.name";
/// Label: the [`ErrorKind`](crate::ErrorKind) of a failed publish.
pub const ERROR_TYPE: &str = "error.type";
/// Label of [`SKIPPED`]: `duplicate` (the idempotency store had it done) or `unknown_type`.
pub const SKIP_REASON: &str = "busbar.skip_reason";
/// The label value standing for every event type (or topic) beyond the bounded set.
pub const OTHER: &str = "_other";
/// How many (topic, event type) pairs one bus labels its publishes with; later pairs count as
/// [`OTHER`].
pub const MAX_PUBLISH_LABELS: usize = 256;

/// Registers the descriptions and units of busbar's metrics with the installed recorder (the
/// bus does it when built; call it again if the recorder was installed later).
pub fn describe() {
    use ::metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(SENT, Unit::Count, "Messages published.");
    describe_histogram!(
        OPERATION_DURATION,
        Unit::Seconds,
        "Time a publish took until the broker accepted the batch."
    );
    describe_counter!(CONSUMED, Unit::Count, "Deliveries received.");
    describe_histogram!(PROCESS_DURATION, Unit::Seconds, "Handler run time.");
    describe_counter!(HANDLED, Unit::Count, "Messages handled and acked.");
    describe_counter!(
        FAILED_ATTEMPTS,
        Unit::Count,
        "Handler attempts that failed."
    );
    describe_counter!(
        RETRIED,
        Unit::Count,
        "Failed attempts scheduled for another try."
    );
    describe_counter!(
        DEAD_LETTERED,
        Unit::Count,
        "Messages sent to the dead-letter queue."
    );
    describe_counter!(
        SKIPPED,
        Unit::Count,
        "Messages acked without running the handler."
    );
    describe_gauge!(IN_FLIGHT, Unit::Count, "Deliveries being handled now.");
    describe_gauge!(
        PENDING,
        Unit::Count,
        "Messages waiting for the group at the broker."
    );
    describe_gauge!(
        DEAD_LETTER_PENDING,
        Unit::Count,
        "Messages in the group's dead-letter queue."
    );
}

fn consumer_labels(system: &'static str, topic: &str, group: &str) -> Vec<Label> {
    vec![
        Label::from_static_parts(SYSTEM, system),
        Label::new(DESTINATION, topic.to_owned()),
        Label::new(GROUP, group.to_owned()),
    ]
}

/// What a subscription records per event type.
pub(crate) struct TypeMetrics {
    pub(crate) handled: Counter,
    pub(crate) failed_attempts: Counter,
    pub(crate) retried: Counter,
    pub(crate) dead_lettered: Counter,
    pub(crate) duplicate: Counter,
    pub(crate) unknown_type: Counter,
    pub(crate) duration: Histogram,
}

impl TypeMetrics {
    fn new(base: &[Label], event_type: &'static str) -> Self {
        let mut labels = base.to_vec();
        labels.push(Label::from_static_parts(EVENT_TYPE, event_type));
        let with = |reason: &'static str| {
            let mut labels = labels.clone();
            labels.push(Label::from_static_parts(SKIP_REASON, reason));
            ::metrics::counter!(SKIPPED, labels)
        };
        Self {
            handled: ::metrics::counter!(HANDLED, labels.clone()),
            failed_attempts: ::metrics::counter!(FAILED_ATTEMPTS, labels.clone()),
            retried: ::metrics::counter!(RETRIED, labels.clone()),
            dead_lettered: ::metrics::counter!(DEAD_LETTERED, labels.clone()),
            duplicate: with("duplicate"),
            unknown_type: with("unknown_type"),
            duration: ::metrics::histogram!(PROCESS_DURATION, labels),
        }
    }
}

/// A subscription's metric handles, made once when it starts.
pub(crate) struct ConsumerMetrics {
    pub(crate) consumed: Counter,
    pub(crate) in_flight: Gauge,
    types: Vec<(&'static str, TypeMetrics)>,
    /// Made on the first message of a type the subscription does not handle, so a service
    /// that never gets one exports no `_other` series.
    other: OnceLock<TypeMetrics>,
    base: Vec<Label>,
}

impl ConsumerMetrics {
    pub(crate) fn new(
        system: &'static str,
        topic: &str,
        group: &str,
        event_types: &[&'static str],
    ) -> Self {
        let base = consumer_labels(system, topic, group);
        Self {
            consumed: ::metrics::counter!(CONSUMED, base.clone()),
            in_flight: ::metrics::gauge!(IN_FLIGHT, base.clone()),
            types: event_types
                .iter()
                .map(|&event_type| (event_type, TypeMetrics::new(&base, event_type)))
                .collect(),
            other: OnceLock::new(),
            base,
        }
    }

    /// The handles of `event_type`: its own when the subscription handles it, else [`OTHER`]'s.
    pub(crate) fn of(&self, event_type: Option<&str>) -> &TypeMetrics {
        event_type
            .and_then(|wanted| self.types.iter().find(|(known, _)| *known == wanted))
            .map_or_else(
                || {
                    self.other
                        .get_or_init(|| TypeMetrics::new(&self.base, OTHER))
                },
                |(_, metrics)| metrics,
            )
    }
}

/// Keeps [`IN_FLIGHT`] up while a delivery is handled, also when its task is aborted.
pub(crate) struct InFlight<'a>(&'a Gauge);

impl<'a> InFlight<'a> {
    pub(crate) fn start(gauge: &'a Gauge) -> Self {
        gauge.increment(1.0);
        Self(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// The publish handles of one (topic, event type) pair, with the labels they were made with.
pub(crate) struct PublishHandles {
    topic: Box<str>,
    event_type: Box<str>,
    system: &'static str,
    sent: Counter,
    duration: Histogram,
}

/// A bus's publish handles, made on a (topic, type) pair's first publish.
#[derive(Default)]
pub(crate) struct PublishMetrics {
    /// By topic label, then event type label.
    pairs: RwLock<HashMap<Box<str>, Vec<Arc<PublishHandles>>>>,
    /// [`MAX_PUBLISH_LABELS`] pairs are made: new ones count as [`OTHER`].
    full: AtomicBool,
}

impl std::fmt::Debug for PublishMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublishMetrics").finish_non_exhaustive()
    }
}

/// The handles of a batch about to be published, resolved before the batch moves into the
/// transport: runs of messages with the same (topic, type), usually one.
pub(crate) struct PublishBatch {
    /// The first run, kept apart so a batch of one (topic, type), the usual one, allocates
    /// nothing.
    first: Option<(Arc<PublishHandles>, u64)>,
    more: Vec<(Arc<PublishHandles>, u64)>,
    started: std::time::Instant,
}

impl PublishBatch {
    /// Records the outcome: [`SENT`] per message and [`OPERATION_DURATION`] per run, or
    /// [`SENT`] under `error.type` when the batch failed.
    pub(crate) fn finish(self, error: Option<&'static str>) {
        let took = self.started.elapsed().as_secs_f64();
        for (handles, count) in self.first.into_iter().chain(self.more) {
            match error {
                None => {
                    handles.sent.increment(count);
                    handles.duration.record(took);
                }
                // Failures are rare: their handle is made on the spot.
                Some(error) => ::metrics::counter!(
                    SENT,
                    SYSTEM => handles.system,
                    DESTINATION => handles.topic.to_string(),
                    EVENT_TYPE => handles.event_type.to_string(),
                    ERROR_TYPE => error
                )
                .increment(count),
            }
        }
    }
}

impl PublishMetrics {
    /// Resolves the handles of `messages`, making those not made yet (within the bound).
    pub(crate) fn batch(&self, system: &'static str, messages: &[crate::Message]) -> PublishBatch {
        let mut batch = PublishBatch {
            first: None,
            more: Vec::new(),
            started: std::time::Instant::now(),
        };
        for message in messages {
            let event_type = message.header(crate::envelope::attr::TYPE).unwrap_or(OTHER);
            let last = batch.more.last_mut().or(batch.first.as_mut());
            if let Some((handles, count)) = last {
                if *handles.topic == *message.topic && *handles.event_type == *event_type {
                    *count += 1;
                    continue;
                }
            }
            let handles = self
                .find(&message.topic, event_type)
                .unwrap_or_else(|| self.register(system, &message.topic, event_type));
            match batch.first {
                None => batch.first = Some((handles, 1)),
                Some(_) => batch.more.push((handles, 1)),
            }
        }
        batch.started = std::time::Instant::now();
        batch
    }

    /// The handles of `count` messages all of `topic` and `event_type`.
    pub(crate) fn uniform(
        &self,
        system: &'static str,
        topic: &str,
        event_type: &str,
        count: usize,
    ) -> PublishBatch {
        let handles = self
            .find(topic, event_type)
            .unwrap_or_else(|| self.register(system, topic, event_type));
        PublishBatch {
            first: Some((handles, count as u64)),
            more: Vec::new(),
            started: std::time::Instant::now(),
        }
    }

    fn find(&self, topic: &str, event_type: &str) -> Option<Arc<PublishHandles>> {
        let pairs = self.pairs.read().ok()?;
        let full = self.full.load(Ordering::Relaxed);
        let types = pairs
            .get(topic)
            .or_else(|| full.then(|| pairs.get(OTHER)).flatten())?;
        let found = types
            .iter()
            .find(|handles| *handles.event_type == *event_type);
        found
            .or_else(|| {
                full.then(|| types.iter().find(|handles| &*handles.event_type == OTHER))
                    .flatten()
            })
            .cloned()
    }

    /// Makes the handles of (`topic`, `event_type`), or of [`OTHER`] once the bound is reached.
    fn register(&self, system: &'static str, topic: &str, event_type: &str) -> Arc<PublishHandles> {
        let make = |topic: &str, event_type: &str| {
            Arc::new(PublishHandles {
                topic: topic.into(),
                event_type: event_type.into(),
                system,
                sent: ::metrics::counter!(SENT, SYSTEM => system, DESTINATION => topic.to_owned(), EVENT_TYPE => event_type.to_owned()),
                duration: ::metrics::histogram!(OPERATION_DURATION, SYSTEM => system, DESTINATION => topic.to_owned(), OPERATION => "send"),
            })
        };
        let Ok(mut pairs) = self.pairs.write() else {
            // A poisoned lock only loses the labels, never the count.
            return make(OTHER, OTHER);
        };
        let made: usize = pairs.values().map(Vec::len).sum();
        let full = made >= MAX_PUBLISH_LABELS;
        self.full.store(full, Ordering::Relaxed);
        let topic_label = if full && !pairs.contains_key(topic) {
            OTHER
        } else {
            topic
        };
        let types = pairs.entry(topic_label.into()).or_default();
        let known = types
            .iter()
            .any(|handles| *handles.event_type == *event_type);
        let type_label = if full && !known { OTHER } else { event_type };
        if let Some(handles) = types
            .iter()
            .find(|handles| *handles.event_type == *type_label)
        {
            return Arc::clone(handles);
        }
        let handles = make(topic_label, type_label);
        types.push(Arc::clone(&handles));
        handles
    }
}

/// Records the broker-side depth of (`topic`, `group`) in the [`PENDING`] and
/// [`DEAD_LETTER_PENDING`] gauges.
pub(crate) fn record_depth(system: &'static str, topic: &str, group: &str, depth: &crate::Depth) {
    let labels = consumer_labels(system, topic, group);
    if let Some(pending) = depth.pending {
        ::metrics::gauge!(PENDING, labels.clone()).set(pending as f64);
    }
    if let Some(dead_letters) = depth.dead_letters {
        ::metrics::gauge!(DEAD_LETTER_PENDING, labels).set(dead_letters as f64);
    }
}
