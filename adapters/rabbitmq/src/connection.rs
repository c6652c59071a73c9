//! The transport's two AMQP connections, one to publish on and one to consume on, each
//! reconnecting with backoff, and the channels made from them.
//!
//! Two, as RabbitMQ advises: while a resource alarm lasts (memory or disk), RabbitMQ stops
//! reading from every connection that publishes, and lapin then sends nothing on it either.
//! Acks sent on that connection would wait too, so the consumers that drain the queues (and so
//! clear the alarm) would stall behind the publishers. On their own connection they go on.
//!
//! busbar owns reconnection instead of lapin's automatic recovery, so what happens on a lost
//! connection is explicit: publishes waiting for confirms are sent again on the new connection
//! (nothing is reported published that the broker did not confirm), consumers open a new
//! channel and consume again, and unacked deliveries of the lost channel are redelivered by
//! the broker.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use busbar_core::{ConnectionState, Error, ErrorKind, Result};
use futures::StreamExt;
use lapin::options::ConfirmSelectOptions;
use lapin::tcp::OwnedTLSConfig;
use lapin::{Channel, Connection, ConnectionProperties, Event};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::config::RabbitConfig;

/// Which of the transport's connections (see the module's documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// Publishing channels (in confirm mode) and the exchange's declaration before a publish.
    Publish,
    /// Consumers, and what manages queues: declares, dead letters, depths.
    Consume,
}

impl Role {
    /// The connection's name, as RabbitMQ's management UI and `rabbitmqctl` show it.
    fn connection_name(self) -> &'static str {
        match self {
            Role::Publish => "busbar publish",
            Role::Consume => "busbar consume",
        }
    }
}

/// One connection and what probes read of it.
#[derive(Default)]
struct Link {
    current: Mutex<Option<Arc<Connection>>>,
    /// What probes read: the live connection (none until first opened: the consuming one
    /// opens with the first consumer or declare, and is no part of health before) and since
    /// when it is lost, kept apart from `current` so reading it never waits on a reconnect.
    seen: std::sync::Mutex<Seen>,
    /// Why RabbitMQ blocked the connection, while it does (a resource alarm).
    blocked: std::sync::Mutex<Option<String>>,
}

impl Link {
    fn set_blocked(&self, reason: Option<String>) {
        if let Ok(mut blocked) = self.blocked.lock() {
            *blocked = reason;
        }
    }

    /// Since when, and why, this connection is lost; `None` while it is connected (or was
    /// never opened).
    fn lost(&self) -> Option<(SystemTime, String)> {
        let mut seen = self.seen.lock().ok()?;
        if seen.live.as_ref().is_none_or(|c| c.status().connected()) {
            return None;
        }
        Some(
            seen.lost
                .get_or_insert_with(|| (SystemTime::now(), LOST.to_owned()))
                .clone(),
        )
    }
}

pub(crate) struct Connector {
    pub(crate) config: RabbitConfig,
    publishing: Link,
    consuming: Link,
    /// Confirming channels for publishing, taken in turn: RabbitMQ handles each channel's
    /// publishes one after another, so concurrent publishes on one channel queue up.
    publishers: Vec<Mutex<Option<Channel>>>,
    next_publisher: AtomicUsize,
    closed: AtomicBool,
    /// Itself, for the tasks that reconnect a lost connection (see [`Connector::watch`]).
    me: Weak<Connector>,
}

#[derive(Default)]
struct Seen {
    live: Option<Arc<Connection>>,
    lost: Option<(SystemTime, String)>,
}

/// What a probe says while the connection is down and no attempt has failed yet.
const LOST: &str = "the connection to RabbitMQ was lost; reconnecting";

impl Connector {
    pub(crate) fn new(config: RabbitConfig) -> Arc<Self> {
        let publishers = (0..config.publish_channels.max(1))
            .map(|_| Mutex::new(None))
            .collect();
        Arc::new_cyclic(|me| Connector {
            config,
            publishing: Link::default(),
            consuming: Link::default(),
            publishers,
            next_publisher: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            me: me.clone(),
        })
    }

    fn link(&self, role: Role) -> &Link {
        match role {
            Role::Publish => &self.publishing,
            Role::Consume => &self.consuming,
        }
    }

    /// The connections as a probe sees them: connected, or reconnecting since the first loss
    /// still unrepaired was seen, with its last attempt's error.
    pub(crate) fn state(&self) -> ConnectionState {
        if self.is_closed() {
            return ConnectionState::Closed;
        }
        let lost = [&self.publishing, &self.consuming]
            .into_iter()
            .filter_map(Link::lost)
            .min_by_key(|(since, _)| *since);
        match lost {
            Some((since, error)) => ConnectionState::Reconnecting { since, error },
            None => ConnectionState::Connected,
        }
    }

    fn connected(&self, role: Role, connection: &Arc<Connection>) {
        let link = self.link(role);
        if let Ok(mut seen) = link.seen.lock() {
            *seen = Seen {
                live: Some(Arc::clone(connection)),
                lost: None,
            };
        }
        self.watch(role, connection);
    }

    /// Follows `connection`'s events: logs the broker blocking and unblocking it (a resource
    /// alarm), and reconnects once it is lost, so that probes see the broker back without
    /// waiting for the next publish or consumer to need the connection.
    fn watch(&self, role: Role, connection: &Arc<Connection>) {
        let events = connection.events_listener();
        let watched = Arc::downgrade(connection);
        let me = self.me.clone();
        let name = role.connection_name();
        let mark_blocked = move |me: &Weak<Connector>, reason: Option<String>| {
            if let Some(connector) = me.upgrade() {
                connector.link(role).set_blocked(reason);
            }
        };
        tokio::spawn(async move {
            let mut events = std::pin::pin!(events);
            while let Some(event) = events.next().await {
                match event {
                    Event::ConnectionBlocked(reason) => {
                        tracing::warn!(
                            connection = name,
                            %reason,
                            "RabbitMQ blocked the connection (a resource alarm): publishes wait \
                             until the alarm clears"
                        );
                        mark_blocked(&me, Some(reason));
                    }
                    Event::ConnectionUnblocked => {
                        tracing::info!(connection = name, "RabbitMQ unblocked the connection");
                        mark_blocked(&me, None);
                    }
                    // A channel's error comes here too: only the connection's own ends it.
                    Event::Error(_)
                        if !watched.upgrade().is_some_and(|c| c.status().connected()) =>
                    {
                        break;
                    }
                    _ => {}
                }
            }
            mark_blocked(&me, None);
            Connector::revive(&me, role).await;
        });
    }

    /// Reconnects `role`'s connection until it is back, the transport is closed (or dropped),
    /// or an attempt fails in a way no retry mends (which probes then report).
    async fn revive(me: &Weak<Connector>, role: Role) {
        loop {
            let Some(connector) = me.upgrade() else {
                return;
            };
            // Windows as long as a publish waits, so the lock is let go between them.
            let deadline = Instant::now() + connector.config.publish_timeout;
            match connector.connection(role, deadline).await {
                Err(e) if e.is_retryable() && !connector.is_closed() => {
                    // The window's last attempt failed: not straight into the next (a window
                    // shorter than the first pause would have no pause at all).
                    let pause = connector.config.reconnect_max;
                    drop(connector);
                    tokio::time::sleep(pause.mul_f64(1.0 - 0.5 * fastrand::f64())).await;
                }
                _ => return,
            }
        }
    }

    fn attempt_failed(&self, role: Role, error: &Error) {
        if let Ok(mut seen) = self.link(role).seen.lock() {
            let since = seen
                .lost
                .as_ref()
                .map_or_else(SystemTime::now, |(since, _)| *since);
            seen.lost = Some((since, error.to_string()));
        }
    }

    /// Why RabbitMQ blocks the publishing connection, while it does.
    pub(crate) fn publishing_blocked(&self) -> Option<String> {
        self.publishing.blocked.lock().ok()?.clone()
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
    async fn open(&self, role: Role) -> lapin::Result<Connection> {
        let properties =
            ConnectionProperties::default().with_connection_name(role.connection_name().into());
        match &self.config.tls_ca_pem {
            None => Connection::connect(&self.config.lapin_uri, properties).await,
            Some(pem) => {
                let tls = OwnedTLSConfig {
                    identity: None,
                    cert_chain: Some(pem.clone()),
                };
                let runtime = lapin::runtime::default_runtime()?;
                Connection::connect_with_config(&self.config.lapin_uri, properties, tls, runtime)
                    .await
            }
        }
    }

    /// One connection attempt, bounded by `connect_timeout`, its failure classified: a refused
    /// login, an unknown vhost or TLS spoken to a plain port cannot be fixed by retrying.
    async fn open_bounded(&self, role: Role) -> Result<Connection> {
        let limit = self.config.connect_timeout;
        match tokio::time::timeout(limit, self.open(role)).await {
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

    /// Opens the publishing connection once, without retrying, so a wrong URL or a broker
    /// that is down fails fast. (The consuming one opens when first needed: a service that
    /// only publishes holds one connection.)
    pub(crate) async fn connect_once(&self) -> Result<Arc<Connection>> {
        let connection = Arc::new(self.open_bounded(Role::Publish).await?);
        *self.publishing.current.lock().await = Some(Arc::clone(&connection));
        self.connected(Role::Publish, &connection);
        Ok(connection)
    }

    /// `role`'s live connection, (re)connecting with backoff until `deadline` if there is
    /// none.
    async fn connection(&self, role: Role, deadline: Instant) -> Result<Arc<Connection>> {
        // Another task may be reconnecting: wait for it, but not beyond our own deadline.
        let Ok(mut current) =
            tokio::time::timeout_at(deadline, self.link(role).current.lock()).await
        else {
            return Err(Error::new(
                ErrorKind::Timeout,
                "connect",
                "RabbitMQ was not reachable again before the deadline (`publish_timeout_ms`)",
            )
            .with_resource(self.config.url.to_string())
            .with_retryable(true));
        };
        if let Some(connection) = current.as_ref() {
            if connection.status().connected() {
                return Ok(Arc::clone(connection));
            }
        }
        let mut pause = Duration::from_millis(50);
        loop {
            self.ensure_open("connect")?;
            match self.open_bounded(role).await {
                Ok(connection) => {
                    tracing::info!(url = %self.config.url, connection = role.connection_name(), "connected to RabbitMQ");
                    let connection = Arc::new(connection);
                    *current = Some(Arc::clone(&connection));
                    self.connected(role, &connection);
                    return Ok(connection);
                }
                Err(e) if e.is_retryable() && Instant::now() + pause < deadline => {
                    self.attempt_failed(role, &e);
                    // Up to half of each wait taken off at random: instances that lost the
                    // broker together do not all come back in the same instant.
                    let wait = pause.mul_f64(1.0 - 0.5 * fastrand::f64());
                    tracing::warn!(url = %self.config.url, error = %e, ?wait, "RabbitMQ unreachable; reconnecting");
                    tokio::time::sleep(wait).await;
                    pause = (pause * 2).min(self.config.reconnect_max);
                }
                Err(e) => {
                    self.attempt_failed(role, &e);
                    return Err(e);
                }
            }
        }
    }

    /// A new channel on the consuming connection, for consumers and what manages queues.
    pub(crate) async fn channel(&self, deadline: Instant) -> Result<Channel> {
        self.channel_on(Role::Consume, deadline).await
    }

    /// A new channel on `role`'s connection.
    pub(crate) async fn channel_on(&self, role: Role, deadline: Instant) -> Result<Channel> {
        loop {
            let connection = self.connection(role, deadline).await?;
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
        let channel = self.channel_on(Role::Publish, deadline).await?;
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
        for link in [&self.publishing, &self.consuming] {
            if let Some(connection) = link.current.lock().await.take() {
                let _ = connection
                    .close(200, "busbar transport closed".into())
                    .await;
            }
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
