//! Consuming: receive loops (long polling, up to 10 messages per call) bounded by the in-flight
//! limit; a visibility heartbeat keeps a message hidden while its handler runs.
//!
//! Stopping never cancels a receive: SQS hands out what a receive returns whether or not the
//! caller is still listening, so a dropped long poll would hide its messages for the whole
//! visibility timeout. A receive in flight when the subscription stops is let finish, and what
//! it returns goes straight back (visibility 0). The subscription's shutdown waits for that,
//! and for every message given back, through a [`ConsumerHold`] that each receive loop and
//! each received message keeps.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::types::MessageSystemAttributeName;
use busbar_core::{
    Acknowledger, ConsumeOptions, ConsumerHold, DeadLetter, DeadLetterInfo, Delivery,
    DeliveryStream, Error, ErrorKind, Message, Result,
};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::mapping::{pack, received_attributes, unpack};
use crate::{sdk_error, GroupQueues, Inner};

/// How long the delete batcher waits for more acks before sending a partial batch.
const DELETE_LINGER: Duration = Duration::from_millis(2);

/// How long a receive loop that holds some free slots waits for more to free up, so it asks
/// for a fuller batch instead of one message at a time.
const RECEIVE_FILL: Duration = Duration::from_millis(20);

type DeleteRequest = (String, oneshot::Sender<std::result::Result<(), String>>);

/// A received message to make visible again at once; the hold keeps the subscription's
/// shutdown waiting until it is done.
type GiveBack = (String, Arc<Settlers>);

/// The next batch of up to 10 requests, `None` once every sender is gone. The handlers of one
/// received batch finish within moments of each other: after the first request it waits
/// [`DELETE_LINGER`] for more, so they share one call instead of the first going alone.
async fn next_batch<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> Option<Vec<T>> {
    let mut batch = vec![rx.recv().await?];
    let linger = tokio::time::Instant::now() + DELETE_LINGER;
    while batch.len() < 10 {
        match tokio::time::timeout_at(linger, rx.recv()).await {
            Ok(Some(more)) => batch.push(more),
            Ok(None) | Err(_) => break,
        }
    }
    Some(batch)
}

/// Batches abandoned and unstarted messages into `ChangeMessageVisibilityBatch` calls that
/// make them visible at once: a subscription shutting down returns all it held in a few calls.
fn spawn_giver(inner: Arc<Inner>, queue_url: String) -> mpsc::UnboundedSender<GiveBack> {
    let (tx, mut rx) = mpsc::unbounded_channel::<GiveBack>();
    tokio::spawn(async move {
        while let Some(batch) = next_batch(&mut rx).await {
            let receipts = batch.iter().map(|(receipt, _)| receipt.as_str());
            give_back_receipts(&inner, &queue_url, receipts).await;
        }
    });
    tx
}

/// Batches acks into `DeleteMessageBatch` calls: acks that arrive while a call is in flight go
/// together into the next one (up to 10), so a busy consumer deletes in batches and an idle
/// one deletes at once.
fn spawn_deleter(inner: Arc<Inner>, queue_url: String) -> mpsc::UnboundedSender<DeleteRequest> {
    let (tx, mut rx) = mpsc::unbounded_channel::<DeleteRequest>();
    tokio::spawn(async move {
        while let Some(batch) = next_batch(&mut rx).await {
            let mut request = inner.sqs.delete_message_batch().queue_url(&queue_url);
            for (i, (receipt, _)) in batch.iter().enumerate() {
                if let Ok(entry) = aws_sdk_sqs::types::DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(receipt)
                    .build()
                {
                    request = request.entries(entry);
                }
            }
            match request.send().await {
                Ok(out) => {
                    let mut failed: std::collections::HashMap<usize, String> = out
                        .failed()
                        .iter()
                        .filter_map(|f| {
                            Some((
                                f.id().parse().ok()?,
                                format!("{}: {}", f.code(), f.message().unwrap_or_default()),
                            ))
                        })
                        .collect();
                    for (i, (_, reply)) in batch.into_iter().enumerate() {
                        let _ = reply.send(failed.remove(&i).map_or(Ok(()), Err));
                    }
                }
                Err(e) => {
                    let text = format!("{}", aws_sdk_sqs::error::DisplayErrorContext(&e));
                    for (_, reply) in batch {
                        let _ = reply.send(Err(text.clone()));
                    }
                }
            }
        }
    });
    tx
}

pub(crate) fn consume(
    inner: Arc<Inner>,
    topic: &str,
    queues: GroupQueues,
    options: ConsumeOptions,
) -> DeliveryStream {
    let limit = options.max_in_flight.max(1);
    let (tx, mut rx) = mpsc::channel(limit);
    let permits = Arc::new(Semaphore::new(limit));
    let queues = Arc::new(queues);
    // One per consumer, shared by its receive loops and every message they receive.
    let settlers = Arc::new(Settlers {
        deleter: spawn_deleter(Arc::clone(&inner), queues.queue.url.clone()),
        giver: spawn_giver(Arc::clone(&inner), queues.queue.url.clone()),
        _hold: options.status.hold(),
    });
    let gate = inner.config.fifo.then(|| {
        Arc::new(Gate {
            groups: Mutex::default(),
            next_seq: AtomicU64::new(0),
            tx: tx.clone(),
        })
    });
    // Several receive loops keep the in-flight window full; each asks for up to 10.
    let loops = limit.div_ceil(10).clamp(1, 4);
    let batch = (limit / loops).clamp(1, 10);
    for _ in 0..loops {
        tokio::spawn(receive_loop(
            Arc::clone(&inner),
            topic.to_string(),
            Arc::clone(&queues),
            Slots {
                permits: Arc::clone(&permits),
                batch,
            },
            tx.clone(),
            Arc::clone(&settlers),
            gate.clone(),
        ));
    }
    Box::pin(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)))
}

/// What a received message is settled through: the batchers of deletes and of give-backs.
/// Whoever holds it (a receive loop, a received message, a give-back not yet sent) keeps the
/// subscription's shutdown waiting.
struct Settlers {
    deleter: mpsc::UnboundedSender<DeleteRequest>,
    giver: mpsc::UnboundedSender<GiveBack>,
    _hold: ConsumerHold,
}

/// The in-flight slots a receive loop takes from, and how many it asks for per receive.
struct Slots {
    permits: Arc<Semaphore>,
    batch: usize,
}

impl Slots {
    /// Waits for one free slot, then up to [`RECEIVE_FILL`] for the rest of a batch: slots
    /// come back one ack at a time, and a receive per freed slot would cost a call per
    /// message.
    async fn take(&self) -> Option<Vec<OwnedSemaphorePermit>> {
        let first = Arc::clone(&self.permits).acquire_owned().await.ok()?;
        let mut held = vec![first];
        let fill = tokio::time::Instant::now() + RECEIVE_FILL;
        while held.len() < self.batch {
            match tokio::time::timeout_at(fill, Arc::clone(&self.permits).acquire_owned()).await {
                Ok(Ok(permit)) => held.push(permit),
                Ok(Err(_)) | Err(_) => break,
            }
        }
        Some(held)
    }
}

async fn receive_loop(
    inner: Arc<Inner>,
    topic: String,
    queues: Arc<GroupQueues>,
    slots: Slots,
    tx: mpsc::Sender<Result<Delivery>>,
    settlers: Arc<Settlers>,
    gate: Option<Arc<Gate>>,
) {
    let mut pause = Duration::from_millis(100);
    loop {
        if inner.is_closed() || tx.is_closed() {
            return;
        }
        let mut held = tokio::select! {
            () = tx.closed() => return,
            held = slots.take() => match held { Some(held) => held, None => return },
        };
        let request = inner
            .sqs
            .receive_message()
            .queue_url(&queues.queue.url)
            .max_number_of_messages(i32::try_from(held.len()).unwrap_or(10))
            .wait_time_seconds(i32::try_from(inner.config.wait_time.as_secs()).unwrap_or(20))
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_system_attribute_names(MessageSystemAttributeName::MessageGroupId)
            .send();
        tokio::pin!(request);
        let received = tokio::select! {
            () = tx.closed() => {
                // Not cancelled (see the module's doc): what it returns goes back at once.
                if let Ok(out) = request.await {
                    let receipts = out.messages().iter().filter_map(|m| m.receipt_handle());
                    give_back_receipts(&inner, &queues.queue.url, receipts).await;
                }
                return;
            }
            received = &mut request => received,
        };
        let received = received.map_err(|e| {
            sdk_error(
                "consume",
                format!("cannot receive from {}", queues.queue.url),
                e,
            )
        });
        inner.saw(&received);
        let out = match received {
            Ok(out) => out,
            Err(error) => {
                if inner.is_closed() {
                    return;
                }
                if tx.send(Err(error)).await.is_err() {
                    return;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        pause = Duration::from_millis(100);
        let mut messages = out.messages().iter();
        while let Some(received) = messages.next() {
            let Some(permit) = held.pop() else { break };
            let attributes = received_attributes(received);
            let message = unpack(
                &topic,
                received.body().unwrap_or_default(),
                attributes,
                received.message_id().unwrap_or_default(),
            );
            let attempt = received
                .attributes()
                .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                .and_then(|n| n.parse().ok())
                .unwrap_or(1);
            let receipt = received.receipt_handle().unwrap_or_default().to_string();
            let group = received
                .attributes()
                .and_then(|a| a.get(&MessageSystemAttributeName::MessageGroupId));
            // FIFO: the delivery's place in its group, kept by its ack and used to admit it.
            let place = match (&gate, group) {
                (Some(gate), Some(group)) => {
                    Some((gate, group, gate.next_seq.fetch_add(1, Ordering::Relaxed)))
                }
                _ => None,
            };
            let ticket = place.map(|(gate, group, seq)| Ticket {
                gate: Arc::clone(gate),
                group: group.clone(),
                seq,
            });
            let ack = SqsAck::new(
                Arc::clone(&inner),
                Arc::clone(&queues),
                receipt,
                permit,
                Arc::clone(&settlers),
                ticket,
            );
            let delivery = Delivery::new(Arc::new(message), attempt, Box::new(ack));
            let delivery = match place {
                Some((gate, group, seq)) => match gate.admit(group, seq, delivery) {
                    Some(now) => now,
                    None => continue, // waits behind an earlier message of its group
                },
                None => delivery,
            };
            if tx.send(Ok(delivery)).await.is_err() {
                // The subscription stopped. The delivery was dropped, which gives its message
                // back; the rest of the batch goes back here.
                let rest = messages.filter_map(|m| m.receipt_handle());
                give_back_receipts(&inner, &queues.queue.url, rest).await;
                return;
            }
        }
    }
}

/// FIFO queues: hands the consumer one message per message group (= key) at a time.
///
/// SQS keeps a group's later messages back while an earlier one is in flight, but one receive
/// can return several messages of a group. Those wait here until the one before them is
/// settled: after an ack or dead-letter the next is handed out; after a nack, an abandoned
/// delivery or a failed delete, the waiting ones go back to SQS too, so it hands the group out
/// again from the message that was not done, in order.
///
/// The waiting ones go back *first*, to become visible no later than the one before them
/// (see [`SqsAck::give_back`]). SQS keeps the group back anyway while that one is in flight.
/// LocalStack does not quite: a message of the group becoming visible again makes the whole
/// group receivable, and a receive then returns the visible messages and skips the ones
/// still in flight. It does keep a message becoming visible behind an earlier-received one
/// still invisible, which the order above relies on.
struct Gate {
    /// Per busy group: the sequence number of the message out now, and the ones waiting.
    groups: Mutex<HashMap<String, Busy>>,
    next_seq: AtomicU64,
    tx: mpsc::Sender<Result<Delivery>>,
}

/// A busy group: the sequence number of its message that is out, and the ones waiting.
type Busy = (u64, VecDeque<(u64, Delivery)>);

/// A delivery's place in the [`Gate`].
struct Ticket {
    gate: Arc<Gate>,
    group: String,
    seq: u64,
}

impl Ticket {
    /// Tells the gate how this message ended (see [`Gate::settled`]).
    fn settled(self, outcome: Settled) -> Vec<Delivery> {
        self.gate.settled(&self.group, self.seq, outcome)
    }
}

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Busy>> {
        self.groups.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The delivery to hand out now, or `None` when it waits behind its group.
    fn admit(&self, group: &str, seq: u64, delivery: Delivery) -> Option<Delivery> {
        let mut groups = self.lock();
        match groups.get_mut(group) {
            Some((_, waiting)) => {
                waiting.push_back((seq, delivery));
                None
            }
            None => {
                groups.insert(group.to_string(), (seq, VecDeque::new()));
                Some(delivery)
            }
        }
    }

    /// Message `seq` of `group` was settled: `Done` (deleted) hands out the next one;
    /// `Again` frees the group and returns the messages that waited behind it, which the
    /// caller gives back to SQS. A message that was never handed out (it was itself given
    /// back) changes nothing.
    fn settled(&self, group: &str, seq: u64, outcome: Settled) -> Vec<Delivery> {
        let mut next = None;
        let mut waiting_ones = Vec::new();
        {
            let mut groups = self.lock();
            let Some((out, waiting)) = groups.get_mut(group) else {
                return waiting_ones;
            };
            if *out != seq {
                return waiting_ones;
            }
            match outcome {
                Settled::Done => match waiting.pop_front() {
                    Some((seq, delivery)) => {
                        *out = seq;
                        next = Some(delivery);
                    }
                    None => {
                        groups.remove(group);
                    }
                },
                Settled::Again => {
                    if let Some((_, waiting)) = groups.remove(group) {
                        waiting_ones.extend(waiting.into_iter().map(|(_, d)| d));
                    }
                }
            }
        }
        if let Some(next) = next {
            // There is always room: the channel holds at most the in-flight limit, and this
            // delivery already counts against it.
            if let Err(e) = self.tx.try_send(Ok(next)) {
                tracing::debug!(error = %e, "consumer gone; the next message of its group returns to SQS");
            }
        }
        waiting_ones
    }
}

/// How a FIFO message ended, for the [`Gate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    /// Deleted (handled or dead-lettered).
    Done,
    /// Not deleted: it becomes visible again.
    Again,
}

/// The shortest visibility delay with which a FIFO message and the messages of its group that
/// waited behind it go back together. SQS counts visibility in whole seconds, and a zero
/// delay would make the waiting ones receivable at once on LocalStack, ahead of the message
/// before them (see [`Gate`]).
const GROUP_RETURN_DELAY: Duration = Duration::from_secs(1);

/// Makes received messages visible again at once, ten per call. Failures are logged: those
/// messages return after their visibility timeout.
async fn give_back_receipts<'a>(
    inner: &Inner,
    queue_url: &str,
    receipts: impl Iterator<Item = &'a str>,
) {
    let receipts: Vec<&str> = receipts.collect();
    for chunk in receipts.chunks(10) {
        let mut request = inner
            .sqs
            .change_message_visibility_batch()
            .queue_url(queue_url);
        for (i, receipt) in chunk.iter().enumerate() {
            if let Ok(entry) =
                aws_sdk_sqs::types::ChangeMessageVisibilityBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(*receipt)
                    .visibility_timeout(0)
                    .build()
            {
                request = request.entries(entry);
            }
        }
        match request.send().await {
            Ok(out) if !out.failed().is_empty() => {
                tracing::warn!(failed = out.failed().len(), queue = queue_url, "could not give back some received messages; they return after their visibility timeout");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %aws_sdk_sqs::error::DisplayErrorContext(&e), queue = queue_url, "could not give back received messages; they return after their visibility timeout");
            }
        }
    }
}

/// Gives `deliveries` back to SQS, all visible after `delay`.
async fn give_back_all(deliveries: Vec<Delivery>, delay: Duration) {
    futures::future::join_all(deliveries.into_iter().map(|d| d.nack(delay))).await;
}

struct SqsAck {
    ticket: Option<Ticket>,
    inner: Arc<Inner>,
    queues: Arc<GroupQueues>,
    settlers: Arc<Settlers>,
    receipt: String,
    settled: bool,
    heartbeat: JoinHandle<()>,
    _permit: OwnedSemaphorePermit,
}

impl SqsAck {
    fn new(
        inner: Arc<Inner>,
        queues: Arc<GroupQueues>,
        receipt: String,
        permit: OwnedSemaphorePermit,
        settlers: Arc<Settlers>,
        ticket: Option<Ticket>,
    ) -> Self {
        // Keep the message hidden while its handler runs longer than the visibility timeout.
        let heartbeat = {
            let (inner, url, receipt) = (
                Arc::clone(&inner),
                queues.queue.url.clone(),
                receipt.clone(),
            );
            tokio::spawn(async move {
                let timeout = inner.config.visibility_timeout;
                let seconds = i32::try_from(timeout.as_secs()).unwrap_or(43_200);
                loop {
                    tokio::time::sleep(timeout / 2).await;
                    if inner.is_closed() {
                        // The transport is gone, as with a crashed process: let the timeout run.
                        return;
                    }
                    let extended = inner
                        .sqs
                        .change_message_visibility()
                        .queue_url(&url)
                        .receipt_handle(&receipt)
                        .visibility_timeout(seconds)
                        .send()
                        .await;
                    if let Err(e) = extended {
                        tracing::warn!(error = %aws_sdk_sqs::error::DisplayErrorContext(&e), "could not extend a message's visibility; it may be delivered again");
                    }
                }
            })
        };
        SqsAck {
            ticket,
            inner,
            queues,
            settlers,
            receipt,
            settled: false,
            heartbeat,
            _permit: permit,
        }
    }

    fn settle(&mut self) {
        self.settled = true;
        self.heartbeat.abort();
    }

    /// Tells the FIFO gate how this message ended (see [`Gate::settled`]); returns the
    /// messages of its group that must go back with it.
    fn release(&mut self, outcome: Settled) -> Vec<Delivery> {
        match self.ticket.take() {
            Some(ticket) => ticket.settled(outcome),
            None => Vec::new(),
        }
    }

    /// After a delete: the group's next message goes out, or, when the delete failed (the
    /// message returns after its visibility timeout), the ones waiting behind it go back, in
    /// [`GROUP_RETURN_DELAY`]: sooner than it, which keeps them behind it (see [`Gate`]).
    async fn after_delete(&mut self, deleted: &Result<()>) {
        match deleted {
            Ok(()) => drop(self.release(Settled::Done)),
            Err(_) => give_back_all(self.release(Settled::Again), GROUP_RETURN_DELAY).await,
        }
    }

    /// Makes the message visible again after `delay`. On a FIFO queue the messages of its
    /// group waiting behind it go back first, with the same delay and at least
    /// [`GROUP_RETURN_DELAY`], so none becomes visible after it (see [`Gate`]).
    async fn give_back(&mut self, delay: Duration) -> Result<()> {
        self.settle();
        let waiting = self.release(Settled::Again);
        let delay = if waiting.is_empty() {
            delay
        } else {
            let delay = delay.max(GROUP_RETURN_DELAY);
            give_back_all(waiting, delay).await;
            delay
        };
        self.show_after(delay).await
    }

    async fn delete(&mut self, operation: &'static str) -> Result<()> {
        self.settle();
        let (reply, done) = oneshot::channel();
        let outcome = match self.settlers.deleter.send((self.receipt.clone(), reply)) {
            Ok(()) => done
                .await
                .unwrap_or_else(|_| Err("the delete batcher stopped".into())),
            Err(_) => Err("the delete batcher stopped".into()),
        };
        outcome.map_err(|why| {
            Error::new(
                ErrorKind::Broker,
                operation,
                format!("could not delete the message ({why}); SQS will deliver it again"),
            )
            .with_retryable(true)
        })
    }

    async fn show_after(&mut self, delay: Duration) -> Result<()> {
        self.settle();
        change_visibility(&self.inner, &self.queues.queue.url, &self.receipt, delay)
            .await
            .map_err(|e| {
                sdk_error(
                    "nack",
                    "could not change the message's visibility; it returns after its timeout"
                        .into(),
                    e,
                )
            })
    }
}

/// Makes a received message visible again after `delay` (in whole seconds, rounded up).
async fn change_visibility(
    inner: &Inner,
    queue_url: &str,
    receipt: &str,
    delay: Duration,
) -> std::result::Result<
    (),
    aws_sdk_sqs::error::SdkError<
        aws_sdk_sqs::operation::change_message_visibility::ChangeMessageVisibilityError,
    >,
> {
    let seconds = i32::try_from(delay.as_millis().div_ceil(1000))
        .unwrap_or(43_200)
        .min(43_200);
    inner
        .sqs
        .change_message_visibility()
        .queue_url(queue_url)
        .receipt_handle(receipt)
        .visibility_timeout(seconds)
        .send()
        .await
        .map(drop)
}

#[async_trait]
impl Acknowledger for SqsAck {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        let deleted = self.delete("ack").await;
        self.after_delete(&deleted).await;
        deleted
    }

    async fn nack(mut self: Box<Self>, delay: Duration) -> Result<()> {
        self.give_back(delay).await
    }

    async fn dead_letter(
        mut self: Box<Self>,
        message: &Message,
        info: &DeadLetterInfo,
    ) -> Result<()> {
        let dead = DeadLetter {
            message: message.clone(),
            info: info.clone(),
        }
        .to_message();
        let sent = match pack(&dead) {
            Ok(packed) => {
                let dlq = &self.queues.dlq.url;
                let send = self.inner.send_to_queue(
                    dlq,
                    vec![(dead.id.clone(), packed)],
                    "dead-letter",
                    crate::Dedup::Fresh,
                );
                self.inner
                    .within_publish_timeout("dead-letter", send, || {
                        ("it may or may not be in the DLQ".to_string(), dlq.clone())
                    })
                    .await
            }
            Err(e) => Err(e),
        };
        match sent {
            Ok(()) => {
                let deleted = self.delete("dead-letter").await;
                self.after_delete(&deleted).await;
                deleted
            }
            Err(e) => {
                let _ = self.give_back(Duration::ZERO).await;
                Err(Error::new(
                    ErrorKind::Broker,
                    "dead-letter",
                    format!(
                        "could not dead-letter {}; it will be delivered again",
                        message.id
                    ),
                )
                .with_source(e))
            }
        }
    }
}

impl Drop for SqsAck {
    fn drop(&mut self) {
        self.heartbeat.abort();
        // Its group's waiting messages go back before it (see `give_back`).
        let waiting = self.release(Settled::Again);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to call SQS from: the visibility timeouts bring them all back.
            return;
        };
        if self.settled {
            // Settling was cut short (its future dropped): it returns after its timeout.
            if !waiting.is_empty() {
                runtime.spawn(give_back_all(waiting, GROUP_RETURN_DELAY));
            }
            return;
        }
        // Abandoned (the handler was stopped) or never started: make it visible again now, not
        // after its timeout (a crashed process cannot; then the timeout brings it back), or
        // with the group's shortest delay when messages of its group go back with it.
        let receipt = std::mem::take(&mut self.receipt);
        let settlers = Arc::clone(&self.settlers);
        if waiting.is_empty() {
            let _ = self.settlers.giver.send((receipt, settlers));
            return;
        }
        let (inner, url) = (Arc::clone(&self.inner), self.queues.queue.url.clone());
        runtime.spawn(async move {
            give_back_all(waiting, GROUP_RETURN_DELAY).await;
            if let Err(e) = change_visibility(&inner, &url, &receipt, GROUP_RETURN_DELAY).await {
                tracing::debug!(error = %aws_sdk_sqs::error::DisplayErrorContext(&e), "could not return an abandoned message; it returns after its visibility timeout");
            }
            drop(settlers);
        });
    }
}
