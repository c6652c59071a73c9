//! Publishing with publisher confirms: a batch is sent in one go and its confirms awaited
//! together; what the broker did not confirm because the connection dropped is sent again on
//! the next connection, until the publish deadline. `Ok` means every message was confirmed.

use busbar_core::{Error, ErrorKind, Message, Result, Text};
use futures::future::join_all;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Confirmation};
use tokio::time::Instant;

use crate::connection::{is_connection_loss, Connector};

/// One AMQP publish.
#[derive(Clone)]
pub(crate) struct Outgoing {
    message: Message,
    /// busbar's attempt count, for a delayed retry.
    attempt: Option<u32>,
    exchange: String,
    routing_key: Text,
    /// The AMQP properties of the first send, taken by it (lapin takes them by value): a
    /// message sent again after a lost connection has them made again from `message`, instead
    /// of every message paying a copy kept for that rare case.
    properties: Option<BasicProperties>,
}

impl Outgoing {
    /// `message`, to `routing_key` on `exchange`; an error when its headers cannot travel as
    /// AMQP properties.
    pub(crate) fn new(
        message: Message,
        attempt: Option<u32>,
        exchange: String,
        routing_key: Text,
    ) -> Result<Self> {
        Ok(Outgoing {
            properties: Some(crate::mapping::to_amqp(&message, attempt)?),
            message,
            attempt,
            exchange,
            routing_key,
        })
    }

    fn id(&self) -> &str {
        &self.message.id
    }

    fn take_properties(&mut self) -> Result<BasicProperties> {
        match self.properties.take() {
            Some(properties) => Ok(properties),
            None => crate::mapping::to_amqp(&self.message, self.attempt),
        }
    }
}

/// `error` stopped `pending` (of `total`) before RabbitMQ confirmed them: say which.
pub(crate) fn not_published(
    connector: &Connector,
    operation: &'static str,
    pending: &[Outgoing],
    total: usize,
    error: Error,
) -> Error {
    let ids: Vec<&str> = pending.iter().map(|o| o.id()).collect();
    Error::new(
        error.kind(),
        operation,
        format!(
            "{} of {total} messages were not published (no confirm from RabbitMQ): {}; {}",
            pending.len(),
            ids.join(", "),
            error.message()
        ),
    )
    .with_resource(connector.config.url.to_string())
    .with_retryable(error.is_retryable())
    .with_source(error)
}

/// Publishes `batch` and waits for every confirm, re-sending after a lost connection.
pub(crate) async fn send_confirmed(
    connector: &Connector,
    mut pending: Vec<Outgoing>,
    operation: &'static str,
) -> Result<()> {
    let total = pending.len();
    let deadline = Instant::now() + connector.config.publish_timeout;
    loop {
        connector.ensure_open(operation)?;
        let channel = match connector.publisher(deadline).await {
            Ok(channel) => channel,
            Err(e) => return Err(not_published(connector, operation, &pending, total, e)),
        };
        let mut confirms = Vec::with_capacity(pending.len());
        let mut lost: Option<lapin::Error> = None;
        for out in &mut pending {
            let properties = out.take_properties()?;
            let sent = channel
                .basic_publish(
                    out.exchange.as_str().into(),
                    out.routing_key.as_str().into(),
                    BasicPublishOptions::default(),
                    &out.message.payload,
                    properties,
                )
                .await;
            match sent {
                Ok(confirm) => confirms.push(confirm),
                Err(e) if is_connection_loss(&e) => {
                    lost = Some(e);
                    break;
                }
                Err(e) => {
                    return Err(connector.broker_error(
                        operation,
                        format!("cannot publish message {}", out.id()),
                        e,
                    ))
                }
            }
        }
        let sent = confirms.len();
        let mut retry = Vec::new();
        let mut nacked = Vec::new();
        let Ok(results) = tokio::time::timeout_at(deadline, join_all(confirms)).await else {
            let ids: Vec<&str> = pending.iter().map(|o| o.id()).collect();
            // The likeliest cause, and what to fix, when RabbitMQ said so.
            let blocked = connector.publishing_blocked().map_or_else(String::new, |reason| {
                format!(" RabbitMQ blocks publishing while a resource alarm lasts ({reason}): free memory or disk on the broker (`rabbitmq-diagnostics alarms` names it).")
            });
            return Err(Error::new(
                ErrorKind::Timeout,
                operation,
                format!(
                    "RabbitMQ confirmed none of {} messages within {:?}; they may or may not be published (at-least-once: send again): {}.{blocked}",
                    pending.len(),
                    connector.config.publish_timeout,
                    ids.join(", ")
                ),
            )
            .with_resource(connector.config.url.to_string())
            .with_retryable(true));
        };
        for (out, result) in pending.iter().zip(results) {
            match result {
                Ok(Confirmation::Ack(_) | Confirmation::NotRequested) => {}
                Ok(Confirmation::Nack(_)) => nacked.push(out.message.id.clone()),
                Err(e) if is_connection_loss(&e) => {
                    lost.get_or_insert(e);
                    retry.push(out.clone());
                }
                Err(e) => {
                    return Err(connector.broker_error(
                        operation,
                        format!("no confirm for message {}", out.id()),
                        e,
                    ))
                }
            }
        }
        if !nacked.is_empty() {
            return Err(Error::new(
                ErrorKind::Broker,
                operation,
                format!(
                    "RabbitMQ refused (nacked) {} of {total} messages: {}; they were not published",
                    nacked.len(),
                    nacked.join(", ")
                ),
            )
            .with_resource(connector.config.url.to_string())
            .with_retryable(true));
        }
        retry.extend(pending.drain(sent..));
        if retry.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let ids: Vec<&str> = retry.iter().map(|o| o.id()).collect();
            let mut error = Error::new(
                ErrorKind::Connection,
                operation,
                format!(
                    "the connection to RabbitMQ was lost and {} of {total} messages were not confirmed within {:?}: {}",
                    retry.len(),
                    connector.config.publish_timeout,
                    ids.join(", ")
                ),
            )
            .with_resource(connector.config.url.to_string());
            if let Some(e) = lost {
                error = error.with_source(e);
            }
            return Err(error);
        }
        tracing::warn!(
            unconfirmed = retry.len(),
            "connection lost while publishing; sending again after reconnecting"
        );
        pending = retry;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_sent_again_has_the_properties_of_its_first_send() {
        let mut message = Message::new("m-1", "orders", "{}");
        message.headers.insert("ce_type", "order.placed.v1");
        message.headers.insert(
            "ce_traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        );
        message.headers.insert("tenant", "acme");
        message.key = Some("customer-7".into());
        let mut out =
            Outgoing::new(message, Some(3), "busbar".into(), "orders".into()).expect("publishable");
        let pending_copy = out.clone();
        let first = out.take_properties().expect("first send");
        // Lost before its confirm: the copy kept for sending again, and the one that was sent.
        for mut again in [pending_copy, out] {
            assert_eq!(again.take_properties().expect("sent again"), first);
        }
        let headers = first.headers().as_ref().expect("headers");
        for name in [
            "cloudEvents:type",
            "cloudEvents:traceparent",
            "cloudEvents:partitionkey",
            "tenant",
            "busbar.attempt",
        ] {
            assert!(headers.inner().contains_key(name), "{name} in {headers:?}");
        }
    }
}
