//! The consumer runtime, written once for every transport: concurrency with per-key order,
//! retry then dead-letter, idempotency, correlation, tracing and graceful shutdown.

mod claim_waits;
mod context;
mod handler;
mod registry;
mod router;
mod runtime;

pub(crate) use claim_waits::ClaimWaits;
pub(crate) use registry::Registry;
pub use router::RouteBuilder;

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use context::{Captured, Context};
pub use handler::{BoxFuture, Handler, HandlerError, Interceptor};

use crate::bus::Bus;
use crate::codec::Json;
use crate::envelope::{Envelope, Undecoded};
use crate::error::{Error, ErrorKind, Result};
use crate::health::{Pulse, SubscriptionHealth};
use crate::idempotency::IdempotencyStore;
use crate::message::{validate_name, Message};
use crate::metrics::ConsumerMetrics;
use crate::retry::RetryPolicy;
use crate::routing::{EventSet, UnknownTypes};
use crate::transport::{ConsumeOptions, ConsumerStatus};

type KeyFn<E> = Arc<dyn Fn(&Envelope<E>) -> String + Send + Sync>;

/// How a subscription turns a received message into the envelope its handler takes.
pub(crate) trait Decoder<E>: Send + Sync + 'static {
    fn decode(&self, message: &Message) -> std::result::Result<Envelope<E>, Undecoded>;
}

/// The decoder of a subscription with one handler: the [`EventSet`] decodes.
struct Typed<S>(PhantomData<fn() -> S>);

impl<S: EventSet> Decoder<S> for Typed<S> {
    fn decode(&self, message: &Message) -> std::result::Result<Envelope<S>, Undecoded> {
        Envelope::decode_with(&Json, message, S::decode)
    }
}

pub(crate) struct Idempotency<E> {
    store: Arc<dyn IdempotencyStore>,
    key: Option<KeyFn<E>>,
    lease: Duration,
    retention: Duration,
}

/// Configures and starts a subscription; made by [`Bus::subscribe`].
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Serialize, Deserialize)] struct OrderPlaced { id: u32 }
/// # impl busbar_core::Event for OrderPlaced { const TYPE: &'static str = "orders.placed.v1"; }
/// use std::{sync::Arc, time::Duration};
/// use busbar_core::{Bus, Context, Envelope, HandlerError, RetryPolicy};
/// use busbar_core::idempotency::MemoryIdempotencyStore;
///
/// let bus = Bus::memory();
/// let subscription = bus
///     .subscribe::<OrderPlaced>("orders", "billing")
///     .concurrency(16)
///     .retry(RetryPolicy::exponential(3))
///     .idempotent(Arc::new(MemoryIdempotencyStore::new(100_000)))
///     .start(|order: Envelope<OrderPlaced>, ctx: Context| async move {
///         if order.payload.id == 0 {
///             return Err(HandlerError::permanent("order 0 does not exist"));
///         }
///         Ok(())
///     })
///     .await?;
/// subscription.shutdown(Duration::from_secs(5)).await?;
/// # Ok::<(), busbar_core::Error>(())
/// # }).unwrap();
/// ```
pub struct SubscriptionBuilder<E> {
    bus: Bus,
    topic: String,
    group: String,
    concurrency: Option<usize>,
    max_in_flight: Option<usize>,
    retry: Option<RetryPolicy>,
    key_ordered: bool,
    unknown_types: UnknownTypes,
    idempotency: Option<Idempotency<E>>,
}

impl<E: Send + 'static> SubscriptionBuilder<E> {
    pub(crate) fn new(bus: Bus, topic: &str, group: &str) -> Self {
        SubscriptionBuilder {
            bus,
            topic: topic.to_string(),
            group: group.to_string(),
            concurrency: None,
            max_in_flight: None,
            retry: None,
            key_ordered: true,
            unknown_types: UnknownTypes::default(),
            idempotency: None,
        }
    }

    /// Handlers running at once (default: the bus's, 8). At 1, the subscription's own task
    /// runs the handler, between fetches; above, long-lived worker tasks do, on any of the
    /// runtime's threads.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = Some(concurrency.max(1));
        self
    }

    /// Deliveries held at once, running or waiting behind their key (prefetch). Default: twice
    /// the concurrency, at least 32 (a prefetch of 2 at concurrency 1 would fetch again after
    /// every message, and on a broker wait a round trip for it). Never below the concurrency.
    pub fn max_in_flight(mut self, max_in_flight: usize) -> Self {
        self.max_in_flight = Some(max_in_flight.max(1));
        self
    }

    /// The retry policy (default: the bus's).
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = Some(retry);
        self
    }

    /// Whether messages with the same key are handled one at a time, in delivery order
    /// (default `true`; messages without a key always run in parallel).
    pub fn key_ordered(mut self, key_ordered: bool) -> Self {
        self.key_ordered = key_ordered;
        self
    }

    /// What to do with a message whose CloudEvents `type` this subscription does not handle
    /// (default: [`UnknownTypes::DeadLetter`], reason `unknown_type`).
    pub fn unknown_types(mut self, policy: UnknownTypes) -> Self {
        self.unknown_types = policy;
        self
    }

    /// Makes the handler idempotent: its effect happens once per message id per group, even
    /// when the message is delivered again. Claims are leases of 30 s by default
    /// ([`lease`](Self::lease)), done marks are kept 24 h ([`retention`](Self::retention)).
    pub fn idempotent(mut self, store: Arc<dyn IdempotencyStore>) -> Self {
        self.idempotency = Some(Idempotency {
            store,
            key: None,
            lease: Duration::from_secs(30),
            retention: Duration::from_secs(24 * 3600),
        });
        self
    }

    /// Uses `key` instead of the message id as the idempotency key (e.g. a business id, so two
    /// messages about the same payment count as one). Needs [`idempotent`](Self::idempotent).
    pub fn idempotency_key(
        mut self,
        key: impl Fn(&Envelope<E>) -> String + Send + Sync + 'static,
    ) -> Self {
        if let Some(idempotency) = &mut self.idempotency {
            idempotency.key = Some(Arc::new(key));
        }
        self
    }

    /// How long an idempotency claim holds before another consumer may take it over. Set it
    /// above the handler's longest run.
    pub fn lease(mut self, lease: Duration) -> Self {
        if let Some(idempotency) = &mut self.idempotency {
            idempotency.lease = lease;
        }
        self
    }

    /// How long a done mark is kept (the window in which duplicates are recognised).
    pub fn retention(mut self, retention: Duration) -> Self {
        if let Some(idempotency) = &mut self.idempotency {
            idempotency.retention = retention;
        }
        self
    }

    /// Starts consuming with `decoder` and `handler`, which claim `event_types`.
    async fn start_with(
        self,
        decoder: Box<dyn Decoder<E>>,
        handler: Arc<dyn Handler<E>>,
        event_types: Vec<&'static str>,
    ) -> Result<Subscription> {
        validate_name("topic", &self.topic)?;
        validate_name("group", &self.group)?;
        if self.bus.is_closed() {
            return Err(Error::closed("subscribe", "bus"));
        }
        let registration = self
            .bus
            .registry()
            .register(&self.topic, &self.group, &event_types)?;
        let concurrency = self
            .concurrency
            .unwrap_or(self.bus.default_concurrency())
            .max(1);
        let max_in_flight = self
            .max_in_flight
            .unwrap_or((concurrency * 2).max(32))
            .max(concurrency);
        let transport = Arc::clone(self.bus.transport());
        let options = ConsumeOptions::new(max_in_flight);
        let status = options.status.clone();
        let stream = transport.consume(&self.topic, &self.group, options).await?;
        let counters = Arc::new(Counters::default());
        let origin = Arc::new(context::Origin {
            topic: self.topic,
            group: self.group,
        });
        let shared = Arc::new(runtime::Shared {
            retry: self
                .retry
                .unwrap_or_else(|| self.bus.default_retry().clone()),
            system: transport.name(),
            max_message_bytes: transport.capabilities().max_message_bytes,
            #[cfg(feature = "otel")]
            spans: crate::otel::ConsumeSpans::new(transport.name(), &origin.topic, &origin.group),
            metrics: ConsumerMetrics::new(
                transport.name(),
                &origin.topic,
                &origin.group,
                &event_types,
            ),
            bus: self.bus.clone(),
            origin: Arc::clone(&origin),
            decoder,
            event_types,
            unknown_types: self.unknown_types,
            handler,
            idempotency: self.idempotency,
            counters: Arc::clone(&counters),
        });
        let (stop, stop_rx) = watch::channel(None);
        let limits = runtime::Limits {
            concurrency,
            max_in_flight,
            key_ordered: self.key_ordered,
        };
        let task = tokio::spawn(runtime::run(shared, stream, stop_rx, limits));
        tracing::debug!(topic = %origin.topic, group = %origin.group, concurrency, max_in_flight, "subscription started");
        Ok(Subscription {
            origin,
            stop,
            task: Some(task),
            counters,
            status,
            bus: self.bus,
            _registration: registration,
        })
    }
}

impl<E: EventSet> SubscriptionBuilder<E> {
    /// Declares the subscription and starts consuming with `handler`.
    ///
    /// Fails when another running subscription of this bus consumes the same (topic, group)
    /// with other event types: the group's messages would be split between the two, and each
    /// would reject the other's types. Handle several types in one subscription instead
    /// ([`Bus::route`], or an [`event_set!`](crate::event_set) enum).
    pub async fn start(self, handler: impl Handler<E>) -> Result<Subscription> {
        self.start_with(
            Box::new(Typed(PhantomData)),
            Arc::new(handler),
            E::event_types(),
        )
        .await
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    received: AtomicU64,
    handled: AtomicU64,
    failed_attempts: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    duplicates_skipped: AtomicU64,
    skipped_unknown: AtomicU64,
    panics: AtomicU64,
    transport_errors: AtomicU64,
    /// The last delivery and the last transport error, for [`Subscription::health`].
    pub(crate) pulse: Pulse,
}

impl Counters {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counts of what a subscription did so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SubscriptionStats {
    /// Deliveries received from the transport (redeliveries included).
    pub received: u64,
    /// Messages whose handler succeeded and that were acked.
    pub handled: u64,
    /// Handler attempts that failed (errors and panics).
    pub failed_attempts: u64,
    /// Failed attempts that were scheduled for another try.
    pub retried: u64,
    /// Messages sent to the dead-letter queue.
    pub dead_lettered: u64,
    /// Deliveries skipped because the idempotency store had them done.
    pub duplicates_skipped: u64,
    /// Messages of a type the subscription does not handle, acknowledged unhandled under
    /// [`UnknownTypes::Skip`] (under the default policy they count in `dead_lettered`).
    pub skipped_unknown: u64,
    /// Handler attempts that panicked (also counted in `failed_attempts`).
    pub panics: u64,
    /// Problems the transport reported while consuming (a lost connection it is recovering
    /// from, a consumer the broker does not give its share); each is also logged.
    pub transport_errors: u64,
}

/// What a graceful shutdown did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ShutdownReport {
    /// Handlers that were running when shutdown began and finished before the deadline.
    pub drained: usize,
    /// Handlers still running at the deadline: stopped, their messages not acked (they will be
    /// delivered again).
    pub abandoned: usize,
    /// Deliveries received but not started: returned unacked.
    pub returned: usize,
}

/// A running subscription. Shut it down with [`Subscription::shutdown`]; dropping it stops it
/// at once, abandoning (not acking) whatever handlers were running.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use std::time::Duration;
/// use serde::{Deserialize, Serialize};
/// use busbar_core::{Bus, Context, Envelope, Event};
///
/// #[derive(Serialize, Deserialize)]
/// struct Ping { n: u32 }
/// impl Event for Ping { const TYPE: &'static str = "demo.ping.v1"; }
///
/// let bus = Bus::memory();
/// let subscription = bus
///     .subscribe::<Ping>("pings", "pong")
///     .start(|_: Envelope<Ping>, _: Context| async { Ok(()) })
///     .await?;
/// bus.publish("pings", Ping { n: 1 }).await?;
/// # while subscription.stats().handled == 0 { tokio::task::yield_now().await; }
/// assert_eq!((subscription.topic(), subscription.group()), ("pings", "pong"));
/// assert_eq!(subscription.stats().handled, 1);
///
/// // Stop fetching; handlers still running get 10 s to finish and be acked.
/// let report = subscription.shutdown(Duration::from_secs(10)).await?;
/// assert_eq!(report.abandoned, 0);
/// # Ok::<(), busbar_core::Error>(())
/// # }).unwrap();
/// ```
#[must_use = "dropping a Subscription stops it"]
pub struct Subscription {
    origin: Arc<context::Origin>,
    stop: watch::Sender<Option<Instant>>,
    task: Option<JoinHandle<ShutdownReport>>,
    counters: Arc<Counters>,
    status: ConsumerStatus,
    bus: Bus,
    /// Holds this subscription's event types for its (topic, group) on the bus until dropped.
    _registration: registry::Registration,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("topic", &self.origin.topic)
            .field("group", &self.origin.group)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Subscription {
    /// The subscribed topic.
    pub fn topic(&self) -> &str {
        &self.origin.topic
    }

    /// The subscription group.
    pub fn group(&self) -> &str {
        &self.origin.group
    }

    /// What the subscription did so far.
    pub fn stats(&self) -> SubscriptionStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SubscriptionStats {
            received: get(&c.received),
            handled: get(&c.handled),
            failed_attempts: get(&c.failed_attempts),
            retried: get(&c.retried),
            dead_lettered: get(&c.dead_lettered),
            duplicates_skipped: get(&c.duplicates_skipped),
            skipped_unknown: get(&c.skipped_unknown),
            panics: get(&c.panics),
            transport_errors: get(&c.transport_errors),
        }
    }

    /// Readiness and liveness, for a probe: whether the consumer runs and consumes, its last
    /// delivery and last transport error, and the transport's connection.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Serialize, Deserialize)] struct Ping;
    /// # impl busbar_core::Event for Ping { const TYPE: &'static str = "ping.v1"; }
    /// use busbar_core::{Bus, Context, Envelope};
    ///
    /// let bus = Bus::memory();
    /// let sub = bus
    ///     .subscribe::<Ping>("pings", "g")
    ///     .start(|_: Envelope<Ping>, _: Context| async { Ok(()) })
    ///     .await?;
    /// let health = sub.health();
    /// assert!(health.is_ready() && health.is_live());
    /// assert!(health.last_delivery.is_none());
    /// sub.shutdown(std::time::Duration::from_secs(1)).await?;
    /// # Ok::<(), busbar_core::Error>(())
    /// # }).unwrap();
    /// ```
    pub fn health(&self) -> SubscriptionHealth {
        SubscriptionHealth {
            running: !self.is_finished(),
            consuming: self.status.is_consuming(),
            last_delivery: self.counters.pulse.last_delivery(),
            last_error: self.counters.pulse.last_error(),
            connection: self.bus.health().connection,
        }
    }

    /// Whether the transport's consumer is consuming: false while a Kafka consumer joins its
    /// group or a rebalance takes its partitions away, true at once on other transports.
    pub fn is_consuming(&self) -> bool {
        self.status.is_consuming()
    }

    /// Waits until the subscription really consumes (a Kafka consumer: joined its group and
    /// was assigned its share), at most `limit`. `start` returns before that, as soon as the
    /// subscription is declared; call this where messages published next must not wait for a
    /// group to form (a test, a readiness probe).
    ///
    /// Fails with [`ErrorKind::Timeout`] when the consumer is not consuming within `limit`.
    pub async fn consuming(&self, limit: Duration) -> Result<()> {
        if self.status.wait_consuming(limit).await {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::Timeout,
            "subscribe",
            format!(
                "the consumer was not consuming within {limit:?}; the broker has not given it \
                 its share of the group yet (see the subscription's transport errors)"
            ),
        )
        .with_resource(self.resource()))
    }

    fn resource(&self) -> String {
        format!("topic {}, group {}", self.origin.topic, self.origin.group)
    }

    /// Whether the consumer has stopped (shut down, or its transport closed and it drained).
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops fetching, lets running handlers finish for up to `grace` (acking what succeeds),
    /// returns the rest unacked, and waits until the consumer has stopped and the transport's
    /// consumer has let go of everything: left its group (Kafka), given back what it received
    /// (SQS, RabbitMQ), ended its long poll (SQS). The process may exit, or another instance
    /// take over, right after. That last wait is at most 60 s (then a warning is logged).
    pub async fn shutdown(mut self, grace: Duration) -> Result<ShutdownReport> {
        let _ = self.stop.send(Some(Instant::now() + grace));
        let Some(task) = self.task.take() else {
            return Ok(ShutdownReport::default());
        };
        let report = task.await.map_err(|e| {
            Error::new(ErrorKind::Closed, "shutdown", "the consumer task failed")
                .with_resource(self.resource())
                .with_source(e)
        })?;
        // The transport's consumer may still hold the broker's things: group membership,
        // messages to give back. Another instance takes over only once it let go.
        if !self.status.wait_released(RELEASE_LIMIT).await {
            tracing::warn!(topic = %self.origin.topic, group = %self.origin.group, limit = ?RELEASE_LIMIT, "the transport's consumer did not let go in time; returning anyway");
        }
        Ok(report)
    }
}

/// How long [`Subscription::shutdown`] waits, after its handlers are done, for the transport's
/// consumer to let go (leave its group, give back what it received).
const RELEASE_LIMIT: Duration = Duration::from_secs(60);

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.task.is_some() {
            let _ = self.stop.send(Some(Instant::now()));
        }
    }
}
