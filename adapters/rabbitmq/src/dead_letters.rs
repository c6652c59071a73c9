//! Listing and redriving a group's dead letters.
//!
//! Listing reads the DLQ with `basic.get` without acking, then closes the channel, which puts
//! every message back where it was. Redrive moves the selected ones back into the group queue
//! (confirmed) before acking them out of the DLQ, so a failure in between duplicates a dead
//! letter rather than losing it.

use busbar_core::{DeadLetter, Depth, Error, ErrorKind, RedriveSelection, Result, Text};
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::FieldTable;
use lapin::Channel;
use tokio::time::Instant;

use crate::mapping::{death_count, from_amqp};
use crate::publisher::{send_confirmed, Outgoing};
use crate::Inner;

/// A message read from a DLQ, still unacked on `channel`.
struct Held {
    dead: DeadLetter,
    acker: lapin::Acker,
}

fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp) if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
}

/// Reads up to `limit` messages of the DLQ of (`topic`, `group`) without acking them.
async fn read(
    inner: &Inner,
    channel: &Channel,
    topic: &str,
    group: &str,
    limit: usize,
) -> Result<Vec<Held>> {
    let config = &inner.connector.config;
    let dlq = config.dead_letter_queue(&config.queue(topic, group));
    let mut held = Vec::new();
    let settle_deadline = Instant::now() + std::time::Duration::from_secs(5);
    while held.len() < limit {
        let got = match channel
            .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: false })
            .await
        {
            Ok(got) => got,
            // Never declared: no dead letters.
            Err(e) if is_not_found(&e) => break,
            Err(e) => {
                return Err(inner.connector.broker_error(
                    "list dead letters",
                    format!("cannot read {dlq:?}"),
                    e,
                ))
            }
        };
        let Some(got) = got else {
            // Empty for now. Dead letters another channel just handed back (a listing closing
            // its channel) are requeued asynchronously: done only when none are ready either.
            if ready(channel, &dlq).await == 0 || Instant::now() >= settle_deadline {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let delivery = got.delivery;
        let deaths = death_count(&delivery.properties);
        let (message, _) = from_amqp(
            topic,
            &delivery.properties,
            delivery.data,
            delivery.redelivered,
        );
        // Without busbar's metadata, RabbitMQ moved it itself (x-delivery-limit).
        let limit = config.delivery_limit;
        let dead = DeadLetter::from_dlq(
            message,
            topic,
            group,
            limit.saturating_mul(deaths.unwrap_or(1)),
            || {
                format!("RabbitMQ dead-lettered the message when it reached its delivery limit ({limit}, x-delivery-limit)")
            },
        );
        held.push(Held {
            dead,
            acker: delivery.acker,
        });
    }
    Ok(held)
}

/// Messages ready in `queue` (0 when it does not exist).
async fn ready(channel: &Channel, queue: &str) -> u32 {
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..lapin::options::QueueDeclareOptions::default()
    };
    channel
        .queue_declare(queue.into(), passive, lapin::types::FieldTable::default())
        .await
        .map_or(0, |q| q.message_count())
}

pub(crate) async fn list(
    inner: &Inner,
    topic: &str,
    group: &str,
    limit: usize,
) -> Result<Vec<DeadLetter>> {
    let deadline = Instant::now() + inner.connector.config.publish_timeout;
    let channel = inner.connector.channel(deadline).await?;
    let held = read(inner, &channel, topic, group, limit).await;
    // Closing the channel returns every unacked message to the DLQ, in place.
    let _ = channel.close(200, "listed".into()).await;
    Ok(held?.into_iter().map(|h| h.dead).collect())
}

/// What happens to the selected dead letters.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settle {
    /// Back into the group queue (confirmed), then out of the DLQ.
    Redrive,
    /// Out of the DLQ for good.
    Purge,
}

impl Settle {
    fn operation(self) -> &'static str {
        match self {
            Settle::Redrive => "redrive",
            Settle::Purge => "purge dead letters",
        }
    }
}

/// Redrives or purges the selected dead letters of (`topic`, `group`); returns how many.
pub(crate) async fn settle(
    inner: &Inner,
    topic: &str,
    group: &str,
    selection: RedriveSelection,
    action: Settle,
) -> Result<usize> {
    let connector = &inner.connector;
    let deadline = Instant::now() + connector.config.publish_timeout;
    let channel = connector.channel(deadline).await?;
    let queue = connector.config.queue(topic, group);
    let operation = action.operation();
    let result = async {
        let held = read(inner, &channel, topic, group, usize::MAX).await?;
        let mut moved = 0;
        for h in held {
            if !selection.matches(&h.dead.message.id) {
                continue;
            }
            let message = &h.dead.message;
            if action == Settle::Redrive {
                let out = Outgoing::new(message.clone(), None, String::new(), Text::new(&queue))?;
                send_confirmed(connector, vec![out], operation).await?;
            }
            h.acker.ack(BasicAckOptions::default()).await.map_err(|e| {
                connector.broker_error(
                    operation,
                    format!("could not remove {} from the DLQ", message.id),
                    e,
                )
            })?;
            moved += 1;
        }
        Ok(moved)
    }
    .await;
    let _ = channel.close(200, "settled".into()).await;
    result
}

/// Deletes the group queue and its dead-letter queue (retry queues, shared by name with
/// nothing else, empty out on their own: a message whose group queue is gone is dropped when
/// its delay ends).
pub(crate) async fn delete_group(inner: &Inner, topic: &str, group: &str) -> Result<()> {
    let connector = &inner.connector;
    let queue = connector.config.queue(topic, group);
    let dlq = connector.config.dead_letter_queue(&queue);
    let deadline = Instant::now() + connector.config.publish_timeout;
    let channel = connector.channel(deadline).await?;
    let mut result = Ok(());
    for name in [&queue, &dlq] {
        if let Err(e) = channel
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await
        {
            result = Err(connector.broker_error(
                "delete a group",
                format!("cannot delete queue {name:?}"),
                e,
            ));
            break;
        }
    }
    let _ = channel.close(200, "deleted".into()).await;
    inner.declared.forget(&[queue.as_str(), dlq.as_str()]);
    result
}

/// The ready messages of the group's queue and of its dead-letter queue, read by passive
/// declares (which create nothing). Messages delivered and not yet acked, and those waiting in
/// retry queues, are not counted: RabbitMQ reports ready messages only.
pub(crate) async fn depth(inner: &Inner, topic: &str, group: &str) -> Result<Depth> {
    let connector = &inner.connector;
    let queue = connector.config.queue(topic, group);
    let dlq = connector.config.dead_letter_queue(&queue);
    let deadline = Instant::now() + connector.config.publish_timeout;
    let channel = connector.channel(deadline).await?;
    let mut counts = [0u64; 2];
    for (count, name) in counts.iter_mut().zip([&queue, &dlq]) {
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let declared = channel
            .queue_declare(name.as_str().into(), passive, FieldTable::default())
            .await;
        *count = match declared {
            Ok(declared) => u64::from(declared.message_count()),
            Err(e) if is_not_found(&e) => {
                return Err(Error::new(
                    ErrorKind::Broker,
                    "report queue depth",
                    format!("queue {name:?} does not exist: declare the group first"),
                )
                .with_resource(format!("topic {topic}, group {group}"))
                .with_retryable(false)
                .with_source(e))
            }
            Err(e) => {
                return Err(connector.broker_error(
                    "report queue depth",
                    format!("cannot read the depth of queue {name:?}"),
                    e,
                ))
            }
        };
    }
    let _ = channel.close(200, "depth read".into()).await;
    Ok(Depth::new(Some(counts[0]), Some(counts[1])))
}
