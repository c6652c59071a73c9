//! One AMQP connection that reconnects with backoff, and the channels made from it.
//!
//! busbar owns reconnection instead of lapin's automatic recovery, so what happens on a lost
//! connection is explicit: publishes waiting for confirms are sent again on the new connection
//! (nothing is reported published that the broker did not confirm), consumers open a new
//! channel and consume again, and unacked deliveries of the lost channel are redelivered by
//! the broker.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use busbar_core::{ConnectionState, Error, ErrorKind, Result};
use lapin::options::ConfirmSelectOptions;
use lapin::tcp::OwnedTLSConfig;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::config::RabbitConfig;

pub(crate) struct Connector {
    pub(crate) config: RabbitConfig,
    current: Mutex<Option<Arc<Connection>>>,
    /// Confirming channels for publishing, taken in turn: RabbitMQ handles each channel's
    /// publishes one after another, so concurrent publishes on one channel queue up.
    publishers: Vec<Mutex<Option<Channel>>>,
    next_publisher: AtomicUsize,
    closed: AtomicBool,
    /// What probes read: the live connection and since when it is lost, kept apart from
    /// `current` so reading it never waits on a reconnect.
    seen: std::sync::Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    live: Option<Arc<Connection>>,
    lost: Option<(SystemTime, String)>,
}

/// What a probe says while the connection is down and no attempt has failed yet.
const LOST: &str = "the connection to RabbitMQ was lost; reconnecting";

impl Connector {
    pub(crate) fn new(config: RabbitConfig) -> Self {
        let publishers = (0..config.publish_channels.max(1))
            .map(|_| Mutex::new(None))
            .collect();
        Connector {
            config,
            current: Mutex::new(None),
            publishers,
            next_publisher: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            seen: std::sync::Mutex::new(Seen::default()),
        }
    }

    /// The connection as a probe sees it: connected, or reconnecting since the loss was first
    /// seen, with the last attempt's error.
    pub(crate) fn state(&self) -> ConnectionState {
        if self.is_closed() {
            return ConnectionState::Closed;
        }
        let Ok(mut seen) = self.seen.lock() else {
            return ConnectionState::Connected;
        };
        if seen.live.as_ref().is_some_and(|c| c.status().connected()) {
            return ConnectionState::Connected;
        }
        let (since, error) = seen
            .lost
            .get_or_insert_with(|| (SystemTime::now(), LOST.to_owned()))
            .clone();
        ConnectionState::Reconnecting { since, error }
    }

    fn connected(&self, connection: &Arc<Connection>) {
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Seen {
                live: Some(Arc::clone(connection)),
                lost: None,
            };
        }
    }

    fn attempt_failed(&self, error: &Error) {
        if let Ok(mut seen) = self.seen.lock() {
            let since = seen
                .lost
                .as_ref()
                .map_or_else(SystemTime::now, |(since, _)| *since);
            seen.lost = Some((since, error.to_string()));
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub(crate) fn ensure_open(&self, operation: &'static str) -> Result<()> {
        if self.is_closed() {
            Err(Error::closed(operation, "RabbitMQ transport")
                .with_resource(self.config.url.to_string()))
        } else {
            Ok(())
        }
    }

    /// Opens a new AMQP connection (TLS with the extra CA when configured).
    async fn open(&self) -> lapin::Result<Connection> {
        match &self.config.tls_ca_pem {
            None => {
                Connection::connect(&self.config.lapin_uri, ConnectionProperties::default()).await
            }
            Some(pem) => {
                let tls = OwnedTLSConfig {
                    identity: None,
                    cert_chain: Some(pem.clone()),
                };
                let runtime = lapin::runtime::default_runtime()?;
                Connection::connect_with_config(
                    &self.config.lapin_uri,
                    ConnectionProperties::default(),
                    tls,
                    runtime,
                )
                .await
            }
        }
    }

    /// One connection attempt, bounded by `connect_timeout`, its failure classified: a refused
    /// login, an unknown vhost or TLS spoken to a plain port cannot be fixed by retrying.
    async fn open_bounded(&self) -> Result<Connection> {
        let limit = self.config.connect_timeout;
        match tokio::time::timeout(limit, self.open()).await {
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(e)) => Err(self.connect_failure(e)),
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                "connect",
                format!(
                    "no AMQP handshake from {} within {limit:?}: is this a RabbitMQ AMQP port \
                     (5672, or 5671 for amqps://)? `connect_timeout_ms` sets the limit",
                    self.config.url.hosts().join(",")
                ),
            )
            .with_resource(self.config.url.to_string())
            .with_retryable(true)),
        }
    }

    fn connect_failure(&self, e: lapin::Error) -> Error {
        let refused = match e.kind() {
            lapin::ErrorKind::ProtocolError(amqp) => match amqp.get_id() {
                403 => Some(
                    "RabbitMQ refused the login: check the user and password in the URL (and \
                     `auth_mechanism`)",
                ),
                530 => Some(
                    "RabbitMQ does not allow this vhost: check the URL's path (`%2f` is the \
                     default vhost `/`) and that the user has permissions on it",
                ),
                _ => None,
            },
            lapin::ErrorKind::IOError(io)
                if self.config.url.scheme() == "amqps"
                    && io.kind() == std::io::ErrorKind::InvalidData =>
            {
                Some(
                    "the TLS handshake failed: the port does not answer in TLS; use amqp:// \
                     for a plain port (5672), or the broker's TLS port (5671)",
                )
            }
            _ => None,
        };
        match refused {
            Some(what) => Error::new(ErrorKind::Connection, "connect", what)
                .with_resource(self.config.url.to_string())
                .with_retryable(false)
                .with_source(e),
            None => self.connection_error("connect", "cannot connect to RabbitMQ", e),
        }
    }

    /// Connects once, without retrying: for the first connection, so a wrong URL or a broker
    /// that is down fails fast.
    pub(crate) async fn connect_once(&self) -> Result<Arc<Connection>> {
        let connection = self.open_bounded().await?;
        let connection = Arc::new(connection);
        *self.current.lock().await = Some(Arc::clone(&connection));
        self.connected(&connection);
        Ok(connection)
    }

    /// The live connection, reconnecting with backoff until `deadline` if it was lost.
    pub(crate) async fn connection(&self, deadline: Instant) -> Result<Arc<Connection>> {
        let mut current = self.current.lock().await;
        if let Some(connection) = current.as_ref() {
            if connection.status().connected() {
                return Ok(Arc::clone(connection));
            }
        }
        let mut pause = Duration::from_millis(50);
        loop {
            self.ensure_open("connect")?;
            match self.open_bounded().await {
                Ok(connection) => {
                    tracing::info!(url = %self.config.url, "connected to RabbitMQ");
                    let connection = Arc::new(connection);
                    *current = Some(Arc::clone(&connection));
                    self.connected(&connection);
                    return Ok(connection);
                }
                Err(e) if e.is_retryable() && Instant::now() + pause < deadline => {
                    self.attempt_failed(&e);
                    // Up to half of each wait taken off at random: instances that lost the
                    // broker together do not all come back in the same instant.
                    let wait = pause.mul_f64(1.0 - 0.5 * fastrand::f64());
                    tracing::warn!(url = %self.config.url, error = %e, ?wait, "RabbitMQ unreachable; reconnecting");
                    tokio::time::sleep(wait).await;
                    pause = (pause * 2).min(self.config.reconnect_max);
                }
                Err(e) => {
                    self.attempt_failed(&e);
                    return Err(e);
                }
            }
        }
    }

    /// A new channel on the live connection.
    pub(crate) async fn channel(&self, deadline: Instant) -> Result<Channel> {
        loop {
            let connection = self.connection(deadline).await?;
            // A broker that accepts the connection but never answers must not hang us.
            let opened = match tokio::time::timeout_at(deadline, connection.create_channel()).await
            {
                Ok(opened) => opened,
                Err(_) => {
                    return Err(Error::new(
                        ErrorKind::Timeout,
                        "open channel",
                        "RabbitMQ did not open a channel before the deadline",
                    )
                    .with_resource(self.config.url.to_string()))
                }
            };
            match opened {
                Ok(channel) => return Ok(channel),
                Err(e) if Instant::now() < deadline && !connection.status().connected() => {
                    tracing::debug!(error = %e, "connection lost while opening a channel; retrying");
                }
                Err(e) => {
                    return Err(self.connection_error("open channel", "cannot open a channel", e))
                }
            }
        }
    }

    /// The shared publishing channel, in confirm mode.
    /// Opens every publishing channel, so the first publishes after connecting find theirs
    /// open: a channel opened during an outage would end in a `Timeout`, where a publish on an
    /// open one sees the lost connection.
    pub(crate) async fn open_publishers(&self, deadline: Instant) -> Result<()> {
        for turn in 0..self.publishers.len() {
            self.publisher_at(turn, deadline).await?;
        }
        Ok(())
    }

    /// A confirming channel to publish one batch on: the pool's next, (re)opened if needed.
    pub(crate) async fn publisher(&self, deadline: Instant) -> Result<Channel> {
        let turn = self.next_publisher.fetch_add(1, Ordering::Relaxed) % self.publishers.len();
        self.publisher_at(turn, deadline).await
    }

    async fn publisher_at(&self, turn: usize, deadline: Instant) -> Result<Channel> {
        let Some(slot) = self.publishers.get(turn) else {
            return Err(Error::new(
                ErrorKind::Closed,
                "publish",
                "no publisher channel",
            ));
        };
        let mut publisher = slot.lock().await;
        if let Some(channel) = publisher.as_ref() {
            if channel.status().connected() {
                return Ok(channel.clone());
            }
        }
        let channel = self.channel(deadline).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| self.connection_error("publish", "cannot enable publisher confirms", e))?;
        *publisher = Some(channel.clone());
        Ok(channel)
    }

    pub(crate) async fn close(&self) {
        self.closed.store(true, Ordering::Release);
        for slot in &self.publishers {
            if let Some(channel) = slot.lock().await.take() {
                let _ = channel.close(200, "busbar transport closed".into()).await;
            }
        }
        if let Some(connection) = self.current.lock().await.take() {
            let _ = connection
                .close(200, "busbar transport closed".into())
                .await;
        }
    }

    pub(crate) fn connection_error(
        &self,
        operation: &'static str,
        what: &str,
        e: lapin::Error,
    ) -> Error {
        Error::new(ErrorKind::Connection, operation, what.to_string())
            .with_resource(self.config.url.to_string())
            .with_retryable(true)
            .with_source(e)
    }

    pub(crate) fn broker_error(
        &self,
        operation: &'static str,
        what: String,
        e: lapin::Error,
    ) -> Error {
        let retryable = is_connection_loss(&e);
        let kind = if retryable {
            ErrorKind::Connection
        } else {
            ErrorKind::Broker
        };
        Error::new(kind, operation, what)
            .with_resource(self.config.url.to_string())
            .with_retryable(retryable)
            .with_source(e)
    }
}

/// Whether `e` means the connection or channel went away (as opposed to the broker refusing
/// an operation, like a queue declared with different arguments).
pub(crate) fn is_connection_loss(e: &lapin::Error) -> bool {
    use lapin::protocol::AMQPErrorKind;
    use lapin::ErrorKind as K;
    match e.kind() {
        K::IOError(_)
        | K::InvalidConnectionState(_)
        | K::InvalidChannelState(..)
        | K::ChannelsLimitReached
        | K::MissingHeartbeatError => true,
        K::ProtocolError(amqp) => matches!(amqp.kind(), AMQPErrorKind::Hard(_)),
        _ => false,
    }
}
