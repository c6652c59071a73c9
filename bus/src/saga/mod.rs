//! Sagas: persisted, event-driven state machines that coordinate a business transaction over
//! several services, with compensation and durable timeouts.
//!
//! A [`Saga`] is defined once, as a state machine that reads in one place:
//!
//! - its **data**, a serde type `S` kept in a [`SagaStore`] per instance;
//! - how each event finds its **instance**: by the event's key (the default), by a field
//!   ([`Saga::correlate`]), or by the conversation it belongs to
//!   ([`Saga::correlate_by_conversation`]);
//! - its **transitions**, one per (state, event type) or (state, timeout name), given with
//!   [`Saga::initially`] (the events that start an instance) and [`Saga::during`]. A transition
//!   is plain async Rust that gets the event and a [`Step`]: it may change the data, move to
//!   another state, send messages, schedule or cancel a timeout, register a compensation,
//!   complete the saga, or fail it.
//! - its **compensations** ([`Saga::compensation`]), named actions that undo a finished step.
//!   Failing a saga runs the registered ones in reverse order, each as a message on the saga's
//!   own topic, so a compensation is retried and dead-lettered like any handler. The instance's
//!   final [`SagaStatus`] says `Completed`, `Compensated`, or `Failed` with the compensation that
//!   did not succeed.
//!
//! ## Guarantees
//!
//! - **One event at a time per instance, no lost update.** Events are applied with optimistic
//!   concurrency: a transition's result is committed only if the instance's version did not
//!   change meanwhile; otherwise the transition runs again on the new version. This holds with
//!   any number of consumers of the saga's group, on any broker.
//! - **Each event is applied to an instance at most once**: the store records the ids of the
//!   applied events and a redelivered event is skipped.
//! - **The state change and the messages a transition sends commit together.** On PostgreSQL
//!   (`busbar-postgres`) they are written in one transaction, the messages to the outbox. The
//!   [`MemorySagaStore`] publishes them while it holds its lock and saves the state only if
//!   publishing succeeded; it keeps nothing across a restart.
//! - **Timeouts are durable and fire once.** They live in the store (not in a broker's delay
//!   feature, which Kafka does not have); a poller publishes each due timeout once to the saga's
//!   own topic, and it is applied only if the instance still waits for it: a timeout requested
//!   in a state is cancelled when the instance leaves that state, completes or fails.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use std::{sync::Arc, time::Duration};
//! use serde::{Deserialize, Serialize};
//! use busbar_core::{Bus, Envelope, Event, Text};
//! use busbar_core::saga::{MemorySagaStore, Saga, SagaStatus, Step};
//!
//! #[derive(Clone, Serialize, Deserialize)]
//! struct OrderPlaced { order_id: String }
//! impl Event for OrderPlaced {
//!     const TYPE: &'static str = "shop.order_placed.v1";
//!     fn key(&self) -> Option<Text> { Some(self.order_id.as_str().into()) }
//! }
//! #[derive(Clone, Serialize, Deserialize)]
//! struct PaymentCaptured { order_id: String }
//! impl Event for PaymentCaptured {
//!     const TYPE: &'static str = "shop.payment_captured.v1";
//!     fn key(&self) -> Option<Text> { Some(self.order_id.as_str().into()) }
//! }
//! #[derive(Clone, Serialize, Deserialize)]
//! struct ChargePayment { order_id: String }
//! impl Event for ChargePayment { const TYPE: &'static str = "shop.charge_payment.v1"; }
//!
//! #[derive(Default, Serialize, Deserialize)]
//! struct Order { id: String }
//!
//! let bus = Bus::memory();
//! let saga = Saga::<Order>::new("checkout")
//!     .listen("shop")
//!     .initially(|s| s.on(|placed: Envelope<OrderPlaced>, mut step: Step<Order>| async move {
//!         step.data_mut().id = placed.payload.order_id.clone();
//!         step.send("payments", ChargePayment { order_id: placed.payload.order_id })?;
//!         step.schedule("payment", Duration::from_secs(15 * 60));
//!         step.transition_to("charging");
//!         Ok(step)
//!     }))
//!     .during("charging", |s| s
//!         .on(|_: Envelope<PaymentCaptured>, mut step: Step<Order>| async move {
//!             step.complete();
//!             Ok(step)
//!         })
//!         .on_timeout("payment", |mut step: Step<Order>| async move {
//!             step.fail("payment not confirmed in 15 minutes");
//!             Ok(step)
//!         }))
//!     .start(&bus, Arc::new(MemorySagaStore::new()))
//!     .await?;
//!
//! bus.publish("shop", OrderPlaced { order_id: "o-1".into() }).await?;
//! bus.publish("shop", PaymentCaptured { order_id: "o-1".into() }).await?;
//! # let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
//! # while saga.get("o-1").await?.is_none_or(|r| r.status == SagaStatus::Running) {
//! #     assert!(tokio::time::Instant::now() < deadline);
//! #     tokio::time::sleep(Duration::from_millis(1)).await;
//! # }
//! let order = saga.get("o-1").await?.expect("the saga started");
//! assert_eq!(order.status, SagaStatus::Completed);
//! saga.shutdown(Duration::from_secs(1)).await?;
//! # Ok::<(), busbar_core::Error>(())
//! # }).unwrap();
//! ```

mod memory;
mod runtime;

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::bus::Bus;
use crate::codec::Json;
use crate::consumer::{Context, HandlerError, RouteBuilder};
use crate::envelope::{Envelope, Event};
use crate::error::{Error, ErrorKind, Result};
use crate::message::Message;
use crate::retry::RetryPolicy;
use crate::text::Text;

pub use memory::MemorySagaStore;
pub use runtime::{RunningSaga, SagaStats};

/// The longest timeout: a later one is due after this (every clock and store can hold it).
pub(crate) const MAX_TIMEOUT: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The state of a new instance, before its first transition.
pub const INITIAL: &str = "initial";

/// Where a saga instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaStatus {
    /// Waiting for events or timeouts.
    Running,
    /// Failed; its compensations are running, last registered first.
    Compensating,
    /// Finished successfully.
    Completed,
    /// Failed, and every registered compensation succeeded.
    Compensated,
    /// Failed, and a compensation did not succeed (see [`SagaRecord::failed_compensation`]);
    /// [`RunningSaga::resume`] tries it again.
    Failed,
}

impl SagaStatus {
    /// The status as stored: `running`, `compensating`, `completed`, `compensated`, `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            SagaStatus::Running => "running",
            SagaStatus::Compensating => "compensating",
            SagaStatus::Completed => "completed",
            SagaStatus::Compensated => "compensated",
            SagaStatus::Failed => "failed",
        }
    }

    /// Reads a stored status.
    pub fn parse(status: &str) -> Option<Self> {
        Some(match status {
            "running" => SagaStatus::Running,
            "compensating" => SagaStatus::Compensating,
            "completed" => SagaStatus::Completed,
            "compensated" => SagaStatus::Compensated,
            "failed" => SagaStatus::Failed,
            _ => return None,
        })
    }

    /// Whether the instance has ended (events for it are ignored).
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            SagaStatus::Completed | SagaStatus::Compensated | SagaStatus::Failed
        )
    }
}

/// One saga instance as a [`SagaStore`] keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaRecord {
    /// The saga's name.
    pub saga: String,
    /// The instance's id (what its events correlate on).
    pub instance_id: String,
    /// The conversation of the event that started it; every message it sends carries it.
    pub correlation_id: String,
    /// The state-machine state ([`INITIAL`] before the first move).
    pub state: String,
    /// Running, compensating, or how it ended.
    pub status: SagaStatus,
    /// The saga's data `S`, as JSON (decode it with [`SagaRecord::data`]).
    pub data: serde_json::Value,
    /// Incremented by every committed change (optimistic concurrency).
    pub version: u64,
    /// The compensations registered so far, in registration order.
    pub compensations: Vec<String>,
    /// How many of them have run (they run last first).
    pub compensated: usize,
    /// Why the saga failed, when it did.
    pub failure: Option<String>,
    /// The compensation that did not succeed, when the status is [`SagaStatus::Failed`].
    pub failed_compensation: Option<FailedCompensation>,
    /// Timeouts waiting to fire.
    pub timeouts: Vec<ScheduledTimeout>,
    /// When the instance started.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

impl SagaRecord {
    /// The saga's data, decoded.
    pub fn data<S: DeserializeOwned>(&self) -> Result<S> {
        S::deserialize(&self.data).map_err(|e| {
            Error::new(
                ErrorKind::Decode,
                "read saga data",
                "the stored data does not fit the saga's data type (changed incompatibly?)",
            )
            .with_resource(self.describe())
            .with_source(e)
        })
    }

    fn describe(&self) -> String {
        format!("saga {}, instance {}", self.saga, self.instance_id)
    }
}

/// A compensation that did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedCompensation {
    /// Its name.
    pub name: String,
    /// The last error.
    pub error: String,
    /// How many attempts were made.
    pub attempts: u32,
}

/// A timeout an instance waits for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduledTimeout {
    /// Unique id of this request (a re-request gets a new one).
    pub id: String,
    /// The name transitions refer to.
    pub name: String,
    /// The state it was requested for; leaving that state cancels it.
    pub state: String,
    /// When it is due, by the wall clock at the time of the request.
    pub due_at: DateTime<Utc>,
}

/// A timeout to store with a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTimeout {
    /// Its id (also in [`SagaRecord::timeouts`]).
    pub id: String,
    /// Its name.
    pub name: String,
    /// Due this long after the commit, by the store's clock.
    pub after: Duration,
}

/// One change to an instance, committed atomically by [`SagaStore::commit`].
#[derive(Debug, Clone)]
pub struct SagaCommit {
    /// The instance after the change (its `version` already incremented).
    pub record: SagaRecord,
    /// The version the change was made from; `None` creates the instance.
    pub expected_version: Option<u64>,
    /// The id of the event (or operation) applied; recorded so it is applied at most once.
    pub event_id: String,
    /// Messages to publish if and only if the change commits.
    pub messages: Vec<Message>,
    /// Timeouts to start.
    pub schedule: Vec<NewTimeout>,
    /// Ids of timeouts to cancel.
    pub cancel: Vec<String>,
}

/// How a [`SagaStore::commit`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// Stored, and its messages published or durably queued.
    Done,
    /// The instance changed since it was loaded (or already exists, for a create): nothing was
    /// stored; load it again and redo the transition.
    Conflict,
    /// The event was already applied to this instance: nothing was stored.
    Duplicate,
}

/// An instance, loaded for applying one event.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The instance, if it exists.
    pub record: Option<SagaRecord>,
    /// Whether the event was already applied to it.
    pub applied: bool,
}

/// A timeout that came due, for [`timeout_message`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueTimeout {
    /// The timeout's id.
    pub id: String,
    /// Its saga.
    pub saga: String,
    /// Its instance.
    pub instance_id: String,
    /// The instance's conversation.
    pub correlation_id: String,
    /// Its name.
    pub name: String,
}

/// What one [`SagaStore::fire_due_timeouts`] call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fired {
    /// Timeouts published.
    pub fired: usize,
    /// How long until the next one is due, if any is waiting.
    pub next_due: Option<Duration>,
}

/// Which instances [`SagaStore::list`] returns; the oldest change first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SagaFilter {
    /// Only instances with this status.
    pub status: Option<SagaStatus>,
    /// Only instances in this state.
    pub state: Option<String>,
    /// Only instances unchanged for at least this long (stuck sagas).
    pub idle_for: Option<Duration>,
    /// At most this many (0 means 100).
    pub limit: usize,
}

impl SagaFilter {
    /// The limit to apply.
    pub fn effective_limit(&self) -> usize {
        if self.limit == 0 {
            100
        } else {
            self.limit
        }
    }
}

/// Keeps saga instances, the ids of the events applied to them, and their timeouts.
///
/// Implementations make [`commit`](Self::commit) atomic: the record, the applied event id,
/// the timeouts and the messages are stored together or not at all, and a commit whose
/// `expected_version` is not the stored one changes nothing. busbar ships
/// [`MemorySagaStore`] here and a PostgreSQL store in `busbar-postgres`.
#[async_trait]
pub trait SagaStore: Send + Sync + 'static {
    /// Loads an instance and whether `event_id` was applied to it.
    async fn load(&self, saga: &str, instance_id: &str, event_id: &str) -> Result<Loaded>;

    /// The instance started in conversation `correlation_id`.
    async fn find_by_correlation(
        &self,
        saga: &str,
        correlation_id: &str,
    ) -> Result<Option<SagaRecord>>;

    /// Commits one change; see [`SagaCommit`]. The messages are published through `bus` or
    /// written to an outbox that publishes them.
    async fn commit(&self, bus: &Bus, commit: SagaCommit) -> Result<Committed>;

    /// Publishes up to `limit` due timeouts of `saga` to `topic` (as [`timeout_message`]s) and
    /// removes them, exactly once even with several callers.
    async fn fire_due_timeouts(
        &self,
        bus: &Bus,
        saga: &str,
        topic: &str,
        limit: usize,
    ) -> Result<Fired>;

    /// Instances of `saga` matching `filter`, least recently changed first.
    async fn list(&self, saga: &str, filter: &SagaFilter) -> Result<Vec<SagaRecord>>;
}

/// The event a due timeout becomes, on the saga's own topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaTimeout {
    /// The saga.
    pub saga: String,
    /// The instance.
    pub instance_id: String,
    /// The timeout's id.
    pub timeout_id: String,
    /// The timeout's name.
    pub name: String,
}

impl Event for SagaTimeout {
    const TYPE: &'static str = "busbar.saga.timeout.v1";
    fn key(&self) -> Option<Text> {
        Some(self.instance_id.as_str().into())
    }
}

/// The message that runs one compensation, on the saga's own topic. A compensation that keeps
/// failing is dead-lettered as this message: it names the saga, the instance, its state and
/// data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaCompensation {
    /// The saga.
    pub saga: String,
    /// The instance.
    pub instance_id: String,
    /// The compensation's name.
    pub name: String,
    /// Its place in the run (0 runs first: the last registered).
    pub index: usize,
    /// The instance's state when the saga failed.
    pub state: String,
    /// The instance's data when the saga failed.
    pub data: serde_json::Value,
    /// Why the saga failed.
    pub reason: Option<String>,
}

impl Event for SagaCompensation {
    const TYPE: &'static str = "busbar.saga.compensation.v1";
    fn key(&self) -> Option<Text> {
        Some(self.instance_id.as_str().into())
    }
}

/// The message a due timeout is published as (for [`SagaStore`] implementations).
pub fn timeout_message(bus: &Bus, topic: &str, due: &DueTimeout) -> Result<Message> {
    bus.envelope(SagaTimeout {
        saga: due.saga.clone(),
        instance_id: due.instance_id.clone(),
        timeout_id: due.id.clone(),
        name: due.name.clone(),
    })
    .with_correlation_id(due.correlation_id.clone())
    .into_message(&Json, topic)
}

/// What a transition decided, besides its data and state.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Running,
    Complete,
    Fail(String),
}

/// One transition's view of an instance, and what it decides: the new data and state, the
/// messages to send, timeouts, compensations, and whether the saga completes or fails.
/// Nothing is sent or stored until the transition returns `Ok(step)` and the change commits.
pub struct Step<S> {
    instance_id: String,
    state: String,
    data: S,
    context: Context,
    outcome: Outcome,
    sends: Vec<Message>,
    schedule: Vec<(String, Duration)>,
    unschedule: Vec<String>,
    compensations: Vec<String>,
    known_compensations: Arc<HashSet<String>>,
}

impl<S> std::fmt::Debug for Step<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Step")
            .field("instance_id", &self.instance_id)
            .field("state", &self.state)
            .field("outcome", &self.outcome)
            .field("sends", &self.sends.len())
            .finish_non_exhaustive()
    }
}

impl<S> Step<S> {
    /// The instance's id.
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// The current state (the new one after [`transition_to`](Self::transition_to)).
    pub fn state(&self) -> &str {
        &self.state
    }

    /// The saga's data.
    pub fn data(&self) -> &S {
        &self.data
    }

    /// The saga's data, to change.
    pub fn data_mut(&mut self) -> &mut S {
        &mut self.data
    }

    /// The handled message's context (its ids, attempt, the bus). Publishing through it goes
    /// to the broker at once, outside the commit: use [`send`](Self::send).
    pub fn context(&self) -> &Context {
        &self.context
    }

    /// Moves the instance to `state`. Timeouts requested in the old state are cancelled.
    pub fn transition_to(&mut self, state: impl Into<String>) {
        self.state = state.into();
    }

    /// Sends `event` to `topic` when this step commits (same conversation as the handled
    /// message, caused by it). Returns the message's id. Fails at once when the event cannot
    /// be encoded or the topic name is invalid.
    pub fn send<E: Event>(&mut self, topic: &str, event: E) -> Result<Text> {
        crate::message::validate_name("topic", topic)?;
        let message = self.context.envelope(event).into_message(&Json, topic)?;
        let id = message.id.clone();
        self.sends.push(message);
        Ok(id)
    }

    /// Asks for the timeout `name` after `after` (replacing a pending one of that name; at
    /// most 100 years). It is
    /// handled by the `on_timeout(name)` transition of the state the instance is in after this
    /// step, and cancelled if the instance leaves that state first.
    pub fn schedule(&mut self, name: impl Into<String>, after: Duration) {
        let name = name.into();
        self.unschedule.retain(|n| *n != name);
        self.schedule.retain(|(n, _)| *n != name);
        self.schedule.push((name, after));
    }

    /// Cancels the pending timeout `name`, if any.
    pub fn cancel_timeout(&mut self, name: impl Into<String>) {
        let name = name.into();
        self.schedule.retain(|(n, _)| *n != name);
        self.unschedule.push(name);
    }

    /// Registers the compensation `name` (defined with [`Saga::compensation`]): if the saga
    /// fails later, it runs, after the compensations registered after it. Fails when the saga
    /// defines no compensation of that name.
    pub fn compensate_with(&mut self, name: &str) -> Result<()> {
        if !self.known_compensations.contains(name) {
            return Err(Error::new(
                ErrorKind::Config,
                "register compensation",
                format!(
                    "the saga defines no compensation {name:?}; define it with \
                     `.compensation({name:?}, action)`"
                ),
            ));
        }
        self.compensations.push(name.to_string());
        Ok(())
    }

    /// Completes the saga: its timeouts are cancelled and later events are ignored.
    pub fn complete(&mut self) {
        self.outcome = Outcome::Complete;
    }

    /// Fails the saga: its timeouts are cancelled and its registered compensations run, last
    /// first, each as a message on the saga's topic.
    pub fn fail(&mut self, reason: impl Into<String>) {
        self.outcome = Outcome::Fail(reason.into());
    }
}

type TransitionFn<S, E> =
    Arc<dyn Fn(Envelope<E>, Step<S>) -> BoxFuture<'static, StepResult<S>> + Send + Sync>;
type TimeoutFn<S> = Arc<dyn Fn(Step<S>) -> BoxFuture<'static, StepResult<S>> + Send + Sync>;
type CompensationFn<S> = Arc<
    dyn Fn(S, Context) -> BoxFuture<'static, std::result::Result<(), HandlerError>> + Send + Sync,
>;
type InstanceIdFn<E> = Arc<dyn Fn(&Envelope<E>) -> String + Send + Sync>;
type StepResult<S> = std::result::Result<Step<S>, HandlerError>;

/// How an event finds its instance.
enum Correlation<E> {
    Key,
    Field(InstanceIdFn<E>),
    Conversation,
}

/// How an event of one type is applied: its correlation and its transition per state.
struct EventEntry<S, E> {
    correlation: Correlation<E>,
    transitions: HashMap<String, TransitionFn<S, E>>,
}

/// An [`EventEntry`] with its event type erased, so a saga keeps one list of them.
trait ErasedEntry<S>: Send + Sync + 'static {
    fn as_any_mut(&mut self) -> &mut dyn Any;
    fn event_type(&self) -> &'static str;
    /// Whether events of this type start an instance.
    fn starts(&self) -> bool;
    /// Whether any state has a transition for this type.
    fn has_transitions(&self) -> bool;
    fn register(
        self: Arc<Self>,
        route: RouteBuilder,
        shared: Arc<runtime::Shared<S>>,
    ) -> RouteBuilder;
}

/// A saga definition: its data type `S`, correlations, transitions and compensations. Start it
/// with [`Saga::start`]; see the [module documentation](self).
pub struct Saga<S> {
    name: String,
    topics: Vec<String>,
    group: Option<String>,
    own_topic: Option<String>,
    retry: Option<RetryPolicy>,
    concurrency: Option<usize>,
    timeout_poll: Duration,
    missing_instance: MissingInstance,
    entries: Vec<Box<dyn ErasedEntry<S>>>,
    timeouts: HashMap<(String, String), TimeoutFn<S>>,
    compensations: HashMap<String, CompensationFn<S>>,
    errors: Vec<String>,
}

impl<S> std::fmt::Debug for Saga<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Saga")
            .field("name", &self.name)
            .field("topics", &self.topics)
            .finish_non_exhaustive()
    }
}

/// The transitions of one state; made by [`Saga::initially`] and [`Saga::during`].
pub struct During<S> {
    saga: Saga<S>,
    state: String,
}

impl<S> std::fmt::Debug for During<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("During")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl<S: SagaData> During<S> {
    /// In this state, events of type `E` run `transition`.
    pub fn on<E, F, Fut>(mut self, transition: F) -> Self
    where
        E: Event + Clone,
        F: Fn(Envelope<E>, Step<S>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = StepResult<S>> + Send + 'static,
    {
        let transition: TransitionFn<S, E> =
            Arc::new(move |event, step| Box::pin(transition(event, step)));
        let state = self.state.clone();
        if self
            .saga
            .entry::<E>()
            .transitions
            .insert(state, transition)
            .is_some()
        {
            self.saga.errors.push(format!(
                "state {:?} has two transitions for {}",
                self.state,
                E::TYPE
            ));
        }
        self
    }

    /// In this state, the timeout `name` runs `transition`.
    pub fn on_timeout<F, Fut>(mut self, name: &str, transition: F) -> Self
    where
        F: Fn(Step<S>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = StepResult<S>> + Send + 'static,
    {
        let transition: TimeoutFn<S> = Arc::new(move |step| Box::pin(transition(step)));
        let key = (self.state.clone(), name.to_string());
        if self.saga.timeouts.insert(key, transition).is_some() {
            self.saga.errors.push(format!(
                "state {:?} has two transitions for timeout {name:?}",
                self.state
            ));
        }
        self
    }
}

/// What a saga does with an event for an instance that does not exist, when the event does
/// not start one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MissingInstance {
    /// Fail the delivery, so the retry policy tries again and finally dead-letters it with
    /// the reason. With several consumers the event that starts an instance and the next one
    /// can be handled at once in two processes; the second then waits for the first.
    #[default]
    Retry,
    /// Acknowledge it without effect (counted in [`SagaStats::ignored`]).
    Ignore,
}

/// What a saga's data type must be: stored as JSON, and `Default` for a new instance.
pub trait SagaData: Serialize + DeserializeOwned + Default + Send + Sync + 'static {}

impl<T: Serialize + DeserializeOwned + Default + Send + Sync + 'static> SagaData for T {}

impl<S: SagaData> Saga<S> {
    /// A saga named `name`: the default group of its subscriptions, and the name its instances
    /// are stored under. Its own topic (timeouts and compensations) is `{name}-saga`.
    pub fn new(name: &str) -> Self {
        Saga {
            name: name.to_string(),
            topics: Vec::new(),
            group: None,
            own_topic: None,
            retry: None,
            concurrency: None,
            timeout_poll: Duration::from_secs(1),
            missing_instance: MissingInstance::Retry,
            entries: Vec::new(),
            timeouts: HashMap::new(),
            compensations: HashMap::new(),
            errors: Vec::new(),
        }
    }

    /// Consumes the saga's events from `topic` (call once per topic). Other event types on
    /// the topic are skipped.
    pub fn listen(mut self, topic: &str) -> Self {
        self.topics.push(topic.to_string());
        self
    }

    /// The subscription group (default: the saga's name).
    pub fn group(mut self, group: &str) -> Self {
        self.group = Some(group.to_string());
        self
    }

    /// The saga's own topic, for its timeouts and compensations (default `{name}-saga`).
    pub fn own_topic(mut self, topic: &str) -> Self {
        self.own_topic = Some(topic.to_string());
        self
    }

    /// The retry policy of its transitions and compensations (default: the bus's).
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = Some(retry);
        self
    }

    /// Transitions running at once per subscription (default: the bus's). Events of one
    /// instance are applied one at a time whatever this is.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = Some(concurrency);
        self
    }

    /// How often the store is asked for due timeouts when nothing is known to be due
    /// (default 1 s). A timeout fires at most about this late on stores that other processes
    /// write to (PostgreSQL); the memory store wakes the poller itself.
    pub fn timeout_poll(mut self, every: Duration) -> Self {
        self.timeout_poll = every.max(Duration::from_millis(1));
        self
    }

    /// What to do with an event whose instance does not exist and that does not start one
    /// (default [`MissingInstance::Retry`]).
    pub fn missing_instance(mut self, policy: MissingInstance) -> Self {
        self.missing_instance = policy;
        self
    }

    /// Events of type `E` find their instance by `instance_id` (a field of the event, say).
    /// Without this, an event finds it by its key.
    pub fn correlate<E: Event + Clone>(
        mut self,
        instance_id: impl Fn(&Envelope<E>) -> String + Send + Sync + 'static,
    ) -> Self {
        self.entry::<E>().correlation = Correlation::Field(Arc::new(instance_id));
        self
    }

    /// Events of type `E` find their instance by the conversation they belong to: the
    /// instance started by an event of that correlation id. An `E` that starts an instance
    /// gives it its conversation id as instance id.
    pub fn correlate_by_conversation<E: Event + Clone>(mut self) -> Self {
        self.entry::<E>().correlation = Correlation::Conversation;
        self
    }

    /// The transitions that start an instance: an event with a transition here and no
    /// instance yet creates one (state [`INITIAL`], data `S::default()`).
    pub fn initially(self, transitions: impl FnOnce(During<S>) -> During<S>) -> Self {
        self.during(INITIAL, transitions)
    }

    /// The transitions of the instances in `state`. An event (or timeout) with no transition
    /// in the instance's state is ignored and counted in [`SagaStats::ignored`].
    pub fn during(self, state: &str, transitions: impl FnOnce(During<S>) -> During<S>) -> Self {
        transitions(During {
            saga: self,
            state: state.to_string(),
        })
        .saga
    }

    /// Defines the compensation `name`: an action that undoes a step, registered by a
    /// transition with [`Step::compensate_with`]. It gets the instance's data and a context
    /// whose publishes commit with the compensation's completion. It is retried by the
    /// saga's retry policy; when it keeps failing, the instance ends [`SagaStatus::Failed`]
    /// naming it and the compensation message is dead-lettered.
    pub fn compensation<F, Fut>(mut self, name: &str, action: F) -> Self
    where
        F: Fn(S, Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), HandlerError>> + Send + 'static,
    {
        let action: CompensationFn<S> = Arc::new(move |data, ctx| Box::pin(action(data, ctx)));
        if self
            .compensations
            .insert(name.to_string(), action)
            .is_some()
        {
            self.errors
                .push(format!("compensation {name:?} is defined twice"));
        }
        self
    }

    // The entry at the index is found or made as this type just before it is downcast.
    #[allow(clippy::expect_used)]
    fn entry<E: Event + Clone>(&mut self) -> &mut EventEntry<S, E> {
        let position = self
            .entries
            .iter_mut()
            .position(|entry| entry.as_any_mut().is::<EventEntry<S, E>>());
        let index = match position {
            Some(index) => index,
            None => {
                self.entries.push(Box::new(EventEntry::<S, E> {
                    correlation: Correlation::Key,
                    transitions: HashMap::new(),
                }));
                self.entries.len() - 1
            }
        };
        self.entries[index]
            .as_any_mut()
            .downcast_mut::<EventEntry<S, E>>()
            .expect("saga entry of the looked-up type")
    }

    /// Subscribes to the saga's topics and its own topic, starts the timeout poller, and
    /// returns the running saga.
    ///
    /// Fails with a `Config` error when the definition is incomplete or ambiguous: no topic,
    /// no event that starts an instance, a state with two transitions for one event type, a
    /// compensation defined twice, or an invalid name.
    pub async fn start(self, bus: &Bus, store: Arc<dyn SagaStore>) -> Result<RunningSaga<S>> {
        runtime::start(self, bus, store).await
    }
}

impl<S: SagaData, E: Event + Clone> ErasedEntry<S> for EventEntry<S, E> {
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }

    fn event_type(&self) -> &'static str {
        E::TYPE
    }

    fn starts(&self) -> bool {
        self.transitions.contains_key(INITIAL)
    }

    fn has_transitions(&self) -> bool {
        !self.transitions.is_empty()
    }

    fn register(
        self: Arc<Self>,
        route: RouteBuilder,
        shared: Arc<runtime::Shared<S>>,
    ) -> RouteBuilder {
        route.on::<E>(runtime::EventHandler {
            entry: self,
            shared,
            _event: PhantomData,
        })
    }
}
