//! busbar: one publish/subscribe API over RabbitMQ, Kafka, Amazon SQS and an in-process memory
//! transport, with typed CloudEvents envelopes, correlation, retries, dead letters and idempotent
//! consumers.
//!
//! A service picks its broker with one URL:
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use serde::{Deserialize, Serialize};
//! use busbar::{Context, Envelope, Event, HandlerError, Text};
//!
//! #[derive(Serialize, Deserialize)]
//! struct OrderPlaced { order_id: String }
//! impl Event for OrderPlaced {
//!     const TYPE: &'static str = "orders.order_placed.v1";
//!     fn key(&self) -> Option<Text> { Some(self.order_id.as_str().into()) }
//! }
//!
//! let bus = busbar::connect("memory://").await?;
//! let subscription = bus
//!     .subscribe::<OrderPlaced>("orders", "billing")
//!     .start(|order: Envelope<OrderPlaced>, _ctx: Context| async move {
//!         println!("bill order {}", order.payload.order_id);
//!         Ok::<_, HandlerError>(())
//!     })
//!     .await?;
//! bus.publish("orders", OrderPlaced { order_id: "o-1".into() }).await?;
//! subscription.shutdown(std::time::Duration::from_secs(1)).await?;
//! # Ok::<(), busbar::Error>(())
//! # }).unwrap();
//! ```
//!
//! This crate is the facade: it re-exports [`busbar_core`] and chooses a transport by URL
//! scheme. Broker adapters are enabled by cargo features, one per broker, so a service compiles
//! only the broker it uses.

// Library code never unwraps or panics on what a user or a broker can send; tests may.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

use std::sync::Arc;

pub use busbar_core::*;

/// Connects to the broker named by `url` (`memory://`, `amqp://…`, `kafka://…`, `sqs://…`)
/// with default settings.
///
/// An unknown scheme, or a broker whose feature is not enabled in this build, is a
/// [`ErrorKind::Config`] error that says which schemes and features exist.
pub async fn connect(url: &str) -> Result<Bus> {
    connect_with(&BusConfig::from_url(url)?).await
}

/// Connects with a full [`BusConfig`] (URL plus source, retry policy and concurrency).
pub async fn connect_with(config: &BusConfig) -> Result<Bus> {
    let transport = open_transport(&config.url).await?;
    Ok(Bus::builder(transport).config(config).build())
}

/// The RabbitMQ transport (feature `rabbitmq`).
#[cfg(feature = "rabbitmq")]
pub use busbar_rabbitmq as rabbitmq;

/// The Kafka transport (feature `kafka`).
#[cfg(feature = "kafka")]
pub use busbar_kafka as kafka;

/// The SQS transport (feature `sqs`).
#[cfg(feature = "sqs")]
pub use busbar_sqs as sqs;

/// PostgreSQL: the idempotency store, the transactional inbox, and the outbox with its relay
/// (feature `postgres`).
#[cfg(feature = "postgres")]
pub use busbar_postgres as postgres;

/// The Redis idempotency store (feature `redis`).
#[cfg(feature = "redis")]
pub use busbar_redis as redis;

/// Opens the transport for `url` without building a bus.
pub async fn open_transport(url: &TransportUrl) -> Result<Arc<dyn Transport>> {
    match url.scheme() {
        "memory" => Ok(Arc::new(MemoryTransport::from_url(url)?)),
        #[cfg(feature = "rabbitmq")]
        "amqp" | "amqps" => Ok(Arc::new(
            busbar_rabbitmq::RabbitTransport::connect(url).await?,
        )),
        #[cfg(feature = "kafka")]
        "kafka" => Ok(Arc::new(busbar_kafka::KafkaTransport::connect(url).await?)),
        #[cfg(feature = "sqs")]
        "sqs" => Ok(Arc::new(busbar_sqs::SqsTransport::connect(url).await?)),
        scheme => Err(not_available(url, scheme)),
    }
}

fn not_available(url: &TransportUrl, scheme: &str) -> Error {
    let message = match config::SCHEMES.iter().find(|(known, _)| *known == scheme) {
        Some((_, feature)) => format!(
            "`{scheme}://` needs busbar's `{feature}` feature, which is not enabled in this build \
             (add `features = [\"{feature}\"]` to the busbar dependency)"
        ),
        None => format!(
            "unknown URL scheme `{scheme}`; available: {}",
            config::SCHEMES
                .iter()
                .map(|(s, _)| format!("{s}://"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    Error::new(ErrorKind::Config, "connect", message).with_resource(url.to_string())
}
