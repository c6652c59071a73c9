//! Listing and redriving a group's dead letters.
//!
//! SQS has no cursor, so both read the DLQ by receiving (which hides messages for a while) until
//! it is empty, then put back what they do not take: listing makes everything visible again;
//! redrive sends the selected ones back to the group's queue, deletes them from the DLQ, and
//! makes the rest visible again.

use std::collections::HashSet;

use aws_sdk_sqs::types::MessageSystemAttributeName;
use busbar_core::{DeadLetter, RedriveSelection, Result};

use crate::mapping::{pack, received_attributes, unpack};
use crate::{sdk_error, GroupQueues, Inner};

struct Held {
    dead: DeadLetter,
    receipt: String,
}

async fn read(
    inner: &Inner,
    topic: &str,
    group: &str,
    queues: &GroupQueues,
    limit: usize,
) -> Result<Vec<Held>> {
    let mut held = Vec::new();
    let mut seen = HashSet::new();
    while held.len() < limit {
        let out = inner
            .sqs
            .receive_message()
            .queue_url(&queues.dlq.url)
            .max_number_of_messages(10)
            .visibility_timeout(60)
            .wait_time_seconds(1)
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .send()
            .await
            .map_err(|e| {
                sdk_error(
                    "list dead letters",
                    format!("cannot read {}", queues.dlq.url),
                    e,
                )
            })?;
        if out.messages().is_empty() {
            break;
        }
        for received in out.messages() {
            if !seen.insert(received.message_id().unwrap_or_default().to_string()) {
                continue;
            }
            let attributes = received_attributes(received);
            let message = unpack(
                topic,
                received.body().unwrap_or_default(),
                attributes,
                received.message_id().unwrap_or_default(),
            );
            // Without busbar's metadata, the queue's redrive policy moved it.
            let limit = inner.config.max_receive_count;
            let dead = DeadLetter::from_dlq(message, topic, group, limit, || {
                format!("SQS moved the message after {limit} receives (redrive policy)")
            });
            held.push(Held {
                dead,
                receipt: received.receipt_handle().unwrap_or_default().to_string(),
            });
        }
    }
    Ok(held)
}

async fn show(inner: &Inner, queues: &GroupQueues, receipts: impl Iterator<Item = &String>) {
    for receipt in receipts {
        let _ = inner
            .sqs
            .change_message_visibility()
            .queue_url(&queues.dlq.url)
            .receipt_handle(receipt)
            .visibility_timeout(0)
            .send()
            .await;
    }
}

pub(crate) async fn list(
    inner: &Inner,
    topic: &str,
    group: &str,
    queues: &GroupQueues,
    limit: usize,
) -> Result<Vec<DeadLetter>> {
    let held = read(inner, topic, group, queues, limit).await?;
    show(inner, queues, held.iter().map(|h| &h.receipt)).await;
    Ok(held.into_iter().map(|h| h.dead).collect())
}

/// What happens to the selected dead letters.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settle {
    /// Sent back to the group's queue, then deleted from the DLQ.
    Redrive,
    /// Deleted from the DLQ for good.
    Purge,
}

/// Redrives or purges the selected dead letters; the others are made visible again.
pub(crate) async fn settle(
    inner: &Inner,
    topic: &str,
    group: &str,
    queues: &GroupQueues,
    selection: RedriveSelection,
    action: Settle,
) -> Result<usize> {
    let operation = match action {
        Settle::Redrive => "redrive",
        Settle::Purge => "purge dead letters",
    };
    let held = read(inner, topic, group, queues, usize::MAX).await?;
    let mut moved = 0;
    let mut kept = Vec::new();
    for h in held {
        if !selection.matches(&h.dead.message.id) {
            kept.push(h.receipt);
            continue;
        }
        let message = &h.dead.message;
        if action == Settle::Redrive {
            inner
                .send_to_queue(
                    &queues.queue.url,
                    vec![(message.id.clone(), pack(message)?)],
                    operation,
                    crate::Dedup::Fresh,
                )
                .await?;
        }
        inner
            .sqs
            .delete_message()
            .queue_url(&queues.dlq.url)
            .receipt_handle(&h.receipt)
            .send()
            .await
            .map_err(|e| {
                sdk_error(
                    operation,
                    format!("could not delete {} from the DLQ", message.id),
                    e,
                )
            })?;
        moved += 1;
    }
    show(inner, queues, kept.iter()).await;
    Ok(moved)
}

/// The messages a queue holds: visible, in flight (received, not yet deleted) and delayed
/// (waiting out a retry's backoff), as SQS approximates them (its counts settle within a
/// minute).
pub(crate) async fn count(inner: &Inner, queue_url: &str) -> Result<u64> {
    use aws_sdk_sqs::types::QueueAttributeName as Name;
    let counted = [
        Name::ApproximateNumberOfMessages,
        Name::ApproximateNumberOfMessagesNotVisible,
        Name::ApproximateNumberOfMessagesDelayed,
    ];
    let out = inner
        .sqs
        .get_queue_attributes()
        .queue_url(queue_url)
        .set_attribute_names(Some(counted.to_vec()))
        .send()
        .await
        .map_err(|e| {
            sdk_error(
                "report queue depth",
                format!("cannot read the depth of {queue_url}"),
                e,
            )
        })?;
    let attributes = out.attributes();
    Ok(counted
        .iter()
        .filter_map(|name| attributes.and_then(|a| a.get(name)))
        .filter_map(|n| n.parse::<u64>().ok())
        .sum())
}
