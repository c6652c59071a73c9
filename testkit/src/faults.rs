//! Fault injection: a transport decorator that records what is published and can fail handler
//! calls, duplicate and delay deliveries, drop acks and reject publishes.
//!
//! It wraps any [`Transport`], so the same faults run on memory in unit tests and on real
//! brokers in the conformance suite.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use busbar_core::{
    Acknowledger, Capabilities, ConsumeOptions, DeadLetter, DeadLetterInfo, Delivery,
    DeliveryStream, Error, ErrorKind, HandlerError, Interceptor, Message, RedriveSelection, Result,
    Transport,
};
use futures::StreamExt;

use crate::conformance::lock;

type Route = (String, String);

fn route(topic: &str, group: &str) -> Route {
    (topic.to_string(), group.to_string())
}

/// How the deliveries of one (topic, group) were settled, as seen on the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SettleCounts {
    /// Deliveries acked (handled, or skipped as already handled).
    pub acked: u64,
    /// Deliveries nacked for a later retry.
    pub nacked: u64,
    /// Deliveries dead-lettered.
    pub dead_lettered: u64,
    /// Deliveries dropped unsettled (abandoned, or their ack dropped by a fault).
    pub abandoned: u64,
}

#[derive(Default)]
struct Plan {
    fail_handler: HashMap<Route, (u32, bool)>,
    duplicate_every: HashMap<Route, (u64, u64)>,
    delay: HashMap<Route, Duration>,
    drop_acks: HashMap<Route, u32>,
    reject_publishes: Option<u32>,
}

/// The shared switchboard of a [`FaultyTransport`]: set faults, read what happened.
///
/// [`TestBus::faults`](crate::TestBus::faults) gives the one of a test bus:
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap().block_on(async {
/// use serde::{Deserialize, Serialize};
/// use busbar_core::{Context, Envelope, Event};
/// use busbar_testkit::TestBus;
///
/// #[derive(Serialize, Deserialize)]
/// struct Charge { cents: u64 }
/// impl Event for Charge { const TYPE: &'static str = "pay.charge.v1"; }
///
/// let bus = TestBus::new();
/// let _payments = bus
///     .subscribe::<Charge>("charges", "payments")
///     .start(|_: Envelope<Charge>, _: Context| async { Ok(()) })
///     .await?;
/// bus.faults().fail_next_handler_calls("charges", "payments", 2); // a flaky provider
/// bus.faults().duplicate_every("charges", "payments", 1);          // a broker that repeats
/// bus.publish("charges", Charge { cents: 500 }).await?;
/// bus.run_until_idle().await;
///
/// let settled = bus.faults().settled("charges", "payments");
/// assert_eq!(settled.nacked, 2); // two failed attempts, retried
/// assert_eq!(settled.acked, 2); // then handled, and its duplicate too (no idempotency store)
/// # Ok::<(), busbar_core::Error>(())
/// # }).unwrap();
/// ```
#[derive(Default)]
pub struct Faults {
    plan: Mutex<Plan>,
    published: Mutex<Vec<Message>>,
    settled: Mutex<HashMap<Route, SettleCounts>>,
    consumers: Mutex<HashMap<Route, usize>>,
    outstanding: AtomicUsize,
}

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Faults")
            .field("published", &lock(&self.published).len())
            .field("outstanding", &self.outstanding.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

impl Faults {
    /// Fails the next `n` handler calls of (`topic`, `group`) with a transient error.
    pub fn fail_next_handler_calls(&self, topic: &str, group: &str, n: u32) {
        lock(&self.plan)
            .fail_handler
            .insert(route(topic, group), (n, false));
    }

    /// Fails the next `n` handler calls of (`topic`, `group`) with a permanent error.
    pub fn fail_next_handler_calls_permanently(&self, topic: &str, group: &str, n: u32) {
        lock(&self.plan)
            .fail_handler
            .insert(route(topic, group), (n, true));
    }

    /// Delivers every `k`-th message of (`topic`, `group`) twice, as a broker with
    /// at-least-once delivery may. `k` = 1 duplicates everything; 0 turns it off.
    pub fn duplicate_every(&self, topic: &str, group: &str, k: u64) {
        let mut plan = lock(&self.plan);
        if k == 0 {
            plan.duplicate_every.remove(&route(topic, group));
        } else {
            plan.duplicate_every.insert(route(topic, group), (k, 0));
        }
    }

    /// Holds every delivery of (`topic`, `group`) back for `delay` before handing it out.
    pub fn delay_deliveries(&self, topic: &str, group: &str, delay: Duration) {
        lock(&self.plan).delay.insert(route(topic, group), delay);
    }

    /// Drops the next `n` acks of (`topic`, `group`): the handler succeeded but the ack never
    /// reaches the broker, as when a consumer crashes right after handling. The broker must
    /// deliver the message again.
    pub fn drop_next_acks(&self, topic: &str, group: &str, n: u32) {
        lock(&self.plan).drop_acks.insert(route(topic, group), n);
    }

    /// Rejects the next `n` publish calls with a retryable connection error.
    pub fn reject_publishes(&self, n: u32) {
        lock(&self.plan).reject_publishes = Some(n);
    }

    /// Removes every fault.
    pub fn clear(&self) {
        *lock(&self.plan) = Plan::default();
    }

    /// Every message published successfully through the decorator, in order.
    pub fn published(&self) -> Vec<Message> {
        lock(&self.published).clone()
    }

    /// How the deliveries of (`topic`, `group`) were settled so far.
    pub fn settled(&self, topic: &str, group: &str) -> SettleCounts {
        lock(&self.settled)
            .get(&route(topic, group))
            .copied()
            .unwrap_or_default()
    }

    /// The (topic, group) pairs with at least one open delivery stream.
    pub fn consumed_routes(&self) -> Vec<(String, String)> {
        lock(&self.consumers)
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(r, _)| r.clone())
            .collect()
    }

    /// Deliveries handed out (duplicates included) and not yet settled or dropped.
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::SeqCst)
    }

    fn count(&self, route: &Route, bump: impl FnOnce(&mut SettleCounts)) {
        bump(lock(&self.settled).entry(route.clone()).or_default());
    }

    fn take_one(map: &mut HashMap<Route, u32>, route: &Route) -> bool {
        match map.get_mut(route) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }
}

impl Interceptor for Faults {
    fn before_handle(
        &self,
        topic: &str,
        group: &str,
        _message: &Message,
        attempt: u32,
    ) -> Option<HandlerError> {
        let mut plan = lock(&self.plan);
        let (remaining, permanent) = plan.fail_handler.get_mut(&route(topic, group))?;
        if *remaining == 0 {
            return None;
        }
        *remaining -= 1;
        let text = format!("injected failure (attempt {attempt})");
        Some(if *permanent {
            HandlerError::permanent(text)
        } else {
            HandlerError::transient(text)
        })
    }
}

/// A [`Transport`] decorator that records publishes and injects the faults set on its
/// [`Faults`].
#[derive(Debug, Clone)]
pub struct FaultyTransport {
    inner: Arc<dyn Transport>,
    faults: Arc<Faults>,
}

impl FaultyTransport {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Transport>) -> Self {
        FaultyTransport {
            inner,
            faults: Arc::default(),
        }
    }

    /// The switchboard; also the [`Interceptor`] to give the bus for handler faults.
    pub fn faults(&self) -> &Arc<Faults> {
        &self.faults
    }

    /// The wrapped transport.
    pub fn inner(&self) -> &Arc<dyn Transport> {
        &self.inner
    }
}

/// Keeps a route's consumer count while a stream is open.
struct ConsumerGuard {
    faults: Arc<Faults>,
    route: Route,
}

impl Drop for ConsumerGuard {
    fn drop(&mut self) {
        if let Some(n) = lock(&self.faults.consumers).get_mut(&self.route) {
            *n = n.saturating_sub(1);
        }
    }
}

#[async_trait]
impl Transport for FaultyTransport {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn publish(&self, messages: Vec<Message>) -> Result<()> {
        {
            let mut plan = lock(&self.faults.plan);
            if let Some(n) = plan.reject_publishes.as_mut() {
                if *n > 0 {
                    *n -= 1;
                    return Err(Error::new(
                        ErrorKind::Connection,
                        "publish",
                        "injected fault: the broker rejected the publish",
                    ));
                }
            }
        }
        self.inner.publish(messages.clone()).await?;
        lock(&self.faults.published).extend(messages);
        Ok(())
    }

    async fn declare(&self, topic: &str, group: &str) -> Result<()> {
        self.inner.declare(topic, group).await
    }

    async fn consume(
        &self,
        topic: &str,
        group: &str,
        options: ConsumeOptions,
    ) -> Result<DeliveryStream> {
        let stream = self.inner.consume(topic, group, options).await?;
        let route = route(topic, group);
        *lock(&self.faults.consumers)
            .entry(route.clone())
            .or_default() += 1;
        let guard = Arc::new(ConsumerGuard {
            faults: Arc::clone(&self.faults),
            route: route.clone(),
        });
        let faults = Arc::clone(&self.faults);
        let stream = stream
            .then(move |item| {
                let (faults, route, guard) =
                    (Arc::clone(&faults), route.clone(), Arc::clone(&guard));
                async move {
                    let _open = guard;
                    let delivery = match item {
                        Ok(delivery) => delivery,
                        Err(e) => return vec![Err(e)],
                    };
                    let delay = lock(&faults.plan).delay.get(&route).copied();
                    if let Some(delay) = delay {
                        tokio::time::sleep(delay).await;
                    }
                    let duplicate = {
                        let mut plan = lock(&faults.plan);
                        match plan.duplicate_every.get_mut(&route) {
                            Some((k, seen)) => {
                                *seen += 1;
                                *seen % *k == 0
                            }
                            None => false,
                        }
                    };
                    let (message, attempt, acker) = delivery.into_parts();
                    let mut out = vec![Ok(wrap(
                        &faults,
                        &route,
                        Arc::clone(&message),
                        attempt,
                        Some(acker),
                    ))];
                    if duplicate {
                        out.push(Ok(wrap(&faults, &route, message, attempt, None)));
                    }
                    out
                }
            })
            .flat_map(futures::stream::iter);
        Ok(Box::pin(stream))
    }

    async fn dead_letters(
        &self,
        topic: &str,
        group: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        self.inner.dead_letters(topic, group, limit).await
    }

    async fn redrive(
        &self,
        topic: &str,
        group: &str,
        selection: RedriveSelection,
    ) -> Result<usize> {
        self.inner.redrive(topic, group, selection).await
    }

    async fn purge_dead_letters(
        &self,
        topic: &str,
        group: &str,
        selection: RedriveSelection,
    ) -> Result<usize> {
        self.inner.purge_dead_letters(topic, group, selection).await
    }

    async fn delete_group(&self, topic: &str, group: &str) -> Result<()> {
        self.inner.delete_group(topic, group).await
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

fn wrap(
    faults: &Arc<Faults>,
    route: &Route,
    message: Arc<Message>,
    attempt: u32,
    inner: Option<Box<dyn Acknowledger>>,
) -> Delivery {
    faults.outstanding.fetch_add(1, Ordering::SeqCst);
    Delivery::new(
        message,
        attempt,
        Box::new(FaultyAck {
            faults: Arc::clone(faults),
            route: route.clone(),
            inner,
            settled: false,
        }),
    )
}

/// Wraps the real acknowledger; `inner: None` marks a duplicate whose settlement is a no-op
/// (the original delivery settles the message with the broker).
struct FaultyAck {
    faults: Arc<Faults>,
    route: Route,
    inner: Option<Box<dyn Acknowledger>>,
    settled: bool,
}

impl FaultyAck {
    fn finish(&mut self, bump: impl FnOnce(&mut SettleCounts)) {
        self.settled = true;
        self.faults.count(&self.route, bump);
        self.faults.outstanding.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl Acknowledger for FaultyAck {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        let drop_it = Faults::take_one(&mut lock(&self.faults.plan).drop_acks, &self.route);
        if drop_it {
            // The ack is lost: drop the real acknowledger unsettled, so the broker redelivers.
            self.finish(|c| c.abandoned += 1);
            drop(self.inner.take());
            return Ok(());
        }
        self.finish(|c| c.acked += 1);
        match self.inner.take() {
            Some(inner) => inner.ack().await,
            None => Ok(()),
        }
    }

    async fn nack(mut self: Box<Self>, delay: Duration) -> Result<()> {
        self.finish(|c| c.nacked += 1);
        match self.inner.take() {
            Some(inner) => inner.nack(delay).await,
            None => Ok(()),
        }
    }

    async fn dead_letter(
        mut self: Box<Self>,
        message: &Message,
        info: &DeadLetterInfo,
    ) -> Result<()> {
        self.finish(|c| c.dead_lettered += 1);
        match self.inner.take() {
            Some(inner) => inner.dead_letter(message, info).await,
            None => Ok(()),
        }
    }
}

impl Drop for FaultyAck {
    fn drop(&mut self) {
        if !self.settled {
            self.finish(|c| c.abandoned += 1);
        }
    }
}
