//! Readiness and liveness of a [`Bus`](crate::Bus) and its subscriptions, for probes.
//!
//! - **Live** means restarting the process would not help: the bus is not closed, a
//!   subscription's consumer still runs. A broker that is away makes nothing un-live: busbar
//!   reconnects by itself, and a restarted process would wait for the same broker.
//! - **Ready** means work flows: the transport is connected and, for a subscription, the broker
//!   gives its consumer its share of the group.
//!
//! A Kubernetes probe endpoint serves them in a few lines (see `examples/operations.rs`):
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use busbar_core::Bus;
//!
//! let bus = Bus::memory();
//! let health = bus.health();
//! assert!(health.is_ready() && health.is_live());
//! let status = if health.is_ready() { 200 } else { 503 };
//! # assert_eq!(status, 200);
//! # });
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The transport's connection to its broker, as its client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionState {
    /// Connected (or, for a connectionless broker such as SQS, its last request succeeded).
    Connected,
    /// The connection was lost and the client is reconnecting.
    Reconnecting {
        /// When the loss was first seen.
        since: SystemTime,
        /// Why: the last failure, as text.
        error: String,
    },
    /// The transport was closed.
    Closed,
}

impl ConnectionState {
    /// Whether it is [`ConnectionState::Connected`].
    pub fn is_connected(&self) -> bool {
        matches!(self, Self::Connected)
    }
}

/// What [`Bus::health`](crate::Bus::health) reports.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BusHealth {
    /// The transport's name (`memory`, `rabbitmq`, …).
    pub transport: &'static str,
    /// The transport's connection.
    pub connection: ConnectionState,
}

impl BusHealth {
    /// Ready: the transport is connected, so publishes go through.
    pub fn is_ready(&self) -> bool {
        self.connection.is_connected()
    }

    /// Live: the bus was not closed (a reconnecting bus is live: it recovers by itself).
    pub fn is_live(&self) -> bool {
        self.connection != ConnectionState::Closed
    }
}

/// An error a subscription's transport reported, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastError {
    /// When it was reported.
    pub at: SystemTime,
    /// What it said.
    pub error: String,
}

/// What [`Subscription::health`](crate::Subscription::health) reports.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscriptionHealth {
    /// The consumer runs (it was not shut down, and its transport did not end it).
    pub running: bool,
    /// The broker gives the consumer its share of the group (see
    /// [`Subscription::is_consuming`](crate::Subscription::is_consuming)).
    pub consuming: bool,
    /// When the last delivery arrived, if one did.
    pub last_delivery: Option<SystemTime>,
    /// The last problem the transport reported while consuming (a lost channel, a group the
    /// broker keeps rebalancing), if any. Handler failures are not transport errors: they are
    /// in [`SubscriptionStats`](crate::SubscriptionStats) and the metrics.
    pub last_error: Option<LastError>,
    /// The bus's transport connection.
    pub connection: ConnectionState,
}

impl SubscriptionHealth {
    /// Ready: running, consuming, and the transport connected.
    pub fn is_ready(&self) -> bool {
        self.running && self.consuming && self.connection.is_connected()
    }

    /// Live: the consumer runs. A stopped consumer does not start again by itself.
    pub fn is_live(&self) -> bool {
        self.running
    }

    /// How long ago the last delivery arrived, if one did: for a probe that expects traffic.
    pub fn since_last_delivery(&self) -> Option<Duration> {
        self.last_delivery
            .and_then(|at| SystemTime::now().duration_since(at).ok())
    }
}

/// A subscription's last delivery and last transport error, updated by its dispatch loop.
#[derive(Debug, Default)]
pub(crate) struct Pulse {
    /// Milliseconds since the Unix epoch of the last delivery; 0 for none.
    last_delivery_ms: AtomicU64,
    last_error: Mutex<Option<LastError>>,
}

impl Pulse {
    pub(crate) fn delivered(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |since| since.as_millis().max(1) as u64);
        self.last_delivery_ms.store(now, Ordering::Relaxed);
    }

    pub(crate) fn failed(&self, error: &crate::Error) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(LastError {
                at: SystemTime::now(),
                error: error.to_string(),
            });
        }
    }

    pub(crate) fn last_delivery(&self) -> Option<SystemTime> {
        match self.last_delivery_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(UNIX_EPOCH + Duration::from_millis(ms)),
        }
    }

    pub(crate) fn last_error(&self) -> Option<LastError> {
        self.last_error.lock().ok().and_then(|last| last.clone())
    }
}
