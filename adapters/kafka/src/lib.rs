//! busbar's Kafka transport, on rdkafka (bundled librdkafka).
//!
//! | busbar | Kafka |
//! |---|---|
//! | topic | a topic (created on declare/publish with `partitions` and `replication`) |
//! | group | a consumer group; `auto.offset.reset=earliest`, so a new group reads the log from its start |
//! | publish | `acks=all`, idempotent producer; the key is the record key (per-key order = partition order) |
//! | ack | the offset is finished; only the contiguous finished prefix of a partition is committed |
//! | nack(delay) | handed out again in this process after the delay; the offset stays uncommitted |
//! | dead letter | produced to `<topic>.<group>.dlq` with the reason headers, acknowledged, then finished |
//! | redrive | produced to `<topic>.<group>.redrive`, which only that group consumes |
//!
//! The envelope is the CloudEvents Kafka binding in binary mode (`ce_*` headers).

// Library code never unwraps or panics on what a user or a broker can send; tests may.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod config;
mod consumer;
mod dead_letters;
mod depth;
pub mod mapping;
mod producer;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use busbar_core::message::validate_name;
use busbar_core::{
    Capabilities, ConnectionState, ConsumeOptions, DeadLetter, DeliveryStream, Depth, Error,
    ErrorKind, Message, RedriveSelection, Result, StartFrom, Transport, TransportUrl,
};
use dead_letters::Settle;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::types::RDKafkaErrorCode;

pub use config::KafkaConfig;

pub(crate) struct Inner {
    pub(crate) config: KafkaConfig,
    pub(crate) producer: FutureProducer<Diagnosis>,
    admin: AdminClient<DefaultClientContext>,
    created: Mutex<HashSet<String>>,
    closed: AtomicBool,
    pub(crate) consumers: consumer::Consumers,
    /// The producer's context (shared with it): what probes read.
    diagnosis: Diagnosis,
}

impl Inner {
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub(crate) fn kafka_error(
        &self,
        operation: &'static str,
        what: impl Into<String>,
        e: rdkafka::error::KafkaError,
    ) -> Error {
        let retryable = e.rdkafka_error_code().is_none_or(|code| {
            matches!(
                code,
                RDKafkaErrorCode::BrokerTransportFailure
                    | RDKafkaErrorCode::AllBrokersDown
                    | RDKafkaErrorCode::MessageTimedOut
                    | RDKafkaErrorCode::RequestTimedOut
                    | RDKafkaErrorCode::NotCoordinator
                    | RDKafkaErrorCode::LeaderNotAvailable
                    | RDKafkaErrorCode::NotLeaderForPartition
            )
        });
        let kind = if retryable {
            ErrorKind::Connection
        } else {
            ErrorKind::Broker
        };
        // The source's text follows in the error's Display: not repeated in the message.
        Error::new(kind, operation, what.into())
            .with_resource(self.config.url.to_string())
            .with_retryable(retryable)
            .with_source(e)
    }

    /// Creates the topics not created yet through this transport (existing ones are fine).
    async fn ensure_topics(&self, names: &[impl AsRef<str>]) -> Result<()> {
        let missing: Vec<&str> = {
            let created = self.created.lock().unwrap_or_else(|p| p.into_inner());
            names
                .iter()
                .map(AsRef::as_ref)
                .filter(|n| !created.contains(*n))
                .collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let topics: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|n| {
                NewTopic::new(
                    n,
                    self.config.partitions,
                    TopicReplication::Fixed(self.config.replication),
                )
            })
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let results = self
            .admin
            .create_topics(&topics, &options)
            .await
            .map_err(|e| self.kafka_error("declare", "cannot create topics", e))?;
        for result in results {
            match result {
                Ok(name) => self.remember(&name),
                Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => self.remember(&name),
                Err((name, code)) => {
                    return Err(Error::new(
                        ErrorKind::Broker,
                        "declare",
                        format!("cannot create topic {name:?}: {code}"),
                    )
                    .with_resource(self.config.url.to_string()))
                }
            }
        }
        Ok(())
    }

    /// Deletes `group` and its DLQ reader group, then its DLQ and redrive topics.
    async fn delete_group(&self, topic: &str, group: &str) -> Result<()> {
        const OPERATION: &str = "delete a group";
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let reader = dead_letters::reader_group(group);
        let results = self
            .admin
            .delete_groups(&[group, reader.as_str()], &options)
            .await
            .map_err(|e| self.kafka_error(OPERATION, "cannot delete the consumer groups", e))?;
        for result in results {
            match result {
                Ok(_) => {}
                // Never consumed, or already deleted.
                Err((_, RDKafkaErrorCode::GroupIdNotFound)) => {}
                Err((name, RDKafkaErrorCode::NonEmptyGroup)) => {
                    return Err(Error::new(
                        ErrorKind::Broker,
                        OPERATION,
                        format!(
                        "consumer group {name:?} still has members: stop its subscriptions first"
                    ),
                    )
                    .with_resource(self.config.url.to_string()))
                }
                Err((name, code)) => {
                    return Err(Error::new(
                        ErrorKind::Broker,
                        OPERATION,
                        format!("cannot delete consumer group {name:?}: {code}"),
                    )
                    .with_resource(self.config.url.to_string()))
                }
            }
        }
        let topics = [
            self.config.dead_letter_topic(topic, group),
            self.config.redrive_topic(topic, group),
        ];
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        let results = self
            .admin
            .delete_topics(&names, &options)
            .await
            .map_err(|e| self.kafka_error(OPERATION, "cannot delete the group's topics", e))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
                Err((name, code)) => {
                    return Err(Error::new(
                        ErrorKind::Broker,
                        OPERATION,
                        format!("cannot delete topic {name:?}: {code}"),
                    )
                    .with_resource(self.config.url.to_string()))
                }
            }
        }
        let mut created = self.created.lock().unwrap_or_else(|p| p.into_inner());
        for name in &topics {
            created.remove(name);
        }
        Ok(())
    }

    fn remember(&self, name: &str) {
        self.created
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string());
    }
}

/// The Kafka transport (`kafka://`).
#[derive(Clone)]
pub struct KafkaTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KafkaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaTransport")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// The producer's client context: logs librdkafka's errors as rdkafka's default context does,
/// and keeps them, so a failed connect can say why (a refused connection, a TLS handshake, an
/// authentication). librdkafka's error texts name brokers, never credentials.
#[derive(Clone)]
pub(crate) struct Diagnosis {
    /// The last error that says why a broker could not be reached.
    last_error: Arc<Mutex<Option<String>>>,
    /// The first refusal that retrying cannot fix (see [`refused_for_good`]).
    refusal: Arc<tokio::sync::watch::Sender<Option<String>>>,
    /// Since when librdkafka says all brokers are down, and why: what probes read until a
    /// metadata request is answered again.
    down: Arc<Mutex<Option<(SystemTime, String)>>>,
    /// A metadata request checking whether the brokers are back is under way.
    probing: Arc<AtomicBool>,
}

impl Default for Diagnosis {
    fn default() -> Self {
        Diagnosis {
            last_error: Arc::default(),
            refusal: Arc::new(tokio::sync::watch::Sender::new(None)),
            down: Arc::default(),
            probing: Arc::default(),
        }
    }
}

impl Diagnosis {
    fn down(&self) -> Option<(SystemTime, String)> {
        self.down
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn up(&self) {
        *self
            .down
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Whether a connect that failed with librdkafka's `code` would fail the same way again: the
/// broker refused the credentials, or the TLS handshake failed (an untrusted certificate, a
/// wrong protocol). Retrying those only hides the cause.
fn refused_for_good(code: Option<RDKafkaErrorCode>) -> bool {
    matches!(
        code,
        Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SSL)
    )
}

impl rdkafka::ClientContext for Diagnosis {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        tracing::error!(target: "librdkafka", "librdkafka: {error}: {reason}");
        // "1/1 brokers are down" follows every transport failure and says nothing about why.
        let code = error.rdkafka_error_code();
        if code == Some(RDKafkaErrorCode::AllBrokersDown) {
            let why = self.last_error().unwrap_or_else(|| reason.to_string());
            self.down
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get_or_insert_with(|| (SystemTime::now(), why));
            return;
        }
        if refused_for_good(code) {
            // The first refusal is the cause; later ones repeat it.
            self.refusal.send_if_modified(|refusal| {
                let first = refusal.is_none();
                if first {
                    *refusal = Some(reason.to_string());
                }
                first
            });
        }
        *self
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(reason.to_string());
    }
}

impl KafkaTransport {
    /// The settings this transport runs with.
    pub fn config(&self) -> &KafkaConfig {
        &self.inner.config
    }

    /// Connects to the cluster at `url`; fails when no broker answers within
    /// `connect_timeout_ms` (10 s), and at once when a broker refuses the credentials or the
    /// TLS handshake fails.
    pub async fn connect(url: &TransportUrl) -> Result<Self> {
        KafkaTransport::connect_with(KafkaConfig::from_url(url)?).await
    }

    /// Connects with explicit settings.
    pub async fn connect_with(config: KafkaConfig) -> Result<Self> {
        let config_error = |what: &str, e: rdkafka::error::KafkaError| match e {
            // librdkafka's message repeats the setting's value, which may be a password or a
            // key: name the setting, never its value, and keep the error out of the chain.
            rdkafka::error::KafkaError::ClientConfig(_, description, key, _) => {
                // "OpenSSL not available at build time": TLS and SCRAM are a cargo feature.
                let hint = if description.contains("not available at build time") {
                    " (TLS and SASL/SCRAM need busbar's `kafka-tls` feature, busbar-kafka's `tls`)"
                } else {
                    ""
                };
                Error::new(
                    ErrorKind::Config,
                    "connect",
                    format!("{what}: setting `{key}` refused: {description}{hint}"),
                )
                .with_resource(config.url.to_string())
            }
            other => Error::new(ErrorKind::Config, "connect", format!("{what}: {other}"))
                .with_resource(config.url.to_string())
                .with_source(other),
        };
        let diagnosis = Diagnosis::default();
        let producer: FutureProducer<Diagnosis> = config
            .producer_config()
            .create_with_context(diagnosis.clone())
            .map_err(|e| config_error("cannot create the producer", e))?;
        let admin: AdminClient<DefaultClientContext> = config
            .client_config()
            .create()
            .map_err(|e| config_error("cannot create the admin client", e))?;
        // Fail fast when the cluster is unreachable, and at once when the broker refuses the
        // credentials or the TLS handshake fails (waiting out the probe would not help).
        let probe = producer.clone();
        let limit = config.connect_timeout;
        let reached =
            tokio::task::spawn_blocking(move || probe.client().fetch_metadata(None, limit));
        let mut refusal = diagnosis.refusal.subscribe();
        let reached = tokio::select! {
            joined = reached => Some(joined),
            Ok(_) = refusal.wait_for(Option::is_some) => None,
        };
        match reached {
            Some(Ok(Ok(_))) => {}
            None => {
                let why = diagnosis.refusal.borrow().clone().unwrap_or_default();
                return Err(Error::new(
                    ErrorKind::Connection,
                    "connect",
                    format!("the connection to Kafka was refused: {why}"),
                )
                .with_retryable(false)
                .with_resource(config.url.to_string()));
            }
            Some(Ok(Err(e))) => {
                // librdkafka's metadata error only says "broker transport failure"; its error
                // callback said why (refused, TLS handshake, authentication). When it said
                // nothing, the brokers accepted the connection and never answered.
                let hosts = config.url.hosts().join(",");
                let error = match diagnosis.last_error() {
                    Some(why) => Error::new(
                        ErrorKind::Connection,
                        "connect",
                        format!("no Kafka broker answered within {limit:?}: {why}"),
                    ),
                    None => Error::new(
                        ErrorKind::Timeout,
                        "connect",
                        format!(
                            "no answer from {hosts} within {limit:?}: is it a Kafka listener? \
                             `connect_timeout_ms` sets the limit"
                        ),
                    ),
                };
                return Err(error
                    .with_retryable(diagnosis.refusal.borrow().is_none())
                    .with_resource(config.url.to_string())
                    .with_source(e));
            }
            Some(Err(e)) => {
                return Err(Error::new(
                    ErrorKind::Connection,
                    "connect",
                    "the metadata probe failed",
                )
                .with_source(e))
            }
        }
        Ok(KafkaTransport {
            inner: Arc::new(Inner {
                config,
                producer,
                admin,
                created: Mutex::default(),
                closed: AtomicBool::new(false),
                consumers: consumer::Consumers::default(),
                diagnosis,
            }),
        })
    }

    fn ensure_open(&self, operation: &'static str) -> Result<()> {
        if self.inner.is_closed() {
            Err(Error::closed(operation, "Kafka transport")
                .with_resource(self.inner.config.url.to_string()))
        } else {
            Ok(())
        }
    }

    fn group_topics(&self, topic: &str, group: &str) -> Vec<String> {
        let config = &self.inner.config;
        vec![
            topic.to_string(),
            config.dead_letter_topic(topic, group),
            config.redrive_topic(topic, group),
        ]
    }
}

#[async_trait]
impl Transport for KafkaTransport {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.config.capabilities()
    }

    async fn publish(&self, messages: Vec<Message>) -> Result<()> {
        self.ensure_open("publish")?;
        let max = self.capabilities().max_message_bytes.unwrap_or(usize::MAX);
        let mut topics = Vec::new();
        for message in &messages {
            message.check_publishable(max, "Kafka")?;
            if !topics.contains(&message.topic) {
                topics.push(message.topic.clone());
            }
        }
        if messages.is_empty() {
            return Ok(());
        }
        self.inner.ensure_topics(&topics).await?;
        producer::send(&self.inner, messages, "publish").await
    }

    async fn declare(&self, topic: &str, group: &str) -> Result<()> {
        self.ensure_open("declare")?;
        validate_name("topic", topic)?;
        validate_name("group", group)?;
        self.inner
            .ensure_topics(&self.group_topics(topic, group))
            .await
    }

    async fn consume(
        &self,
        topic: &str,
        group: &str,
        options: ConsumeOptions,
    ) -> Result<DeliveryStream> {
        self.declare(topic, group).await?;
        // A consumer of this group that this transport is still closing would leave the group
        // while the new one joins: wait until it has committed and left.
        self.inner
            .consumers
            .stopped(Some(group), consumer::CLOSE_LIMIT)
            .await;
        if options.start == StartFrom::Latest {
            depth::start_latest(&self.inner, topic, group).await?;
        }
        consumer::consume(Arc::clone(&self.inner), topic, group, options)
    }

    async fn dead_letters(
        &self,
        topic: &str,
        group: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        self.ensure_open("list dead letters")?;
        dead_letters::list(&self.inner, topic, group, limit).await
    }

    async fn redrive(
        &self,
        topic: &str,
        group: &str,
        selection: RedriveSelection,
    ) -> Result<usize> {
        self.ensure_open("redrive")?;
        dead_letters::settle(&self.inner, topic, group, selection, Settle::Redrive).await
    }

    async fn purge_dead_letters(
        &self,
        topic: &str,
        group: &str,
        selection: RedriveSelection,
    ) -> Result<usize> {
        self.ensure_open("purge dead letters")?;
        dead_letters::settle(&self.inner, topic, group, selection, Settle::Purge).await
    }

    /// Deletes the consumer group (with its committed offsets) and its DLQ reader's, then the
    /// group's dead-letter and redrive topics. The topic itself stays: other groups read it.
    async fn delete_group(&self, topic: &str, group: &str) -> Result<()> {
        self.ensure_open("delete a group")?;
        validate_name("topic", topic)?;
        validate_name("group", group)?;
        self.inner.delete_group(topic, group).await
    }

    async fn depth(&self, topic: &str, group: &str) -> Result<Depth> {
        self.ensure_open("report queue depth")?;
        depth::depth(&self.inner, topic, group).await
    }

    /// Connected unless librdkafka said all brokers are down; then reconnecting, until a
    /// metadata request (one at a time, started by this call) is answered again.
    fn connection(&self) -> ConnectionState {
        if self.inner.closed.load(Ordering::Acquire) {
            return ConnectionState::Closed;
        }
        let diagnosis = &self.inner.diagnosis;
        let Some((since, error)) = diagnosis.down() else {
            return ConnectionState::Connected;
        };
        if !diagnosis.probing.swap(true, Ordering::AcqRel) {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    let inner = Arc::clone(&self.inner);
                    runtime.spawn_blocking(move || {
                        let limit = Duration::from_secs(1);
                        let answered = inner.producer.client().fetch_metadata(None, limit).is_ok();
                        let diagnosis = &inner.diagnosis;
                        if answered {
                            diagnosis.up();
                        }
                        diagnosis.probing.store(false, Ordering::Release);
                    });
                }
                Err(_) => diagnosis.probing.store(false, Ordering::Release),
            }
        }
        ConnectionState::Reconnecting { since, error }
    }

    async fn close(&self) -> Result<()> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        // Consumers commit what finished and leave their groups before the transport is done.
        self.inner
            .consumers
            .stopped(None, consumer::CLOSE_LIMIT)
            .await;
        let producer = self.inner.producer.clone();
        let _ = tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(10))).await;
        Ok(())
    }
}
