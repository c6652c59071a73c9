//! Consuming with manual offsets: only the contiguous prefix of finished offsets of each
//! partition is committed, so concurrent handlers never commit past an unfinished message.
//!
//! - ack: the offset is finished.
//! - nack(delay): the message is handed out again after the delay, in this process; its offset
//!   stays uncommitted meanwhile, so a crash redelivers it from Kafka.
//! - dead letter: produced (and acknowledged by Kafka) to the group's DLQ topic, then finished.
//! - dropped unsettled: handed out again at once.
//! - rebalance: before partitions are revoked, what finished on them is committed (in flight
//!   work on them will be redelivered to their new owner).
//! - shutdown: fetching stops; the consumer stays in the group until in-flight handlers have
//!   settled (or 30 s passed), commits, and leaves at a moment when leaving cannot wedge the
//!   group (see `until_safe_to_leave`): leaving in the middle of a rebalance can leave a
//!   broker's group naming the departed member as its leader (Tansu does), so that no later
//!   member of the group is ever assigned anything.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use busbar_core::{
    Acknowledger, ConsumeOptions, ConsumerHold, ConsumerStatus, DeadLetter, DeadLetterInfo,
    Delivery, DeliveryStream, Error, ErrorKind, Message, Result, Text,
};
use futures::{FutureExt as _, StreamExt as _};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::mapping::from_record;
use crate::Inner;

/// A topic's partition. The topic name is shared, not copied for every record received.
type Partition = (Arc<str>, i32);

#[derive(Default)]
struct PartitionState {
    in_flight: Held,
    /// The held offsets not being handled: waiting behind their key, or for a retry.
    parked: Held,
    /// Keys whose message waits for a retry (`KeyQueue::stalled`).
    stalled_keys: usize,
    next: i64,
    committed: i64,
    /// Keys with a message handed out (or waiting for its retry), and the later messages of
    /// that key waiting their turn: one message per key at a time keeps per-key order, also
    /// across retries.
    keys: foldhash::HashMap<Text, KeyQueue>,
    /// Payload bytes of the messages in `in_flight`.
    held_bytes: usize,
    /// Whether fetching from the partition is paused because too many of its messages are
    /// held here (waiting behind their key, mostly).
    paused: bool,
}

/// The messages of one key waiting for the one handed out before them.
#[derive(Default)]
struct KeyQueue {
    waiting: VecDeque<(Arc<Message>, i64)>,
    /// Whether the message handed out is waiting for a retry: then those behind it do not
    /// count as read ahead (see [`HeldLimit::read_ahead`]).
    stalled: bool,
}

impl PartitionState {
    /// Marks `key` (when it has messages waiting or handed out) stalled in retries, or no
    /// longer; returns by how much that changed the messages waiting behind keys not stalled.
    fn set_stalled(&mut self, key: Option<&str>, stalled: bool) -> isize {
        let Some(queue) = key.and_then(|key| self.keys.get_mut(key)) else {
            return 0;
        };
        if queue.stalled == stalled {
            return 0;
        }
        queue.stalled = stalled;
        let waiting = queue.waiting.len() as isize;
        if stalled {
            self.stalled_keys += 1;
            -waiting
        } else {
            self.stalled_keys = self.stalled_keys.saturating_sub(1);
            waiting
        }
    }

    /// Messages waiting behind a key that is not stalled.
    fn queued(&self) -> usize {
        self.keys
            .values()
            .filter(|queue| !queue.stalled)
            .map(|queue| queue.waiting.len())
            .sum()
    }

    fn over(&self, limit: &HeldLimit) -> bool {
        self.in_flight.len() >= limit.messages || self.held_bytes >= limit.bytes
    }

    fn under_half(&self, limit: &HeldLimit) -> bool {
        self.in_flight.len() < limit.messages / 2 && self.held_bytes < limit.bytes / 2
    }
}

/// Offsets of one partition's messages, in order: those held (received, not finished), or
/// those of them parked.
///
/// A partition's records arrive in offset order, so a received offset goes at the back, and
/// the handlers finish them roughly in order (and a key's waiting messages are handed out in
/// order), so one leaves near the front (or, behind an offset held back by retries, near the
/// back): cheaper per record than a `BTreeSet` (an allocation per node, a rebalancing walk
/// per insert and removal). Only held offsets are kept, so memory stays bounded by the held
/// limit whatever finishes first. An offset that arrives out of order (not expected from
/// librdkafka) still takes its place.
#[derive(Default)]
struct Held(VecDeque<i64>);

impl Held {
    fn insert(&mut self, offset: i64) {
        match self.0.back() {
            Some(&last) if offset <= last => {
                if let Err(i) = self.0.binary_search(&offset) {
                    self.0.insert(i, offset);
                }
            }
            _ => self.0.push_back(offset),
        }
    }

    /// Forgets `offset`; returns whether it was held.
    fn remove(&mut self, offset: i64) -> bool {
        match self.0.binary_search(&offset) {
            Ok(i) => self.0.remove(i).is_some(),
            Err(_) => false,
        }
    }

    fn contains(&self, offset: i64) -> bool {
        self.0.binary_search(&offset).is_ok()
    }

    /// The oldest held offset.
    fn first(&self) -> Option<i64> {
        self.0.front().copied()
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

/// How much of one partition may be held (handed out, retrying or waiting behind its key)
/// before its fetching pauses; it resumes below half of both.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct HeldLimit {
    pub(crate) messages: usize,
    pub(crate) bytes: usize,
    /// How many messages may wait behind keys being handled (over all partitions) before the
    /// reader waits for some to be handed out, rather than read further ahead: records read far
    /// ahead are cold in the CPU's caches by the time they are handled (a backlog of keyed
    /// records took about a tenth more CPU a record with the reader up to 2,000 records ahead).
    /// Messages behind a key stalled in retries do not count, so such a key never holds back
    /// the others; the held limit bounds those.
    pub(crate) read_ahead: usize,
}

impl HeldLimit {
    /// Per partition: 16 MiB of payload, and 256 times the subscription's in-flight limit
    /// (at least 8,192 messages) for small ones. Large enough that a backlog of keyed records,
    /// most of them waiting behind their key for a moment, flows without pauses (each pause
    /// costs a re-fetch from the broker); small enough to bound what a key stuck in retries
    /// holds back. librdkafka's own fetch buffer is 64 MiB by default.
    pub(crate) fn for_subscription(max_in_flight: usize) -> Self {
        HeldLimit {
            messages: max_in_flight.saturating_mul(256).max(8192),
            bytes: 16 * 1024 * 1024,
            read_ahead: max_in_flight.saturating_mul(8).max(64),
        }
    }
}

/// What finishing a message freed.
#[derive(Debug, Default)]
struct Finished {
    /// The next message of its key, to hand out now.
    next: Option<(Arc<Message>, i64)>,
    /// The offset to resume fetching from, when its partition was paused and is now under
    /// half its limit.
    resume_from: Option<i64>,
    /// Whether the reader waits for room to read ahead, and now has it.
    room: bool,
}

/// Hashes a [`Partition`] by its number and its topic name's length, not the name's bytes:
/// a consumer reads two topics, its own and its redrive topic (longer by its suffix), so
/// those tell its partitions apart, and equal keys still hash alike (keys are compared in
/// full). Hashing the name cost about 100 instructions a look-up, several per record.
#[derive(Default)]
struct PartitionHasher(u64);

impl std::hash::Hasher for PartitionHasher {
    fn finish(&self) -> u64 {
        // Spread the bits over the whole word: the table takes its buckets from the low bits
        // and its tags from the high ones.
        self.0.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0 = self.0.rotate_left(17) ^ bytes.len() as u64;
    }

    /// The end mark `str` writes after its bytes: no news.
    fn write_u8(&mut self, _: u8) {}

    fn write_i32(&mut self, partition: i32) {
        self.0 = self.0.rotate_left(17) ^ u64::from(partition as u32);
    }
}

type Partitions = std::collections::HashMap<
    Partition,
    PartitionState,
    std::hash::BuildHasherDefault<PartitionHasher>,
>;

/// In-flight offsets per partition, and what may be committed.
pub(crate) struct Tracker {
    partitions: Partitions,
    limit: HeldLimit,
    /// Messages waiting behind keys that are not stalled, in all partitions.
    queued: usize,
    /// Whether the reader waits for `queued` to fall below the read-ahead limit.
    reader_waiting: bool,
}

impl Tracker {
    pub(crate) fn new(limit: HeldLimit) -> Self {
        Tracker {
            partitions: Partitions::default(),
            limit,
            queued: 0,
            reader_waiting: false,
        }
    }

    /// Whether the reader may read on; if not, it waits, and the settling that makes room
    /// tells it (`Finished::room`, `retrying`).
    fn may_read(&mut self) -> bool {
        let room = self.queued < self.limit.read_ahead;
        self.reader_waiting = !room;
        room
    }

    /// Whether the reader waits and may now read on (it is told once).
    fn room_made(&mut self) -> bool {
        let room = self.reader_waiting && self.queued < self.limit.read_ahead;
        if room {
            self.reader_waiting = false;
        }
        room
    }

    /// Records a received message; returns whether it may be handed out now (false: an
    /// earlier message of its key is still out, so it waits its turn).
    fn received(&mut self, partition: &Partition, message: &Arc<Message>, offset: i64) -> bool {
        // Not `entry(partition.clone())`: that would copy the topic name for every record.
        if !self.partitions.contains_key(partition) {
            self.partitions
                .insert(partition.clone(), PartitionState::default());
        }
        let Some(state) = self.partitions.get_mut(partition) else {
            return true;
        };
        state.in_flight.insert(offset);
        state.held_bytes += message.payload.len();
        state.next = state.next.max(offset + 1);
        let Some(key) = &message.key else { return true };
        match state.keys.get_mut(key) {
            Some(queue) => {
                queue.waiting.push_back((Arc::clone(message), offset));
                if !queue.stalled {
                    self.queued += 1;
                }
                state.parked.insert(offset);
                false
            }
            None => {
                state.keys.insert(key.clone(), KeyQueue::default());
                true
            }
        }
    }

    /// Records a finished message: the next message of its key to hand out, if any, and
    /// whether its partition may fetch again.
    fn finished(&mut self, partition: &Partition, message: &Message, offset: i64) -> Finished {
        let Some(state) = self.partitions.get_mut(partition) else {
            return Finished::default();
        };
        if state.in_flight.remove(offset) {
            state.held_bytes = state.held_bytes.saturating_sub(message.payload.len());
        }
        state.parked.remove(offset);
        let mut finished = Finished::default();
        if state.paused && state.under_half(&self.limit) {
            state.paused = false;
            finished.resume_from = Some(state.next);
        }
        if let Some(key) = message.key.as_deref() {
            if state.stalled_keys > 0 {
                // (A stalled key's message is handed out again before it finishes; should one
                // not be, its key is not stalled any more.)
                let unstalled = state.set_stalled(Some(key), false);
                self.queued = self.queued.saturating_add_signed(unstalled);
            }
            finished.next = state
                .keys
                .get_mut(key)
                .and_then(|queue| queue.waiting.pop_front());
            match finished.next {
                Some(_) => self.queued = self.queued.saturating_sub(1),
                None => {
                    state.keys.remove(key);
                }
            }
        }
        finished.room = self.room_made();
        finished
    }

    /// A message handed out waits for a retry: parked (not busy) until handed out again, and
    /// the messages behind its key stop counting as read ahead. Returns whether that made room
    /// for the reader.
    fn retrying(&mut self, partition: &Partition, message: &Message, offset: i64) -> bool {
        if let Some(state) = self.partitions.get_mut(partition) {
            state.parked.insert(offset);
            let stalled = state.set_stalled(message.key.as_deref(), true);
            self.queued = self.queued.saturating_add_signed(stalled);
        }
        self.room_made()
    }

    /// Takes a parked message out to be handled (busy again; the messages behind its key count
    /// as read ahead again); false when its partition was revoked meanwhile: the new owner
    /// reads it again.
    fn unpark(&mut self, partition: &Partition, message: &Message, offset: i64) -> bool {
        let Some(state) = self
            .partitions
            .get_mut(partition)
            .filter(|state| state.in_flight.contains(offset))
        else {
            return false;
        };
        state.parked.remove(offset);
        if state.stalled_keys > 0 {
            let unstalled = state.set_stalled(message.key.as_deref(), false);
            self.queued = self.queued.saturating_add_signed(unstalled);
        }
        true
    }

    /// Deliveries being handled (not finished, not parked for a delayed redelivery).
    fn busy(&self) -> usize {
        self.partitions
            .values()
            .map(|s| s.in_flight.len() - s.parked.len())
            .sum()
    }

    /// The positions to commit (first unfinished offset, or past the last received one), for
    /// partitions that moved since the last commit; `only` restricts to some partitions.
    fn take_commit(&mut self, only: Option<&[Partition]>) -> TopicPartitionList {
        let mut list = TopicPartitionList::new();
        for (partition, state) in &mut self.partitions {
            if only.is_some_and(|only| !only.contains(partition)) {
                continue;
            }
            let position = state.in_flight.first().unwrap_or(state.next);
            if position > state.committed
                && list
                    .add_partition_offset(&partition.0, partition.1, Offset::Offset(position))
                    .is_ok()
            {
                state.committed = position;
            }
        }
        list
    }

    /// Whether the partition holds its limit or more and is not paused yet; marks it paused
    /// if so (the caller pauses the fetch).
    fn should_pause(&mut self, partition: &Partition) -> bool {
        match self.partitions.get_mut(partition) {
            Some(state) if !state.paused && state.over(&self.limit) => {
                state.paused = true;
                true
            }
            _ => false,
        }
    }

    fn forget(&mut self, partitions: &[Partition]) {
        for partition in partitions {
            if let Some(state) = self.partitions.remove(partition) {
                self.queued = self.queued.saturating_sub(state.queued());
            }
        }
    }
}

fn lock(tracker: &Mutex<Tracker>) -> MutexGuard<'_, Tracker> {
    tracker.lock().unwrap_or_else(|p| p.into_inner())
}

/// Commits what finished on partitions before they are revoked, tells the subscription
/// whether the consumer holds an assignment, and follows its role in the group.
pub(crate) struct RebalanceContext {
    tracker: Arc<Mutex<Tracker>>,
    status: ConsumerStatus,
    role: Mutex<Role>,
    /// Whether librdkafka's debug logs go on to `tracing` (the URL asked for `debug`).
    forward_debug: bool,
}

/// The consumer's place in its group, as its last JoinGroup response and assignment tell.
#[derive(Debug, Default, Clone, Copy)]
struct Role {
    /// Whether the last join completed, and whether it named this consumer the leader.
    leader: Option<bool>,
    /// Members in the last join (the leader's response lists them; others' list none).
    members: usize,
    /// When the consumer was last assigned its share.
    assigned_at: Option<tokio::time::Instant>,
}

impl RebalanceContext {
    fn role(&self) -> Role {
        *self.role.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads a JoinGroup response from librdkafka's log ("JoinGroup response: GenerationId
    /// 17, Protocol range, LeaderId X (me), my MemberId X, member metadata count 3: (no
    /// error)"): no API tells a consumer whether it leads its group.
    fn joined(&self, line: &str) {
        // The message starts with the thread: "[thrd:main]: JoinGroup response: …".
        let Some((_, response)) = line.split_once("JoinGroup response: ") else {
            return;
        };
        if !response.ends_with("(no error)") {
            return;
        }
        let members = response
            .split("member metadata count ")
            .nth(1)
            .and_then(|rest| rest.split(':').next())
            .and_then(|count| count.trim().parse().ok())
            .unwrap_or(0);
        let mut role = self.role.lock().unwrap_or_else(|p| p.into_inner());
        role.leader = Some(response.contains(" (me),"));
        role.members = members;
    }
}

impl ClientContext for RebalanceContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        if fac == "JOINGROUP" {
            self.joined(log_message);
        }
        if matches!(level, rdkafka::config::RDKafkaLogLevel::Debug) && !self.forward_debug {
            return;
        }
        rdkafka::client::DefaultClientContext.log(level, fac, log_message);
    }
}

impl ConsumerContext for RebalanceContext {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            // An assignment, even an empty one (more members than partitions): the join is
            // complete.
            Rebalance::Assign(_) => {
                self.role
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .assigned_at = Some(tokio::time::Instant::now());
                self.status.set_consuming(true);
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "group rebalance failed"),
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(revoked) = rebalance {
            self.status.set_consuming(false);
            let partitions: Vec<Partition> = revoked
                .elements()
                .iter()
                .map(|e| (Arc::from(e.topic()), e.partition()))
                .collect();
            let list = {
                let mut tracker = lock(&self.tracker);
                let list = tracker.take_commit(Some(&partitions));
                tracker.forget(&partitions);
                list
            };
            if list.count() > 0 {
                if let Err(e) = consumer.commit(&list, CommitMode::Sync) {
                    tracing::warn!(error = %e, "could not commit before a rebalance; the new owner redelivers from the last commit");
                }
            }
            // A pause (see `Tracker::should_pause`) outlives the assignment in librdkafka: a
            // partition assigned back to this consumer would never fetch again.
            if let Err(e) = consumer.resume(revoked) {
                tracing::debug!(error = %e, "could not resume revoked partitions");
            }
        }
    }
}

/// How long a message whose dead-lettering failed waits before it is handed out again.
const DEAD_LETTER_RETRY: Duration = Duration::from_secs(1);

/// How long a stopping consumer may take to settle, commit and leave its group before a new
/// consumer of the group (or the transport's close) stops waiting for it.
pub(crate) const CLOSE_LIMIT: Duration = Duration::from_secs(40);

/// The consumers of one transport, so that a new consumer of a group joins only after one
/// being stopped has left it, and `close` returns only once every consumer has committed and
/// left (a process may exit right after).
#[derive(Default)]
pub(crate) struct Consumers {
    list: Mutex<Vec<Registered>>,
}

struct Registered {
    group: String,
    /// The consumer's channel to its subscription: closed once the subscription let go.
    deliveries: mpsc::WeakSender<Result<Delivery>>,
    /// Released once the consumer committed and left the group.
    status: ConsumerStatus,
}

impl Consumers {
    /// Registers a consumer whose `status` already has its hold.
    fn register(
        &self,
        group: &str,
        deliveries: &mpsc::Sender<Result<Delivery>>,
        status: &ConsumerStatus,
    ) {
        let mut list = self.list.lock().unwrap_or_else(|p| p.into_inner());
        list.retain(|r| !r.status.is_released());
        list.push(Registered {
            group: group.to_string(),
            deliveries: deliveries.downgrade(),
            status: status.clone(),
        });
    }

    /// Waits (at most `limit`) until the consumers that are stopping, of `group` or of every
    /// group, have left. Consumers still serving a subscription are not waited for, unless
    /// the transport is closing (`group` is `None`).
    pub(crate) async fn stopped(&self, group: Option<&str>, limit: Duration) {
        let waits: Vec<_> = {
            let list = self.list.lock().unwrap_or_else(|p| p.into_inner());
            list.iter()
                .filter(|r| !r.status.is_released())
                .filter(|r| match group {
                    None => true,
                    Some(group) => {
                        r.group == group && r.deliveries.upgrade().is_none_or(|tx| tx.is_closed())
                    }
                })
                .map(|r| r.status.clone())
                .collect()
        };
        let all = futures::future::join_all(waits.iter().map(|s| s.wait_released(limit)));
        if !all.await.into_iter().all(|released| released) {
            tracing::warn!(
                ?group,
                "a stopping Kafka consumer did not leave its group in time; going on"
            );
        }
    }
}

struct Redelivery {
    message: Arc<Message>,
    attempt: u32,
    partition: Partition,
    offset: i64,
}

/// What settling a delivery asks of the consumer's loop.
enum Wake {
    /// Hand this message out (again).
    Redeliver(Redelivery),
    /// Fetch from this partition again, from this offset.
    Resume(Partition, i64),
    /// The reader, waiting with enough read ahead, may read on.
    Room,
}

pub(crate) fn consume(
    inner: Arc<Inner>,
    topic: &str,
    group: &str,
    options: ConsumeOptions,
) -> Result<DeliveryStream> {
    // The start was settled before (`depth::start_at_end` for `Latest`): a group without
    // committed offsets begins at the start of the log.
    let ConsumeOptions {
        max_in_flight,
        status,
        start: _,
    } = options;
    let config = &inner.config;
    let tracker = Arc::new(Mutex::new(Tracker::new(HeldLimit::for_subscription(
        max_in_flight,
    ))));
    let consumer: StreamConsumer<RebalanceContext> = config
        .consumer_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set(
            "session.timeout.ms",
            config.session_timeout.as_millis().to_string(),
        )
        .create_with_context(RebalanceContext {
            tracker: Arc::clone(&tracker),
            status: status.clone(),
            role: Mutex::default(),
            forward_debug: config.wants_debug(),
        })
        .map_err(|e| inner.kafka_error("consume", "cannot create a consumer", e))?;
    let redrive = config.redrive_topic(topic, group);
    consumer
        .subscribe(&[topic, redrive.as_str()])
        .map_err(|e| inner.kafka_error("consume", format!("cannot subscribe to {topic:?}"), e))?;
    let (tx, mut rx) = mpsc::channel(max_in_flight.max(1));
    status.joining();
    let member = Member {
        hold: status.hold(),
        status,
    };
    inner.consumers.register(group, &tx, &member.status);
    let (retry_tx, retry_rx) = mpsc::unbounded_channel();
    let route = Arc::new(Route {
        topic: topic.to_string(),
        group: group.to_string(),
        dlq: config.dead_letter_topic(topic, group),
    });
    tokio::spawn(run(
        inner, consumer, tracker, route, member, tx, retry_tx, retry_rx,
    ));
    Ok(Box::pin(futures::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
    })))
}

struct Route {
    topic: String,
    group: String,
    dlq: String,
}

/// After how many session timeouts without an assignment a consumer reports it: a join on
/// Tansu takes about 3 s, a few rebalances in a row take a session timeout or two.
const UNASSIGNED_SESSIONS: u32 = 3;

/// Notices a consumer that stays without an assignment (joining or rebalancing) for longer
/// than `limit`, once per `limit`.
struct Unassigned {
    limit: Duration,
    since: Option<tokio::time::Instant>,
    reported: Option<tokio::time::Instant>,
}

impl Unassigned {
    fn new(limit: Duration) -> Self {
        Unassigned {
            limit,
            since: Some(tokio::time::Instant::now()),
            reported: None,
        }
    }

    /// How long the consumer has been without an assignment, when that is overdue and was
    /// not reported within the last `limit`.
    fn overdue(&mut self, consuming: bool) -> Option<Duration> {
        let now = tokio::time::Instant::now();
        if consuming {
            (self.since, self.reported) = (None, None);
            return None;
        }
        let waited = now - *self.since.get_or_insert(now);
        let due = self.reported.is_none_or(|at| now - at >= self.limit);
        (waited >= self.limit && due).then(|| {
            self.reported = Some(now);
            waited
        })
    }
}

/// The consumer's membership of its group, as the subscription sees it: whether it is
/// assigned its share, and a hold released once it has left.
struct Member {
    status: ConsumerStatus,
    hold: ConsumerHold,
}

/// The names of the topics a consumer reads (its topic and its redrive topic), shared.
#[derive(Default)]
struct TopicNames(Vec<Arc<str>>);

impl TopicNames {
    fn name(&mut self, topic: &str) -> Arc<str> {
        if let Some(known) = self.0.iter().find(|known| ***known == *topic) {
            return Arc::clone(known);
        }
        let name: Arc<str> = Arc::from(topic);
        self.0.push(Arc::clone(&name));
        name
    }
}

/// How many ready records the reader takes in a row before it looks at its other duties
/// (redeliveries, the commit tick, a closed subscription) again.
const BURST: usize = 64;

#[allow(clippy::too_many_arguments)]
async fn run(
    inner: Arc<Inner>,
    consumer: StreamConsumer<RebalanceContext>,
    tracker: Arc<Mutex<Tracker>>,
    route: Arc<Route>,
    member: Member,
    tx: mpsc::Sender<Result<Delivery>>,
    retry_tx: mpsc::UnboundedSender<Wake>,
    mut retry_rx: mpsc::UnboundedReceiver<Wake>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut topics = TopicNames::default();
    let mut unassigned = Unassigned::new(UNASSIGNED_SESSIONS * inner.config.session_timeout);
    let settling = Arc::new(Settling {
        inner: Arc::clone(&inner),
        tracker: Arc::clone(&tracker),
        retry: retry_tx,
        route: Arc::clone(&route),
        deliveries: tx.downgrade(),
    });
    let make = |message, attempt, partition, offset| {
        settling.delivery(message, attempt, partition, offset)
    };
    let mut records = consumer.stream();
    'reading: loop {
        if inner.is_closed() {
            break;
        }
        let room = lock(&tracker).may_read();
        tokio::select! {
            biased;
            () = tx.closed() => break,
            Some(wake) = retry_rx.recv() => {
                let again = match wake {
                    Wake::Redeliver(again) => again,
                    Wake::Resume(partition, from) => {
                        fetch(&consumer, &partition, Fetch::Resume(from));
                        continue;
                    }
                    Wake::Room => continue,
                };
                if !lock(&tracker).unpark(&again.partition, &again.message, again.offset) {
                    continue;
                }
                let delivery = make(again.message, again.attempt, again.partition, again.offset);
                if tx.send(Ok(delivery)).await.is_err() {
                    break;
                }
            }
            _ = tick.tick() => {
                commit(&consumer, &tracker, CommitMode::Async);
                if let Some(waited) = unassigned.overdue(member.status.is_consuming()) {
                    let error = Error::new(
                        ErrorKind::Broker,
                        "consume",
                        format!(
                            "the consumer has had no assignment for {waited:?}: the group \
                             coordinator keeps the group rebalancing. On Tansu, a group whose \
                             leader left while the group was forming stays so until the broker \
                             restarts (see busbar-kafka's README); use another group name or \
                             restart the broker"
                        ),
                    )
                    .with_resource(format!("topic {}, group {}", route.topic, route.group))
                    .with_retryable(true);
                    if tx.send(Err(error)).await.is_err() {
                        break;
                    }
                }
            }
            record = records.next(), if room => {
                // A backlog is read in bursts: the records librdkafka holds ready are taken
                // one after another, without a select (about 2,000 instructions) for each.
                let mut record = record;
                let mut burst = 0;
                while let Some(received) = record.take() {
                    match received {
                        Ok(received) => {
                            use rdkafka::Message as _;
                            let partition = (topics.name(received.topic()), received.partition());
                            let offset = received.offset();
                            let message = Arc::new(from_record(&route.topic, &received));
                            drop(received);
                            let (now, pause, room) = {
                                let mut tracker = lock(&tracker);
                                let now = tracker.received(&partition, &message, offset);
                                (now, tracker.should_pause(&partition), tracker.may_read())
                            };
                            if !room {
                                // Enough read ahead: the burst ends here.
                                burst = BURST;
                            }
                            if pause {
                                // Bounded memory: a partition whose messages wait behind a
                                // retrying key stops fetching until most of them are done.
                                fetch(&consumer, &partition, Fetch::Pause);
                            }
                            // Else it waits behind an earlier message of its key.
                            if now && tx.send(Ok(make(message, 1, partition, offset))).await.is_err() {
                                break 'reading;
                            }
                        }
                        Err(e) => {
                            let error = inner.kafka_error("consume", format!("consumer of {:?} reported an error", route.topic), e);
                            if tx.send(Err(error)).await.is_err() {
                                break 'reading;
                            }
                        }
                    }
                    burst += 1;
                    if burst < BURST {
                        record = records.next().now_or_never().flatten();
                    }
                }
            }
        }
    }
    drop(records);
    // Stay in the group until the handlers still running have settled, then commit and leave.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while lock(&tracker).busy() > 0 && tokio::time::Instant::now() < deadline && !inner.is_closed()
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    until_safe_to_leave(
        &consumer,
        &member.status,
        JOIN_ROUNDS * inner.config.session_timeout,
    )
    .await;
    // The commit and the close (which leaves the group, serving the revoke on the way) block
    // on the broker: not on a runtime worker.
    let _ = tokio::task::spawn_blocking(move || {
        commit(&consumer, &tracker, CommitMode::Sync);
        drop(consumer);
    })
    .await;
    drop(member.hold);
}

/// How many session timeouts a stopping consumer waits, at most, for a moment when leaving
/// its group is safe: members of a group stopping together each end a join round, so the last
/// ones may need a few.
const JOIN_ROUNDS: u32 = 6;

/// How long a leader stays after its last assignment before leaving, when other members are
/// in its group: about one heartbeat interval (librdkafka's default is 3 s), time for a
/// member's departure that began earlier to reach it as a rebalance.
const LEADER_QUIET: Duration = Duration::from_secs(4);

/// Waits (at most `limit`) until leaving the group cannot wedge it, serving rebalances.
///
/// Tansu (0.6.0, and its main branch in November 2026) keeps a member that leaves while the
/// group is being formed as the group's leader, though it is gone: every later member's
/// SyncGroup is then answered "rebalance in progress", forever, and the group consumes nothing
/// again until the broker restarts (Apache Kafka had the same class of bug, KAFKA-12890). So:
/// - a member still joining finishes its join first (it may be chosen leader meanwhile);
/// - a follower, once assigned, leaves at once: its leaving never changes the leader;
/// - the leader leaves once assigned when it is the group's only member, or after
///   [`LEADER_QUIET`] without a new rebalance: a group that was just formed, not one that
///   another member's departure is re-forming.
///
/// Records fetched meanwhile are not handed out; the group's next owner reads them from the
/// committed offset.
async fn until_safe_to_leave(
    consumer: &StreamConsumer<RebalanceContext>,
    status: &ConsumerStatus,
    limit: Duration,
) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        // Rebalance callbacks and logs are served while the consumer is polled; the consumer
        // was not polled since its subscription stopped, and a revoke may be waiting.
        let _ = tokio::time::timeout(Duration::from_millis(20), consumer.recv()).await;
        let role = consumer.context().role();
        let assigned_for = role.assigned_at.map(|at| at.elapsed());
        let safe = status.is_consuming()
            && match role.leader {
                Some(false) => true,
                Some(true) => role.members <= 1 || assigned_for >= Some(LEADER_QUIET),
                None => false,
            };
        if safe {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                ?limit,
                ?role,
                "no safe moment to leave the group came in time; leaving anyway"
            );
            return;
        }
    }
}

enum Fetch {
    Pause,
    /// Resume fetching from this offset: librdkafka drops what it had fetched ahead while the
    /// partition was paused, so without the seek those records would be skipped.
    Resume(i64),
}

fn fetch(consumer: &StreamConsumer<RebalanceContext>, partition: &Partition, what: Fetch) {
    let mut list = TopicPartitionList::new();
    list.add_partition(&partition.0, partition.1);
    let result = match what {
        Fetch::Pause => consumer.pause(&list),
        Fetch::Resume(next) => consumer
            .seek(
                &partition.0,
                partition.1,
                Offset::Offset(next),
                Duration::ZERO,
            )
            .and_then(|()| consumer.resume(&list)),
    };
    if let Err(e) = result {
        // Pausing is only a memory bound; a partition that was revoked meanwhile needs none.
        tracing::debug!(error = %e, topic = %partition.0, partition = partition.1, "could not pause or resume fetching");
    }
}

fn commit(consumer: &StreamConsumer<RebalanceContext>, tracker: &Mutex<Tracker>, mode: CommitMode) {
    let list = lock(tracker).take_commit(None);
    if list.count() > 0 {
        if let Err(e) = consumer.commit(&list, mode) {
            tracing::warn!(error = %e, "offset commit failed; those messages may be delivered again");
        }
    }
}

/// What the acks of one consumer's deliveries share: one reference each, not four (each
/// taken on the reader's thread and given back on a handler's).
struct Settling {
    inner: Arc<Inner>,
    tracker: Arc<Mutex<Tracker>>,
    retry: mpsc::UnboundedSender<Wake>,
    route: Arc<Route>,
    /// The subscription's channel, for the next message of a key (weak: the channel ends
    /// with the reader, not with the last ack).
    deliveries: mpsc::WeakSender<Result<Delivery>>,
}

impl Settling {
    /// A delivery of `message`, read at `offset` of `partition`, on its `attempt`-th delivery.
    fn delivery(
        self: &Arc<Self>,
        message: Arc<Message>,
        attempt: u32,
        partition: Partition,
        offset: i64,
    ) -> Delivery {
        Delivery::new(
            Arc::clone(&message),
            attempt,
            Box::new(KafkaAck {
                settling: Arc::clone(self),
                message,
                attempt,
                partition,
                offset,
                settled: false,
            }),
        )
    }
}

struct KafkaAck {
    settling: Arc<Settling>,
    message: Arc<Message>,
    attempt: u32,
    partition: Partition,
    offset: i64,
    settled: bool,
}

impl KafkaAck {
    fn finish(&mut self) {
        self.settled = true;
        let settling = &self.settling;
        let finished =
            lock(&settling.tracker).finished(&self.partition, &self.message, self.offset);
        if finished.room {
            let _ = settling.retry.send(Wake::Room);
        }
        if let Some(from) = finished.resume_from {
            // Under half its limit: fetch again now, not at the next tick.
            let _ = settling
                .retry
                .send(Wake::Resume(self.partition.clone(), from));
        }
        if let Some((message, offset)) = finished.next {
            // The next message of this key gets its turn: straight to the subscription when
            // its channel has room (a round trip through the reader's loop cost about 2,000
            // instructions per message held behind its key), else through the reader.
            // It stays parked (not busy, so a stopping consumer does not wait for it) until it
            // is handed out.
            let subscription = settling.deliveries.upgrade();
            let room = subscription
                .as_ref()
                .and_then(|sender| sender.try_reserve().ok());
            if let Some(room) = room {
                if lock(&settling.tracker).unpark(&self.partition, &message, offset) {
                    let partition = self.partition.clone();
                    room.send(Ok(settling.delivery(message, 1, partition, offset)));
                }
            } else {
                let _ = settling.retry.send(Wake::Redeliver(Redelivery {
                    message,
                    attempt: 1,
                    partition: self.partition.clone(),
                    offset,
                }));
            }
        }
    }

    fn again(&mut self, delay: Duration) {
        self.settled = true;
        let room =
            lock(&self.settling.tracker).retrying(&self.partition, &self.message, self.offset);
        if room {
            let _ = self.settling.retry.send(Wake::Room);
        }
        let redelivery = Redelivery {
            message: Arc::clone(&self.message),
            attempt: self.attempt.saturating_add(1),
            partition: self.partition.clone(),
            offset: self.offset,
        };
        let retry = self.settling.retry.clone();
        let redelivery = Wake::Redeliver(redelivery);
        if delay.is_zero() {
            let _ = retry.send(redelivery);
        } else if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                tokio::time::sleep(delay).await;
                // A closed channel means the consumer stopped: the offset stays uncommitted
                // and Kafka redelivers the message to the group.
                let _ = retry.send(redelivery);
            });
        }
    }
}

#[async_trait]
impl Acknowledger for KafkaAck {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        self.finish();
        Ok(())
    }

    /// An ack only marks the offset done; commits go out on the consumer's tick.
    fn ack_at_once(&mut self) -> Option<Result<()>> {
        self.finish();
        Some(Ok(()))
    }

    async fn nack(mut self: Box<Self>, delay: Duration) -> Result<()> {
        self.again(delay);
        Ok(())
    }

    async fn dead_letter(
        mut self: Box<Self>,
        message: &Message,
        info: &DeadLetterInfo,
    ) -> Result<()> {
        let mut dead = DeadLetter {
            message: message.clone(),
            info: info.clone(),
        }
        .to_message();
        dead.topic = Text::new(&self.settling.route.dlq);
        match crate::producer::send(&self.settling.inner, vec![dead], "dead-letter").await {
            Ok(()) => {
                self.finish();
                Ok(())
            }
            Err(e) => {
                // Not at once: Kafka has no delivery limit to end a loop of failing attempts
                // (RabbitMQ and SQS do), and the DLQ topic is likely down for a while.
                self.again(DEAD_LETTER_RETRY);
                Err(Error::new(
                    ErrorKind::Broker,
                    "dead-letter",
                    format!(
                        "could not dead-letter {}; it will be delivered again in {DEAD_LETTER_RETRY:?}",
                        message.id
                    ),
                )
                .with_source(e))
            }
        }
    }
}

impl Drop for KafkaAck {
    fn drop(&mut self) {
        if !self.settled {
            self.again(Duration::ZERO);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> Partition {
        ("t".into(), 0)
    }

    fn tracker(messages: usize, bytes: usize) -> Tracker {
        Tracker::new(HeldLimit {
            messages,
            bytes,
            read_ahead: 1000,
        })
    }

    fn keyed(id: &str, key: &str) -> Arc<Message> {
        let mut m = Message::new(id, "t", "");
        m.key = Some(key.into());
        Arc::new(m)
    }

    fn committed(tracker: &mut Tracker) -> Option<i64> {
        let list = tracker.take_commit(None);
        list.elements().first().and_then(|e| match e.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        })
    }

    #[test]
    fn partitions_of_a_topic_and_its_redrive_topic_hash_apart_and_equal_keys_alike() {
        use std::hash::BuildHasher;
        let hash =
            |p: &Partition| std::hash::BuildHasherDefault::<PartitionHasher>::default().hash_one(p);
        let (topic, redrive): (Arc<str>, Arc<str>) = ("orders".into(), "orders.redrive.g".into());
        let mut seen = std::collections::HashSet::new();
        for name in [&topic, &redrive] {
            for partition in 0..256 {
                assert!(
                    seen.insert(hash(&(Arc::clone(name), partition))),
                    "{name}/{partition} collides"
                );
            }
        }
        // A key made apart from the map's (as a revoke's list is) hashes as the map's does.
        let copy: Arc<str> = Arc::from(&*topic);
        assert_eq!(hash(&(copy, 3)), hash(&(topic, 3)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_consumer_without_an_assignment_is_reported_once_per_limit() {
        let limit = Duration::from_secs(10);
        let mut unassigned = Unassigned::new(limit);
        assert_eq!(unassigned.overdue(false), None, "joining just began");
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(unassigned.overdue(false), None);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            unassigned.overdue(false),
            Some(limit),
            "ten seconds without"
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(unassigned.overdue(false), None, "reported five seconds ago");
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(
            unassigned.overdue(false),
            Some(2 * limit),
            "again after the limit"
        );
        assert_eq!(unassigned.overdue(true), None, "assigned");
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(
            unassigned.overdue(false),
            None,
            "a new rebalance starts the count over"
        );
        tokio::time::advance(limit).await;
        assert_eq!(unassigned.overdue(false), Some(limit));
    }

    #[test]
    fn held_offsets_behave_as_a_set_in_any_arrival_order() {
        let mut held = Held::default();
        for offset in [5, 6, 7, 9] {
            held.insert(offset);
        }
        held.insert(6); // a repeat counts once
        held.insert(8); // out of order, takes its place
        assert_eq!((held.len(), held.first()), (5, Some(5)));
        assert!(held.remove(7) && !held.remove(7) && !held.remove(4));
        assert!(!held.contains(7) && held.contains(8));
        assert_eq!((held.len(), held.first()), (4, Some(5)));
        assert!(held.remove(5) && held.remove(6));
        assert_eq!(
            (held.len(), held.first()),
            (2, Some(8)),
            "finished ones leave the front"
        );
        held.insert(7); // again after it finished
        assert_eq!((held.len(), held.first()), (3, Some(7)));
        for offset in [7, 8, 9] {
            assert!(held.remove(offset));
        }
        assert_eq!((held.len(), held.first()), (0, None));
        // Behind an offset held back (a retrying message), what finishes leaves: nothing
        // accumulates however long it stays.
        for offset in 100..10_000 {
            held.insert(offset);
        }
        for offset in 101..10_000 {
            assert!(held.remove(offset));
        }
        assert_eq!((held.0.len(), held.first()), (1, Some(100)));
    }

    #[test]
    fn only_the_contiguous_prefix_of_finished_offsets_is_committed() {
        let mut t = tracker(100, 1 << 20);
        let m = Arc::new(Message::new("m", "t", ""));
        for o in 0..5 {
            assert!(t.received(&p(), &m, o));
        }
        t.finished(&p(), &m, 1);
        t.finished(&p(), &m, 2);
        assert_eq!(
            committed(&mut t),
            None,
            "offset 0 is unfinished: nothing may be committed"
        );
        t.finished(&p(), &m, 0);
        assert_eq!(committed(&mut t), Some(3));
        t.retrying(&p(), &m, 3);
        t.finished(&p(), &m, 4);
        assert_eq!(committed(&mut t), None, "a parked retry holds the position");
        assert_eq!(t.busy(), 0, "a parked message is not busy");
        t.finished(&p(), &m, 3);
        assert_eq!(committed(&mut t), Some(5));
    }

    #[test]
    fn a_partition_holding_too_many_messages_pauses_until_half_are_done() {
        let mut t = tracker(4, 1 << 20);
        let m = Arc::new(Message::new("m", "t", ""));
        for o in 0..3 {
            t.received(&p(), &m, o);
            assert!(!t.should_pause(&p()), "below the limit at {o}");
        }
        t.received(&p(), &m, 3);
        assert!(t.should_pause(&p()), "four held: pause");
        t.received(&p(), &m, 4);
        assert!(!t.should_pause(&p()), "already paused");
        assert_eq!(t.finished(&p(), &m, 0).resume_from, None);
        assert_eq!(
            t.finished(&p(), &m, 1).resume_from,
            None,
            "three still held"
        );
        assert_eq!(
            t.finished(&p(), &m, 2).resume_from,
            None,
            "two still held: not below half"
        );
        assert_eq!(
            t.finished(&p(), &m, 3).resume_from,
            Some(5),
            "under half: the finish says to resume at once, past the last received"
        );
        assert_eq!(t.finished(&p(), &m, 4).resume_from, None, "resumed once");
        t.forget(&[p()]);
        assert!(!t.should_pause(&p()), "a forgotten partition is not paused");
    }

    #[test]
    fn held_payload_bytes_pause_a_partition_too() {
        let mut t = tracker(1000, 3000);
        let big = Arc::new(Message::new("m", "t", vec![0u8; 1000]));
        t.received(&p(), &big, 0);
        t.received(&p(), &big, 1);
        assert!(!t.should_pause(&p()), "2,000 bytes held");
        t.received(&p(), &big, 2);
        assert!(t.should_pause(&p()), "3,000 bytes held: pause");
        assert_eq!(t.finished(&p(), &big, 0).resume_from, None, "2,000 bytes");
        assert_eq!(
            t.finished(&p(), &big, 1).resume_from,
            Some(3),
            "1,000 bytes"
        );
        t.finished(&p(), &big, 1);
        assert_eq!(
            t.partitions.get(&p()).map(|s| s.held_bytes),
            Some(1000),
            "a message finished twice is subtracted once"
        );
    }

    #[test]
    fn one_message_per_key_is_out_at_a_time_and_the_rest_follow_in_order() {
        let mut t = tracker(100, 1 << 20);
        let a0 = keyed("a0", "a");
        assert!(t.received(&p(), &a0, 0));
        assert!(
            !t.received(&p(), &keyed("a1", "a"), 1),
            "a1 waits behind a0"
        );
        assert!(
            t.received(&p(), &keyed("b0", "b"), 2),
            "other keys are not held up"
        );
        assert!(!t.received(&p(), &keyed("a2", "a"), 3));
        assert_eq!(t.busy(), 2, "waiting messages are not busy");
        // a0 is retried: still out, so a1 keeps waiting. When a0 finally finishes, a1 follows.
        t.retrying(&p(), &a0, 0);
        assert!(
            !t.received(&p(), &keyed("a1b", "a"), 5),
            "a0 still holds the key"
        );
        assert!(t.unpark(&p(), &a0, 0), "handed out again");
        let (a1, offset) = t.finished(&p(), &a0, 0).next.unwrap();
        assert_eq!((a1.id.as_str(), offset), ("a1", 1));
        let (a2, _) = t.finished(&p(), &a1, 1).next.unwrap();
        assert_eq!(a2.id.as_str(), "a2");
        let (a1b, _) = t.finished(&p(), &a2, 3).next.unwrap();
        assert_eq!(a1b.id.as_str(), "a1b");
        assert!(t.finished(&p(), &a1b, 5).next.is_none());
        assert!(
            t.received(&p(), &keyed("a3", "a"), 4),
            "the key is free again"
        );
    }

    #[test]
    fn the_reader_waits_with_enough_read_ahead_behind_keys_being_handled_only() {
        let mut t = Tracker::new(HeldLimit {
            messages: 100,
            bytes: 1 << 20,
            read_ahead: 2,
        });
        let (a0, b0, b1) = (keyed("a0", "a"), keyed("b0", "b"), keyed("b1", "b"));
        assert!(t.received(&p(), &a0, 0));
        assert!(t.received(&p(), &b0, 1));
        assert!(!t.received(&p(), &keyed("a1", "a"), 2));
        assert!(t.may_read(), "one waits behind a busy key: read on");
        assert!(!t.received(&p(), &b1, 3));
        assert!(
            !t.may_read(),
            "two wait behind busy keys: enough read ahead"
        );
        assert!(
            t.retrying(&p(), &a0, 0),
            "a key stalled in retries does not hold the reader back: room at once"
        );
        assert!(t.may_read());
        assert!(!t.received(&p(), &keyed("a2", "a"), 4));
        assert!(t.may_read(), "nor do messages arriving behind it");
        assert!(t.unpark(&p(), &a0, 0));
        assert!(
            !t.may_read(),
            "handed out again: the key's waiting count again"
        );
        let finished = t.finished(&p(), &b0, 1);
        assert_eq!(
            finished.next.map(|(m, _)| m.id.clone()).as_deref(),
            Some("b1")
        );
        assert!(!finished.room, "a1 and a2 still wait");
        let finished = t.finished(&p(), &a0, 0);
        assert!(finished.room, "one left waiting: the reader is told");
        assert!(
            !t.finished(&p(), &b1, 3).room,
            "told once, not for every finish"
        );
        assert!(!t.received(&p(), &keyed("a3", "a"), 5));
        assert!(!t.may_read());
        t.forget(&[p()]);
        assert!(t.may_read(), "a revoked partition's waiting are gone");
        assert_eq!(t.queued, 0);
    }
}
