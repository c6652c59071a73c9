//! busbar's RabbitMQ transport, on lapin.
//!
//! | busbar | RabbitMQ |
//! |---|---|
//! | topic | routing key on one durable topic exchange (`busbar`) |
//! | group | durable queue `<exchange>:<topic>:<group>` bound to the topic (quorum by default) |
//! | publish | persistent messages, publisher confirms; a batch awaits its confirms together |
//! | ack | `basic.ack` |
//! | nack(delay) | the message is parked, confirmed, in a retry queue whose TTL ≈ delay and which dead-letters back into the group queue; then acked |
//! | dead letter | republished, confirmed, to `<queue>:dlq` with the reason headers; then acked. Quorum queues also dead-letter there on their own after `delivery_limit` deliveries (crash backstop) |
//! | attempt | busbar's `busbar.attempt` header plus the quorum queue's `x-delivery-count` |
//!
//! The envelope follows the CloudEvents AMQP binding (see [`mapping`]). Connection loss is
//! handled by busbar: see [`RabbitTransport`].
//!
//! ```no_run
//! # async fn demo() -> busbar_core::Result<()> {
//! let transport = busbar_rabbitmq::RabbitTransport::connect(
//!     &"amqp://guest:guest@127.0.0.1:5672/%2f".parse()?,
//! ).await?;
//! let bus = busbar_core::Bus::new(transport);
//! # Ok(()) }
//! ```

// Library code never unwraps or panics on what a user or a broker can send; tests may.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod config;
mod connection;
mod dead_letters;
pub mod mapping;
mod publisher;
mod subscriber;
mod topology;

use std::sync::Arc;

use async_trait::async_trait;
use busbar_core::message::validate_name;
use busbar_core::transport::no_history;
use busbar_core::{
    Capabilities, ConnectionState, ConsumeOptions, DeadLetter, DeliveryStream, Depth, Message,
    RedriveSelection, Result, StartFrom, Transport, TransportUrl,
};
use tokio::time::Instant;

pub use config::{QueueType, RabbitConfig};

use connection::Connector;
use dead_letters::Settle;
use publisher::{not_published, send_confirmed, Outgoing};
use topology::Declared;

pub(crate) struct Inner {
    pub(crate) connector: Arc<Connector>,
    pub(crate) declared: Declared,
}

/// The RabbitMQ transport (`amqp://`, `amqps://`).
///
/// It publishes on one connection and consumes on another (opened by the first consumer or
/// declare), so that consumers go on acking, and so draining queues, while a resource alarm
/// blocks the publishers. A lost connection is reconnected at once, with backoff (up to
/// `reconnect_max_ms` between tries), whether or not anything needs it then:
/// a publish waiting for confirms sends the unconfirmed messages again on the new connection
/// and returns `Ok` only once all are confirmed, or a `Connection` error naming the ids that
/// were not confirmed by `publish_timeout_ms`. Consumers open a new channel and consume again;
/// whatever they had not acked is redelivered by RabbitMQ.
#[derive(Clone)]
pub struct RabbitTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RabbitTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitTransport")
            .field("url", &self.inner.connector.config.url)
            .field("exchange", &self.inner.connector.config.exchange)
            .field("queue_type", &self.inner.connector.config.queue_type)
            .finish_non_exhaustive()
    }
}

impl RabbitTransport {
    /// Connects to the broker at `url`. Fails at once (no retry) when it cannot connect, so a
    /// wrong URL or a broker that is down is reported immediately.
    pub async fn connect(url: &TransportUrl) -> Result<Self> {
        RabbitTransport::connect_with(RabbitConfig::from_url(url)?).await
    }

    /// Connects with explicit settings.
    pub async fn connect_with(config: RabbitConfig) -> Result<Self> {
        let connector = Connector::new(config);
        connector.connect_once().await?;
        let deadline = Instant::now() + connector.config.publish_timeout;
        connector.open_publishers(deadline).await?;
        Ok(RabbitTransport {
            inner: Arc::new(Inner {
                connector,
                declared: Declared::default(),
            }),
        })
    }

    /// The settings in use.
    pub fn config(&self) -> &RabbitConfig {
        &self.inner.connector.config
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.inner.connector.config.publish_timeout
    }
}

#[async_trait]
impl Transport for RabbitTransport {
    fn name(&self) -> &'static str {
        "rabbitmq"
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.connector.config.capabilities()
    }

    async fn publish(&self, messages: Vec<Message>) -> Result<()> {
        let connector = &self.inner.connector;
        connector.ensure_open("publish")?;
        let max = connector.config.max_message_bytes;
        let mut batch = Vec::with_capacity(messages.len());
        for message in messages {
            message.check_publishable(max, "RabbitMQ")?;
            let topic = message.topic.clone();
            batch.push(Outgoing::new(
                message,
                None,
                connector.config.exchange.clone(),
                topic,
            )?);
        }
        if batch.is_empty() {
            return Ok(());
        }
        // A consumer that reconnects makes the exchange be declared again; when that fails,
        // the error names the messages like any other unpublished batch.
        if let Err(e) =
            topology::ensure_exchange(connector, &self.inner.declared, self.deadline()).await
        {
            return Err(not_published(connector, "publish", &batch, batch.len(), e));
        }
        send_confirmed(connector, batch, "publish").await
    }

    async fn declare(&self, topic: &str, group: &str) -> Result<()> {
        self.inner.connector.ensure_open("declare")?;
        validate_name("topic", topic)?;
        validate_name("group", group)?;
        topology::declare_group(
            &self.inner.connector,
            &self.inner.declared,
            topic,
            group,
            self.deadline(),
        )
        .await?;
        Ok(())
    }

    async fn consume(
        &self,
        topic: &str,
        group: &str,
        options: ConsumeOptions,
    ) -> Result<DeliveryStream> {
        self.inner.connector.ensure_open("consume")?;
        validate_name("topic", topic)?;
        validate_name("group", group)?;
        if options.start == StartFrom::Earliest {
            return Err(no_history("RabbitMQ", topic, group));
        }
        let queue = topology::declare_group(
            &self.inner.connector,
            &self.inner.declared,
            topic,
            group,
            self.deadline(),
        )
        .await?;
        Ok(subscriber::consume(
            Arc::clone(&self.inner),
            topic,
            group,
            queue,
            options,
        ))
    }

    async fn dead_letters(
        &self,
        topic: &str,
        group: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        self.inner.connector.ensure_open("list dead letters")?;
        dead_letters::list(&self.inner, topic, group, limit).await
    }

    async fn redrive(
        &self,
        topic: &str,
        group: &str,
        selection: RedriveSelection,
    ) -> Result<usize> {
        self.inner.connector.ensure_open("redrive")?;
        dead_letters::settle(&self.inner, topic, group, selection, Settle::Redrive).await
    }

    async fn purge_dead_letters(
        &self,
        topic: &str,
        group: &str,
        selection: RedriveSelection,
    ) -> Result<usize> {
        self.inner.connector.ensure_open("purge dead letters")?;
        dead_letters::settle(&self.inner, topic, group, selection, Settle::Purge).await
    }

    async fn delete_group(&self, topic: &str, group: &str) -> Result<()> {
        self.inner.connector.ensure_open("delete a group")?;
        dead_letters::delete_group(&self.inner, topic, group).await
    }

    async fn depth(&self, topic: &str, group: &str) -> Result<Depth> {
        self.inner.connector.ensure_open("report queue depth")?;
        dead_letters::depth(&self.inner, topic, group).await
    }

    fn connection(&self) -> ConnectionState {
        self.inner.connector.state()
    }

    async fn close(&self) -> Result<()> {
        self.inner.connector.close().await;
        Ok(())
    }
}
