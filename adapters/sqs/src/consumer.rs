//! Consuming: receive loops (long polling, up to 10 messages per call) bounded by the in-flight
//! limit; a visibility heartbeat keeps a message hidden while its handler runs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::types::MessageSystemAttributeName;
use busbar_core::{
    Acknowledger, DeadLetter, DeadLetterInfo, Delivery, DeliveryStream, Error, ErrorKind, Message,
    Result,
};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::mapping::{pack, unpack};
use crate::{sdk_error, GroupQueues, Inner};

type DeleteRequest = (String, oneshot::Sender<std::result::Result<(), String>>);

/// Batches acks into `DeleteMessageBatch` calls: acks that arrive while a call is in flight go
/// together into the next one (up to 10), so a busy consumer deletes in batches and an idle
/// one deletes at once.
fn spawn_deleter(inner: Arc<Inner>, queue_url: String) -> mpsc::UnboundedSender<DeleteRequest> {
    let (tx, mut rx) = mpsc::unbounded_channel::<DeleteRequest>();
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < 10 {
                match rx.try_recv() {
                    Ok(more) => batch.push(more),
                    Err(_) => break,
                }
            }
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
    max_in_flight: usize,
) -> DeliveryStream {
    let limit = max_in_flight.max(1);
    let (tx, rx) = mpsc::channel(limit);
    let permits = Arc::new(Semaphore::new(limit));
    let queues = Arc::new(queues);
    let deleter = spawn_deleter(Arc::clone(&inner), queues.queue.url.clone());
    // Several receive loops keep the in-flight window full; each asks for up to 10.
    for _ in 0..limit.div_ceil(10).clamp(1, 4) {
        tokio::spawn(receive_loop(
            Arc::clone(&inner),
            topic.to_string(),
            Arc::clone(&queues),
            Arc::clone(&permits),
            tx.clone(),
            deleter.clone(),
        ));
    }
    Box::pin(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

async fn receive_loop(
    inner: Arc<Inner>,
    topic: String,
    queues: Arc<GroupQueues>,
    permits: Arc<Semaphore>,
    tx: mpsc::Sender<Result<Delivery>>,
    deleter: mpsc::UnboundedSender<DeleteRequest>,
) {
    let mut pause = Duration::from_millis(100);
    loop {
        if inner.is_closed() || tx.is_closed() {
            return;
        }
        let first = tokio::select! {
            () = tx.closed() => return,
            permit = Arc::clone(&permits).acquire_owned() => match permit { Ok(p) => p, Err(_) => return },
        };
        let mut held = vec![first];
        while held.len() < 10 {
            match Arc::clone(&permits).try_acquire_owned() {
                Ok(p) => held.push(p),
                Err(_) => break,
            }
        }
        let request = inner
            .sqs
            .receive_message()
            .queue_url(&queues.queue.url)
            .max_number_of_messages(i32::try_from(held.len()).unwrap_or(10))
            .wait_time_seconds(i32::try_from(inner.config.wait_time.as_secs()).unwrap_or(20))
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .send();
        let received = tokio::select! {
            () = tx.closed() => return,
            received = request => received,
        };
        let out = match received {
            Ok(out) => out,
            Err(e) => {
                if inner.is_closed() {
                    return;
                }
                let error = sdk_error(
                    "consume",
                    format!("cannot receive from {}", queues.queue.url),
                    e,
                );
                if tx.send(Err(error)).await.is_err() {
                    return;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        pause = Duration::from_millis(100);
        for received in out.messages() {
            let Some(permit) = held.pop() else { break };
            let attributes: BTreeMap<String, String> = received
                .message_attributes()
                .map(|a| {
                    a.iter()
                        .filter_map(|(k, v)| v.string_value().map(|s| (k.clone(), s.to_string())))
                        .collect()
                })
                .unwrap_or_default();
            let message = unpack(
                &topic,
                received.body().unwrap_or_default(),
                &attributes,
                received.message_id().unwrap_or_default(),
            );
            let attempt = received
                .attributes()
                .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                .and_then(|n| n.parse().ok())
                .unwrap_or(1);
            let receipt = received.receipt_handle().unwrap_or_default().to_string();
            let ack = SqsAck::new(
                Arc::clone(&inner),
                Arc::clone(&queues),
                receipt,
                permit,
                deleter.clone(),
            );
            if tx
                .send(Ok(Delivery::new(Arc::new(message), attempt, Box::new(ack))))
                .await
                .is_err()
            {
                return; // the delivery was dropped: its message becomes visible again at once
            }
        }
    }
}

struct SqsAck {
    inner: Arc<Inner>,
    queues: Arc<GroupQueues>,
    deleter: mpsc::UnboundedSender<DeleteRequest>,
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
        deleter: mpsc::UnboundedSender<DeleteRequest>,
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
            inner,
            queues,
            deleter,
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

    async fn delete(&mut self, operation: &'static str) -> Result<()> {
        self.settle();
        let (reply, done) = oneshot::channel();
        let outcome = match self.deleter.send((self.receipt.clone(), reply)) {
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
        let seconds = i32::try_from(delay.as_millis().div_ceil(1000))
            .unwrap_or(43_200)
            .min(43_200);
        self.inner
            .sqs
            .change_message_visibility()
            .queue_url(&self.queues.queue.url)
            .receipt_handle(&self.receipt)
            .visibility_timeout(seconds)
            .send()
            .await
            .map(drop)
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

#[async_trait]
impl Acknowledger for SqsAck {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        self.delete("ack").await
    }

    async fn nack(mut self: Box<Self>, delay: Duration) -> Result<()> {
        self.show_after(delay).await
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
                self.inner
                    .send_to_queue(
                        &self.queues.dlq.url,
                        vec![(dead.id.clone(), packed)],
                        "dead-letter",
                    )
                    .await
            }
            Err(e) => Err(e),
        };
        match sent {
            Ok(()) => self.delete("dead-letter").await,
            Err(e) => {
                let _ = self.show_after(Duration::ZERO).await;
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
        if !self.settled {
            // Abandoned (the handler was stopped): make it visible again now, not after its
            // timeout. A crashed process cannot do this; then the timeout brings it back.
            let (inner, url, receipt) = (
                Arc::clone(&self.inner),
                self.queues.queue.url.clone(),
                self.receipt.clone(),
            );
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let _ = inner
                        .sqs
                        .change_message_visibility()
                        .queue_url(url)
                        .receipt_handle(receipt)
                        .visibility_timeout(0)
                        .send()
                        .await;
                });
            }
        }
    }
}
