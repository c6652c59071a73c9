//! The conformance suite: one set of scenarios every transport must pass.
//!
//! Each scenario is a plain async function taking a [`Harness`] (a transport factory). It runs
//! on fresh random topic and group names, and only where the transport claims the capability it
//! checks. "Nothing lost" and "nothing duplicated" are separate assertions; the latter is relaxed
//! only where [`Capabilities::may_duplicate`] says the broker may redeliver on its own.
//!
//! An adapter runs the whole suite with one macro call in a test file; each scenario becomes
//! a named `#[tokio::test]`, so a failure names the guarantee that broke:
//!
//! ```no_run
//! // In an adapter's tests/conformance.rs; the memory transport stands in for the adapter's.
//! async fn transport() -> busbar_core::Result<std::sync::Arc<dyn busbar_core::Transport>> {
//!     Ok(std::sync::Arc::new(busbar_core::memory::MemoryTransport::new()))
//! }
//! busbar_testkit::conformance_suite!(transport);
//! # fn main() {}
//! ```
//!
//! The factory is called once or more per scenario; every transport it returns must reach the
//! same broker (two service instances). When it fails (broker unreachable), the scenario is
//! skipped with a message on stderr, unless `CI=true` or `BUSBAR_REQUIRE_BROKERS=1`, where it
//! fails. The test crate needs `tokio` (with `macros` and `rt-multi-thread`) as a dependency.

mod churn;
mod delivery;
mod envelope;
mod failure;
mod lifecycle;
mod order;
mod routing;

pub use churn::*;
pub use delivery::*;
pub use envelope::*;
pub use failure::*;
pub use lifecycle::*;
pub use order::*;
pub use routing::*;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use busbar_core::Text;
use busbar_core::{
    Bus, Capabilities, Context, Envelope, Event, HandlerError, Result, RetryPolicy, Transport,
};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

type Factory = Arc<dyn Fn() -> BoxFuture<'static, Result<Arc<dyn Transport>>> + Send + Sync>;

/// A transport factory plus the suite's settings.
#[derive(Clone)]
pub struct Harness {
    factory: Factory,
}

impl Harness {
    /// A harness over `factory`.
    pub fn new<F, Fut>(factory: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Arc<dyn Transport>>> + Send + 'static,
    {
        Harness {
            factory: Arc::new(move || Box::pin(factory())),
        }
    }

    /// A new transport, or `None` when the broker is unreachable and brokers are not required.
    ///
    /// Panics (fails the test) when the broker is unreachable and `CI=true` or
    /// `BUSBAR_REQUIRE_BROKERS=1`.
    pub async fn transport(&self) -> Option<Arc<dyn Transport>> {
        reachable((self.factory)().await)
    }

    /// A bus over a new transport, with the suite's fast retry policy.
    pub async fn bus(&self) -> Option<Bus> {
        Some(bus_over(self.transport().await?))
    }
}

/// The connected transport (or client), or `None` when the broker is unreachable and brokers
/// are not required: the test then returns early, saying `SKIPPED`.
///
/// Panics (fails the test) when the broker is unreachable and `CI=true` or
/// `BUSBAR_REQUIRE_BROKERS=1`: in CI a broker test never skips silently.
pub fn reachable<T>(connected: Result<T>) -> Option<T> {
    match connected {
        Ok(connected) => Some(connected),
        Err(error) if brokers_required() => {
            panic!("the broker for this test is unreachable and brokers are required here: {error}")
        }
        Err(error) => {
            eprintln!("SKIPPED: broker unreachable ({error}); set CI=true to make this a failure");
            None
        }
    }
}

/// Whether an unreachable broker must fail the test instead of skipping it.
pub fn brokers_required() -> bool {
    let set = |name: &str| {
        std::env::var(name)
            .is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
    };
    set("CI") || set("BUSBAR_REQUIRE_BROKERS")
}

pub(crate) fn bus_over(transport: Arc<dyn Transport>) -> Bus {
    Bus::builder(transport)
        .source("/busbar/conformance")
        .retry(fast_retry(5))
        .build()
}

/// The suite's retry policy: `max_attempts` attempts, 20 ms → 200 ms, no jitter.
pub fn fast_retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy::exponential(max_attempts)
        .with_initial_backoff(Duration::from_millis(20))
        .with_max_backoff(Duration::from_millis(200))
        .with_jitter(0.0)
}

/// How long a scenario waits for a condition: `BUSBAR_CONFORMANCE_WAIT_SECS`, default 30 s.
pub fn wait_limit() -> Duration {
    std::env::var("BUSBAR_CONFORMANCE_WAIT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(30), Duration::from_secs)
}

/// Waits until `condition` holds, failing the test after [`wait_limit`] with `what`.
pub async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let limit = wait_limit();
    let deadline = tokio::time::Instant::now() + limit;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A fresh random name with `prefix`, valid on every broker.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:012x}", fastrand::u64(..) & 0xffff_ffff_ffff)
}

/// Skips a scenario whose capability the transport does not claim, saying so on stderr.
pub(crate) fn claims(caps: &Capabilities, claimed: bool, capability: &str) -> bool {
    if !claimed {
        eprintln!("SKIPPED: the transport does not claim `{capability}` ({caps:?})");
    }
    claimed
}

/// The event the suite sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    /// Sequence number within the scenario.
    pub seq: u64,
    /// Ordering key ("" = none).
    pub key: String,
    /// Free text; scenarios use it to steer handlers and to size messages.
    pub note: String,
}

impl Event for Probe {
    const TYPE: &'static str = "busbar.conformance.probe.v1";
    fn key(&self) -> Option<Text> {
        (!self.key.is_empty()).then(|| self.key.as_str().into())
    }
}

/// A [`Probe`] with `seq` and `key`.
pub fn probe(seq: u64, key: &str) -> Probe {
    Probe {
        seq,
        key: key.to_string(),
        note: String::new(),
    }
}

/// A second event type, for handlers that publish follow-ups.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Echo {
    /// The probe's sequence number.
    pub seq: u64,
}

impl Event for Echo {
    const TYPE: &'static str = "busbar.conformance.echo.v1";
}

/// What handlers saw, shared between a scenario and its handlers.
#[derive(Clone, Default)]
pub struct Ledger {
    seen: Arc<Mutex<Vec<Envelope<Probe>>>>,
}

impl Ledger {
    /// Records one handled envelope.
    pub fn record(&self, envelope: Envelope<Probe>) {
        lock(&self.seen).push(envelope);
    }

    /// A handler that records every probe and succeeds.
    pub fn handler(
        &self,
    ) -> impl Fn(Envelope<Probe>, Context) -> BoxFuture<'static, Result<(), HandlerError>>
           + Send
           + Sync
           + 'static {
        let ledger = self.clone();
        move |envelope, _ctx| {
            ledger.record(envelope);
            Box::pin(async { Ok(()) })
        }
    }

    /// A handler that counts each start in `started`, takes `took`, then records the probe
    /// and succeeds: for scenarios that stop a subscription while handlers run.
    pub fn slow_handler(
        &self,
        started: &Arc<AtomicUsize>,
        took: Duration,
    ) -> impl Fn(Envelope<Probe>, Context) -> BoxFuture<'static, Result<(), HandlerError>>
           + Send
           + Sync
           + 'static {
        let (ledger, started) = (self.clone(), Arc::clone(started));
        move |envelope, _ctx| {
            started.fetch_add(1, Ordering::SeqCst);
            let ledger = ledger.clone();
            Box::pin(async move {
                tokio::time::sleep(took).await;
                ledger.record(envelope);
                Ok(())
            })
        }
    }

    /// Everything recorded, in handling order.
    pub fn envelopes(&self) -> Vec<Envelope<Probe>> {
        lock(&self.seen).clone()
    }

    /// How many deliveries were recorded (duplicates included).
    pub fn len(&self) -> usize {
        lock(&self.seen).len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Distinct message ids recorded.
    pub fn distinct(&self) -> HashSet<Text> {
        lock(&self.seen).iter().map(|e| e.id.clone()).collect()
    }

    /// Asserts every id in `published` was recorded.
    #[track_caller]
    pub fn assert_nothing_lost(&self, published: &[Text]) {
        let seen = self.distinct();
        let lost: Vec<&Text> = published.iter().filter(|id| !seen.contains(*id)).collect();
        assert!(
            lost.is_empty(),
            "lost {} of {} messages: {lost:?}",
            lost.len(),
            published.len()
        );
    }

    /// Asserts no id was recorded twice, unless the transport may duplicate on its own.
    #[track_caller]
    pub fn assert_nothing_duplicated(&self, caps: &Capabilities) {
        let mut counts: HashMap<Text, usize> = HashMap::new();
        for e in lock(&self.seen).iter() {
            *counts.entry(e.id.clone()).or_default() += 1;
        }
        let twice: Vec<_> = counts.into_iter().filter(|(_, n)| *n > 1).collect();
        if caps.may_duplicate {
            if !twice.is_empty() {
                eprintln!(
                    "note: {} duplicate deliveries (allowed: the transport may duplicate)",
                    twice.len()
                );
            }
            return;
        }
        assert!(twice.is_empty(), "handled more than once: {twice:?}");
    }
}

/// Locks `m`, taking the value of a poisoned lock as it is (a test that panicked while holding
/// it has failed already; the next assertion should still read what it recorded).
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Generates one `#[tokio::test]` per conformance scenario, named after the guarantee, calling
/// `$factory` (an `async fn() -> busbar_core::Result<Arc<dyn Transport>>`) for transports.
/// `conformance_suite!(factory, without_churn)` leaves out the churn scenarios, for a second
/// configuration of a transport whose suite already runs in full.
#[macro_export]
macro_rules! conformance_suite {
    ($factory:path) => {
        $crate::conformance_suite!(@core $factory);
        $crate::conformance_suite!(@churn $factory);
    };
    // For a second configuration of a transport already run in full (TLS over the same
    // broker): the churn scenarios test group membership, which the socket does not change,
    // and take minutes.
    ($factory:path, without_churn) => {
        $crate::conformance_suite!(@core $factory);
    };
    (@core $factory:path) => {
        $crate::conformance_suite!(@cases $factory;
            published_before_and_after_subscribing_arrives_intact,
            topics_are_isolated,
            every_group_gets_every_message,
            competing_consumers_split_the_work_with_nothing_lost,
            concurrent_publishers_and_consumers_lose_nothing,
            messages_acknowledged_before_close_are_not_lost,
            nacked_message_is_redelivered,
            abandoned_delivery_is_redelivered_to_another_consumer,
            exhausted_attempts_go_to_dead_letter_with_reason,
            permanent_errors_and_undecodable_payloads_dead_letter_at_once,
            dead_letters_are_listed_and_redriven_then_handled,
            chosen_dead_letters_are_redriven_or_purged,
            correlation_and_causation_propagate_through_a_handler,
            custom_headers_survive,
            largest_allowed_message_round_trips_and_larger_is_rejected,
            per_key_order_holds,
            per_key_order_holds_across_retries,
            duplicates_do_not_repeat_an_idempotent_effect,
            closed_subscription_stops_and_resubscribing_resumes,
            publishing_after_close_is_a_clear_error,
            a_temporary_group_sees_only_new_messages_and_its_deletion_spares_the_others,
            shutdown_drains_in_flight_handlers,
            several_types_on_one_topic_reach_their_handlers_in_key_order,
            unknown_types_follow_the_subscription_policy,
            v1_and_v2_on_one_topic_are_handled_as_v2,
            a_group_split_between_different_types_is_refused,
        );
    };
    (@churn $factory:path) => {
        $crate::conformance_suite!(@cases $factory;
            a_storm_of_starts_and_stops_does_not_wedge_the_group,
            unstarted_deliveries_come_back_promptly_after_shutdown,
            failing_subscriptions_in_turn_leave_nothing_stuck,
        );
    };
    (@cases $factory:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $crate::conformance::$case($crate::conformance::Harness::new($factory)).await;
            }
        )*
    };
}
