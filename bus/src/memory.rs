//! The in-process memory transport (`memory://`), the embedded default.
//!
//! Each declared (topic, group) has a bounded queue. Publishing puts the message in every group
//! queue of the topic (fan-out); consumers of one group pop from the same queue (competing
//! consumers). Messages with the same key are handed out one at a time, in publish order, also
//! across retries: a key stays locked while one of its messages is in flight or waiting for a
//! delayed redelivery, like an SQS FIFO message group. A nacked message comes back after its
//! delay; a dropped delivery comes back at once; a dead-lettered one goes to the group's
//! dead-letter queue.
//!
//! Nothing survives the process: [`Capabilities::persistent`] is false.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::capabilities::Capabilities;
use crate::config::TransportUrl;
use crate::dead_letter::{DeadLetter, DeadLetterInfo};
use crate::error::{Error, ErrorKind, Result};
use crate::health::ConnectionState;
use crate::message::{validate_name, Message};
use crate::text::Text;
use crate::transport::{
    no_history, Acknowledger, ConsumeOptions, Delivery, DeliveryStream, Depth, RedriveSelection,
    StartFrom, Transport,
};

/// Limits of a [`MemoryTransport`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryOptions {
    /// The most unsettled messages one group queue holds; publishing waits for space.
    pub queue_capacity: usize,
    /// How long a publish waits for space in a full group queue before failing.
    pub publish_timeout: Duration,
    /// The largest message accepted ([`Message::wire_size`]).
    pub max_message_bytes: usize,
}

impl Default for MemoryOptions {
    fn default() -> Self {
        MemoryOptions {
            queue_capacity: 100_000,
            publish_timeout: Duration::from_secs(30),
            max_message_bytes: 16 * 1024 * 1024,
        }
    }
}

impl MemoryOptions {
    /// Reads options from a `memory://` URL's query: `capacity`, `publish_timeout_ms`,
    /// `max_message_bytes`. Unknown parameters are an error naming the known ones.
    pub fn from_url(url: &TransportUrl) -> Result<Self> {
        let mut options = MemoryOptions::default();
        for (name, value) in url.query_pairs() {
            let number = || {
                value.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| {
                    Error::new(
                        ErrorKind::Config,
                        "connect",
                        format!(
                            "query parameter `{name}` must be a positive integer, got {value:?}"
                        ),
                    )
                    .with_resource(url.to_string())
                })
            };
            match name.as_str() {
                "capacity" => options.queue_capacity = usize::try_from(number()?).unwrap_or(usize::MAX),
                "publish_timeout_ms" => options.publish_timeout = Duration::from_millis(number()?),
                "max_message_bytes" => {
                    options.max_message_bytes = usize::try_from(number()?).unwrap_or(usize::MAX)
                }
                _ => {
                    return Err(Error::new(
                        ErrorKind::Config,
                        "connect",
                        format!(
                            "unknown query parameter `{name}` for memory://; known: capacity, publish_timeout_ms, max_message_bytes"
                        ),
                    )
                    .with_resource(url.to_string()))
                }
            }
        }
        Ok(options)
    }
}

/// The in-process transport. Cheap to clone; clones share the same queues.
///
/// ```
/// # tokio_test_block_on(async {
/// use busbar_core::{Bus, MemoryTransport};
/// let bus = Bus::new(MemoryTransport::new());
/// assert_eq!(bus.transport().name(), "memory");
/// # });
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
/// # }
/// ```
///
/// A `MemoryTransport` is one connection to an in-process broker. [`connection`](Self::connection)
/// opens another connection to the same broker (as a second service instance would); closing a
/// connection ends its own delivery streams and publishes, never the broker's queues.
#[derive(Clone, Default)]
pub struct MemoryTransport {
    inner: Arc<Inner>,
    closed: Arc<AtomicBool>,
}

#[derive(Default)]
struct Inner {
    options: MemoryOptions,
    topics: Mutex<foldhash::HashMap<String, Vec<Arc<GroupQueue>>>>,
    /// Publishers waiting on a full queue, signalled when a queue frees space.
    space: Arc<Signal>,
}

/// Tasks waiting for something (space in a queue, a free in-flight slot), woken when it comes.
/// The one making it looks at a count alone when none waits: a `Notify` takes its waiters'
/// lock on every signal, that is for every message settled.
///
/// A waiter counts itself, registers with `notify`, and only then looks again for what it
/// waits for; the signaller makes it available first and then reads the count (both in
/// sequentially consistent order), so one of the two sees the other's change.
#[derive(Default)]
struct Signal {
    waiting: AtomicUsize,
    notify: Notify,
}

impl Signal {
    /// Counts a task as waiting for as long as the guard lives.
    fn wait(&self) -> Waiting<'_> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        Waiting(self)
    }

    /// Wakes the waiting tasks, if any.
    fn signal(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.notify.notify_waiters();
        }
    }
}

/// A task counted as waiting.
struct Waiting<'a>(&'a Signal);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A consumer's free in-flight slots: a delivery holds one until it is settled or dropped.
/// (A tokio `Semaphore` takes its waiters' lock for every permit given back.)
struct Slots {
    free: AtomicUsize,
    returned: Signal,
}

impl Slots {
    fn new(slots: usize) -> Arc<Self> {
        Arc::new(Slots {
            free: AtomicUsize::new(slots),
            returned: Signal::default(),
        })
    }

    fn try_take(self: &Arc<Self>) -> Option<Slot> {
        self.free
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |free| {
                free.checked_sub(1)
            })
            .ok()
            .map(|_| Slot(Arc::clone(self)))
    }

    /// A free slot, once there is one.
    async fn take(self: &Arc<Self>) -> Slot {
        loop {
            if let Some(slot) = self.try_take() {
                return slot;
            }
            let _waiting = self.returned.wait();
            let returned = self.returned.notify.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            if let Some(slot) = self.try_take() {
                return slot;
            }
            returned.await;
        }
    }
}

/// One taken in-flight slot, given back when dropped.
struct Slot(Arc<Slots>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.free.fetch_add(1, Ordering::SeqCst);
        self.0.returned.signal();
    }
}

impl std::fmt::Debug for MemoryTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryTransport")
            .field("options", &self.inner.options)
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish()
    }
}

struct GroupQueue {
    topic: String,
    group: String,
    state: Mutex<QueueState>,
    /// Signalled when a message becomes ready or the transport closes.
    ready: Notify,
    space: Arc<Signal>,
}

#[derive(Default)]
struct QueueState {
    /// Messages that may be handed out now: at most one per key.
    ready: VecDeque<Entry>,
    /// For each locked key, the messages waiting behind the one that holds the lock.
    waiting: foldhash::HashMap<Text, VecDeque<Entry>>,
    /// Unsettled messages: ready, waiting, in flight and delayed.
    len: usize,
    dead: VecDeque<DeadLetter>,
}

struct Entry {
    message: Arc<Message>,
    deliveries: u32,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves the data consistent (every mutation is a
    // single push/pop), so a poisoned lock is still safe to use.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl QueueState {
    fn push(&mut self, entry: Entry) {
        self.len += 1;
        self.make_ready(entry, false);
    }

    /// Queues `entry` behind its key's lock holder, or makes it ready and takes the lock.
    fn make_ready(&mut self, entry: Entry, front: bool) {
        if let Some(key) = &entry.message.key {
            if let Some(waiting) = self.waiting.get_mut(key) {
                waiting.push_back(entry);
                return;
            }
            self.waiting.insert(key.clone(), VecDeque::new());
        }
        if front {
            self.ready.push_front(entry);
        } else {
            self.ready.push_back(entry);
        }
    }

    /// Puts a redelivery back in front; its key is still locked by it.
    fn requeue(&mut self, entry: Entry) {
        self.ready.push_front(entry);
    }

    /// A message left the queue for good: free a slot and pass its key's lock on. Returns
    /// whether a message waiting behind it became ready.
    fn remove(&mut self, message: &Message) -> bool {
        self.len = self.len.saturating_sub(1);
        if let Some(key) = &message.key {
            let next = self.waiting.get_mut(key).and_then(VecDeque::pop_front);
            match next {
                Some(next) => {
                    self.ready.push_front(next);
                    return true;
                }
                None => {
                    self.waiting.remove(key);
                }
            }
        }
        false
    }
}

impl GroupQueue {
    /// Removes a settled message. Consumers are woken only when a message waiting behind it
    /// became ready: an ack frees no message otherwise, and a waiting consumer woken for
    /// nothing costs a context switch.
    fn settle_removed(&self, message: &Message) {
        let became_ready = lock(&self.state).remove(message);
        if became_ready {
            self.ready.notify_waiters();
        }
        self.space.signal();
    }

    fn requeue(self: &Arc<Self>, entry: Entry, delay: Duration) {
        if delay.is_zero() {
            lock(&self.state).requeue(entry);
            self.ready.notify_waiters();
            return;
        }
        let queue = Arc::clone(self);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    tokio::time::sleep(delay).await;
                    lock(&queue.state).requeue(entry);
                    queue.ready.notify_waiters();
                });
            }
            // Outside a runtime (a delivery dropped during runtime shutdown) nobody could wait
            // for the delay; redeliver at once rather than lose the message.
            Err(_) => {
                lock(&self.state).requeue(entry);
                self.ready.notify_waiters();
            }
        }
    }
}

impl MemoryTransport {
    /// A memory transport with default options.
    pub fn new() -> Self {
        MemoryTransport::with_options(MemoryOptions::default())
    }

    /// A memory transport with `options`.
    pub fn with_options(options: MemoryOptions) -> Self {
        MemoryTransport {
            inner: Arc::new(Inner {
                options,
                ..Inner::default()
            }),
            closed: Arc::default(),
        }
    }

    /// Another connection to the same in-process broker: same queues, its own open/closed state.
    pub fn connection(&self) -> MemoryTransport {
        MemoryTransport {
            inner: Arc::clone(&self.inner),
            closed: Arc::default(),
        }
    }

    /// A memory transport configured from a `memory://` URL.
    pub fn from_url(url: &TransportUrl) -> Result<Self> {
        Ok(MemoryTransport::with_options(MemoryOptions::from_url(url)?))
    }

    /// Unsettled messages (ready, waiting, in flight or delayed) of (`topic`, `group`).
    pub fn pending(&self, topic: &str, group: &str) -> usize {
        self.find(topic, group)
            .map_or(0, |queue| lock(&queue.state).len)
    }

    /// Unsettled messages across all groups: zero means every published message is settled.
    pub fn total_pending(&self) -> usize {
        lock(&self.inner.topics)
            .values()
            .flatten()
            .map(|queue| lock(&queue.state).len)
            .sum()
    }

    fn find(&self, topic: &str, group: &str) -> Option<Arc<GroupQueue>> {
        lock(&self.inner.topics)
            .get(topic)?
            .iter()
            .find(|queue| queue.group == group)
            .cloned()
    }

    fn ensure_open(&self, operation: &'static str) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            Err(Error::closed(operation, "memory transport connection"))
        } else {
            Ok(())
        }
    }

    fn queue(&self, topic: &str, group: &str) -> Arc<GroupQueue> {
        let mut topics = lock(&self.inner.topics);
        let queues = topics.entry(topic.to_string()).or_default();
        if let Some(queue) = queues.iter().find(|queue| queue.group == group) {
            return Arc::clone(queue);
        }
        let queue = Arc::new(GroupQueue {
            topic: topic.to_string(),
            group: group.to_string(),
            state: Mutex::new(QueueState::default()),
            ready: Notify::new(),
            space: Arc::clone(&self.inner.space),
        });
        queues.push(Arc::clone(&queue));
        queue
    }

    /// Enqueues the whole batch if every target queue has room; otherwise names a full queue.
    fn try_enqueue(&self, messages: &[Arc<Message>]) -> std::result::Result<(), (String, String)> {
        let topics = lock(&self.inner.topics);
        let capacity = self.inner.options.queue_capacity;
        // The queues the batch goes to, each with how many of its messages: a list searched in
        // turn (a batch reaches a few queues; two hash maps per publish cost more than that).
        let mut wanted: Vec<(&Arc<GroupQueue>, usize)> = Vec::new();
        for message in messages {
            for queue in topics.get(message.topic.as_str()).into_iter().flatten() {
                match wanted
                    .iter_mut()
                    .find(|(known, _)| Arc::ptr_eq(known, queue))
                {
                    Some((_, count)) => *count += 1,
                    None => wanted.push((queue, 1)),
                }
            }
        }
        // Every queue locked (under the topics' lock, so in no competing order) and checked
        // before any message goes in: the batch is enqueued whole or not at all.
        let mut states = Vec::with_capacity(wanted.len());
        for (queue, count) in &wanted {
            let state = lock(&queue.state);
            if state.len + count > capacity {
                return Err((queue.topic.clone(), queue.group.clone()));
            }
            states.push(state);
        }
        for message in messages {
            for queue in topics.get(message.topic.as_str()).into_iter().flatten() {
                let at = wanted
                    .iter()
                    .position(|(known, _)| Arc::ptr_eq(known, queue));
                if let Some(state) = at.and_then(|at| states.get_mut(at)) {
                    state.push(Entry {
                        message: Arc::clone(message),
                        deliveries: 0,
                    });
                }
            }
        }
        drop(states);
        for (queue, _) in &wanted {
            queue.ready.notify_waiters();
        }
        Ok(())
    }
}

#[async_trait]
impl Transport for MemoryTransport {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            fan_out: true,
            competing_consumers: true,
            ordered_by_key: true,
            ordered_across_retries: true,
            delayed_nack: true,
            may_duplicate: false,
            native_dead_letter: false,
            redrive: true,
            persistent: false,
            max_message_bytes: Some(self.inner.options.max_message_bytes),
        }
    }

    async fn publish(&self, messages: Vec<Message>) -> Result<()> {
        self.ensure_open("publish")?;
        let max = self.inner.options.max_message_bytes;
        for message in &messages {
            message.check_publishable(max, "memory")?;
        }
        let messages: Vec<Arc<Message>> = messages.into_iter().map(Arc::new).collect();
        if messages.len() > self.inner.options.queue_capacity {
            return Err(Error::new(
                ErrorKind::Config,
                "publish",
                format!(
                    "a batch of {} messages can never fit a queue of capacity {}; split it",
                    messages.len(),
                    self.inner.options.queue_capacity
                ),
            ));
        }
        let deadline = Instant::now() + self.inner.options.publish_timeout;
        loop {
            self.ensure_open("publish")?;
            if self.try_enqueue(&messages).is_ok() {
                return Ok(());
            }
            // Full: wait for space, counted and registered before looking again, so that
            // space freed meanwhile is not missed.
            let _waiting = self.inner.space.wait();
            let freed = self.inner.space.notify.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            self.ensure_open("publish")?;
            let full = match self.try_enqueue(&messages) {
                Ok(()) => return Ok(()),
                Err(full) => full,
            };
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                let (topic, group) = full;
                return Err(Error::new(
                    ErrorKind::Timeout,
                    "publish",
                    format!(
                        "group queue is full ({} unsettled messages) and no consumer freed space within {:?}",
                        self.inner.options.queue_capacity, self.inner.options.publish_timeout
                    ),
                )
                .with_resource(format!("topic {topic}, group {group}")));
            }
        }
    }

    async fn declare(&self, topic: &str, group: &str) -> Result<()> {
        self.ensure_open("declare")?;
        validate_name("topic", topic)?;
        validate_name("group", group)?;
        self.queue(topic, group);
        Ok(())
    }

    async fn consume(
        &self,
        topic: &str,
        group: &str,
        options: ConsumeOptions,
    ) -> Result<DeliveryStream> {
        if options.start == StartFrom::Earliest {
            return Err(no_history("memory", topic, group));
        }
        self.declare(topic, group).await?;
        let queue = self.queue(topic, group);
        let slots = Slots::new(options.max_in_flight.max(1));
        let closed = Arc::clone(&self.closed);
        let stream = futures::stream::unfold(
            (queue, slots, closed),
            |(queue, slots, closed)| async move {
                let slot = slots.take().await;
                let mut entry = loop {
                    if closed.load(Ordering::Acquire) {
                        return None;
                    }
                    let next = lock(&queue.state).ready.pop_front();
                    if let Some(entry) = next {
                        break entry;
                    }
                    // Nothing ready: wait for a publish, registered before looking again so
                    // that one made meanwhile is not missed. (Registering costs a lock of the
                    // waiters' list each way: not for a message already there.)
                    let ready = queue.ready.notified();
                    tokio::pin!(ready);
                    ready.as_mut().enable();
                    if closed.load(Ordering::Acquire) {
                        return None;
                    }
                    let next = lock(&queue.state).ready.pop_front();
                    match next {
                        Some(entry) => break entry,
                        None => ready.await,
                    }
                };
                entry.deliveries += 1;
                let delivery = Delivery::new(
                    Arc::clone(&entry.message),
                    entry.deliveries,
                    Box::new(MemoryAck {
                        queue: Arc::clone(&queue),
                        entry: Some(entry),
                        _slot: slot,
                    }),
                );
                Some((Ok(delivery), (queue, slots, closed)))
            },
        );
        Ok(Box::pin(stream))
    }

    async fn dead_letters(
        &self,
        topic: &str,
        group: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        Ok(self
            .find(topic, group)
            .map(|queue| {
                lock(&queue.state)
                    .dead
                    .iter()
                    .take(limit)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn redrive(
        &self,
        topic: &str,
        group: &str,
        selection: RedriveSelection,
    ) -> Result<usize> {
        self.ensure_open("redrive")?;
        let Some(queue) = self.find(topic, group) else {
            return Ok(0);
        };
        let moved = {
            let mut state = lock(&queue.state);
            let (chosen, kept): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut state.dead)
                .into_iter()
                .partition(|dl| selection.matches(&dl.message.id));
            state.dead = kept;
            let moved = chosen.len();
            for dead in chosen {
                state.push(Entry {
                    message: Arc::new(dead.message),
                    deliveries: 0,
                });
            }
            moved
        };
        queue.ready.notify_waiters();
        Ok(moved)
    }

    async fn purge_dead_letters(
        &self,
        topic: &str,
        group: &str,
        selection: RedriveSelection,
    ) -> Result<usize> {
        self.ensure_open("purge dead letters")?;
        let Some(queue) = self.find(topic, group) else {
            return Ok(0);
        };
        let mut state = lock(&queue.state);
        let before = state.dead.len();
        state
            .dead
            .retain(|dead| !selection.matches(&dead.message.id));
        Ok(before - state.dead.len())
    }

    async fn delete_group(&self, topic: &str, group: &str) -> Result<()> {
        self.ensure_open("delete a group")?;
        let mut topics = lock(&self.inner.topics);
        if let Some(queues) = topics.get_mut(topic) {
            queues.retain(|queue| queue.group != group);
        }
        drop(topics);
        // Publishers waiting for room in the deleted queue go on.
        self.inner.space.notify.notify_waiters();
        Ok(())
    }

    async fn depth(&self, topic: &str, group: &str) -> Result<Depth> {
        self.ensure_open("report queue depth")?;
        let Some(queue) = self.find(topic, group) else {
            return Err(Error::new(
                ErrorKind::Broker,
                "report queue depth",
                "the group is not declared on this topic: declare it first",
            )
            .with_resource(format!("topic {topic}, group {group}"))
            .with_retryable(false));
        };
        let state = lock(&queue.state);
        Ok(Depth::new(
            Some(state.len as u64),
            Some(state.dead.len() as u64),
        ))
    }

    fn connection(&self) -> ConnectionState {
        if self.closed.load(Ordering::Acquire) {
            ConnectionState::Closed
        } else {
            ConnectionState::Connected
        }
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        for queue in lock(&self.inner.topics).values().flatten() {
            queue.ready.notify_waiters();
        }
        self.inner.space.notify.notify_waiters();
        Ok(())
    }
}

struct MemoryAck {
    queue: Arc<GroupQueue>,
    entry: Option<Entry>,
    _slot: Slot,
}

#[async_trait]
impl Acknowledger for MemoryAck {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        self.settle()
    }

    fn ack_at_once(&mut self) -> Option<Result<()>> {
        Some(self.settle())
    }

    async fn nack(mut self: Box<Self>, delay: Duration) -> Result<()> {
        if let Some(entry) = self.entry.take() {
            self.queue.requeue(entry, delay);
        }
        Ok(())
    }

    async fn dead_letter(
        mut self: Box<Self>,
        message: &Message,
        info: &DeadLetterInfo,
    ) -> Result<()> {
        if let Some(entry) = self.entry.take() {
            lock(&self.queue.state).dead.push_back(DeadLetter {
                message: message.clone(),
                info: info.clone(),
            });
            self.queue.settle_removed(&entry.message);
        }
        Ok(())
    }
}

impl MemoryAck {
    /// Removes the message for good.
    fn settle(&mut self) -> Result<()> {
        if let Some(entry) = self.entry.take() {
            self.queue.settle_removed(&entry.message);
        }
        Ok(())
    }
}

impl Drop for MemoryAck {
    fn drop(&mut self) {
        // Unsettled: the consumer went away (crash, abort, shutdown). Redeliver at once.
        if let Some(entry) = self.entry.take() {
            self.queue.requeue(entry, Duration::ZERO);
        }
    }
}
