//! Declaring what busbar's nouns need on RabbitMQ.
//!
//! - one durable topic exchange (`exchange`, default `busbar`); a busbar topic is a routing key;
//! - per (topic, group), a durable group queue `<exchange>:<topic>:<group>` bound to the topic,
//!   quorum by default, whose broker-side dead-letter target is the group's DLQ (the crash
//!   backstop, with `x-delivery-limit`);
//! - per group queue, a classic durable DLQ `<queue>:dlq` where busbar puts dead letters;
//! - per group queue and delay, a classic retry queue `<queue>:retry:<ms>ms` whose messages
//!   expire after `<ms>` and dead-letter back into the group queue: a delayed nack without
//!   busy loops and without one long delay holding up shorter ones (each queue has one TTL).

use std::collections::HashSet;
use std::sync::Mutex;

use busbar_core::{Error, ErrorKind, Result};
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};
use tokio::time::Instant;

use crate::config::QueueType;
use crate::connection::{Connector, Role};

/// What was already declared through this transport (declarations are durable).
#[derive(Default)]
pub(crate) struct Declared {
    names: Mutex<HashSet<String>>,
}

impl Declared {
    fn contains(&self, name: &str) -> bool {
        self.names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(name)
    }

    fn insert(&self, name: String) {
        self.names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name);
    }

    /// Forgets `names`, so the next use declares them again (after a reconnect, in case the
    /// broker came back without them).
    pub(crate) fn forget(&self, names: &[&str]) {
        let mut declared = self.names.lock().unwrap_or_else(|p| p.into_inner());
        for name in names {
            declared.remove(*name);
        }
    }
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.as_bytes()))
}

/// Adds `x-expires` when the transport is configured with `queue_expires_ms`.
fn with_expiry(connector: &Connector, mut args: FieldTable) -> FieldTable {
    if let Some(expires) = connector.config.queue_expires {
        args.insert(
            "x-expires".into(),
            AMQPValue::LongLongInt(i64::try_from(expires.as_millis()).unwrap_or(i64::MAX)),
        );
    }
    args
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

fn check_length(queue: &str) -> Result<()> {
    if queue.len() > 255 {
        return Err(Error::new(
            ErrorKind::Config,
            "declare",
            format!(
                "the queue name {queue:?} is {} bytes; RabbitMQ allows 255. Use shorter topic and group names",
                queue.len()
            ),
        ));
    }
    Ok(())
}

async fn declare_exchange(
    connector: &Connector,
    declared: &Declared,
    channel: &Channel,
) -> Result<()> {
    let exchange = &connector.config.exchange;
    if declared.contains(exchange) {
        return Ok(());
    }
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| {
            connector.broker_error(
                "declare",
                format!("cannot declare exchange {exchange:?}"),
                e,
            )
        })?;
    declared.insert(exchange.clone());
    Ok(())
}

/// Makes sure the exchange exists (before the first publish).
pub(crate) async fn ensure_exchange(
    connector: &Connector,
    declared: &Declared,
    deadline: Instant,
) -> Result<()> {
    if declared.contains(&connector.config.exchange) {
        return Ok(());
    }
    let channel = connector.channel_on(Role::Publish, deadline).await?;
    let result = declare_exchange(connector, declared, &channel).await;
    let _ = channel.close(200, "declared".into()).await;
    result
}

/// Declares the group queue of (`topic`, `group`), its DLQ and binding; returns the queue name.
pub(crate) async fn declare_group(
    connector: &Connector,
    declared: &Declared,
    topic: &str,
    group: &str,
    deadline: Instant,
) -> Result<String> {
    let config = &connector.config;
    let queue = config.queue(topic, group);
    if declared.contains(&queue) {
        return Ok(queue);
    }
    let dlq = config.dead_letter_queue(&queue);
    check_length(&dlq)?;
    let channel = connector.channel(deadline).await?;
    let declaring = async {
        declare_exchange(connector, declared, &channel).await?;
        let mut dlq_args = FieldTable::default();
        dlq_args.insert("x-queue-type".into(), text("classic"));
        channel
            .queue_declare(
                dlq.as_str().into(),
                durable(),
                with_expiry(connector, dlq_args),
            )
            .await
            .map_err(|e| {
                connector.broker_error(
                    "declare",
                    format!("cannot declare dead-letter queue {dlq:?}"),
                    e,
                )
            })?;
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), text(config.queue_type.as_str()));
        args.insert("x-dead-letter-exchange".into(), text(""));
        args.insert("x-dead-letter-routing-key".into(), text(&dlq));
        if config.queue_type == QueueType::Quorum {
            args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongLongInt(i64::from(config.delivery_limit)),
            );
        }
        channel.queue_declare(queue.as_str().into(), durable(), with_expiry(connector, args)).await.map_err(|e| {
            connector.broker_error(
                "declare",
                format!(
                    "cannot declare group queue {queue:?} (if it exists with other arguments, e.g. another queue_type or delivery_limit, delete it or match its settings)"
                ),
                e,
            )
        })?;
        channel
            .queue_bind(
                queue.as_str().into(),
                config.exchange.as_str().into(),
                topic.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                connector.broker_error(
                    "declare",
                    format!("cannot bind {queue:?} to topic {topic:?}"),
                    e,
                )
            })?;
        Ok::<_, Error>(())
    };
    let result = tokio::time::timeout_at(deadline, declaring)
        .await
        .unwrap_or_else(|_| {
            Err(Error::new(
                ErrorKind::Timeout,
                "declare",
                format!("RabbitMQ did not finish declaring {queue:?} before the deadline"),
            )
            .with_resource(connector.config.url.to_string()))
        });
    let _ = channel.close(200, "declared".into()).await;
    result?;
    declared.insert(queue.clone());
    Ok(queue)
}

/// The delay actually used for a requested one: rounded *up* on the series 1, 1.2, 1.5,
/// 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 8 × 10ⁿ ms, so a retry never comes early, at most 25 %
/// late, and one group needs about 13 retry queues per decade of delays (jittered backoffs
/// included). Below 10 ms the delay is kept as it is.
pub(crate) fn retry_bucket(delay_ms: u64) -> u64 {
    if delay_ms < 10 {
        return delay_ms.max(1);
    }
    let mut decade = 1u64;
    while delay_ms / decade >= 10 {
        decade = decade.saturating_mul(10);
    }
    [
        100u64, 120, 150, 175, 200, 250, 300, 350, 400, 500, 600, 700, 800, 1000,
    ]
    .iter()
    .map(|step| decade.saturating_mul(*step).div_ceil(100))
    .find(|&bucket| bucket >= delay_ms)
    .unwrap_or(delay_ms)
}

/// The retry queue of `queue` for a delay of about `delay_ms` (see [`retry_bucket`]),
/// declared if needed.
pub(crate) async fn declare_retry(
    connector: &Connector,
    declared: &Declared,
    queue: &str,
    delay_ms: u64,
    deadline: Instant,
) -> Result<String> {
    let bucket = retry_bucket(delay_ms);
    let name = connector.config.retry_queue(queue, bucket);
    if declared.contains(&name) {
        return Ok(name);
    }
    check_length(&name)?;
    let channel = connector.channel(deadline).await?;
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), text("classic"));
    args.insert(
        "x-message-ttl".into(),
        AMQPValue::LongLongInt(i64::try_from(bucket).unwrap_or(i64::MAX)),
    );
    args.insert("x-dead-letter-exchange".into(), text(""));
    args.insert("x-dead-letter-routing-key".into(), text(queue));
    let result = channel
        .queue_declare(
            name.as_str().into(),
            durable(),
            with_expiry(connector, args),
        )
        .await
        .map_err(|e| {
            connector.broker_error("nack", format!("cannot declare retry queue {name:?}"), e)
        });
    let _ = channel.close(200, "declared".into()).await;
    result?;
    declared.insert(name.clone());
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::retry_bucket;

    #[test]
    fn retry_buckets_never_shorten_a_delay_and_lengthen_it_by_at_most_a_quarter() {
        for delay in 1..200_000u64 {
            let bucket = retry_bucket(delay);
            assert!(bucket >= delay, "{delay} -> {bucket}");
            assert!(bucket * 4 <= delay * 5, "{delay} -> {bucket}");
        }
        assert_eq!(retry_bucket(300), 300);
        assert_eq!(retry_bucket(301), 350);
        assert_eq!(retry_bucket(1_100), 1_200);
        let distinct: std::collections::BTreeSet<u64> = (1_000..10_000).map(retry_bucket).collect();
        assert_eq!(distinct.len(), 14);
    }
}
