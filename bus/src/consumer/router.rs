//! A subscription with one handler per event type: [`Bus::route`].

use std::any::Any;
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use super::{Context, Decoder, Handler, HandlerError, Subscription, SubscriptionBuilder};
use crate::bus::Bus;
use crate::codec::Json;
use crate::envelope::{Envelope, Undecoded};
use crate::error::{Error, ErrorKind, Result};
use crate::idempotency::IdempotencyStore;
use crate::message::Message;
use crate::retry::RetryPolicy;
use crate::routing::{EventSet, Payload, UnknownTypes};

type AnyEvent = Box<dyn Any + Send>;

/// A decoded event of one route, on its way to that route's handler.
pub(crate) struct Routed {
    route: usize,
    event: AnyEvent,
}

/// One event type (or set) and its handler, with the type erased so routes share a table.
trait Route: Send + Sync + 'static {
    fn event_types(&self) -> Vec<&'static str>;
    fn decode(&self, payload: Payload<'_, Json>) -> Option<Result<AnyEvent>>;
    fn handle(
        &self,
        envelope: Envelope<AnyEvent>,
        context: Context,
    ) -> BoxFuture<'static, Result<(), HandlerError>>;
}

struct TypedRoute<E, H> {
    handler: H,
    _event: PhantomData<fn() -> E>,
}

impl<E: EventSet, H: Handler<E>> Route for TypedRoute<E, H> {
    fn event_types(&self) -> Vec<&'static str> {
        E::event_types()
    }

    fn decode(&self, payload: Payload<'_, Json>) -> Option<Result<AnyEvent>> {
        Some(E::decode(payload)?.map(|event| Box::new(event) as AnyEvent))
    }

    fn handle(
        &self,
        envelope: Envelope<AnyEvent>,
        context: Context,
    ) -> BoxFuture<'static, Result<(), HandlerError>> {
        match envelope.try_map_payload(|event| event.downcast::<E>().map(|event| *event)) {
            Ok(envelope) => self.handler.handle(envelope, context),
            // Only this route's `decode` makes its events, so this is a bug in busbar.
            Err(_) => Box::pin(async {
                Err(HandlerError::permanent(
                    "busbar routed an event to the handler of another type",
                ))
            }),
        }
    }
}

/// The routes of one subscription, by the event types they claim.
#[derive(Clone)]
struct Table {
    routes: Arc<[Arc<dyn Route>]>,
    by_type: Arc<HashMap<&'static str, usize>>,
}

impl Decoder<Routed> for Table {
    fn decode(&self, message: &Message) -> std::result::Result<Envelope<Routed>, Undecoded> {
        Envelope::decode_with(&Json, message, |payload| {
            let route = *self.by_type.get(payload.event_type())?;
            let decoded = self.routes.get(route)?.decode(payload)?;
            Some(decoded.map(|event| Routed { route, event }))
        })
    }
}

impl Handler<Routed> for Table {
    fn handle(
        &self,
        envelope: Envelope<Routed>,
        context: Context,
    ) -> BoxFuture<'static, Result<(), HandlerError>> {
        let route = envelope.payload.route;
        let Some(handler) = self.routes.get(route) else {
            return Box::pin(async {
                Err(HandlerError::permanent("busbar lost an event's route"))
            });
        };
        handler.handle(envelope.map_payload(|routed| routed.event), context)
    }
}

/// Configures and starts a subscription with one handler per event type; made by
/// [`Bus::route`].
///
/// Each message goes to the handler registered for its CloudEvents `type` (or one of that
/// event's [`ALIASES`](crate::Event::ALIASES)). All of them run on one consumer of (topic,
/// group), so retry, dead-letter, idempotency, per-key order and shutdown are those of any
/// subscription, and messages with the same key stay in order across their types. A type no
/// handler claims follows [`unknown_types`](Self::unknown_types).
///
/// A handler is a closure or a struct that implements [`Handler`], which can keep its own
/// state:
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use std::sync::{atomic::{AtomicU64, Ordering}, Arc};
/// use serde::{Deserialize, Serialize};
/// use busbar_core::{BoxFuture, Bus, Context, Envelope, Event, Handler, HandlerError, UnknownTypes};
///
/// #[derive(Serialize, Deserialize)]
/// struct OrderPlaced { order_id: String, cents: u64 }
/// impl Event for OrderPlaced { const TYPE: &'static str = "shop.order_placed.v1"; }
///
/// #[derive(Serialize, Deserialize)]
/// struct OrderCancelled { order_id: String }
/// impl Event for OrderCancelled { const TYPE: &'static str = "shop.order_cancelled.v1"; }
///
/// /// A handler with state of its own.
/// struct Revenue { cents: Arc<AtomicU64> }
///
/// impl Handler<OrderPlaced> for Revenue {
///     fn handle(&self, order: Envelope<OrderPlaced>, _: Context)
///         -> BoxFuture<'static, Result<(), HandlerError>> {
///         self.cents.fetch_add(order.payload.cents, Ordering::Relaxed);
///         Box::pin(async { Ok(()) })
///     }
/// }
///
/// let bus = Bus::memory();
/// let cents = Arc::new(AtomicU64::new(0));
/// let subscription = bus
///     .route("shop.orders", "reporting")
///     .on::<OrderPlaced>(Revenue { cents: Arc::clone(&cents) })
///     .on(|cancelled: Envelope<OrderCancelled>, _ctx: Context| async move {
///         println!("cancelled {}", cancelled.payload.order_id);
///         Ok(())
///     })
///     .unknown_types(UnknownTypes::Skip) // other types on the topic are not ours
///     .start()
///     .await?;
/// bus.publish("shop.orders", OrderPlaced { order_id: "o-1".into(), cents: 250 }).await?;
/// # while cents.load(Ordering::Relaxed) == 0 { tokio::task::yield_now().await; }
/// # subscription.shutdown(std::time::Duration::from_secs(1)).await?;
/// # Ok::<(), busbar_core::Error>(())
/// # }).unwrap();
/// ```
pub struct RouteBuilder {
    inner: SubscriptionBuilder<Routed>,
    routes: Vec<Arc<dyn Route>>,
}

impl RouteBuilder {
    pub(crate) fn new(bus: Bus, topic: &str, group: &str) -> Self {
        RouteBuilder {
            inner: SubscriptionBuilder::new(bus, topic, group),
            routes: Vec::new(),
        }
    }

    /// Handles events of type `E` (and its older aliases) with `handler`. `E` may also be an
    /// [`event_set!`](crate::event_set) enum. Each type may have one handler.
    pub fn on<E: EventSet>(mut self, handler: impl Handler<E>) -> Self {
        self.routes.push(Arc::new(TypedRoute {
            handler,
            _event: PhantomData,
        }));
        self
    }

    /// Handlers running at once (default: the bus's, 8).
    pub fn concurrency(self, concurrency: usize) -> Self {
        self.map(|inner| inner.concurrency(concurrency))
    }

    /// Deliveries held at once (prefetch); see [`SubscriptionBuilder::max_in_flight`].
    pub fn max_in_flight(self, max_in_flight: usize) -> Self {
        self.map(|inner| inner.max_in_flight(max_in_flight))
    }

    /// The retry policy (default: the bus's).
    pub fn retry(self, retry: RetryPolicy) -> Self {
        self.map(|inner| inner.retry(retry))
    }

    /// Whether messages with the same key, whatever their type, are handled one at a time in
    /// delivery order (default `true`).
    pub fn key_ordered(self, key_ordered: bool) -> Self {
        self.map(|inner| inner.key_ordered(key_ordered))
    }

    /// What to do with a message whose type no handler claims (default:
    /// [`UnknownTypes::DeadLetter`], reason `unknown_type`).
    pub fn unknown_types(self, policy: UnknownTypes) -> Self {
        self.map(|inner| inner.unknown_types(policy))
    }

    /// Makes every handler idempotent per message id; see [`SubscriptionBuilder::idempotent`].
    pub fn idempotent(self, store: Arc<dyn IdempotencyStore>) -> Self {
        self.map(|inner| inner.idempotent(store))
    }

    /// How long an idempotency claim holds; see [`SubscriptionBuilder::lease`].
    pub fn lease(self, lease: Duration) -> Self {
        self.map(|inner| inner.lease(lease))
    }

    /// How long a done mark is kept; see [`SubscriptionBuilder::retention`].
    pub fn retention(self, retention: Duration) -> Self {
        self.map(|inner| inner.retention(retention))
    }

    fn map(
        mut self,
        f: impl FnOnce(SubscriptionBuilder<Routed>) -> SubscriptionBuilder<Routed>,
    ) -> Self {
        self.inner = f(self.inner);
        self
    }

    /// Declares the subscription and starts consuming.
    ///
    /// Fails with a `Config` error when no handler was registered, when two handlers claim the
    /// same event type, or when another running subscription of this bus consumes the same
    /// (topic, group) with other types.
    pub async fn start(self) -> Result<Subscription> {
        let resource = || format!("topic {}, group {}", self.inner.topic, self.inner.group);
        if self.routes.is_empty() {
            return Err(Error::new(
                ErrorKind::Config,
                "subscribe",
                "the route has no handlers; add one per event type with `.on::<E>(handler)`",
            )
            .with_resource(resource()));
        }
        let mut by_type = HashMap::new();
        let mut event_types = Vec::new();
        for (index, route) in self.routes.iter().enumerate() {
            for event_type in route.event_types() {
                if by_type.insert(event_type, index).is_some() {
                    return Err(Error::new(
                        ErrorKind::Config,
                        "subscribe",
                        format!(
                            "event type {event_type:?} has two handlers; give each type one handler"
                        ),
                    )
                    .with_resource(resource()));
                }
                event_types.push(event_type);
            }
        }
        let table = Table {
            routes: self.routes.into(),
            by_type: Arc::new(by_type),
        };
        self.inner
            .start_with(Box::new(table.clone()), Arc::new(table), event_types)
            .await
    }
}
