//! The transport SPI: what every broker adapter implements.
//!
//! It is small on purpose. Typed publishing, envelopes, retry, dead-letter metadata and
//! idempotency live in the core; an adapter only moves [`Message`]s and settles [`Delivery`]s.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::capabilities::Capabilities;
use crate::dead_letter::{DeadLetter, DeadLetterInfo};
use crate::error::{Error, ErrorKind, Result};
use crate::health::ConnectionState;
use crate::message::Message;

/// How a consumer wants its deliveries.
#[derive(Debug, Clone)]
pub struct ConsumeOptions {
    /// The most deliveries handed out and not yet settled at once (prefetch). At least 1.
    pub max_in_flight: usize,
    /// Where the transport's consumer reports whether it is consuming and what it still holds
    /// after its stream is dropped; the subscription reads it.
    pub status: ConsumerStatus,
    /// Where a group that has no position yet starts reading. A group that has one (a declared
    /// queue, committed offsets) continues from it.
    pub start: StartFrom,
}

/// Where a consumer of a group with no position yet starts reading (see
/// [`ConsumeOptions::start`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartFrom {
    /// What the transport does for a new group: messages published from its declare on
    /// (memory, RabbitMQ, SQS), every message the log still keeps (Kafka).
    #[default]
    Default,
    /// Only messages published from now on (Kafka: the end of the log).
    Latest,
    /// Every message the broker still keeps for the topic (Kafka: the start of the log).
    /// Transports that keep no history of a topic (memory, RabbitMQ, SQS) refuse it with
    /// [`ErrorKind::Unsupported`], for an existing group too.
    Earliest,
}

impl ConsumeOptions {
    /// Options with `max_in_flight` and a fresh [`ConsumerStatus`].
    pub fn new(max_in_flight: usize) -> Self {
        ConsumeOptions {
            max_in_flight,
            status: ConsumerStatus::default(),
            start: StartFrom::Default,
        }
    }
}

impl Default for ConsumeOptions {
    fn default() -> Self {
        ConsumeOptions::new(16)
    }
}

/// What a transport's consumer tells the subscription over it about its life: whether it is
/// really consuming, and whether it still holds anything of the broker's.
///
/// The subscription makes one per consumer and passes it in [`ConsumeOptions::status`]. A
/// transport whose consumer is ready as soon as `consume` returns, and holds nothing once its
/// stream is dropped, ignores it. Others report:
/// - [`joining`](Self::joining) before `consume` returns, when the broker still has to give
///   the consumer its share (a Kafka group join), then [`set_consuming`](Self::set_consuming)
///   once it has, and `set_consuming(false)` while a rebalance takes it away;
/// - a [`hold`](Self::hold) for as long as the consumer keeps anything after its stream is
///   dropped: group membership, received messages it must give back, a channel whose
///   deliveries are still being settled. `Subscription::shutdown` returns only once every
///   hold is dropped, so the process may exit, or another instance take over, at once.
///
/// ```
/// use std::time::Duration;
/// use busbar_core::ConsumerStatus;
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let status = ConsumerStatus::default();
/// assert!(status.is_consuming(), "ready unless the transport says it is joining");
/// status.joining();
/// assert!(!status.wait_consuming(Duration::from_millis(10)).await);
/// status.set_consuming(true);
/// assert!(status.wait_consuming(Duration::from_millis(10)).await);
///
/// let hold = status.hold(); // e.g. the consumer still has to leave its group
/// assert!(!status.wait_released(Duration::from_millis(10)).await);
/// drop(hold);
/// assert!(status.wait_released(Duration::from_millis(10)).await);
/// # });
/// ```
#[derive(Debug, Clone)]
pub struct ConsumerStatus {
    state: Arc<tokio::sync::watch::Sender<StatusState>>,
}

#[derive(Debug, Clone, Copy)]
struct StatusState {
    consuming: bool,
    holds: usize,
}

impl Default for ConsumerStatus {
    fn default() -> Self {
        let (state, _) = tokio::sync::watch::channel(StatusState {
            consuming: true,
            holds: 0,
        });
        ConsumerStatus {
            state: Arc::new(state),
        }
    }
}

impl ConsumerStatus {
    /// Transport side: the consumer is not consuming until [`set_consuming`](Self::set_consuming)
    /// says so.
    pub fn joining(&self) {
        self.set_consuming(false);
    }

    /// Transport side: whether the consumer is consuming now (joined and assigned its share).
    pub fn set_consuming(&self, consuming: bool) {
        self.state.send_if_modified(|state| {
            let changed = state.consuming != consuming;
            state.consuming = consuming;
            changed
        });
    }

    /// Transport side: the consumer holds something until the returned guard is dropped.
    pub fn hold(&self) -> ConsumerHold {
        self.state.send_modify(|state| state.holds += 1);
        ConsumerHold {
            state: Arc::clone(&self.state),
        }
    }

    /// Whether the consumer is consuming.
    pub fn is_consuming(&self) -> bool {
        self.state.borrow().consuming
    }

    /// Whether the consumer holds nothing (every [`hold`](Self::hold) was dropped).
    pub fn is_released(&self) -> bool {
        self.state.borrow().holds == 0
    }

    /// Waits at most `limit` until the consumer is consuming; returns whether it is.
    pub async fn wait_consuming(&self, limit: Duration) -> bool {
        self.wait(limit, |state| state.consuming).await
    }

    /// Waits at most `limit` until the consumer holds nothing; returns whether it does.
    pub async fn wait_released(&self, limit: Duration) -> bool {
        self.wait(limit, |state| state.holds == 0).await
    }

    async fn wait(&self, limit: Duration, done: impl Fn(&StatusState) -> bool) -> bool {
        let mut state = self.state.subscribe();
        tokio::time::timeout(limit, state.wait_for(|s| done(s)))
            .await
            .is_ok_and(|waited| waited.is_ok())
    }
}

/// Something a transport's consumer holds (see [`ConsumerStatus::hold`]); dropping it lets go.
#[derive(Debug)]
#[must_use = "the hold is released when dropped"]
pub struct ConsumerHold {
    state: Arc<tokio::sync::watch::Sender<StatusState>>,
}

impl Drop for ConsumerHold {
    fn drop(&mut self) {
        self.state
            .send_modify(|state| state.holds = state.holds.saturating_sub(1));
    }
}

/// Which dead letters to redrive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedriveSelection {
    /// Every dead letter of the group.
    All,
    /// Only the dead letters with these message ids.
    Ids(Vec<String>),
}

impl RedriveSelection {
    /// Whether the message id `id` is selected.
    pub fn matches(&self, id: &str) -> bool {
        match self {
            RedriveSelection::All => true,
            RedriveSelection::Ids(ids) => ids.iter().any(|i| i == id),
        }
    }
}

/// A stream of deliveries for one (topic, group) consumer.
///
/// The stream ends when the transport is closed. An `Err` item reports a problem the transport
/// is recovering from (e.g. a reconnect); the stream keeps going after it.
pub type DeliveryStream = BoxStream<'static, Result<Delivery>>;

/// The broker adapter SPI. Object-safe: the bus holds an `Arc<dyn Transport>`.
///
/// Contract (checked by the conformance suite):
/// - `publish` returns `Ok` only once the broker has durably accepted every message of the batch.
/// - After `declare(topic, group)` the group receives every message published to the topic,
///   whether or not a consumer runs; every declared group gets every message (where
///   [`Capabilities::fan_out`] is claimed), and consumers of one group share its messages.
/// - A delivery that is dropped without being settled comes back (to this or another consumer).
#[async_trait]
pub trait Transport: Send + Sync + fmt::Debug + 'static {
    /// A short name of the broker for logs and spans (`"memory"`, `"rabbitmq"`, …).
    fn name(&self) -> &'static str;

    /// What this transport guarantees.
    fn capabilities(&self) -> Capabilities;

    /// Publishes a batch; each message names its topic. Returns once all are durable.
    async fn publish(&self, messages: Vec<Message>) -> Result<()>;

    /// Declares a durable subscription of `group` to `topic`, and its dead-letter destination.
    async fn declare(&self, topic: &str, group: &str) -> Result<()>;

    /// Opens a delivery stream for (`topic`, `group`), declaring the group if needed.
    async fn consume(
        &self,
        topic: &str,
        group: &str,
        options: ConsumeOptions,
    ) -> Result<DeliveryStream>;

    /// Lists up to `limit` dead letters of (`topic`, `group`), oldest first.
    async fn dead_letters(
        &self,
        topic: &str,
        group: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        let _ = (topic, group, limit);
        Err(unsupported(self.name(), "list dead letters"))
    }

    /// Moves the selected dead letters of (`topic`, `group`) back so the group handles them
    /// again, with a fresh attempt count. Returns how many were moved.
    async fn redrive(
        &self,
        topic: &str,
        group: &str,
        selection: RedriveSelection,
    ) -> Result<usize> {
        let _ = (topic, group, selection);
        Err(unsupported(self.name(), "redrive dead letters"))
    }

    /// Deletes the selected dead letters of (`topic`, `group`) for good. Returns how many were
    /// deleted.
    async fn purge_dead_letters(
        &self,
        topic: &str,
        group: &str,
        selection: RedriveSelection,
    ) -> Result<usize> {
        let _ = (topic, group, selection);
        Err(unsupported(self.name(), "purge dead letters"))
    }

    /// Removes `group`'s subscription to `topic` and what the transport keeps for it (its
    /// queue and dead letters, its position): the group stops receiving the topic's messages.
    /// Deleting a group that does not exist succeeds. Consumers of the group should be stopped
    /// first.
    async fn delete_group(&self, topic: &str, group: &str) -> Result<()> {
        let _ = (topic, group);
        Err(unsupported(self.name(), "delete a group"))
    }

    /// How many messages wait for `group` at the broker, and how many are in its dead-letter
    /// queue, where the broker can tell (fields it cannot tell are `None`).
    async fn depth(&self, topic: &str, group: &str) -> Result<Depth> {
        let _ = (topic, group);
        Err(unsupported(self.name(), "report queue depth"))
    }

    /// The connection to the broker as the client sees it now; cheap (a probe calls it).
    /// Transports without a lasting connection report what their last request saw.
    fn connection(&self) -> ConnectionState {
        ConnectionState::Connected
    }

    /// Closes the transport: delivery streams end, later publishes fail with
    /// [`ErrorKind::Closed`]. Deliveries already handed out can still be settled where the
    /// broker allows it.
    async fn close(&self) -> Result<()>;
}

/// What [`Transport::depth`] reports: broker-side backlog of one (topic, group).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Depth {
    /// Messages waiting for the group: the queue's depth (RabbitMQ, SQS: approximate, visible
    /// and in flight), or the group's consumer lag summed over partitions (Kafka).
    pub pending: Option<u64>,
    /// Messages in the group's dead-letter queue.
    pub dead_letters: Option<u64>,
}

impl Depth {
    /// A depth of `pending` messages and `dead_letters` dead letters.
    pub fn new(pending: Option<u64>, dead_letters: Option<u64>) -> Self {
        Self {
            pending,
            dead_letters,
        }
    }
}

/// The error of a transport that keeps no history for a new group, asked to start it from
/// [`StartFrom::Earliest`].
pub fn no_history(transport: &str, topic: &str, group: &str) -> Error {
    Error::new(
        ErrorKind::Unsupported,
        "consume",
        format!(
            "the {transport} transport keeps no history for a group: a new group receives the \
             messages published from its declare on, so it cannot start from the earliest message"
        ),
    )
    .with_resource(format!("topic {topic}, group {group}"))
    .with_retryable(false)
}

fn unsupported(transport: &str, operation: &'static str) -> Error {
    Error::new(
        ErrorKind::Unsupported,
        operation,
        format!("the {transport} transport cannot {operation}"),
    )
}

/// Settles one delivery with the broker. Implemented by each adapter.
///
/// Each method consumes the acknowledger: a delivery is settled at most once. An acknowledger
/// dropped without being settled must make the broker redeliver the message.
#[async_trait]
pub trait Acknowledger: Send + 'static {
    /// The message was handled: remove it for this group.
    async fn ack(self: Box<Self>) -> Result<()>;

    /// Acks without waiting, where that needs no I/O (the memory transport; an adapter that
    /// records acks and commits them later): `Some` with the outcome, after which the
    /// acknowledger is dropped and must not have the message delivered again; `None` (the
    /// default) to be acked by [`ack`](Self::ack) instead. It spares the allocation of `ack`'s
    /// boxed future for every message.
    fn ack_at_once(&mut self) -> Option<Result<()>> {
        None
    }

    /// The message failed: deliver it again after about `delay`.
    async fn nack(self: Box<Self>, delay: Duration) -> Result<()>;

    /// Move the message to the group's dead-letter destination with `info`, then remove it.
    /// An `Err` means it was not dead-lettered and will be delivered again.
    async fn dead_letter(self: Box<Self>, message: &Message, info: &DeadLetterInfo) -> Result<()>;
}

/// One received message, to be settled exactly once with [`ack`](Delivery::ack),
/// [`nack`](Delivery::nack) or [`dead_letter`](Delivery::dead_letter).
///
/// Dropping a delivery without settling it returns the message to the broker for redelivery,
/// as a crashed consumer would.
pub struct Delivery {
    message: Arc<Message>,
    attempt: u32,
    acker: Box<dyn Acknowledger>,
}

impl Delivery {
    /// A delivery of `message` on its `attempt`-th delivery (1 for the first), settled by `acker`.
    pub fn new(message: Arc<Message>, attempt: u32, acker: Box<dyn Acknowledger>) -> Self {
        Delivery {
            message,
            attempt: attempt.max(1),
            acker,
        }
    }

    /// The received message.
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// A shared handle to the received message.
    pub fn shared_message(&self) -> Arc<Message> {
        Arc::clone(&self.message)
    }

    /// Which delivery attempt this is, starting at 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Takes the delivery apart, for transport decorators that wrap the acknowledger (fault
    /// injection, metrics). Rebuild it with [`Delivery::new`].
    pub fn into_parts(self) -> (Arc<Message>, u32, Box<dyn Acknowledger>) {
        (self.message, self.attempt, self.acker)
    }

    /// The message was handled.
    pub async fn ack(mut self) -> Result<()> {
        match self.acker.ack_at_once() {
            Some(acked) => acked,
            None => self.acker.ack().await,
        }
    }

    /// The message failed; redeliver it after about `delay`.
    pub async fn nack(self, delay: Duration) -> Result<()> {
        self.acker.nack(delay).await
    }

    /// Dead-letter the message with `info`.
    pub async fn dead_letter(self, info: &DeadLetterInfo) -> Result<()> {
        self.acker.dead_letter(&self.message, info).await
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("id", &self.message.id)
            .field("topic", &self.message.topic)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}
