//! The handler's context: where the message came from, and publishing that continues its
//! conversation.

use std::sync::{Arc, Mutex, PoisonError};

use crate::bus::Bus;
use crate::codec::Json;
use crate::envelope::{attr, new_traceparent, Envelope, Event};
use crate::error::{Error, ErrorKind, Result};
use crate::message::Message;
use crate::text::Text;

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
    /// Where publishes go instead of the transport, when set (see [`Context::capturing`]).
    capture: Option<Arc<Captured>>,
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
            capture: None,
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

    /// Publishes a follow-up event to `topic`; returns its id. On a [capturing](Self::capturing)
    /// context the encoded message is kept for the capture's owner instead (an outbox writes
    /// it in the handler's transaction).
    pub async fn publish<E: Event>(&self, topic: &str, event: E) -> Result<Text> {
        let envelope = self.envelope(event);
        match &self.capture {
            None => self.bus.publish_owned(topic, envelope).await,
            Some(capture) => {
                let id = envelope.id.clone();
                capture.push(envelope.into_message(&Json, topic)?)?;
                Ok(id)
            }
        }
    }

    /// A copy of this context whose [`publish`](Self::publish) calls are captured, not sent:
    /// each encoded message (same id, correlation and causation as it would have had) is kept
    /// in the returned [`Captured`] until its owner takes them. A consumer outbox uses it to
    /// write a handler's follow-up events in the handler's own database transaction.
    ///
    /// Publishing through [`bus`](Self::bus) bypasses the capture.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// # use serde::{Deserialize, Serialize};
    /// # use busbar_core::{Bus, Context, Envelope, Event, HandlerError};
    /// # #[derive(Serialize, Deserialize)] struct Shipped { order: u32 }
    /// # impl Event for Shipped { const TYPE: &'static str = "shop.shipped.v1"; }
    /// # let bus = Bus::memory();
    /// # let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    /// # let _sub = bus.subscribe::<Shipped>("orders", "g").start(move |_: Envelope<Shipped>, ctx: Context| {
    /// #     let tx = tx.clone();
    /// #     async move { let _ = tx.send(ctx); Ok::<(), HandlerError>(()) }
    /// # }).await?;
    /// # bus.publish("orders", Shipped { order: 1 }).await?;
    /// # let ctx: Context = rx.recv().await.unwrap();
    /// let (capturing, captured) = ctx.capturing();
    /// let id = capturing.publish("mail", Shipped { order: 1 }).await?;
    /// let messages = captured.take()?; // and later publishes through `capturing` fail
    /// assert_eq!(messages[0].id, id);
    /// assert_eq!(messages[0].header("ce_causationid"), Some(ctx.message_id()));
    /// assert!(capturing.publish("mail", Shipped { order: 2 }).await.is_err());
    /// # Ok::<(), busbar_core::Error>(())
    /// # }).unwrap();
    /// ```
    pub fn capturing(&self) -> (Context, Arc<Captured>) {
        let captured = Arc::new(Captured {
            messages: Mutex::new(Some(Vec::new())),
        });
        let mut context = self.clone();
        context.capture = Some(Arc::clone(&captured));
        (context, captured)
    }
}

/// The messages a [capturing](Context::capturing) context published, waiting for their owner.
#[derive(Debug)]
pub struct Captured {
    /// `None` once taken: a publish after that is an error, never a silent loss.
    messages: Mutex<Option<Vec<Message>>>,
}

impl Captured {
    fn push(&self, message: Message) -> Result<()> {
        match self
            .messages
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
        {
            Some(messages) => {
                messages.push(message);
                Ok(())
            }
            None => Err(Error::new(
                ErrorKind::Closed,
                "publish",
                "the handler this context belongs to has finished, and its captured messages \
                 were already taken (by its transaction's outbox); publish through the bus instead",
            )
            .with_resource(format!("message {} on topic {}", message.id, message.topic))),
        }
    }

    /// Takes the captured messages, in publish order. Later publishes through the capturing
    /// context fail with [`ErrorKind::Closed`]; taking twice is an error of the same kind.
    pub fn take(&self) -> Result<Vec<Message>> {
        self.messages
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Closed,
                    "take captured messages",
                    "they were already taken",
                )
            })
    }
}
