//! busbar-core: the broker-independent heart of busbar.
//!
//! - [`Event`] and [`Envelope`]: typed events with CloudEvents metadata, mapped onto an untyped
//!   [`Message`] by the [`envelope`] module.
//! - [`Transport`]: the small SPI each broker adapter implements; [`MemoryTransport`] is the
//!   in-process one.
//! - [`Bus`]: publishing and [`Bus::subscribe`], whose consumer runtime (retry, dead-letter,
//!   idempotency, per-key order, graceful shutdown) is written once here for every broker.
//! - [`routing`]: several event types on one topic ([`EventSet`], [`event_set!`],
//!   [`Bus::route`]), older versions of an event, and the [`UnknownTypes`] policy.
//! - [`saga`]: persisted state machines over several events, with compensation and durable
//!   timeouts.
//!
//! Most users depend on the `busbar` facade, which re-exports this crate and adds
//! `busbar::connect(url)`.

// Library code never unwraps or panics on what a user or a broker can send; tests may.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod bus;
pub mod capabilities;
pub mod codec;
pub mod config;
pub mod consumer;
pub mod dead_letter;
pub mod envelope;
pub mod error;
pub mod health;
pub mod idempotency;
mod json;
pub mod memory;
pub mod message;
pub mod metrics;
#[cfg(feature = "otel")]
pub mod otel;
pub mod retry;
pub mod routing;
pub mod saga;
pub mod structured;
pub mod text;
pub mod transport;

pub use bus::{Bus, BusBuilder};
pub use capabilities::Capabilities;
pub use config::{BusConfig, TransportUrl};
pub use consumer::{
    BoxFuture, Context, Handler, HandlerError, Interceptor, RouteBuilder, ShutdownReport,
    Subscription, SubscriptionBuilder, SubscriptionStats,
};
pub use dead_letter::{DeadLetter, DeadLetterInfo, DeadLetterReason};
pub use envelope::{Envelope, Event};
pub use error::{Error, ErrorKind, Result};
pub use health::{BusHealth, ConnectionState, LastError, SubscriptionHealth};
pub use idempotency::{IdempotencyStore, MemoryIdempotencyStore};
pub use memory::{MemoryOptions, MemoryTransport};
pub use message::{HeaderName, Headers, Message};
pub use retry::RetryPolicy;
pub use routing::{EventSet, UnknownTypes};
pub use text::Text;
pub use transport::{
    Acknowledger, ConsumeOptions, ConsumerHold, ConsumerStatus, Delivery, DeliveryStream, Depth,
    RedriveSelection, StartFrom, Transport,
};
