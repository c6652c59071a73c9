//! The handler's context: where the message came from, and publishing that continues its
//! conversation.

use std::sync::Arc;

use crate::bus::Bus;
use crate::envelope::{attr, new_traceparent, Envelope, Event};
use crate::error::Result;
use crate::message::Message;

/// What a handler knows about the message it handles, and a bus to publish follow-ups.
///
/// Events published through the context carry the handled message's correlation id and have
/// the handled message's id as their causation id, so a chain of handlers forms one conversation.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use serde::{Deserialize, Serialize};
/// use busbar_core::{Bus, Context, Envelope, Event, HandlerError};
///
/// #[derive(Serialize, Deserialize)]
/// struct OrderPlaced { order_id: String }
/// impl Event for OrderPlaced { const TYPE: &'static str = "shop.order_placed.v1"; }
///
/// #[derive(Serialize, Deserialize)]
/// struct InvoiceIssued { order_id: String }
/// impl Event for InvoiceIssued { const TYPE: &'static str = "billing.invoice_issued.v1"; }
///
/// let bus = Bus::memory();
/// let billing = bus
///     .subscribe::<OrderPlaced>("orders", "billing")
///     .start(|order: Envelope<OrderPlaced>, ctx: Context| async move {
///         if ctx.attempt() > 1 {
///             tracing::info!(message = ctx.message_id(), "retrying");
///         }
///         let invoice = InvoiceIssued { order_id: order.payload.order_id };
///         // Same conversation: correlation_id kept, causation_id = the order's id.
///         ctx.publish("invoices", invoice).await?;
///         Ok::<(), HandlerError>(())
///     })
///     .await?;
/// # billing.shutdown(std::time::Duration::from_secs(1)).await?;
/// # Ok::<(), busbar_core::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone, Debug)]
pub struct Context {
    bus: Bus,
    subscription: Arc<Origin>,
    /// The handled message, shared with the delivery: its attributes are read from it, not
    /// copied, since most handlers never ask for them.
    message: Arc<Message>,
    attempt: u32,
}

/// Where a subscription's messages come from; one per subscription, shared by its contexts.
#[derive(Debug)]
pub(crate) struct Origin {
    pub(crate) topic: String,
    pub(crate) group: String,
}

impl Context {
    pub(crate) fn new(
        bus: Bus,
        subscription: &Arc<Origin>,
        message: Arc<Message>,
        attempt: u32,
    ) -> Self {
        Context {
            bus,
            subscription: Arc::clone(subscription),
            message,
            attempt,
        }
    }

    /// The topic the handled message came from.
    pub fn topic(&self) -> &str {
        &self.subscription.topic
    }

    /// The subscription group handling it.
    pub fn group(&self) -> &str {
        &self.subscription.group
    }

    /// The handled message's id (its CloudEvents `id`).
    pub fn message_id(&self) -> &str {
        self.message.header(attr::ID).unwrap_or(&self.message.id)
    }

    /// The conversation the handled message belongs to: its correlation id, or its id when it
    /// has none (see [`Envelope::conversation_id`]).
    pub fn correlation_id(&self) -> &str {
        self.message
            .header(attr::CORRELATION_ID)
            .unwrap_or_else(|| self.message_id())
    }

    /// Which delivery attempt this is, starting at 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The bus, for anything the context does not offer.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// A follow-up envelope: same conversation, caused by the handled message, same trace.
    pub fn envelope<E: Event>(&self, event: E) -> Envelope<E> {
        let mut envelope = self
            .bus
            .envelope(event)
            .with_correlation_id(self.correlation_id())
            .with_causation_id(self.message_id());
        envelope.traceparent = Some(new_traceparent(self.message.header(attr::TRACEPARENT)));
        envelope
    }

    /// Publishes a follow-up event to `topic`; returns its id.
    pub async fn publish<E: Event>(&self, topic: &str, event: E) -> Result<String> {
        self.bus.publish_owned(topic, self.envelope(event)).await
    }
}
