//! [`TestBus`]: a bus for unit tests, on the memory transport, with a record of everything
//! published, typed assertions, fault injection and [`TestBus::run_until_idle`].

use std::fmt::Write as _;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use busbar_core::codec::Json;
use busbar_core::envelope::attr;
use busbar_core::Text;
use busbar_core::{Bus, Envelope, Event, MemoryTransport, Message, RetryPolicy};

use crate::faults::{Faults, FaultyTransport, SettleCounts};

/// A [`Bus`] for tests: the memory transport plus a record of every publish, typed assertions,
/// fault injection and a way to run every started subscription until nothing is left to do.
///
/// It dereferences to [`Bus`], so the code under test takes `&test_bus` wherever it takes a
/// `&Bus`. Works with tokio's paused clock (`#[tokio::test(start_paused = true)]`): retry
/// backoff then costs no real time.
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Serialize, Deserialize)] struct OrderPlaced { id: u32 }
/// # impl busbar_core::Event for OrderPlaced { const TYPE: &'static str = "shop.order_placed.v1"; }
/// # #[derive(Serialize, Deserialize)] struct Invoiced { id: u32 }
/// # impl busbar_core::Event for Invoiced { const TYPE: &'static str = "shop.invoiced.v1"; }
/// # tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap().block_on(async {
/// use busbar_core::{Context, Envelope};
/// use busbar_testkit::TestBus;
///
/// let bus = TestBus::new();
/// let _billing = bus
///     .subscribe::<OrderPlaced>("orders", "billing")
///     .start(|order: Envelope<OrderPlaced>, ctx: Context| async move {
///         ctx.publish("invoices", Invoiced { id: order.payload.id }).await?;
///         Ok(())
///     })
///     .await
///     .unwrap();
///
/// let id = bus.publish("orders", OrderPlaced { id: 7 }).await.unwrap();
/// bus.run_until_idle().await;
///
/// let invoice = bus.assert_published_one::<Invoiced>();
/// assert_eq!(invoice.payload.id, 7);
/// assert_eq!(invoice.causation_id.as_deref(), Some(id.as_str()));
/// assert_eq!(bus.settled("orders", "billing").acked, 1);
/// # });
/// ```
pub struct TestBus {
    bus: Bus,
    memory: MemoryTransport,
    transport: FaultyTransport,
}

impl Deref for TestBus {
    type Target = Bus;
    fn deref(&self) -> &Bus {
        &self.bus
    }
}

impl Default for TestBus {
    fn default() -> Self {
        TestBus::new()
    }
}

impl std::fmt::Debug for TestBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestBus")
            .field("published", &self.transport.faults().published().len())
            .finish_non_exhaustive()
    }
}

/// How long [`TestBus::run_until_idle`] waits before it fails the test.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

impl TestBus {
    /// A test bus with source `/test` and a quick retry policy (5 attempts, 10 ms → 1 s).
    pub fn new() -> Self {
        TestBus::with_retry(
            RetryPolicy::exponential(5)
                .with_initial_backoff(Duration::from_millis(10))
                .with_max_backoff(Duration::from_secs(1)),
        )
    }

    /// A test bus whose subscriptions default to `retry`.
    pub fn with_retry(retry: RetryPolicy) -> Self {
        let memory = MemoryTransport::new();
        let transport = FaultyTransport::new(Arc::new(memory.clone()));
        let bus = Bus::builder(Arc::new(transport.clone()))
            .source("/test")
            .retry(retry)
            .interceptor(transport.faults().clone())
            .build();
        TestBus {
            bus,
            memory,
            transport,
        }
    }

    /// The bus itself, for code that wants a `Bus` value (clones share everything).
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// The fault switchboard: fail handler calls, duplicate, delay, drop acks, reject publishes.
    pub fn faults(&self) -> &Faults {
        self.transport.faults()
    }

    /// The memory transport underneath.
    pub fn memory(&self) -> &MemoryTransport {
        &self.memory
    }

    /// Every message published so far (by the test and by handlers), in order.
    pub fn published_messages(&self) -> Vec<Message> {
        self.faults().published()
    }

    /// Every published event of type `E`, decoded, in publish order.
    ///
    /// Panics if a message claims type `E` but does not decode: that is a bug in the test or
    /// the code under test, and the message says which field is wrong.
    pub fn published<E: Event>(&self) -> Vec<Envelope<E>> {
        self.published_messages()
            .iter()
            .filter(|m| m.header(attr::TYPE) == Some(E::TYPE))
            .map(|m| match Envelope::<E>::from_message(&Json, m) {
                Ok(envelope) => envelope,
                Err(e) => panic!("a published {} does not decode: {e}", E::TYPE),
            })
            .collect()
    }

    /// Published events of type `E` on `topic`.
    pub fn published_on<E: Event>(&self, topic: &str) -> Vec<Envelope<E>> {
        let ids: Vec<Text> = self
            .published_messages()
            .into_iter()
            .filter(|m| m.topic == topic)
            .map(|m| m.id)
            .collect();
        self.published::<E>()
            .into_iter()
            .filter(|e| ids.contains(&e.id))
            .collect()
    }

    /// Published events of type `E` that belong to the conversation `correlation_id`.
    pub fn published_in_conversation<E: Event>(&self, correlation_id: &str) -> Vec<Envelope<E>> {
        self.published::<E>()
            .into_iter()
            .filter(|e| e.correlation_id.as_deref() == Some(correlation_id))
            .collect()
    }

    /// Asserts exactly `count` events of type `E` were published and returns them. On failure
    /// the panic lists everything that was published instead.
    #[track_caller]
    pub fn assert_published<E: Event>(&self, count: usize) -> Vec<Envelope<E>> {
        let found = self.published::<E>();
        if found.len() != count {
            panic!(
                "expected {count} published {} event(s), found {}.\n{}",
                E::TYPE,
                found.len(),
                self.describe_published()
            );
        }
        found
    }

    /// Asserts exactly one event of type `E` was published and returns it.
    #[track_caller]
    pub fn assert_published_one<E: Event>(&self) -> Envelope<E> {
        let mut found = self.assert_published::<E>(1);
        found.remove(0)
    }

    /// Asserts some published `E` satisfies `predicate` and returns the first that does.
    #[track_caller]
    pub fn assert_published_matching<E: Event>(
        &self,
        predicate: impl Fn(&Envelope<E>) -> bool,
    ) -> Envelope<E> {
        match self.published::<E>().into_iter().find(|e| predicate(e)) {
            Some(envelope) => envelope,
            None => panic!(
                "no published {} event matches the predicate.\n{}",
                E::TYPE,
                self.describe_published()
            ),
        }
    }

    /// Asserts no event of type `E` was published.
    #[track_caller]
    pub fn assert_not_published<E: Event>(&self) {
        self.assert_published::<E>(0);
    }

    /// How deliveries of (`topic`, `group`) were settled: acked, nacked, dead-lettered,
    /// abandoned.
    pub fn settled(&self, topic: &str, group: &str) -> SettleCounts {
        self.faults().settled(topic, group)
    }

    /// A table of every published message: topic, type, id, correlation.
    pub fn describe_published(&self) -> String {
        let published = self.published_messages();
        let mut out = format!("published so far ({}):", published.len());
        if published.is_empty() {
            out.push_str(" nothing");
        }
        for m in &published {
            let _ = write!(
                out,
                "\n  topic {:<24} type {:<32} id {} correlation {}",
                m.topic,
                m.header(attr::TYPE).unwrap_or("<none>"),
                m.id,
                m.header(attr::CORRELATION_ID).unwrap_or("<none>"),
            );
        }
        out
    }

    /// Whether every subscription started on this bus has nothing left to do: no unsettled
    /// message in any consumed group (retries waiting for their delay included) and no delivery
    /// in a handler.
    pub fn is_idle(&self) -> bool {
        self.faults().outstanding() == 0
            && self
                .faults()
                .consumed_routes()
                .iter()
                .all(|(topic, group)| self.memory.pending(topic, group) == 0)
    }

    /// Waits until [`is_idle`](Self::is_idle): every chain of handlers ran to completion,
    /// retries and dead-lettering included. Groups without a running subscription are not
    /// waited for. Panics after [`IDLE_TIMEOUT`] naming the groups still busy.
    pub async fn run_until_idle(&self) {
        self.run_until_idle_within(IDLE_TIMEOUT).await;
    }

    /// [`run_until_idle`](Self::run_until_idle) with a custom deadline.
    pub async fn run_until_idle_within(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        // Let freshly started subscriptions and spawned handlers get going first.
        tokio::task::yield_now().await;
        while !self.is_idle() {
            if tokio::time::Instant::now() >= deadline {
                let busy: Vec<String> = self
                    .faults()
                    .consumed_routes()
                    .iter()
                    .filter(|(t, g)| self.memory.pending(t, g) > 0)
                    .map(|(t, g)| format!("{t}/{g}: {} unsettled", self.memory.pending(t, g)))
                    .collect();
                panic!(
                    "not idle after {within:?}: {} deliveries in handlers; {}",
                    self.faults().outstanding(),
                    if busy.is_empty() {
                        "no queue busy".to_string()
                    } else {
                        busy.join(", ")
                    }
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}
