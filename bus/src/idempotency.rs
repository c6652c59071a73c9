//! Idempotent consumers: a store that lets a handler's effect happen once per key per group.
//!
//! A claim is a lease. The consumer claims the message's key before running the handler, marks
//! it done after success (kept for a retention window), or releases it after a failure so a retry
//! can claim again. A consumer that dies holding a claim does not block the key forever: the
//! lease expires and another consumer can claim it.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::error::{Error, ErrorKind, Result};

/// Proof of holding a claim; needed to complete or release it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Lease {
    /// An opaque token that identifies this claim (fencing against an expired holder).
    pub token: String,
}

impl Lease {
    /// A new lease with a random token.
    pub fn generate() -> Self {
        Lease {
            token: format!("{:032x}", fastrand::u128(..)),
        }
    }
}

/// The answer to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The key is yours until the lease expires: run the handler.
    Acquired(Lease),
    /// The key was already handled: skip the handler and ack.
    Done,
    /// Another consumer holds the key; try again after about `retry_after`.
    Busy {
        /// When the other holder's lease expires, at the latest.
        retry_after: Duration,
    },
}

/// Stores claims and done marks per (scope, key); `scope` is the subscription group.
///
/// Implementations must make `claim`, `complete` and `release` atomic on the server: no
/// read-then-write races between consumers.
///
/// A subscription uses it through [`idempotent`](crate::SubscriptionBuilder::idempotent):
/// it claims the message id (or the [idempotency key](crate::SubscriptionBuilder::idempotency_key))
/// before the handler runs, completes the claim when the handler succeeds and releases it when
/// it fails. A duplicate finds the key done and is acknowledged without running the handler; a
/// key another consumer holds is looked at again later. busbar ships
/// [`MemoryIdempotencyStore`] here, and PostgreSQL and Redis stores in their crates.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use std::{sync::Arc, time::Duration};
/// use serde::{Deserialize, Serialize};
/// use busbar_core::{Bus, Context, Envelope, Event, IdempotencyStore, MemoryIdempotencyStore};
///
/// #[derive(Serialize, Deserialize)]
/// struct Paid { payment_id: String }
/// impl Event for Paid { const TYPE: &'static str = "pay.paid.v1"; }
///
/// let store: Arc<dyn IdempotencyStore> = Arc::new(MemoryIdempotencyStore::new(100_000));
/// let bus = Bus::memory();
/// let ledger = bus
///     .subscribe::<Paid>("payments", "ledger")
///     .idempotent(store)
///     .idempotency_key(|paid: &Envelope<Paid>| paid.payload.payment_id.clone())
///     .lease(Duration::from_secs(60)) // above the handler's longest run
///     .start(|_: Envelope<Paid>, _: Context| async { Ok(()) })
///     .await?;
/// # ledger.shutdown(Duration::from_secs(1)).await?;
/// # Ok::<(), busbar_core::Error>(())
/// # }).unwrap();
/// ```
#[async_trait]
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Claims `key` in `scope` for `lease`, unless it is done or validly held by someone else.
    async fn claim(&self, scope: &str, key: &str, lease: Duration) -> Result<Claim>;

    /// Marks `key` done (the effect happened); the mark is kept for `retention`.
    /// Fails with [`ErrorKind::Store`] when `lease` no longer holds the key.
    async fn complete(
        &self,
        scope: &str,
        key: &str,
        lease: &Lease,
        retention: Duration,
    ) -> Result<()>;

    /// Gives up the claim so the key can be claimed again. Releasing a lost lease is a no-op.
    async fn release(&self, scope: &str, key: &str, lease: &Lease) -> Result<()>;
}

/// A bounded, in-process store with expiring claims and done marks.
///
/// Dedups only inside one process: use a shared store (PostgreSQL, Redis) when several service
/// instances consume one group. When full, the oldest record is evicted, so size `capacity` above
/// the number of messages that can be redelivered within the retention window.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use std::time::Duration;
/// use busbar_core::idempotency::{Claim, IdempotencyStore, MemoryIdempotencyStore};
///
/// let store = MemoryIdempotencyStore::new(10_000);
/// let lease = match store.claim("billing", "msg-1", Duration::from_secs(30)).await.unwrap() {
///     Claim::Acquired(lease) => lease,
///     other => panic!("{other:?}"),
/// };
/// store.complete("billing", "msg-1", &lease, Duration::from_secs(3600)).await.unwrap();
/// assert_eq!(store.claim("billing", "msg-1", Duration::from_secs(30)).await.unwrap(), Claim::Done);
/// # });
/// ```
#[derive(Debug)]
pub struct MemoryIdempotencyStore {
    capacity: usize,
    state: Mutex<StoreState>,
}

#[derive(Debug, Default)]
struct StoreState {
    records: HashMap<(String, String), Record>,
    /// Insertion order, for eviction; may hold keys already removed.
    order: VecDeque<(String, String)>,
}

#[derive(Debug)]
enum Record {
    Claimed { token: String, until: Instant },
    Done { until: Instant },
}

impl Record {
    fn expired(&self, now: Instant) -> bool {
        match self {
            Record::Claimed { until, .. } | Record::Done { until } => *until <= now,
        }
    }
}

impl MemoryIdempotencyStore {
    /// A store that keeps at most `capacity` records (at least 1).
    pub fn new(capacity: usize) -> Self {
        MemoryIdempotencyStore {
            capacity: capacity.max(1),
            state: Mutex::new(StoreState::default()),
        }
    }

    /// How many records (claims and done marks, expired ones not yet purged) are held.
    pub fn len(&self) -> usize {
        self.lock().records.len()
    }

    /// Whether the store holds no records.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StoreState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl StoreState {
    fn make_room(&mut self, capacity: usize, now: Instant) {
        while self.records.len() >= capacity {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            self.records.remove(&oldest);
        }
        // Drop expired records at the front cheaply, so `order` does not grow without bound.
        while let Some(front) = self.order.front() {
            match self.records.get(front) {
                Some(record) if !record.expired(now) => break,
                _ => {
                    if let Some(front) = self.order.pop_front() {
                        self.records.remove(&front);
                    }
                }
            }
        }
    }
}

/// The error for completing a claim whose lease was lost (expired and taken over, or purged);
/// every store returns it so callers see one message.
pub fn lease_lost(scope: &str, key: &str) -> Error {
    Error::new(
        ErrorKind::Store,
        "complete claim",
        "the claim's lease expired and the key was claimed again or purged",
    )
    .with_resource(format!("key {key:?} in scope {scope:?}"))
}

#[async_trait]
impl IdempotencyStore for MemoryIdempotencyStore {
    async fn claim(&self, scope: &str, key: &str, lease: Duration) -> Result<Claim> {
        let now = Instant::now();
        let id = (scope.to_string(), key.to_string());
        let mut state = self.lock();
        match state.records.get(&id) {
            Some(Record::Done { until }) if *until > now => return Ok(Claim::Done),
            Some(Record::Claimed { until, .. }) if *until > now => {
                return Ok(Claim::Busy {
                    retry_after: *until - now,
                })
            }
            _ => {}
        }
        if !state.records.contains_key(&id) {
            state.make_room(self.capacity, now);
            state.order.push_back(id.clone());
        }
        let granted = Lease::generate();
        state.records.insert(
            id,
            Record::Claimed {
                token: granted.token.clone(),
                until: now + lease,
            },
        );
        Ok(Claim::Acquired(granted))
    }

    async fn complete(
        &self,
        scope: &str,
        key: &str,
        lease: &Lease,
        retention: Duration,
    ) -> Result<()> {
        let id = (scope.to_string(), key.to_string());
        let mut state = self.lock();
        match state.records.get_mut(&id) {
            Some(record @ Record::Claimed { .. }) => {
                if matches!(record, Record::Claimed { token, .. } if *token == lease.token) {
                    *record = Record::Done {
                        until: Instant::now() + retention,
                    };
                    Ok(())
                } else {
                    Err(lease_lost(scope, key))
                }
            }
            _ => Err(lease_lost(scope, key)),
        }
    }

    async fn release(&self, scope: &str, key: &str, lease: &Lease) -> Result<()> {
        let id = (scope.to_string(), key.to_string());
        let mut state = self.lock();
        if let Some(Record::Claimed { token, until }) = state.records.get_mut(&id) {
            if *token == lease.token {
                // Expire rather than remove: the key keeps its place in the eviction order.
                *until = Instant::now();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(10);
    const KEEP: Duration = Duration::from_secs(60);

    async fn acquire(store: &MemoryIdempotencyStore, key: &str) -> Lease {
        match store.claim("g", key, LEASE).await.unwrap() {
            Claim::Acquired(lease) => lease,
            other => panic!("expected to acquire {key}, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_claim_is_busy_until_its_lease_expires() {
        let store = MemoryIdempotencyStore::new(100);
        let first = acquire(&store, "k").await;
        match store.claim("g", "k", LEASE).await.unwrap() {
            Claim::Busy { retry_after } => assert!(retry_after <= LEASE),
            other => panic!("{other:?}"),
        }
        tokio::time::advance(LEASE + Duration::from_millis(1)).await;
        let second = acquire(&store, "k").await;
        assert_ne!(first, second);
        // The first holder's lease is gone: it can neither complete nor release the new claim.
        assert_eq!(
            store
                .complete("g", "k", &first, KEEP)
                .await
                .unwrap_err()
                .kind(),
            ErrorKind::Store
        );
        store.release("g", "k", &first).await.unwrap();
        store.complete("g", "k", &second, KEEP).await.unwrap();
        assert_eq!(store.claim("g", "k", LEASE).await.unwrap(), Claim::Done);
    }

    #[tokio::test(start_paused = true)]
    async fn released_claims_can_be_claimed_again_and_done_marks_expire() {
        let store = MemoryIdempotencyStore::new(100);
        let lease = acquire(&store, "k").await;
        store.release("g", "k", &lease).await.unwrap();
        let lease = acquire(&store, "k").await;
        store.complete("g", "k", &lease, KEEP).await.unwrap();
        assert_eq!(store.claim("g", "k", LEASE).await.unwrap(), Claim::Done);
        assert!(matches!(
            store.claim("other-group", "k", LEASE).await.unwrap(),
            Claim::Acquired(_)
        ));
        tokio::time::advance(KEEP).await;
        acquire(&store, "k").await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_store_stays_within_its_capacity() {
        let store = MemoryIdempotencyStore::new(50);
        for i in 0..500 {
            let key = format!("k{i}");
            let lease = acquire(&store, &key).await;
            store.complete("g", &key, &lease, KEEP).await.unwrap();
        }
        assert!(store.len() <= 50, "{}", store.len());
        assert!(store.lock().order.len() <= 50);
        assert_eq!(store.claim("g", "k499", LEASE).await.unwrap(), Claim::Done);
    }
}
