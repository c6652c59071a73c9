//! The dispatch loop and the handling of one delivery.

use std::collections::VecDeque;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Poll;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::context::Origin;
use super::{Context, Counters, Decoder, Handler, Idempotency, ShutdownReport};
use crate::bus::Bus;
use crate::dead_letter::{DeadLetterInfo, DeadLetterReason};
use crate::envelope::{attr, unknown_type_error, Undecoded};
use crate::idempotency::{Claim, Lease};
use crate::metrics::{ConsumerMetrics, InFlight, TypeMetrics};
use crate::retry::RetryPolicy;
use crate::routing::UnknownTypes;
use crate::transport::{Delivery, DeliveryStream};

pub(crate) struct Shared<E> {
    pub(crate) bus: Bus,
    /// The subscription's topic and group, shared with every handler's [`Context`].
    pub(crate) origin: Arc<Origin>,
    pub(crate) decoder: Box<dyn Decoder<E>>,
    /// The CloudEvents types the decoder claims, to say so when a message has another.
    pub(crate) event_types: Vec<&'static str>,
    pub(crate) unknown_types: UnknownTypes,
    pub(crate) handler: Arc<dyn Handler<E>>,
    pub(crate) retry: RetryPolicy,
    pub(crate) idempotency: Option<Idempotency<E>>,
    pub(crate) counters: Arc<Counters>,
    /// The subscription's metric handles.
    pub(crate) metrics: ConsumerMetrics,
    pub(crate) system: &'static str,
    /// The transport's publish limit: larger received messages are not handled.
    pub(crate) max_message_bytes: Option<usize>,
    /// The subscription's OpenTelemetry consume spans.
    #[cfg(feature = "otel")]
    pub(crate) spans: crate::otel::ConsumeSpans,
}

impl<E> Shared<E> {
    fn attempt(&self, id: &str, transport_attempt: u32) -> u32 {
        self.bus
            .claim_waits()
            .attempt(&self.origin.group, id, transport_attempt)
    }

    fn waited_busy(&self, id: &str) {
        self.bus.claim_waits().waited(&self.origin.group, id);
    }

    fn forget_waits(&self, id: &str) {
        self.bus.claim_waits().forget(&self.origin.group, id);
    }

    /// Counts what happened to `message`, in the subscription's stats and its metrics.
    fn tally(&self, tally: Tally, message: &crate::Message) {
        self.tally_as(tally, self.metrics.of(message.header(attr::TYPE)));
    }

    /// [`tally`](Self::tally) with the metrics of the message's type already looked up.
    fn tally_as(&self, tally: Tally, of: &TypeMetrics) {
        let (counter, metric) = {
            let c = &self.counters;
            match tally {
                Tally::Handled => (&c.handled, &of.handled),
                Tally::FailedAttempt => (&c.failed_attempts, &of.failed_attempts),
                Tally::Retried => (&c.retried, &of.retried),
                Tally::DeadLettered => (&c.dead_lettered, &of.dead_lettered),
                Tally::Duplicate => (&c.duplicates_skipped, &of.duplicate),
                Tally::UnknownType => (&c.skipped_unknown, &of.unknown_type),
            }
        };
        Counters::bump(counter);
        metric.increment(1);
    }
}

/// What [`Shared::tally`] counts.
#[derive(Clone, Copy)]
enum Tally {
    Handled,
    FailedAttempt,
    Retried,
    DeadLettered,
    Duplicate,
    UnknownType,
}

pub(crate) struct Limits {
    pub(crate) concurrency: usize,
    pub(crate) max_in_flight: usize,
    pub(crate) key_ordered: bool,
}

/// Deliveries received but not yet finished, with per-key sequencing.
///
/// A key is "busy" while one of its deliveries runs or is runnable; later deliveries of a busy
/// key wait behind it, so each key is handled sequentially while different keys run in parallel.
/// Keys are told apart by a 64-bit hash, so no delivery copies its key: two keys with the same
/// hash (one chance in 2^64 for a pair) would only wait for each other, never run at once.
#[derive(Default)]
struct Dispatch {
    /// Deliveries that may start, with their key's hash when ordered by key.
    runnable: VecDeque<(Delivery, Option<u64>)>,
    waiting: foldhash::HashMap<u64, VecDeque<Delivery>>,
    held: usize,
    /// Seeded per subscription, so a producer cannot choose keys that collide.
    hasher: foldhash::fast::RandomState,
}

impl Dispatch {
    fn receive(&mut self, delivery: Delivery, key_ordered: bool) {
        self.held += 1;
        let key = match (key_ordered, &delivery.message().key) {
            (true, Some(key)) => std::hash::BuildHasher::hash_one(&self.hasher, key.as_str()),
            _ => {
                self.runnable.push_back((delivery, None));
                return;
            }
        };
        if let Some(queue) = self.waiting.get_mut(&key) {
            queue.push_back(delivery);
            return;
        }
        self.waiting.insert(key, VecDeque::new());
        self.runnable.push_back((delivery, Some(key)));
    }

    fn finished(&mut self, key: Option<u64>) {
        self.held = self.held.saturating_sub(1);
        if let Some(key) = key {
            match self.waiting.get_mut(&key).and_then(VecDeque::pop_front) {
                Some(next) => self.runnable.push_front((next, Some(key))),
                None => {
                    self.waiting.remove(&key);
                }
            }
        }
    }

    /// Gives back every delivery not yet started; dropping them returns them unacked.
    fn return_unstarted(&mut self) -> usize {
        let count = self.runnable.len() + self.waiting.values().map(VecDeque::len).sum::<usize>();
        self.runnable.clear();
        self.waiting.clear();
        count
    }
}

/// What the subscription's loop and its workers share: the deliveries not yet finished and
/// which workers wait for one.
#[derive(Default)]
struct Pool {
    dispatch: Dispatch,
    /// Workers waiting in their inbox.
    idle: Vec<usize>,
    /// Workers started (each is busy or idle).
    started: usize,
}

impl Pool {
    fn busy(&self) -> usize {
        self.started - self.idle.len()
    }
}

fn lock(pool: &Mutex<Pool>) -> MutexGuard<'_, Pool> {
    pool.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A delivery to handle, with its key's hash when ordered by key.
type Job = (Delivery, Option<u64>);

/// The handler tasks of one subscription: up to `concurrency` long-lived workers, started as
/// they are first needed, each handling one delivery at a time and still running on any of the
/// runtime's threads, so CPU-bound handlers keep their parallelism. A worker that finishes
/// takes the next runnable delivery itself, under the pool's lock; only an idle one is handed
/// a delivery, through its own inbox. Handing every delivery to a worker and hearing back from
/// it cost two channel messages and two task wake-ups per delivery; a task per delivery cost
/// about 3,000 instructions and an allocation.
struct Crew {
    tasks: JoinSet<()>,
    inboxes: Vec<mpsc::Sender<Job>>,
    pool: Arc<Mutex<Pool>>,
    /// Rung by a worker going idle, or taking the pool down to its refill mark.
    wake: Arc<Notify>,
    refill_at: usize,
}

impl Crew {
    /// Hands the runnable deliveries to idle workers, starting workers up to `concurrency`.
    fn start<E: Send + 'static>(&mut self, shared: &Arc<Shared<E>>, concurrency: usize) {
        let shared_pool = Arc::clone(&self.pool);
        let mut pool = lock(&shared_pool);
        while !pool.dispatch.runnable.is_empty() {
            let index = match pool.idle.pop() {
                Some(index) => index,
                None if pool.started < concurrency => {
                    let index = self.inboxes.len();
                    let inbox = self.spawn(shared, index);
                    self.inboxes.push(inbox);
                    pool.started += 1;
                    index
                }
                None => break,
            };
            let Some(job) = pool.dispatch.runnable.pop_front() else {
                pool.idle.push(index);
                break;
            };
            // The worker is idle, so its inbox is empty and takes the job. A worker never ends
            // while this loop runs (it catches what `process` throws); should one have, a new
            // one takes its place rather than the delivery and its key being lost.
            if let Err(error) = self.inboxes[index].try_send(job) {
                tracing::error!(topic = %shared.origin.topic, group = %shared.origin.group, "a handler worker was gone; starting another");
                let inbox = self.spawn(shared, index);
                self.inboxes[index] = inbox;
                if let Err(error) = self.inboxes[index].try_send(error.into_inner()) {
                    // Unreachable (a new inbox has room); the delivery returns unacked, and
                    // its key is free for the next.
                    let (_, key) = error.into_inner();
                    pool.dispatch.finished(key);
                    pool.idle.push(index);
                }
            }
        }
    }

    /// Starts worker `index`; returns its inbox.
    fn spawn<E: Send + 'static>(
        &mut self,
        shared: &Arc<Shared<E>>,
        index: usize,
    ) -> mpsc::Sender<Job> {
        let (inbox, jobs) = mpsc::channel(1);
        self.tasks.spawn(worker(
            index,
            Arc::clone(shared),
            jobs,
            Arc::clone(&self.pool),
            Arc::clone(&self.wake),
            self.refill_at,
        ));
        inbox
    }
}

/// One worker: handles what its inbox brings, then the runnable deliveries it finds in the
/// pool, one at a time, until none is left; then waits in its inbox again.
async fn worker<E: Send + 'static>(
    index: usize,
    shared: Arc<Shared<E>>,
    mut jobs: mpsc::Receiver<Job>,
    pool: Arc<Mutex<Pool>>,
    wake: Arc<Notify>,
    refill_at: usize,
) {
    while let Some(mut job) = jobs.recv().await {
        loop {
            let key = handle(&shared, job).await;
            let (next, ring) = {
                let mut pool = lock(&pool);
                pool.dispatch.finished(key);
                let next = pool.dispatch.runnable.pop_front();
                if next.is_none() {
                    pool.idle.push(index);
                }
                // The loop fetches more once the pool is down to its refill mark, not for
                // every delivery finished.
                (next, pool.dispatch.held == refill_at)
            };
            if next.is_none() || ring {
                wake.notify_one();
            }
            match next {
                Some(next) => job = next,
                None => break,
            }
        }
    }
}

/// Handles `job`; returns its key's hash, to free the key. A panic outside the handler (which
/// `process` catches itself) is a bug in busbar: it is logged, and the message returns unacked,
/// as a failed task's would.
async fn handle<E: Send + 'static>(shared: &Arc<Shared<E>>, job: Job) -> Option<u64> {
    let (delivery, key) = job;
    let handling = std::pin::pin!(process(Arc::clone(shared), delivery));
    if let Err(panic) = caught(handling).await {
        tracing::error!(topic = %shared.origin.topic, group = %shared.origin.group, panic = panic_text(panic.as_ref()), "handling failed; its message returns unacked");
    }
    key
}

/// `future`'s output, or the panic it threw, polling it where it is: `catch_unwind` on a future
/// taken by value moved the whole handling state of a delivery (about 2.5 KB) twice more.
async fn caught<F: Future>(mut future: Pin<&mut F>) -> std::thread::Result<F::Output> {
    std::future::poll_fn(|cx| {
        match std::panic::catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    })
    .await
}

pub(crate) async fn run<E: Send + 'static>(
    shared: Arc<Shared<E>>,
    stream: DeliveryStream,
    mut stop: watch::Receiver<Option<Instant>>,
    limits: Limits,
) -> ShutdownReport {
    let pool = Arc::new(Mutex::new(Pool::default()));
    let wake = Arc::new(Notify::new());
    let mut crew = Crew {
        tasks: JoinSet::new(),
        inboxes: Vec::new(),
        pool: Arc::clone(&pool),
        wake: Arc::clone(&wake),
        // A quarter of the in-flight limit below it: the loop tops the pool up in a batch.
        refill_at: limits
            .max_in_flight
            .saturating_sub(1 + limits.max_in_flight / 4),
    };
    let mut fetching = true;
    let mut deadline: Option<Instant> = None;
    let mut report = ShutdownReport::default();
    let mut stream = Some(stream);
    // At concurrency 1 the loop handles each delivery itself, between fetches: a worker task
    // has no parallelism to add there, only two task wake-ups per delivery, often on the other
    // thread.
    let inline = limits.concurrency == 1;
    let mut own = std::pin::pin!(None);

    loop {
        // What is ready is taken without a select each (about 1,000 instructions), under one
        // lock of the pool each, and the time of the last delivery read once for them all.
        let mut room = fetching && lock(&pool).dispatch.held < limits.max_in_flight;
        let mut took = false;
        while room {
            let Some(item) = stream.as_mut().and_then(|s| s.next().now_or_never()) else {
                break;
            };
            took |= matches!(item, Some(Ok(_)));
            let mut pool = lock(&pool);
            fetching = received(&shared, &mut pool.dispatch, item, limits.key_ordered);
            room = fetching && pool.dispatch.held < limits.max_in_flight;
        }
        if took {
            shared.counters.pulse.delivered();
        }
        if inline {
            if own.is_none() {
                let job = lock(&pool).dispatch.runnable.pop_front();
                if let Some(job) = job {
                    own.set(Some(handle(&shared, job)));
                }
            }
            // Polled here first: a handler that finishes without waiting costs no select.
            if let Some(key) = step(own.as_mut()).await {
                own.set(None);
                lock(&pool).dispatch.finished(key);
                // A stream that always has more, and handlers that never wait, would keep the
                // loop from ever giving its thread back, or reaching the select below that
                // hears a shutdown.
                tokio::task::coop::consume_budget().await;
                if !stop.has_changed().unwrap_or(true) {
                    continue;
                }
            }
        } else {
            crew.start(&shared, limits.concurrency);
        }
        let own_busy = usize::from(own.is_some());
        let (room, busy, held) = {
            let pool = lock(&pool);
            (
                pool.dispatch.held < limits.max_in_flight,
                pool.busy() + own_busy,
                pool.dispatch.held,
            )
        };
        if !fetching && busy == 0 && held == 0 {
            break;
        }
        tokio::select! {
            biased;
            changed = stop.changed(), if deadline.is_none() => {
                // A dropped handle (Err) stops at once, like a zero grace period.
                let until = match changed {
                    Ok(()) => stop.borrow().unwrap_or_else(Instant::now),
                    Err(_) => Instant::now(),
                };
                deadline = Some(until);
                fetching = false;
                // Stop the transport's consumer before giving back what was not started: a
                // consumer still running would fetch what is given back again.
                drop(stream.take());
                let mut pool = lock(&pool);
                report.returned = pool.dispatch.return_unstarted();
                // (Workers may have finished since `busy` was read.)
                let running = pool.busy() + own_busy;
                pool.dispatch.held = running;
                report.drained = running;
                tracing::debug!(topic = %shared.origin.topic, group = %shared.origin.group, running, "subscription shutting down");
            }
            key = finish(own.as_mut()), if own_busy == 1 => {
                own.set(None);
                lock(&pool).dispatch.finished(key);
            }
            () = wake.notified() => {}
            item = next_delivery(&mut stream), if fetching && room => {
                if let Some(Ok(_)) = item {
                    shared.counters.pulse.delivered();
                }
                fetching = received(&shared, &mut lock(&pool).dispatch, item, limits.key_ordered);
            }
            () = sleep_until_deadline(deadline), if deadline.is_some() => {
                let busy = lock(&pool).busy() + usize::from(own.is_some());
                report.abandoned = busy;
                report.drained = report.drained.saturating_sub(busy);
                break;
            }
        }
    }
    // Idle workers end when their inboxes close; busy ones (past the deadline) are aborted,
    // which drops their deliveries unacked, as does the loop's own.
    own.set(None);
    crew.inboxes.clear();
    crew.tasks.abort_all();
    while crew.tasks.join_next().await.is_some() {}
    drop(stream);
    report
}

/// Polls the loop's own handling, if there is one, once: its key's hash if it finished.
async fn step<F: Future<Output = Option<u64>>>(
    mut own: Pin<&mut Option<F>>,
) -> Option<Option<u64>> {
    std::future::poll_fn(|cx| {
        Poll::Ready(
            match own.as_mut().as_pin_mut().map(|handling| handling.poll(cx)) {
                Some(Poll::Ready(key)) => Some(key),
                _ => None,
            },
        )
    })
    .await
}

/// The loop's own handling, to its end: its key's hash.
async fn finish<F: Future<Output = Option<u64>>>(own: Pin<&mut Option<F>>) -> Option<u64> {
    match own.as_pin_mut() {
        Some(handling) => handling.await,
        None => std::future::pending().await,
    }
}

/// Takes what the transport's stream gave; returns whether to go on fetching. (The caller
/// stamps the time of the last delivery.)
fn received<E>(
    shared: &Shared<E>,
    dispatch: &mut Dispatch,
    item: Option<crate::Result<Delivery>>,
    key_ordered: bool,
) -> bool {
    match item {
        Some(Ok(delivery)) => {
            Counters::bump(&shared.counters.received);
            shared.metrics.consumed.increment(1);
            dispatch.receive(delivery, key_ordered);
        }
        Some(Err(e)) => {
            Counters::bump(&shared.counters.transport_errors);
            shared.counters.pulse.failed(&e);
            tracing::warn!(topic = %shared.origin.topic, group = %shared.origin.group, error = %e, "transport reported a consume error");
        }
        None => {
            tracing::debug!(topic = %shared.origin.topic, group = %shared.origin.group, "delivery stream ended");
            return false;
        }
    }
    true
}

async fn next_delivery(stream: &mut Option<DeliveryStream>) -> Option<crate::Result<Delivery>> {
    match stream {
        Some(stream) => stream.next().await,
        None => None,
    }
}

async fn sleep_until_deadline(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Why a received message is too large to handle, if it is: one larger than the transport
/// publishes (only a foreign producer can send it) could not be republished by busbar (a
/// handler's forward, a redrive), so it goes to the dead-letter queue at once, saying why.
fn oversize<E>(shared: &Shared<E>, message: &crate::Message) -> Option<String> {
    let max = shared.max_message_bytes?;
    let size = message.wire_size();
    (size > max).then(|| {
        format!(
            "message is {size} bytes, more than the {max} the {} transport carries; busbar does not handle it",
            shared.system
        )
    })
}

enum Outcome {
    Handled,
    Failed { permanent: bool, error: String },
}

async fn process<E: Send + 'static>(shared: Arc<Shared<E>>, delivery: Delivery) {
    let message = delivery.shared_message();
    let attempt = shared.attempt(&message.id, delivery.attempt());
    // The consume span, the child of the message's trace; current while the `tracing` span
    // below is made (when a subscriber takes spans at all), so that a `tracing-opentelemetry`
    // bridge makes that one its child.
    #[cfg(feature = "otel")]
    let trace = shared.spans.start(&message, attempt);
    #[cfg(feature = "otel")]
    let current = trace
        .as_ref()
        .filter(|_| tracing::enabled!(kind: tracing::metadata::Kind::SPAN, tracing::Level::INFO))
        .map(|context| context.clone().attach());
    // Every field is known here (a structured-mode event's, below, once decoded): recording
    // one later costs a subscriber's look-up each.
    let span = tracing::info_span!(
        "busbar.process",
        messaging.system = shared.system,
        messaging.operation.type = "process",
        messaging.destination.name = shared.origin.topic.as_str(),
        messaging.consumer.group.name = shared.origin.group.as_str(),
        messaging.message.id = message.id.as_str(),
        messaging.message.conversation_id = message
            .header(attr::CORRELATION_ID)
            .or_else(|| message.header(attr::ID))
            .unwrap_or(message.id.as_str()),
        busbar.causation_id = message.header(attr::CAUSATION_ID),
        busbar.event_type = message.header(attr::TYPE).unwrap_or_default(),
        busbar.attempt = attempt,
    );
    #[cfg(feature = "otel")]
    drop(current);
    // Made where it is pinned: made first and pinned after, it was a second 2.3 KB in this
    // future's state, copied into the first on every message.
    let mut handling = std::pin::pin!(async move {
        let _in_flight = InFlight::start(&shared.metrics.in_flight);
        if let Some(error) = oversize(&shared, &message) {
            tracing::warn!(%error, "oversize message; dead-lettering it");
            dead_letter(
                &shared,
                delivery,
                attempt,
                DeadLetterReason::Undecodable,
                error,
            )
            .await;
            return;
        }
        // A structured-mode CloudEvent is read into the binary form once, here, so the
        // decoder and the handler's context see the same attributes. (The envelope is not
        // passed through a tuple or a closure's result: each move of it is a copy of ~650
        // bytes.)
        let (message, structured) = match crate::structured::from_structured(&message) {
            Ok(Some(binary)) => (Arc::new(binary), true),
            Ok(None) => (message, false),
            Err(error) => return undecodable(&shared, delivery, attempt, &error).await,
        };
        let envelope = match shared.decoder.decode(&message) {
            Ok(envelope) => envelope,
            Err(Undecoded::Invalid(error)) => {
                return undecodable(&shared, delivery, attempt, &error).await
            }
            Err(Undecoded::UnknownType(event_type)) => {
                unknown_type(&shared, delivery, attempt, &event_type).await;
                return;
            }
        };
        if structured {
            // Its attributes were in its body: the span learns them now.
            let span = tracing::Span::current();
            span.record(
                "messaging.message.conversation_id",
                envelope.conversation_id(),
            );
            span.record("busbar.causation_id", envelope.causation_id.as_deref());
        }

        // The decoded type, looked up once for the duration and the outcome's counts.
        let of = shared.metrics.of(Some(envelope.event_type.as_str()));
        let mut lease = None;
        if let Some(idempotency) = &shared.idempotency {
            let key = idempotency
                .key
                .as_ref()
                .map_or_else(|| envelope.id.to_string(), |key| key(&envelope));
            match idempotency
                .store
                .claim(&shared.origin.group, &key, idempotency.lease)
                .await
            {
                Ok(Claim::Acquired(granted)) => lease = Some((key, granted)),
                Ok(Claim::Done) => {
                    tracing::debug!(idempotency_key = %key, "already handled; skipping duplicate");
                    shared.tally(Tally::Duplicate, &message);
                    shared.forget_waits(&message.id);
                    settle("ack", delivery.ack().await);
                    return;
                }
                Ok(Claim::Busy { retry_after }) => {
                    // Another consumer is handling it right now; not a failure of ours, so it
                    // is never dead-lettered for it. Look again on the retry schedule (the holder
                    // usually finishes long before its lease expires), at the latest at expiry.
                    let wait = shared
                        .retry
                        .backoff(attempt)
                        .min(retry_after)
                        .max(Duration::from_millis(1));
                    tracing::debug!(idempotency_key = %key, ?wait, "claimed elsewhere; looking again later");
                    shared.waited_busy(&message.id);
                    settle("nack", delivery.nack(wait).await);
                    return;
                }
                Err(error) => {
                    let outcome = Outcome::Failed {
                        permanent: false,
                        error: format!("idempotency store: {error}"),
                    };
                    conclude(&shared, delivery, attempt, outcome, of).await;
                    return;
                }
            }
        }

        let intercepted = shared.bus.interceptor().and_then(|i| {
            i.before_handle(
                &shared.origin.topic,
                &shared.origin.group,
                &message,
                attempt,
            )
        });
        let context = Context::new(
            shared.bus.clone(),
            &shared.origin,
            Arc::clone(&message),
            attempt,
        );
        let outcome = match intercepted {
            Some(error) => Outcome::Failed {
                permanent: error.is_permanent(),
                error: error.to_string(),
            },
            None => {
                let started = std::time::Instant::now();
                // Called here, not in an `async fn` taking the envelope: its future would
                // hold a copy of it, moved again into this one's state.
                let handling = AssertUnwindSafe(shared.handler.handle(envelope, context));
                let outcome = outcome(&shared, handling.catch_unwind().await);
                of.duration.record(started.elapsed().as_secs_f64());
                outcome
            }
        };

        if let (Some(idempotency), Some((key, granted))) = (&shared.idempotency, &lease) {
            release_or_complete(idempotency, &shared.origin.group, key, granted, &outcome).await;
        }
        conclude(&shared, delivery, attempt, outcome, of).await;
    });
    // Polled in place with the `tracing` span entered and, inside it, the consume span's
    // context current (what the handler publishes is its child, and a failure is marked on
    // it): `Instrumented` and `WithContext` took the handling state (about 2 KB) by value, a
    // copy each.
    std::future::poll_fn(|cx| {
        let _entered = span.enter();
        #[cfg(feature = "otel")]
        let _attached = trace.as_ref().map(|context| context.clone().attach());
        handling.as_mut().poll(cx)
    })
    .await;
    #[cfg(feature = "otel")]
    if let Some(trace) = trace {
        use opentelemetry::trace::TraceContextExt as _;
        let span = trace.span();
        if span.is_recording() {
            span.end();
        }
    }
}

/// A message that is not a readable CloudEvent, or whose payload does not fit its type: to the
/// dead-letter queue, saying why.
async fn undecodable<E>(
    shared: &Shared<E>,
    delivery: Delivery,
    attempt: u32,
    error: &crate::Error,
) {
    tracing::warn!(%error, "undecodable message; dead-lettering it");
    let reason = DeadLetterReason::Undecodable;
    dead_letter(shared, delivery, attempt, reason, error.to_string()).await;
}

/// A message of a type the subscription does not handle: dead-lettered or skipped, as the
/// subscription's policy says; never handed to a handler.
async fn unknown_type<E>(shared: &Shared<E>, delivery: Delivery, attempt: u32, event_type: &str) {
    match shared.unknown_types {
        UnknownTypes::DeadLetter => {
            let error = unknown_type_error(delivery.message(), event_type, &shared.event_types);
            tracing::warn!(%error, "unknown event type; dead-lettering it");
            dead_letter(
                shared,
                delivery,
                attempt,
                DeadLetterReason::UnknownType,
                error.to_string(),
            )
            .await;
        }
        UnknownTypes::Skip => {
            tracing::debug!(event_type, "unknown event type; skipping it");
            shared.forget_waits(&delivery.message().id);
            shared.tally(Tally::UnknownType, delivery.message());
            settle("ack", delivery.ack().await);
        }
    }
}

/// What the handler's result (or its panic) means for the delivery.
fn outcome<E>(
    shared: &Shared<E>,
    handled: std::thread::Result<Result<(), super::HandlerError>>,
) -> Outcome {
    match handled {
        Ok(Ok(())) => Outcome::Handled,
        Ok(Err(error)) => Outcome::Failed {
            permanent: error.is_permanent(),
            error: error.to_string(),
        },
        Err(panic) => {
            Counters::bump(&shared.counters.panics);
            Outcome::Failed {
                permanent: false,
                error: format!("handler panicked: {}", panic_text(panic.as_ref())),
            }
        }
    }
}

async fn release_or_complete<E>(
    idempotency: &Idempotency<E>,
    group: &str,
    key: &str,
    lease: &Lease,
    outcome: &Outcome,
) {
    let result = match outcome {
        Outcome::Handled => {
            idempotency
                .store
                .complete(group, key, lease, idempotency.retention)
                .await
        }
        Outcome::Failed { .. } => idempotency.store.release(group, key, lease).await,
    };
    if let Err(error) = result {
        // The effect already happened (or failed); acking is still right. A lost lease means
        // another consumer may handle the message too: the lease was shorter than the handler.
        tracing::warn!(idempotency_key = %key, %error, "idempotency store could not record the outcome");
    }
}

async fn conclude<E>(
    shared: &Shared<E>,
    delivery: Delivery,
    attempt: u32,
    outcome: Outcome,
    of: &TypeMetrics,
) {
    match outcome {
        Outcome::Handled => {
            shared.forget_waits(&delivery.message().id);
            shared.tally_as(Tally::Handled, of);
            settle("ack", delivery.ack().await);
        }
        Outcome::Failed { permanent, error } => {
            shared.tally_as(Tally::FailedAttempt, of);
            if permanent {
                tracing::warn!(%error, "permanent failure; dead-lettering");
                dead_letter(
                    shared,
                    delivery,
                    attempt,
                    DeadLetterReason::Permanent,
                    error,
                )
                .await;
            } else if shared.retry.should_retry(attempt) {
                let wait = shared.retry.backoff(attempt);
                tracing::info!(%error, ?wait, "handler failed; will retry");
                // (A failure that dead-letters is marked by `dead_letter`.)
                #[cfg(feature = "otel")]
                crate::otel::failed(&error);
                shared.tally_as(Tally::Retried, of);
                settle("nack", delivery.nack(wait).await);
            } else {
                tracing::warn!(%error, attempt, "attempts exhausted; dead-lettering");
                dead_letter(
                    shared,
                    delivery,
                    attempt,
                    DeadLetterReason::RetriesExhausted,
                    error,
                )
                .await;
            }
        }
    }
}

async fn dead_letter<E>(
    shared: &Shared<E>,
    delivery: Delivery,
    attempt: u32,
    reason: DeadLetterReason,
    error: String,
) {
    #[cfg(feature = "otel")]
    crate::otel::failed(&error);
    shared.forget_waits(&delivery.message().id);
    let message = delivery.shared_message();
    let info = DeadLetterInfo::new(
        reason,
        error,
        attempt,
        &shared.origin.topic,
        &shared.origin.group,
    );
    match delivery.dead_letter(&info).await {
        Ok(()) => shared.tally(Tally::DeadLettered, &message),
        Err(e) => {
            tracing::error!(error = %e, "could not dead-letter; the message will be delivered again")
        }
    }
}

fn settle(what: &str, result: crate::Result<()>) {
    if let Err(error) = result {
        tracing::error!(%error, "could not {what}; the broker will deliver the message again");
    }
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic payload".to_string())
}
