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
use crate::message::Message;

/// How a consumer wants its deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsumeOptions {
    /// The most deliveries handed out and not yet settled at once (prefetch). At least 1.
    pub max_in_flight: usize,
}

impl Default for ConsumeOptions {
    fn default() -> Self {
        ConsumeOptions { max_in_flight: 16 }
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

    /// Closes the transport: delivery streams end, later publishes fail with
    /// [`ErrorKind::Closed`]. Deliveries already handed out can still be settled where the
    /// broker allows it.
    async fn close(&self) -> Result<()>;
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
    pub async fn ack(self) -> Result<()> {
        self.acker.ack().await
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
