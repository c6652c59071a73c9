//! The in-process saga store, for tests (with `TestBus`) and single-process services that can
//! lose their sagas on a restart.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use chrono::Utc;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::{
    timeout_message, Committed, DueTimeout, Fired, Loaded, SagaCommit, SagaFilter, SagaRecord,
    SagaStore, MAX_TIMEOUT,
};
use crate::bus::Bus;
use crate::error::Result;

/// Keeps saga instances in this process's memory.
///
/// What it guarantees: one commit at a time (a lock around the whole store); a commit stores
/// the record, the applied event id and the timeouts only after its messages were published,
/// and stores nothing when publishing fails, so the transition's delivery is retried with
/// nothing half done. Timeouts run on tokio's clock, so a paused clock
/// (`#[tokio::test(start_paused = true)]`, `tokio::time::advance`) drives them. Nothing
/// survives the process; applied event ids are kept as long as their instance.
///
/// ```
/// use std::sync::Arc;
/// use busbar_core::saga::{MemorySagaStore, SagaStore};
/// let store: Arc<dyn SagaStore> = Arc::new(MemorySagaStore::new());
/// ```
#[derive(Debug, Default)]
pub struct MemorySagaStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// By saga, then instance id: looked up with borrowed names, no key to build.
    instances: HashMap<String, HashMap<String, Entry>>,
    timeouts: HashMap<String, Waiting>,
}

#[derive(Debug)]
struct Entry {
    record: SagaRecord,
    applied: HashSet<String>,
}

#[derive(Debug)]
struct Waiting {
    due: Instant,
    timeout: DueTimeout,
}

impl MemorySagaStore {
    /// An empty store.
    pub fn new() -> Self {
        MemorySagaStore::default()
    }
}

impl Inner {
    fn entry(&self, saga: &str, instance_id: &str) -> Option<&Entry> {
        self.instances.get(saga)?.get(instance_id)
    }

    fn records<'a>(&'a self, saga: &str) -> impl Iterator<Item = &'a SagaRecord> + 'a {
        self.instances
            .get(saga)
            .into_iter()
            .flat_map(|instances| instances.values().map(|entry| &entry.record))
    }
}

#[async_trait]
impl SagaStore for MemorySagaStore {
    async fn load(&self, saga: &str, instance_id: &str, event_id: &str) -> Result<Loaded> {
        let inner = self.inner.lock().await;
        Ok(match inner.entry(saga, instance_id) {
            Some(entry) => Loaded {
                record: Some(entry.record.clone()),
                applied: entry.applied.contains(event_id),
            },
            None => Loaded {
                record: None,
                applied: false,
            },
        })
    }

    async fn find_by_correlation(
        &self,
        saga: &str,
        correlation_id: &str,
    ) -> Result<Option<SagaRecord>> {
        let inner = self.inner.lock().await;
        Ok(inner
            .records(saga)
            .filter(|r| r.correlation_id == correlation_id)
            .min_by_key(|r| r.created_at)
            .cloned())
    }

    async fn commit(&self, bus: &Bus, commit: SagaCommit) -> Result<Committed> {
        let mut inner = self.inner.lock().await;
        let record = &commit.record;
        match (
            inner.entry(&record.saga, &record.instance_id),
            commit.expected_version,
        ) {
            (Some(entry), _) if entry.applied.contains(&commit.event_id) => {
                return Ok(Committed::Duplicate)
            }
            (Some(entry), Some(version)) if entry.record.version == version => {}
            (None, None) => {}
            _ => return Ok(Committed::Conflict),
        }
        // Publish while holding the lock: the change is stored only if this succeeds.
        bus.publish_messages(commit.messages).await?;
        let now = Instant::now();
        for cancelled in &commit.cancel {
            inner.timeouts.remove(cancelled);
        }
        for timeout in commit.schedule {
            inner.timeouts.insert(
                timeout.id.clone(),
                Waiting {
                    // The runtime caps `after` at 100 years; never overflow the clock anyway.
                    due: now.checked_add(timeout.after).unwrap_or(now + MAX_TIMEOUT),
                    timeout: DueTimeout {
                        id: timeout.id,
                        saga: commit.record.saga.clone(),
                        instance_id: commit.record.instance_id.clone(),
                        correlation_id: commit.record.correlation_id.clone(),
                        name: timeout.name,
                    },
                },
            );
        }
        let instances = inner
            .instances
            .entry(commit.record.saga.clone())
            .or_default();
        match instances.get_mut(&commit.record.instance_id) {
            Some(entry) => {
                entry.applied.insert(commit.event_id);
                entry.record = commit.record;
            }
            None => {
                instances.insert(
                    commit.record.instance_id.clone(),
                    Entry {
                        record: commit.record,
                        applied: HashSet::from([commit.event_id]),
                    },
                );
            }
        }
        Ok(Committed::Done)
    }

    async fn fire_due_timeouts(
        &self,
        bus: &Bus,
        saga: &str,
        topic: &str,
        limit: usize,
    ) -> Result<Fired> {
        let mut inner = self.inner.lock().await;
        let now = Instant::now();
        let mut due: Vec<&Waiting> = inner
            .timeouts
            .values()
            .filter(|w| w.timeout.saga == saga && w.due <= now)
            .collect();
        due.sort_by_key(|w| w.due);
        due.truncate(limit);
        let messages = due
            .iter()
            .map(|w| timeout_message(bus, topic, &w.timeout))
            .collect::<Result<Vec<_>>>()?;
        let ids: Vec<String> = due.iter().map(|w| w.timeout.id.clone()).collect();
        bus.publish_messages(messages).await?;
        for id in &ids {
            inner.timeouts.remove(id);
        }
        let next_due = inner
            .timeouts
            .values()
            .filter(|w| w.timeout.saga == saga)
            .map(|w| w.due.saturating_duration_since(now))
            .min();
        Ok(Fired {
            fired: ids.len(),
            next_due,
        })
    }

    async fn list(&self, saga: &str, filter: &SagaFilter) -> Result<Vec<SagaRecord>> {
        let inner = self.inner.lock().await;
        let now = Utc::now();
        let idle_for = filter
            .idle_for
            .map(|d| chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX));
        let mut found: Vec<SagaRecord> = inner
            .records(saga)
            .filter(|r| filter.status.is_none_or(|s| r.status == s))
            .filter(|r| filter.state.as_ref().is_none_or(|s| r.state == *s))
            .filter(|r| idle_for.is_none_or(|idle| now - r.updated_at >= idle))
            .cloned()
            .collect();
        found.sort_by_key(|r| r.updated_at);
        found.truncate(filter.effective_limit());
        Ok(found)
    }
}
