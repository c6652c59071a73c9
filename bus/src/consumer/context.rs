//! The handler's context: where the message came from, and publishing that continues its
//! conversation.

use std::sync::Arc;

use crate::bus::Bus;
use crate::envelope::{new_traceparent, Envelope, Event};
use crate::error::Result;

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
    origin: Arc<Origin>,
}

#[derive(Debug)]
struct Origin {
    topic: String,
    group: String,
    message_id: String,
    correlation_id: String,
    traceparent: Option<String>,
    attempt: u32,
}

impl Context {
    pub(crate) fn new<E>(
        bus: Bus,
        group: &str,
        topic: &str,
        envelope: &Envelope<E>,
        attempt: u32,
    ) -> Self {
        Context {
            bus,
            origin: Arc::new(Origin {
                topic: topic.to_string(),
                group: group.to_string(),
                message_id: envelope.id.clone(),
                correlation_id: envelope.conversation_id().to_string(),
                traceparent: envelope.traceparent.clone(),
                attempt,
            }),
        }
    }

    /// The topic the handled message came from.
    pub fn topic(&self) -> &str {
        &self.origin.topic
    }

    /// The subscription group handling it.
    pub fn group(&self) -> &str {
        &self.origin.group
    }

    /// The handled message's id.
    pub fn message_id(&self) -> &str {
        &self.origin.message_id
    }

    /// The conversation the handled message belongs to.
    pub fn correlation_id(&self) -> &str {
        &self.origin.correlation_id
    }

    /// Which delivery attempt this is, starting at 1.
    pub fn attempt(&self) -> u32 {
        self.origin.attempt
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
            .with_correlation_id(self.origin.correlation_id.clone())
            .with_causation_id(self.origin.message_id.clone());
        envelope.traceparent = Some(new_traceparent(self.origin.traceparent.as_deref()));
        envelope
    }

    /// Publishes a follow-up event to `topic`; returns its id.
    pub async fn publish<E: Event>(&self, topic: &str, event: E) -> Result<String> {
        let envelope = self.envelope(event);
        self.bus.publish_envelope(topic, &envelope).await?;
        Ok(envelope.id)
    }
}
