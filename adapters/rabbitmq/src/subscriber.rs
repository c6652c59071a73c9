//! Consuming: one channel per consumer with `basic.qos` = the in-flight limit, reconnecting
//! when the connection drops; acks, delayed nacks through retry queues, and dead-lettering.

use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use async_trait::async_trait;
use busbar_core::{
    Acknowledger, ConsumeOptions, ConsumerHold, ConsumerStatus, DeadLetter, DeadLetterInfo,
    Delivery, DeliveryStream, Error, ErrorKind, Message, Result,
};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use lapin::{Acker, Channel, Consumer};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::mapping::from_amqp;
use crate::publisher::{send_confirmed, Outgoing};
use crate::topology::{declare_group, declare_retry};
use crate::Inner;

/// Closes a consumer's channel once the consumer loop and every delivery it handed out are
/// done, so acks of handlers still draining after a shutdown reach the broker. The
/// subscription's shutdown waits for the close (its hold): the broker has then requeued
/// whatever the channel still held.
struct ChannelGuard {
    channel: Channel,
    hold: Option<ConsumerHold>,
}

impl Drop for ChannelGuard {
    fn drop(&mut self) {
        let channel = self.channel.clone();
        let hold = self.hold.take();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            // Bounded: lapin may never answer on a connection that is already gone.
            runtime.spawn(async move {
                let _ = tokio::time::timeout(
                    BACKGROUND_LIMIT,
                    channel.close(200, "consumer done".into()),
                )
                .await;
                drop(hold);
            });
        }
    }
}

struct Route {
    topic: String,
    group: String,
    queue: String,
}

pub(crate) fn consume(
    inner: Arc<Inner>,
    topic: &str,
    group: &str,
    queue: String,
    options: ConsumeOptions,
) -> DeliveryStream {
    let prefetch = options.max_in_flight;
    let (tx, mut rx) = mpsc::channel(1);
    let route = Arc::new(Route {
        topic: topic.to_string(),
        group: group.to_string(),
        queue,
    });
    let prefetch = u16::try_from(prefetch.max(1)).unwrap_or(u16::MAX);
    // Held until the loop ends: a subscription stopped while its channel is still opening
    // waits for the loop to notice, so no consumer outlives `shutdown`.
    let looping = options.status.hold();
    tokio::spawn(async move {
        consume_loop(inner, route, prefetch, options.status, tx).await;
        drop(looping);
    });
    Box::pin(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)))
}

async fn open(
    inner: &Inner,
    route: &Route,
    prefetch: u16,
    status: &ConsumerStatus,
) -> Result<(Arc<ChannelGuard>, Consumer)> {
    let connector = &inner.connector;
    let deadline = Instant::now() + connector.config.publish_timeout;
    // Declare again on every (re)open: a broker that came back without its durable queues
    // (a new node, a reset) gets them back instead of failing the consumer forever.
    let dlq = connector.config.dead_letter_queue(&route.queue);
    inner
        .declared
        .forget(&[&route.queue, &dlq, &connector.config.exchange]);
    declare_group(
        connector,
        &inner.declared,
        &route.topic,
        &route.group,
        deadline,
    )
    .await?;
    let channel = connector.channel(deadline).await?;
    let guard = Arc::new(ChannelGuard {
        channel: channel.clone(),
        hold: Some(status.hold()),
    });
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| connector.broker_error("consume", "cannot set the prefetch".into(), e))?;
    let consumer = channel
        .basic_consume(
            route.queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| {
            connector.broker_error(
                "consume",
                format!("cannot consume from {:?}", route.queue),
                e,
            )
        })?;
    Ok((guard, consumer))
}

async fn consume_loop(
    inner: Arc<Inner>,
    route: Arc<Route>,
    prefetch: u16,
    status: ConsumerStatus,
    tx: mpsc::Sender<Result<Delivery>>,
) {
    let mut pause = Duration::from_millis(50);
    loop {
        if inner.connector.is_closed() || tx.is_closed() {
            return;
        }
        let (guard, mut consumer) = match open(&inner, &route, prefetch, &status).await {
            Ok(opened) => opened,
            Err(e) => {
                status.set_consuming(false);
                if inner.connector.is_closed() || tx.send(Err(e)).await.is_err() {
                    return;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(inner.connector.config.reconnect_max);
                continue;
            }
        };
        pause = Duration::from_millis(50);
        status.set_consuming(true);
        loop {
            let next = tokio::select! {
                () = tx.closed() => {
                    // The subscription stopped: stop fetching. The channel stays open (guard)
                    // until handlers still running have settled their deliveries.
                    let _ = guard.channel.basic_cancel(consumer.tag(), BasicCancelOptions::default()).await;
                    return;
                }
                next = consumer.next() => next,
            };
            match next {
                Some(Ok(delivery)) => {
                    let delivery = to_delivery(&inner, &route, &guard, delivery);
                    if tx.send(Ok(delivery)).await.is_err() {
                        let _ = guard
                            .channel
                            .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                            .await;
                        return;
                    }
                }
                Some(Err(e)) => {
                    status.set_consuming(false);
                    if inner.connector.is_closed() {
                        return;
                    }
                    let error = inner.connector.broker_error(
                        "consume",
                        format!(
                            "consumer of {:?} lost its channel; reconnecting",
                            route.queue
                        ),
                        e,
                    );
                    if tx.send(Err(error)).await.is_err() {
                        return;
                    }
                    break;
                }
                None => {
                    status.set_consuming(false);
                    if inner.connector.is_closed() {
                        return;
                    }
                    tracing::warn!(queue = %route.queue, "consumer cancelled by the broker; consuming again");
                    break;
                }
            }
        }
    }
}

fn to_delivery(
    inner: &Arc<Inner>,
    route: &Arc<Route>,
    guard: &Arc<ChannelGuard>,
    delivery: lapin::message::Delivery,
) -> Delivery {
    let (message, attempt) = from_amqp(
        &route.topic,
        &delivery.properties,
        delivery.data,
        delivery.redelivered,
    );
    let message = Arc::new(message);
    Delivery::new(
        Arc::clone(&message),
        attempt,
        Box::new(RabbitAck {
            inner: Arc::clone(inner),
            route: Arc::clone(route),
            message,
            acker: Some(delivery.acker),
            attempt,
            guard: Arc::clone(guard),
        }),
    )
}

/// How long a background close or requeue may take before it is given up (the broker
/// redelivers unsettled messages of a closed channel anyway).
const BACKGROUND_LIMIT: Duration = Duration::from_secs(30);

/// How often a pending ack looks whether its channel is still open.
const SETTLE_WATCH: Duration = Duration::from_millis(100);

struct RabbitAck {
    inner: Arc<Inner>,
    route: Arc<Route>,
    message: Arc<Message>,
    acker: Option<Acker>,
    attempt: u32,
    guard: Arc<ChannelGuard>,
}

impl RabbitAck {
    fn settle_error(&self, operation: &'static str, why: String) -> Error {
        Error::new(
            ErrorKind::Connection,
            operation,
            format!("could not {operation} on RabbitMQ: {why}; the broker will deliver the message again"),
        )
        .with_resource(format!("queue {}", self.route.queue))
    }

    /// Acks (or requeues, with `requeue`) the delivery on its channel.
    ///
    /// lapin can leave an ack pending forever when the channel dies as it is sent, and reports
    /// an ack on an already dead channel as `Ok(false)`. Neither may pass for success or hold
    /// up the consumer (its key would wait behind it for good), so the settle races a watch on
    /// the channel: once the channel is gone the broker redelivers the message anyway, and the
    /// caller gets a `Connection` error saying so.
    async fn settle(&mut self, requeue: bool) -> Result<()> {
        let operation = if requeue { "nack" } else { "ack" };
        let Some(acker) = self.acker.take() else {
            return Ok(());
        };
        let channel = self.guard.channel.clone();
        let settling = async {
            if requeue {
                let options = BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                };
                acker.nack(options).await
            } else {
                acker.ack(BasicAckOptions::default()).await
            }
        };
        let watch = async {
            let mut tick = tokio::time::interval(SETTLE_WATCH);
            loop {
                tick.tick().await;
                if acker.poisoned() || !channel.status().connected() {
                    return;
                }
            }
        };
        tokio::select! {
            settled = settling => match settled {
                Ok(true) => Ok(()),
                Ok(false) => Err(self.settle_error(operation, "its channel was closed".into())),
                Err(e) => Err(self.settle_error(operation, e.to_string()).with_source(e)),
            },
            () = watch => {
                tracing::debug!(queue = %self.route.queue, operation, "channel closed while settling a delivery");
                Err(self.settle_error(operation, "its channel closed while settling".into()))
            }
        }
    }

    async fn requeue(&mut self) -> Result<()> {
        self.settle(true).await
    }

    async fn ack_now(&mut self) -> Result<()> {
        self.settle(false).await
    }

    /// Sends `message` to `queue` through the default exchange, confirmed.
    async fn send_to_queue(
        &self,
        queue: String,
        message: &Message,
        attempt: Option<u32>,
        operation: &'static str,
    ) -> Result<()> {
        let out = Outgoing::new(message.clone(), attempt, String::new(), queue.into())?;
        send_confirmed(&self.inner.connector, vec![out], operation).await
    }
}

#[async_trait]
impl Acknowledger for RabbitAck {
    /// Returns once lapin has the ack, not once lapin wrote it: an ack is never confirmed
    /// by RabbitMQ, so a written one is no surer to arrive than one handed to lapin. Waiting
    /// for the write held the consumer up by two thread wake-ups each, and left lapin one ack
    /// to write at a time (callers ack one after another), a write and a `futex` each: 10.4
    /// `futex` and 2 `sendto` calls a message against 6.5 and 1.4 (`strace -f -c` of
    /// `benches/peers` on RabbitMQ). The wait goes on in a task that holds the delivery, and
    /// with it the channel: a consumer's channel is still closed only once its acks are
    /// written, and a failed write is logged as a failed ack was.
    async fn ack(mut self: Box<Self>) -> Result<()> {
        let mut settling = Box::pin(async move { self.ack_now().await });
        // The first poll hands lapin the ack, or says that the channel is gone.
        match futures::poll!(settling.as_mut()) {
            Poll::Ready(result) => result,
            Poll::Pending => {
                tokio::spawn(async move {
                    if let Err(error) = settling.await {
                        tracing::error!(%error, "could not ack; the broker will deliver the message again");
                    }
                });
                Ok(())
            }
        }
    }

    async fn nack(mut self: Box<Self>, delay: Duration) -> Result<()> {
        let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        if delay_ms == 0 {
            return self.requeue().await;
        }
        let deadline = Instant::now() + self.inner.connector.config.publish_timeout;
        let retry = match declare_retry(
            &self.inner.connector,
            &self.inner.declared,
            &self.route.queue,
            delay_ms,
            deadline,
        )
        .await
        {
            Ok(retry) => retry,
            Err(e) => {
                tracing::warn!(error = %e, "no retry queue; redelivering at once");
                return self.requeue().await;
            }
        };
        // The delayed copy is confirmed before the original is acked: a crash in between
        // duplicates the message, never loses it.
        let message = Arc::clone(&self.message);
        match self
            .send_to_queue(
                retry,
                &message,
                Some(self.attempt.saturating_add(1)),
                "nack",
            )
            .await
        {
            Ok(()) => self.ack_now().await,
            Err(e) => {
                tracing::warn!(error = %e, "could not park the message for a delayed retry; redelivering at once");
                self.requeue().await
            }
        }
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
        let dlq = self
            .inner
            .connector
            .config
            .dead_letter_queue(&self.route.queue);
        match self.send_to_queue(dlq, &dead, None, "dead-letter").await {
            Ok(()) => self.ack_now().await,
            Err(e) => {
                let _ = self.requeue().await;
                Err(e)
            }
        }
    }
}

impl Drop for RabbitAck {
    fn drop(&mut self) {
        // Unsettled (the handler was abandoned): hand the message back now rather than when
        // the channel closes.
        if let Some(acker) = self.acker.take() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let requeue = BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    };
                    let _ = tokio::time::timeout(BACKGROUND_LIMIT, acker.nack(requeue)).await;
                });
            }
        }
    }
}
