//! A started saga: its subscriptions, the handlers that apply events, timeouts and
//! compensations to instances, the timeout poller, and the operations on instances.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::future::BoxFuture;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use super::{
    Committed, CompensationFn, Correlation, ErasedEntry, EventEntry, FailedCompensation,
    MissingInstance, NewTimeout, Outcome, Saga, SagaCommit, SagaCompensation, SagaData, SagaFilter,
    SagaRecord, SagaStatus, SagaStore, SagaTimeout, ScheduledTimeout, Step, TimeoutFn, INITIAL,
    MAX_TIMEOUT,
};
use crate::bus::Bus;
use crate::codec::Json;
use crate::consumer::{Context, Handler, HandlerError, Subscription};
use crate::envelope::{Envelope, Event};
use crate::error::{Error, ErrorKind, Result};
use crate::message::{validate_name, Message};
use crate::retry::RetryPolicy;
use crate::routing::UnknownTypes;

/// How often a transition is redone after the instance changed under it, before the delivery
/// is failed (and retried by the retry policy).
const MAX_CONFLICTS: u32 = 16;
/// Due timeouts published per store call.
const TIMEOUT_BATCH: usize = 100;

/// What every handler of one started saga shares.
pub(crate) struct Shared<S> {
    name: String,
    bus: Bus,
    store: Arc<dyn SagaStore>,
    own_topic: String,
    retry: RetryPolicy,
    timeouts: HashMap<(String, String), TimeoutFn<S>>,
    compensations: HashMap<String, CompensationFn<S>>,
    known_compensations: Arc<HashSet<String>>,
    missing_instance: MissingInstance,
    counters: Counters,
    wake_poller: Notify,
}

#[derive(Debug, Default)]
struct Counters {
    started: AtomicU64,
    transitions: AtomicU64,
    completed: AtomicU64,
    compensated: AtomicU64,
    failed: AtomicU64,
    duplicates: AtomicU64,
    ignored: AtomicU64,
    conflicts: AtomicU64,
    timeouts_fired: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// Counts of what a running saga did in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SagaStats {
    /// Instances started.
    pub started: u64,
    /// Changes committed (events, timeouts, compensations, operations).
    pub transitions: u64,
    /// Instances that completed.
    pub completed: u64,
    /// Instances whose compensations all ran.
    pub compensated: u64,
    /// Instances that ended with a compensation that did not succeed.
    pub failed: u64,
    /// Redelivered events skipped because they were already applied.
    pub duplicates: u64,
    /// Events and timeouts with nothing to do: no instance, a finished instance, no
    /// transition in the instance's state, or a cancelled timeout.
    pub ignored: u64,
    /// Transitions redone because the instance changed concurrently.
    pub conflicts: u64,
    /// Due timeouts published.
    pub timeouts_fired: u64,
}

/// What to do when a message's instance does not exist.
#[derive(Clone, Copy)]
enum Missing<'a> {
    /// Create it, in this conversation.
    Start(&'a str),
    /// As the saga's [`MissingInstance`] policy says.
    Retry,
    /// Ignore the message (a timeout or compensation of a removed instance, an operation).
    Ignore,
}

/// How a message finds its instance.
pub(crate) enum Find {
    Id(String),
    Conversation(String),
}

/// The result of a transition, to commit.
pub(crate) struct Change {
    record: SagaRecord,
    messages: Vec<Message>,
    schedule: Vec<NewTimeout>,
    cancel: Vec<String>,
}

impl Change {
    fn of(record: SagaRecord) -> Self {
        Change {
            record,
            messages: Vec::new(),
            schedule: Vec::new(),
            cancel: Vec::new(),
        }
    }
}

/// What applying one message did.
enum Advanced {
    Committed(Box<SagaRecord>),
    Duplicate,
    Ignored,
}

fn transient(error: Error) -> HandlerError {
    HandlerError::transient(error)
}

impl<S: SagaData> Shared<S> {
    fn resource(&self, instance_id: &str) -> String {
        format!("saga {}, instance {instance_id}", self.name)
    }

    fn new_record(&self, instance_id: String, correlation_id: &str) -> Result<SagaRecord> {
        let data = serde_json::to_value(S::default()).map_err(|e| {
            Error::new(
                ErrorKind::Encode,
                "start saga",
                "its default data does not encode",
            )
            .with_source(e)
        })?;
        let now = Utc::now();
        Ok(SagaRecord {
            saga: self.name.clone(),
            instance_id,
            correlation_id: correlation_id.to_string(),
            state: INITIAL.to_string(),
            status: SagaStatus::Running,
            data,
            version: 0,
            compensations: Vec::new(),
            compensated: 0,
            failure: None,
            failed_compensation: None,
            timeouts: Vec::new(),
            created_at: now,
            updated_at: now,
        })
    }

    /// A step over `record` for a transition handling the message of `context`.
    fn step(
        &self,
        record: &SagaRecord,
        context: Context,
    ) -> std::result::Result<Step<S>, HandlerError> {
        Ok(Step {
            instance_id: record.instance_id.clone(),
            state: record.state.clone(),
            data: record.data().map_err(HandlerError::permanent)?,
            context,
            outcome: Outcome::Running,
            sends: Vec::new(),
            schedule: Vec::new(),
            unschedule: Vec::new(),
            compensations: Vec::new(),
            known_compensations: Arc::clone(&self.known_compensations),
        })
    }

    /// Turns a transition's step into the change to commit.
    fn settle(
        &self,
        mut record: SagaRecord,
        step: Step<S>,
        context: Option<&Context>,
    ) -> std::result::Result<Change, HandlerError> {
        record.data = serde_json::to_value(&step.data).map_err(|e| {
            HandlerError::permanent(
                Error::new(
                    ErrorKind::Encode,
                    "save saga data",
                    "the data does not encode",
                )
                .with_resource(self.resource(&record.instance_id))
                .with_source(e),
            )
        })?;
        let moved = record.state != step.state;
        record.state = step.state;
        record.compensations.extend(step.compensations);
        let mut change = Change::of(record);
        let record = &mut change.record;
        let finishing = step.outcome != Outcome::Running;
        let replaced = |name: &str| {
            step.unschedule.iter().any(|n| n == name)
                || step.schedule.iter().any(|(n, _)| n == name)
        };
        let (cancelled, kept) = std::mem::take(&mut record.timeouts)
            .into_iter()
            .partition::<Vec<_>, _>(|t| finishing || moved || replaced(&t.name));
        record.timeouts = kept;
        change.cancel = cancelled.into_iter().map(|t| t.id).collect();
        if !finishing {
            for (name, after) in step.schedule {
                let after = after.min(MAX_TIMEOUT);
                let id = uuid::Uuid::now_v7().to_string();
                let due_at = chrono::Duration::from_std(after)
                    .ok()
                    .and_then(|after| Utc::now().checked_add_signed(after))
                    .unwrap_or(chrono::DateTime::<Utc>::MAX_UTC);
                record.timeouts.push(ScheduledTimeout {
                    id: id.clone(),
                    name: name.clone(),
                    state: record.state.clone(),
                    due_at,
                });
                change.schedule.push(NewTimeout { id, name, after });
            }
        }
        change.messages = step.sends;
        match step.outcome {
            Outcome::Running => {}
            Outcome::Complete => record.status = SagaStatus::Completed,
            Outcome::Fail(reason) => {
                record.failure = Some(reason);
                if let Some(message) = self
                    .next_compensation(record, context)
                    .map_err(HandlerError::permanent)?
                {
                    change.messages.push(message);
                }
            }
        }
        Ok(change)
    }

    /// Moves a failing instance on to its next compensation: the message that runs it, or the
    /// status `Compensated` when none is left.
    fn next_compensation(
        &self,
        record: &mut SagaRecord,
        context: Option<&Context>,
    ) -> Result<Option<Message>> {
        let Some(position) = record
            .compensations
            .len()
            .checked_sub(record.compensated + 1)
        else {
            record.status = SagaStatus::Compensated;
            return Ok(None);
        };
        record.status = SagaStatus::Compensating;
        let event = SagaCompensation {
            saga: self.name.clone(),
            instance_id: record.instance_id.clone(),
            name: record.compensations[position].clone(),
            index: record.compensated,
            state: record.state.clone(),
            data: record.data.clone(),
            reason: record.failure.clone(),
        };
        let envelope = match context {
            Some(context) => context.envelope(event),
            None => self
                .bus
                .envelope(event)
                .with_correlation_id(record.correlation_id.clone()),
        };
        envelope.into_message(&Json, &self.own_topic).map(Some)
    }

    async fn load(
        &self,
        find: &Find,
        event_id: &str,
    ) -> Result<(Option<SagaRecord>, bool, String)> {
        match find {
            Find::Id(id) => {
                let loaded = self.store.load(&self.name, id, event_id).await?;
                Ok((loaded.record, loaded.applied, id.clone()))
            }
            Find::Conversation(correlation_id) => {
                match self
                    .store
                    .find_by_correlation(&self.name, correlation_id)
                    .await?
                {
                    Some(record) => {
                        let loaded = self
                            .store
                            .load(&self.name, &record.instance_id, event_id)
                            .await?;
                        Ok((loaded.record, loaded.applied, record.instance_id))
                    }
                    None => Ok((None, false, correlation_id.clone())),
                }
            }
        }
    }

    /// Applies one message to its instance: load, run `change`, commit; on a concurrent
    /// change, again from the load. `may_start` creates a missing instance in conversation
    /// `correlation_id`.
    async fn advance<F, Fut>(
        &self,
        event_id: &str,
        find: &Find,
        missing: Missing<'_>,
        mut change: F,
    ) -> std::result::Result<Advanced, HandlerError>
    where
        F: FnMut(SagaRecord) -> Fut,
        Fut: Future<Output = std::result::Result<Option<Change>, HandlerError>>,
    {
        let mut conflicts = 0;
        loop {
            let (record, applied, instance_id) =
                self.load(find, event_id).await.map_err(transient)?;
            if applied {
                bump(&self.counters.duplicates, 1);
                tracing::debug!(saga = %self.name, instance = %instance_id, event_id, "already applied; skipping");
                return Ok(Advanced::Duplicate);
            }
            let (record, created) = match (record, missing) {
                (Some(record), _) => (record, false),
                (None, Missing::Start(correlation_id)) => (
                    self.new_record(instance_id.clone(), correlation_id)
                        .map_err(HandlerError::permanent)?,
                    true,
                ),
                (None, Missing::Retry) if self.missing_instance == MissingInstance::Retry => {
                    return Err(HandlerError::transient(
                        Error::new(
                            ErrorKind::Store,
                            "apply saga event",
                            "no such instance (yet?): the event that starts it may not have \
                             been applied; retrying",
                        )
                        .with_resource(self.resource(&instance_id)),
                    ));
                }
                (None, _) => {
                    bump(&self.counters.ignored, 1);
                    tracing::debug!(saga = %self.name, instance = %instance_id, event_id, "no such instance; ignored");
                    return Ok(Advanced::Ignored);
                }
            };
            let (version, status) = (record.version, record.status);
            let Some(mut change) = change(record).await? else {
                bump(&self.counters.ignored, 1);
                tracing::debug!(saga = %self.name, instance = %instance_id, event_id, "nothing to do in this state; ignored");
                return Ok(Advanced::Ignored);
            };
            change.record.version = version + 1;
            change.record.updated_at = Utc::now();
            let scheduled = !change.schedule.is_empty();
            let record = change.record.clone();
            let commit = SagaCommit {
                record: change.record,
                expected_version: (!created).then_some(version),
                event_id: event_id.to_string(),
                messages: change.messages,
                schedule: change.schedule,
                cancel: change.cancel,
            };
            match self
                .store
                .commit(&self.bus, commit)
                .await
                .map_err(transient)?
            {
                Committed::Done => {
                    self.count(created, status, record.status);
                    if scheduled {
                        self.wake_poller.notify_one();
                    }
                    return Ok(Advanced::Committed(Box::new(record)));
                }
                Committed::Duplicate => {
                    bump(&self.counters.duplicates, 1);
                    return Ok(Advanced::Duplicate);
                }
                Committed::Conflict => {
                    bump(&self.counters.conflicts, 1);
                    conflicts += 1;
                    if conflicts >= MAX_CONFLICTS {
                        return Err(HandlerError::transient(
                            Error::new(
                                ErrorKind::Store,
                                "apply saga event",
                                format!(
                                    "the instance changed concurrently {MAX_CONFLICTS} times in a \
                                     row; the delivery will be retried"
                                ),
                            )
                            .with_resource(self.resource(&instance_id)),
                        ));
                    }
                    let wait = Duration::from_millis(fastrand::u64(1..=(2u64 << conflicts.min(6))));
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    fn count(&self, created: bool, before: SagaStatus, after: SagaStatus) {
        let c = &self.counters;
        bump(&c.transitions, 1);
        if created {
            bump(&c.started, 1);
        }
        if before != after {
            match after {
                SagaStatus::Completed => bump(&c.completed, 1),
                SagaStatus::Compensated => bump(&c.compensated, 1),
                SagaStatus::Failed => bump(&c.failed, 1),
                SagaStatus::Running | SagaStatus::Compensating => {}
            }
        }
    }
}

/// Applies events of type `E` to their instances.
pub(crate) struct EventHandler<S, E> {
    pub(crate) entry: Arc<EventEntry<S, E>>,
    pub(crate) shared: Arc<Shared<S>>,
    pub(crate) _event: PhantomData<fn() -> E>,
}

impl<S: SagaData, E: Event + Clone> Handler<E> for EventHandler<S, E> {
    fn handle(
        &self,
        envelope: Envelope<E>,
        context: Context,
    ) -> BoxFuture<'static, std::result::Result<(), HandlerError>> {
        let entry = Arc::clone(&self.entry);
        let shared = Arc::clone(&self.shared);
        Box::pin(async move {
            let find = match &entry.correlation {
                Correlation::Key => match &envelope.key {
                    Some(key) if !key.is_empty() => Find::Id(key.to_string()),
                    _ => {
                        return Err(HandlerError::permanent(format!(
                            "a {} event has no key to find its saga instance by; give the event \
                             a key, or correlate it with `.correlate::<E>(…)`",
                            E::TYPE
                        )))
                    }
                },
                Correlation::Field(instance_id) => {
                    let id = instance_id(&envelope);
                    if id.is_empty() {
                        return Err(HandlerError::permanent(format!(
                            "a {} event correlates to an empty saga instance id",
                            E::TYPE
                        )));
                    }
                    Find::Id(id)
                }
                Correlation::Conversation => {
                    Find::Conversation(envelope.conversation_id().to_string())
                }
            };
            let conversation = envelope.conversation_id().to_string();
            let starts = entry.transitions.contains_key(INITIAL);
            let event_id = envelope.id.clone();
            shared
                .advance(
                    &event_id,
                    &find,
                    if starts {
                        Missing::Start(&conversation)
                    } else {
                        Missing::Retry
                    },
                    |record| {
                        let transition = (record.status == SagaStatus::Running)
                            .then(|| entry.transitions.get(&record.state).cloned())
                            .flatten();
                        let (shared, envelope, context) =
                            (Arc::clone(&shared), envelope.clone(), context.clone());
                        async move {
                            let Some(transition) = transition else {
                                return Ok(None);
                            };
                            let step = shared.step(&record, context.clone())?;
                            let step = transition(envelope, step).await?;
                            shared.settle(record, step, Some(&context)).map(Some)
                        }
                    },
                )
                .await
                .map(|_| ())
        })
    }
}

/// Applies due timeouts, from the saga's own topic.
struct TimeoutHandler<S> {
    shared: Arc<Shared<S>>,
}

impl<S: SagaData> Handler<SagaTimeout> for TimeoutHandler<S> {
    fn handle(
        &self,
        envelope: Envelope<SagaTimeout>,
        context: Context,
    ) -> BoxFuture<'static, std::result::Result<(), HandlerError>> {
        let shared = Arc::clone(&self.shared);
        Box::pin(async move {
            let timeout = envelope.payload;
            if timeout.saga != shared.name {
                tracing::warn!(saga = %shared.name, other = %timeout.saga, "a timeout of another saga on this saga's topic; ignored");
                return Ok(());
            }
            let find = Find::Id(timeout.instance_id.clone());
            shared
                .advance(&envelope.id, &find, Missing::Ignore, |mut record| {
                    let (shared, context, timeout_id) =
                        (Arc::clone(&shared), context.clone(), timeout.timeout_id.clone());
                    async move {
                        let Some(position) = record.timeouts.iter().position(|t| t.id == timeout_id)
                        else {
                            return Ok(None); // cancelled, or already applied
                        };
                        let timeout = record.timeouts.remove(position);
                        if record.status != SagaStatus::Running {
                            return Ok(Some(Change::of(record)));
                        }
                        let key = (record.state.clone(), timeout.name.clone());
                        let Some(transition) = shared.timeouts.get(&key).cloned() else {
                            tracing::warn!(saga = %shared.name, instance = %record.instance_id, state = %record.state, timeout = %timeout.name, "no transition for this timeout in this state; dropped");
                            return Ok(Some(Change::of(record)));
                        };
                        let step = shared.step(&record, context.clone())?;
                        let step = transition(step).await?;
                        shared.settle(record, step, Some(&context)).map(Some)
                    }
                })
                .await
                .map(|_| ())
        })
    }
}

/// Runs compensations, from the saga's own topic.
struct CompensationHandler<S> {
    shared: Arc<Shared<S>>,
}

impl<S: SagaData> Handler<SagaCompensation> for CompensationHandler<S> {
    fn handle(
        &self,
        envelope: Envelope<SagaCompensation>,
        context: Context,
    ) -> BoxFuture<'static, std::result::Result<(), HandlerError>> {
        let shared = Arc::clone(&self.shared);
        Box::pin(async move {
            let run = envelope.payload;
            let find = Find::Id(run.instance_id.clone());
            let expects = |record: &SagaRecord| {
                record.status == SagaStatus::Compensating && record.compensated == run.index
            };
            let result = shared
                .advance(&envelope.id, &find, Missing::Ignore, |mut record| {
                    let (shared, context) = (Arc::clone(&shared), context.clone());
                    let waiting = expects(&record);
                    async move {
                        if !waiting {
                            return Ok(None);
                        }
                        let Some(name) = current_compensation(&record) else {
                            return Ok(None);
                        };
                        let Some(action) = shared.compensations.get(&name).cloned() else {
                            return Err(HandlerError::permanent(format!(
                                "the saga defines no compensation {name:?} (removed from the \
                                 definition while instances still need it?)"
                            )));
                        };
                        let data = record.data().map_err(HandlerError::permanent)?;
                        let (capturing, captured) = context.capturing();
                        action(data, capturing).await?;
                        let mut messages = captured.take().map_err(transient)?;
                        record.compensated += 1;
                        if let Some(next) = shared
                            .next_compensation(&mut record, Some(&context))
                            .map_err(HandlerError::permanent)?
                        {
                            messages.push(next);
                        }
                        let mut change = Change::of(record);
                        change.messages = messages;
                        Ok(Some(change))
                    }
                })
                .await;
            let Err(error) = result else {
                return Ok(());
            };
            if error.is_permanent() || !shared.retry.should_retry(context.attempt()) {
                // The last attempt: the instance says which compensation did not succeed
                // before the message goes to the dead-letter queue.
                let failed_id = format!("{}/failed", envelope.id);
                let text = error.to_string();
                let marked = shared
                    .advance(&failed_id, &find, Missing::Ignore, |mut record| {
                        let waiting = expects(&record);
                        let (text, attempts) = (text.clone(), context.attempt());
                        async move {
                            if !waiting {
                                return Ok(None);
                            }
                            let name = current_compensation(&record).unwrap_or_default();
                            record.status = SagaStatus::Failed;
                            record.failed_compensation = Some(FailedCompensation {
                                name,
                                error: text,
                                attempts,
                            });
                            Ok(Some(Change::of(record)))
                        }
                    })
                    .await;
                if let Err(e) = marked {
                    tracing::error!(saga = %shared.name, instance = %run.instance_id, error = %e, "could not record the failed compensation on the instance");
                }
            }
            Err(error)
        })
    }
}

/// The compensation an instance runs next.
fn current_compensation(record: &SagaRecord) -> Option<String> {
    let position = record
        .compensations
        .len()
        .checked_sub(record.compensated + 1)?;
    record.compensations.get(position).cloned()
}

pub(super) async fn start<S: SagaData>(
    saga: Saga<S>,
    bus: &Bus,
    store: Arc<dyn SagaStore>,
) -> Result<RunningSaga<S>> {
    let resource = format!("saga {}", saga.name);
    let config = |text: String| {
        Error::new(ErrorKind::Config, "start saga", text).with_resource(resource.clone())
    };
    validate_name("group", &saga.name)?;
    if let Some(error) = saga.errors.first() {
        return Err(config(format!("{error}; give each one definition")));
    }
    if saga.topics.is_empty() {
        return Err(config(
            "the saga listens to no topic; add `.listen(topic)`".to_string(),
        ));
    }
    if !saga.entries.iter().any(|entry| entry.starts()) {
        return Err(config(
            "no event starts an instance; add `.initially(|s| s.on(transition))`".to_string(),
        ));
    }
    if let Some(entry) = saga.entries.iter().find(|entry| !entry.has_transitions()) {
        return Err(config(format!(
            "events of type {} are correlated but no state has a transition for them",
            entry.event_type()
        )));
    }
    let group = saga.group.clone().unwrap_or_else(|| saga.name.clone());
    let own_topic = saga
        .own_topic
        .clone()
        .unwrap_or_else(|| format!("{}-saga", saga.name));
    validate_name("group", &group)?;
    validate_name("topic", &own_topic)?;
    if saga.topics.contains(&own_topic) {
        return Err(config(format!(
            "the saga's own topic {own_topic:?} is also one it listens to; pick another with \
             `.own_topic(…)`"
        )));
    }
    let retry = saga.retry.unwrap_or_else(|| bus.default_retry().clone());
    let shared = Arc::new(Shared {
        name: saga.name,
        bus: bus.clone(),
        store,
        own_topic: own_topic.clone(),
        retry: retry.clone(),
        timeouts: saga.timeouts,
        known_compensations: Arc::new(saga.compensations.keys().cloned().collect()),
        compensations: saga.compensations,
        missing_instance: saga.missing_instance,
        counters: Counters::default(),
        wake_poller: Notify::new(),
    });
    let entries: Vec<Arc<dyn ErasedEntry<S>>> = saga.entries.into_iter().map(Arc::from).collect();
    let mut subscriptions = Vec::new();
    for topic in &saga.topics {
        let mut route = bus
            .route(topic, &group)
            .unknown_types(UnknownTypes::Skip)
            .retry(retry.clone());
        if let Some(concurrency) = saga.concurrency {
            route = route.concurrency(concurrency);
        }
        for entry in &entries {
            route = Arc::clone(entry).register(route, Arc::clone(&shared));
        }
        subscriptions.push(route.start().await?);
    }
    let mut own = bus
        .route(&own_topic, &group)
        .retry(retry)
        .on(TimeoutHandler {
            shared: Arc::clone(&shared),
        })
        .on(CompensationHandler {
            shared: Arc::clone(&shared),
        });
    if let Some(concurrency) = saga.concurrency {
        own = own.concurrency(concurrency);
    }
    subscriptions.push(own.start().await?);
    let (stop, stop_rx) = watch::channel(false);
    let poller = tokio::spawn(poll_timeouts(
        Arc::clone(&shared),
        saga.timeout_poll,
        stop_rx,
    ));
    tracing::debug!(saga = %shared.name, group, own_topic, "saga started");
    Ok(RunningSaga {
        shared,
        subscriptions,
        poller: Some(poller),
        stop,
    })
}

async fn poll_timeouts<S: SagaData>(
    shared: Arc<Shared<S>>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let wait = match fire(&shared).await {
            Ok(fired) if fired.fired >= TIMEOUT_BATCH => Duration::ZERO,
            Ok(fired) => fired.next_due.map_or(every, |due| due.min(every)),
            Err(e) => {
                tracing::warn!(saga = %shared.name, error = %e, "could not fire due timeouts; trying again");
                every
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shared.wake_poller.notified() => {}
            _ = stop.changed() => return,
        }
    }
}

async fn fire<S: SagaData>(shared: &Shared<S>) -> Result<super::Fired> {
    let fired = shared
        .store
        .fire_due_timeouts(&shared.bus, &shared.name, &shared.own_topic, TIMEOUT_BATCH)
        .await?;
    bump(&shared.counters.timeouts_fired, fired.fired as u64);
    Ok(fired)
}

/// A started saga: its subscriptions and timeout poller, and the operations on its instances.
/// Made by [`Saga::start`]. Shut it down with [`shutdown`](Self::shutdown); dropping it stops
/// it at once.
#[must_use = "dropping a RunningSaga stops it"]
pub struct RunningSaga<S> {
    shared: Arc<Shared<S>>,
    subscriptions: Vec<Subscription>,
    poller: Option<JoinHandle<()>>,
    stop: watch::Sender<bool>,
}

impl<S> std::fmt::Debug for RunningSaga<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningSaga")
            .field("name", &self.shared.name)
            .field("subscriptions", &self.subscriptions)
            .finish_non_exhaustive()
    }
}

impl<S: SagaData> RunningSaga<S> {
    /// The saga's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The saga's own topic (timeouts and compensations).
    pub fn own_topic(&self) -> &str {
        &self.shared.own_topic
    }

    /// Its subscriptions: one per listened topic, then its own topic's.
    pub fn subscriptions(&self) -> &[Subscription] {
        &self.subscriptions
    }

    /// What it did so far in this process.
    pub fn stats(&self) -> SagaStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SagaStats {
            started: get(&c.started),
            transitions: get(&c.transitions),
            completed: get(&c.completed),
            compensated: get(&c.compensated),
            failed: get(&c.failed),
            duplicates: get(&c.duplicates),
            ignored: get(&c.ignored),
            conflicts: get(&c.conflicts),
            timeouts_fired: get(&c.timeouts_fired),
        }
    }

    /// The instance `instance_id`.
    pub async fn get(&self, instance_id: &str) -> Result<Option<SagaRecord>> {
        let loaded = self
            .shared
            .store
            .load(&self.shared.name, instance_id, "")
            .await?;
        Ok(loaded.record)
    }

    /// The instance started in conversation `correlation_id`.
    pub async fn find_by_correlation(&self, correlation_id: &str) -> Result<Option<SagaRecord>> {
        self.shared
            .store
            .find_by_correlation(&self.shared.name, correlation_id)
            .await
    }

    /// Instances matching `filter`, least recently changed first: e.g. running ones idle for
    /// an hour (stuck sagas).
    pub async fn list(&self, filter: &SagaFilter) -> Result<Vec<SagaRecord>> {
        self.shared.store.list(&self.shared.name, filter).await
    }

    /// Publishes the timeouts that are due now, in the caller's task (the poller does this by
    /// itself; tests call it after advancing a paused clock). Returns how many.
    pub async fn fire_due_timeouts(&self) -> Result<usize> {
        Ok(fire(&self.shared).await?.fired)
    }

    /// Fails a running instance by hand, as a transition calling [`Step::fail`] would: its
    /// timeouts are cancelled and its compensations start. Returns the instance as failed.
    pub async fn fail(&self, instance_id: &str, reason: &str) -> Result<SagaRecord> {
        let shared = &self.shared;
        self.operate(
            "fail saga instance",
            instance_id,
            SagaStatus::Running,
            |mut record| {
                record.failure = Some(reason.to_string());
                let mut change = Change::of(record);
                let record = &mut change.record;
                change.cancel = std::mem::take(&mut record.timeouts)
                    .into_iter()
                    .map(|t| t.id)
                    .collect();
                change
                    .messages
                    .extend(shared.next_compensation(record, None)?);
                Ok(change)
            },
        )
        .await
    }

    /// Runs again the compensation that did not succeed (after its cause was fixed), then the
    /// ones after it. Only for an instance whose status is [`SagaStatus::Failed`].
    pub async fn resume(&self, instance_id: &str) -> Result<SagaRecord> {
        let shared = &self.shared;
        self.operate(
            "resume saga instance",
            instance_id,
            SagaStatus::Failed,
            |mut record| {
                record.failed_compensation = None;
                let message = shared.next_compensation(&mut record, None)?;
                let mut change = Change::of(record);
                change.messages.extend(message);
                Ok(change)
            },
        )
        .await
    }

    async fn operate(
        &self,
        operation: &'static str,
        instance_id: &str,
        expected: SagaStatus,
        change: impl Fn(SagaRecord) -> Result<Change>,
    ) -> Result<SagaRecord> {
        let shared = &self.shared;
        let wrong = |status: Option<SagaStatus>| {
            let found = status.map_or("missing".to_string(), |s| s.as_str().to_string());
            Error::new(
                ErrorKind::Config,
                operation,
                format!(
                    "the instance is {found}; only a {} instance can be changed this way",
                    expected.as_str()
                ),
            )
            .with_resource(shared.resource(instance_id))
        };
        let operation_id = format!("busbar-{}", uuid::Uuid::now_v7());
        let find = Find::Id(instance_id.to_string());
        let mut status = None;
        let advanced = shared
            .advance(&operation_id, &find, Missing::Ignore, |record| {
                status = Some(record.status);
                let result = if record.status == expected {
                    change(record).map(Some).map_err(HandlerError::permanent)
                } else {
                    Ok(None)
                };
                async move { result }
            })
            .await
            .map_err(|e| {
                Error::new(ErrorKind::Store, operation, e.to_string())
                    .with_resource(shared.resource(instance_id))
            })?;
        match advanced {
            Advanced::Committed(record) => Ok(*record),
            Advanced::Duplicate | Advanced::Ignored => Err(wrong(status)),
        }
    }

    /// Stops the timeout poller and shuts the subscriptions down, letting running transitions
    /// finish for up to `grace`.
    pub async fn shutdown(mut self, grace: Duration) -> Result<()> {
        let _ = self.stop.send(true);
        if let Some(poller) = self.poller.take() {
            let _ = poller.await;
        }
        let mut first_error = None;
        for subscription in std::mem::take(&mut self.subscriptions) {
            if let Err(e) = subscription.shutdown(grace).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl<S> Drop for RunningSaga<S> {
    fn drop(&mut self) {
        if let Some(poller) = self.poller.take() {
            poller.abort();
        }
    }
}
