//! [`Bus`]: what services hold. A transport plus the codec and defaults.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tracing::Instrument;

use crate::codec::Json;
use crate::config::BusConfig;
use crate::consumer::{ClaimWaits, Interceptor, Registry, RouteBuilder, SubscriptionBuilder};
use crate::dead_letter::DeadLetter;
use crate::envelope::{Envelope, Event};
use crate::error::{Error, Result};
use crate::health::{BusHealth, ConnectionState};
use crate::memory::MemoryTransport;
use crate::message::{validate_name, Message};
use crate::metrics::PublishMetrics;
use crate::retry::RetryPolicy;
use crate::routing::EventSet;
use crate::text::Text;
use crate::transport::{Depth, RedriveSelection, Transport};
use crate::Capabilities;

/// The CloudEvents `source` used when none is configured.
pub const DEFAULT_SOURCE: &str = "/busbar";
/// Handlers run at once per subscription when none is configured.
pub const DEFAULT_CONCURRENCY: usize = 8;

/// Publishes typed events and starts subscriptions, over any [`Transport`].
///
/// Cheap to clone: clones share the transport.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use serde::{Deserialize, Serialize};
/// use busbar_core::{Bus, Event};
///
/// #[derive(Serialize, Deserialize)]
/// struct OrderPlaced { order_id: u32 }
/// impl Event for OrderPlaced { const TYPE: &'static str = "orders.order_placed.v1"; }
///
/// let bus = Bus::memory();
/// bus.declare("orders", "billing").await?;
/// let id = bus.publish("orders", OrderPlaced { order_id: 1 }).await?;
/// assert!(!id.is_empty());
/// # Ok::<(), busbar_core::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct Bus {
    inner: Arc<BusInner>,
}

struct BusInner {
    transport: Arc<dyn Transport>,
    source: Text,
    retry: RetryPolicy,
    concurrency: usize,
    interceptor: Option<Arc<dyn Interceptor>>,
    closed: AtomicBool,
    claim_waits: ClaimWaits,
    registry: Registry,
    publish_metrics: PublishMetrics,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("transport", &self.inner.transport)
            .field("source", &self.inner.source)
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

/// Builds a [`Bus`] with non-default settings.
#[derive(Debug)]
pub struct BusBuilder {
    transport: Arc<dyn Transport>,
    source: String,
    retry: RetryPolicy,
    concurrency: usize,
    interceptor: Option<Arc<dyn Interceptor>>,
}

impl std::fmt::Debug for dyn Interceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Interceptor")
    }
}

impl BusBuilder {
    /// The CloudEvents `source` of events this service publishes (e.g. `/orders-service`).
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = source.into();
        self
    }

    /// The retry policy subscriptions use unless they set their own.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Handlers running at once per subscription, unless set per subscription.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// Consults `interceptor` before every handler attempt of every subscription of this bus.
    pub fn interceptor(mut self, interceptor: Arc<dyn Interceptor>) -> Self {
        self.interceptor = Some(interceptor);
        self
    }

    /// Applies the non-URL parts of `config`.
    pub fn config(self, config: &BusConfig) -> Self {
        self.source(config.source.clone())
            .retry(config.retry.clone())
            .concurrency(config.concurrency)
    }

    /// The bus.
    pub fn build(self) -> Bus {
        crate::metrics::describe();
        Bus {
            inner: Arc::new(BusInner {
                transport: self.transport,
                source: Text::from(self.source),
                retry: self.retry,
                concurrency: self.concurrency,
                interceptor: self.interceptor,
                closed: AtomicBool::new(false),
                claim_waits: ClaimWaits::default(),
                registry: Registry::default(),
                publish_metrics: PublishMetrics::default(),
            }),
        }
    }
}

impl Bus {
    /// The claim waits of this bus's subscriptions (see [`ClaimWaits`]).
    pub(crate) fn claim_waits(&self) -> &ClaimWaits {
        &self.inner.claim_waits
    }

    /// The running subscriptions of this bus by (topic, group) (see [`Registry`]).
    pub(crate) fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// A bus over `transport` with default settings.
    pub fn new(transport: impl Transport) -> Self {
        Bus::builder(Arc::new(transport)).build()
    }

    /// A bus over a fresh in-process [`MemoryTransport`].
    pub fn memory() -> Self {
        Bus::new(MemoryTransport::new())
    }

    /// A builder over a shared transport.
    pub fn builder(transport: Arc<dyn Transport>) -> BusBuilder {
        BusBuilder {
            transport,
            source: DEFAULT_SOURCE.to_string(),
            retry: RetryPolicy::default(),
            concurrency: DEFAULT_CONCURRENCY,
            interceptor: None,
        }
    }

    /// The transport underneath.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.inner.transport
    }

    /// What the transport guarantees.
    pub fn capabilities(&self) -> Capabilities {
        self.inner.transport.capabilities()
    }

    /// The CloudEvents `source` of this bus's events.
    pub fn source(&self) -> &str {
        &self.inner.source
    }

    pub(crate) fn default_retry(&self) -> &RetryPolicy {
        &self.inner.retry
    }

    pub(crate) fn interceptor(&self) -> Option<&Arc<dyn Interceptor>> {
        self.inner.interceptor.as_ref()
    }

    pub(crate) fn default_concurrency(&self) -> usize {
        self.inner.concurrency
    }

    /// A fresh envelope for `event` from this bus's source, to adjust before publishing.
    pub fn envelope<E: Event>(&self, event: E) -> Envelope<E> {
        Envelope::new(self.inner.source.clone(), event)
    }

    /// Publishes `event` to `topic` as a new conversation. Returns the message id once the
    /// broker durably accepted it.
    pub async fn publish<E: Event>(&self, topic: &str, event: E) -> Result<Text> {
        self.publish_owned(topic, self.envelope(event)).await
    }

    /// Publishes an envelope busbar made, moving its strings into the message; returns its id.
    pub(crate) async fn publish_owned<E: Event>(
        &self,
        topic: &str,
        envelope: Envelope<E>,
    ) -> Result<Text> {
        let (id, event_type) = (envelope.id.clone(), envelope.event_type.clone());
        let message = envelope.into_message(&Json, topic)?;
        self.publish_encoded(vec![message], Some((topic, &event_type)))
            .await?;
        Ok(id)
    }

    /// Publishes a prepared envelope (its id, correlation and headers as they are).
    pub async fn publish_envelope<E: Event>(
        &self,
        topic: &str,
        envelope: &Envelope<E>,
    ) -> Result<()> {
        let message = envelope.to_message(&Json, topic)?;
        self.publish_messages(vec![message]).await
    }

    /// Publishes several events to `topic` in one batch. Returns their ids in order once all
    /// were durably accepted; on error, none of them should be assumed published.
    pub async fn publish_batch<E: Event>(
        &self,
        topic: &str,
        events: impl IntoIterator<Item = E>,
    ) -> Result<Vec<Text>> {
        let messages = events
            .into_iter()
            .map(|event| self.envelope(event).into_message(&Json, topic))
            .collect::<Result<Vec<_>>>()?;
        let ids = messages.iter().map(|message| message.id.clone()).collect();
        self.publish_encoded(messages, Some((topic, E::TYPE)))
            .await?;
        Ok(ids)
    }

    /// Publishes already-encoded messages (for bridges and tools; services use
    /// [`Bus::publish`]).
    pub async fn publish_messages(&self, messages: Vec<Message>) -> Result<()> {
        self.publish_encoded(messages, None).await
    }

    /// Publishes `messages`; `uniform` is the topic and event type all of them have, when the
    /// caller made them so (a typed batch): neither is then read message by message (looking
    /// up each message's `ce_type` header and comparing both cost about 250 instructions a
    /// message).
    async fn publish_encoded(
        &self,
        messages: Vec<Message>,
        uniform: Option<(&str, &str)>,
    ) -> Result<()> {
        self.ensure_open("publish")?;
        if messages.is_empty() {
            return Ok(());
        }
        if let Some((topic, _)) = uniform {
            validate_name("topic", topic)?;
        } else {
            // A batch's messages usually share their topic: each name is checked once in a row.
            let mut checked = None;
            for message in &messages {
                let topic = message.topic.as_str();
                if checked != Some(topic) {
                    validate_name("topic", topic)?;
                    checked = Some(topic);
                }
            }
        }
        let span = tracing::info_span!(
            "busbar.publish",
            messaging.system = self.inner.transport.name(),
            messaging.operation.type = "publish",
            messaging.destination.name = %messages[0].topic,
            messaging.batch.message_count = messages.len(),
            messaging.message.id = %messages[0].id,
        );
        let system = self.inner.transport.name();
        let metrics = &self.inner.publish_metrics;
        let batch = match uniform {
            Some((topic, event_type)) => metrics.uniform(system, topic, event_type, messages.len()),
            None => metrics.batch(system, &messages),
        };
        let result = self
            .inner
            .transport
            .publish(messages)
            .instrument(span)
            .await;
        batch.finish(result.as_ref().err().map(|e| e.kind().as_str()));
        result
    }

    /// Declares `group`'s durable subscription to `topic`: from now on the group receives every
    /// message published to the topic, even while none of its consumers runs.
    pub async fn declare(&self, topic: &str, group: &str) -> Result<()> {
        self.ensure_open("declare")?;
        validate_name("topic", topic)?;
        validate_name("group", group)?;
        self.inner.transport.declare(topic, group).await
    }

    /// Starts building a subscription of `group` to events of type `E` on `topic`: one
    /// [`Event`] type (and its older [`ALIASES`](Event::ALIASES)), or an
    /// [`event_set!`](crate::event_set) enum of several, handled by one handler.
    pub fn subscribe<E: EventSet>(&self, topic: &str, group: &str) -> SubscriptionBuilder<E> {
        SubscriptionBuilder::new(self.clone(), topic, group)
    }

    /// Starts building a subscription of `group` to `topic` with one handler per event type:
    /// each message goes to the handler of its CloudEvents `type`, on one consumer, so per-key
    /// order holds across the types.
    pub fn route(&self, topic: &str, group: &str) -> RouteBuilder {
        RouteBuilder::new(self.clone(), topic, group)
    }

    /// Up to `limit` dead letters of (`topic`, `group`), oldest first.
    pub async fn dead_letters(
        &self,
        topic: &str,
        group: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        self.ensure_open("list dead letters")?;
        self.inner.transport.dead_letters(topic, group, limit).await
    }

    /// Sends every dead letter of (`topic`, `group`) back to the group, with fresh attempts.
    /// Returns how many were redriven.
    pub async fn redrive(&self, topic: &str, group: &str) -> Result<usize> {
        self.redrive_selected(topic, group, RedriveSelection::All)
            .await
    }

    /// Sends the selected dead letters back to the group.
    pub async fn redrive_selected(
        &self,
        topic: &str,
        group: &str,
        selection: RedriveSelection,
    ) -> Result<usize> {
        self.ensure_open("redrive")?;
        self.inner.transport.redrive(topic, group, selection).await
    }

    /// Deletes the selected dead letters of (`topic`, `group`) for good; returns how many.
    pub async fn purge_dead_letters(
        &self,
        topic: &str,
        group: &str,
        selection: RedriveSelection,
    ) -> Result<usize> {
        self.ensure_open("purge dead letters")?;
        self.inner
            .transport
            .purge_dead_letters(topic, group, selection)
            .await
    }

    /// Removes `group`'s subscription to `topic`, with its pending messages and dead letters
    /// (see [`Transport::delete_group`]). Stop the group's subscriptions first.
    pub async fn delete_group(&self, topic: &str, group: &str) -> Result<()> {
        self.ensure_open("delete a group")?;
        validate_name("topic", topic)?;
        validate_name("group", group)?;
        self.inner.transport.delete_group(topic, group).await
    }

    /// How many messages wait for `group` at the broker and in its dead-letter queue (see
    /// [`Depth`]); also sets the [`PENDING`](crate::metrics::PENDING) and
    /// [`DEAD_LETTER_PENDING`](crate::metrics::DEAD_LETTER_PENDING) gauges. A service calls it
    /// on a timer, or when its metrics are scraped.
    ///
    /// Fails with [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported) on a transport
    /// that cannot tell.
    pub async fn depth(&self, topic: &str, group: &str) -> Result<Depth> {
        self.ensure_open("report queue depth")?;
        validate_name("topic", topic)?;
        validate_name("group", group)?;
        let depth = self.inner.transport.depth(topic, group).await?;
        crate::metrics::record_depth(self.inner.transport.name(), topic, group, &depth);
        Ok(depth)
    }

    /// Readiness and liveness of the bus, for a probe (see [`BusHealth`]): the transport's
    /// connection, or [`ConnectionState::Closed`] once [`Bus::close`] was called.
    pub fn health(&self) -> BusHealth {
        let connection = if self.is_closed() {
            ConnectionState::Closed
        } else {
            self.inner.transport.connection()
        };
        BusHealth {
            transport: self.inner.transport.name(),
            connection,
        }
    }

    /// Closes the bus and its transport: later publishes fail with a `Closed` error and
    /// subscriptions stop receiving. Shut subscriptions down first to drain them gracefully.
    pub async fn close(&self) -> Result<()> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.inner.transport.close().await
    }

    /// Whether [`Bus::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    fn ensure_open(&self, operation: &'static str) -> Result<()> {
        if self.is_closed() {
            Err(Error::closed(operation, "bus"))
        } else {
            Ok(())
        }
    }
}
