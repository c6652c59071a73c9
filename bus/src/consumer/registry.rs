//! The subscriptions of one bus, by (topic, group), so two that would split a group's messages
//! between different event types are refused when the second starts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::{Error, ErrorKind, Result};

type Key = (String, String);

/// The event types each (topic, group) of a bus is consumed with, and by how many running
/// subscriptions.
#[derive(Default)]
pub(crate) struct Registry {
    entries: Arc<Mutex<HashMap<Key, Entry>>>,
}

struct Entry {
    /// Sorted, so two subscriptions of the same types in another order are equal.
    event_types: Vec<&'static str>,
    subscriptions: usize,
}

/// One subscription's place in the registry; dropping it gives the place back.
pub(crate) struct Registration {
    entries: Arc<Mutex<HashMap<Key, Entry>>>,
    key: Key,
}

impl Registry {
    fn lock(entries: &Mutex<HashMap<Key, Entry>>) -> MutexGuard<'_, HashMap<Key, Entry>> {
        entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a subscription of (`topic`, `group`) handling `event_types`.
    ///
    /// Competing consumers inside one process are fine when they handle the same types; with
    /// other types, the group's messages would be split between the two and each would
    /// reject what only the other handles, so that is refused with a `Config` error.
    pub(crate) fn register(
        &self,
        topic: &str,
        group: &str,
        event_types: &[&'static str],
    ) -> Result<Registration> {
        let mut event_types = event_types.to_vec();
        event_types.sort_unstable();
        event_types.dedup();
        let key = (topic.to_string(), group.to_string());
        let mut entries = Self::lock(&self.entries);
        match entries.get_mut(&key) {
            Some(entry) if entry.event_types != event_types => {
                return Err(Error::new(
                    ErrorKind::Config,
                    "subscribe",
                    format!(
                        "this bus already consumes the group with a subscription of other event types ({}; this one: {}). \
                         A group receives each message once, so the two would split the messages and each would reject the \
                         types only the other handles. Handle every type in one subscription (`bus.route(topic, group)` \
                         with one `.on::<E>(handler)` per type, or an `event_set!` enum), or give each its own group",
                        entry.event_types.join(", "),
                        event_types.join(", ")
                    ),
                )
                .with_resource(format!("topic {topic}, group {group}")));
            }
            Some(entry) => entry.subscriptions += 1,
            None => {
                entries.insert(
                    key.clone(),
                    Entry {
                        event_types,
                        subscriptions: 1,
                    },
                );
            }
        }
        Ok(Registration {
            entries: Arc::clone(&self.entries),
            key,
        })
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut entries = Registry::lock(&self.entries);
        if let Some(entry) = entries.get_mut(&self.key) {
            entry.subscriptions -= 1;
            if entry.subscriptions == 0 {
                entries.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_types_share_a_group_other_types_are_refused_until_the_first_is_gone() {
        let registry = Registry::default();
        let first = registry.register("t", "g", &["a.v1", "b.v1"]).unwrap();
        let same = registry.register("t", "g", &["b.v1", "a.v1"]).unwrap();
        let err = registry.register("t", "g", &["c.v1"]).err().unwrap();
        assert_eq!(err.kind(), ErrorKind::Config);
        let text = err.to_string();
        assert!(text.contains("topic t, group g"), "{text}");
        assert!(text.contains("a.v1, b.v1; this one: c.v1"), "{text}");
        assert!(text.contains("bus.route(topic, group)"), "{text}");
        let _other_group = registry.register("t", "h", &["c.v1"]).unwrap();
        let _other_topic = registry.register("u", "g", &["c.v1"]).unwrap();
        drop(first);
        assert!(
            registry.register("t", "g", &["c.v1"]).is_err(),
            "one is left"
        );
        drop(same);
        let _now = registry.register("t", "g", &["c.v1"]).unwrap();
    }
}
