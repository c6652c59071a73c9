//! Redeliveries asked for only to wait for an idempotency claim held elsewhere.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

/// The most message ids remembered: entries of messages that ended on another process are
/// never removed otherwise.
const KEPT: usize = 10_000;

/// Per (group, message id), the redeliveries a consumer of this bus asked for only because
/// another consumer held the message's idempotency claim.
///
/// Waiting for a claim is not a failure, so it must not use up the retry policy's attempts: a
/// consumer that crashed holding claims would otherwise send their messages to the
/// dead-letter queue. Kept per bus, so every subscription of the bus sees the waits the
/// others asked for; a wait asked for by another process still counts as an attempt there.
#[derive(Default)]
pub(crate) struct ClaimWaits {
    by_group: Mutex<HashMap<String, HashMap<String, u32>>>,
    /// How many ids are remembered, so the common case (none) takes no lock.
    len: AtomicUsize,
}

impl ClaimWaits {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, HashMap<String, u32>>> {
        self.by_group.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The handler attempt a delivery stands for: the transport's count less the waits.
    pub(crate) fn attempt(&self, group: &str, id: &str, transport_attempt: u32) -> u32 {
        if self.len.load(Ordering::Acquire) == 0 {
            return transport_attempt.max(1);
        }
        let waits = self
            .lock()
            .get(group)
            .and_then(|ids| ids.get(id))
            .copied()
            .unwrap_or(0);
        transport_attempt.saturating_sub(waits).max(1)
    }

    /// Records one more wait for the claim of `id`.
    pub(crate) fn waited(&self, group: &str, id: &str) {
        let mut by_group = self.lock();
        if self.len.load(Ordering::Acquire) >= KEPT {
            by_group.clear();
            self.len.store(0, Ordering::Release);
        }
        let count = by_group
            .entry(group.to_string())
            .or_default()
            .entry(id.to_string())
            .or_insert_with(|| {
                self.len.fetch_add(1, Ordering::AcqRel);
                0
            });
        *count += 1;
    }

    /// Forgets `id` once its message is settled for good.
    pub(crate) fn forget(&self, group: &str, id: &str) {
        if self.len.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut by_group = self.lock();
        if let Some(ids) = by_group.get_mut(group) {
            if ids.remove(id).is_some() {
                self.len.fetch_sub(1, Ordering::AcqRel);
            }
            if ids.is_empty() {
                by_group.remove(group);
            }
        }
    }
}
