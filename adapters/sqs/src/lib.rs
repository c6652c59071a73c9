//! busbar's Amazon SQS transport, with SNS for fan-out.
//!
//! | busbar | fan-out mode (default) | queue mode (`mode=queue`) |
//! |---|---|---|
//! | topic | SNS topic `<prefix><topic>` | SQS queue `<prefix><topic>` |
//! | group | SQS queue `<prefix><topic>__<group>` subscribed to the topic with raw delivery | shares the topic's queue |
//! | publish | SNS `PublishBatch` (10 per call) | SQS `SendMessageBatch` (10 per call) |
//! | ack | `DeleteMessage` | same |
//! | nack(delay) | `ChangeMessageVisibility` to the delay | same |
//! | dead letter | `SendMessage` to `<queue>-dlq` with the reason, then `DeleteMessage`; the queue's `RedrivePolicy` moves a message there after `max_receive_count` receives as crash backstop | same |
//! | attempt | `ApproximateReceiveCount` | same |
//!
//! Names: `.` is not allowed in SQS and SNS names and becomes `_`.
//!
//! With `fifo=true` the queues and topics are FIFO: a message's key is its `MessageGroupId`
//! and its id the `MessageDeduplicationId`, and per-key order holds across retries (see the
//! crate's README).

// Library code never unwraps or panics on what a user or a broker can send; tests may.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod config;
mod consumer;
mod dead_letters;
pub mod mapping;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use aws_sdk_sqs::types::QueueAttributeName;
use busbar_core::message::validate_name;
use busbar_core::transport::no_history;
use busbar_core::{
    Capabilities, ConnectionState, ConsumeOptions, DeadLetter, DeliveryStream, Depth, Error,
    ErrorKind, Message, RedriveSelection, Result, StartFrom, Text, Transport, TransportUrl,
};
use dead_letters::Settle;

pub use config::{Mode, SqsConfig, SQS_MAX_BYTES};
use mapping::{pack, Packed};

/// The deduplication id of a send to a FIFO queue or topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dedup {
    /// The message id: a publish sent twice (a retry after a timeout) is stored once.
    MessageId,
    /// A new id: dead-lettering and redrive re-send a message SQS may still remember.
    Fresh,
}

/// A queue busbar created: its URL and ARN.
#[derive(Debug, Clone)]
pub(crate) struct Queue {
    pub(crate) url: String,
    pub(crate) arn: String,
}

/// The queues of one consumed (topic, group).
#[derive(Debug, Clone)]
pub(crate) struct GroupQueues {
    pub(crate) queue: Queue,
    pub(crate) dlq: Queue,
}

pub(crate) struct Inner {
    pub(crate) config: SqsConfig,
    pub(crate) sqs: aws_sdk_sqs::Client,
    sns: aws_sdk_sns::Client,
    topics: Mutex<HashMap<String, String>>,
    groups: Mutex<HashMap<(String, String), GroupQueues>>,
    closed: AtomicBool,
    /// Since when requests fail to reach SQS, and the last such failure: what probes read
    /// (SQS has no lasting connection; the last request's outcome stands for one).
    unreachable: Mutex<Option<(SystemTime, String)>>,
}

pub(crate) fn sdk_error<E: std::error::Error + Send + Sync + 'static>(
    operation: &'static str,
    what: String,
    e: aws_sdk_sqs::error::SdkError<E, impl std::fmt::Debug + Send + Sync + 'static>,
) -> Error {
    use aws_sdk_sqs::error::SdkError;
    if matches!(e, SdkError::DispatchFailure(_)) && is_tls_failure(&e) {
        return Error::new(
            ErrorKind::Connection,
            operation,
            format!(
                "{what}: the TLS handshake failed: the endpoint's certificate is not trusted, or \
                 it does not speak TLS (use http:// for a plain endpoint)"
            ),
        )
        .with_retryable(false)
        .with_source(e);
    }
    let (kind, retryable) = match &e {
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => (ErrorKind::Connection, true),
        SdkError::ServiceError(_) => (ErrorKind::Broker, false),
        _ => (ErrorKind::Broker, true),
    };
    let detail = match &e {
        SdkError::ServiceError(service) => {
            format!("{}", aws_sdk_sqs::error::DisplayErrorContext(service.err()))
        }
        other => format!("{}", aws_sdk_sqs::error::DisplayErrorContext(other)),
    };
    Error::new(kind, operation, format!("{what}: {detail}")).with_retryable(retryable)
}

/// An SNS request's failure, with the service's explanation.
fn sns_error<E: std::error::Error + 'static, R: std::fmt::Debug>(
    operation: &'static str,
    what: &str,
    e: aws_sdk_sns::error::SdkError<E, R>,
) -> Error {
    Error::new(
        ErrorKind::Broker,
        operation,
        format!("{what}: {}", aws_sdk_sns::error::DisplayErrorContext(&e)),
    )
}

/// Whether a failed request's causes hold a TLS failure: the TLS stack reports a certificate
/// it does not trust, or bytes that are not TLS, as an I/O error of kind `InvalidData`.
fn is_tls_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = e.source();
    while let Some(error) = cause {
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            // An I/O error wrapping another hides it from `source()`: look inside.
            if io.kind() == std::io::ErrorKind::InvalidData
                || io.get_ref().is_some_and(|inner| {
                    inner
                        .downcast_ref::<std::io::Error>()
                        .is_some_and(|io| io.kind() == std::io::ErrorKind::InvalidData)
                })
            {
                return true;
            }
        }
        cause = error.source();
    }
    false
}

impl Inner {
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Notes a request's outcome for probes: a connection failure (SQS unreachable, or not
    /// answering in time) starts or continues an outage; any answer ends it.
    pub(crate) fn saw<T>(&self, result: &Result<T>) {
        let mut unreachable = self.unreachable.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Err(e) if matches!(e.kind(), ErrorKind::Connection | ErrorKind::Timeout) => {
                let since = unreachable
                    .as_ref()
                    .map_or_else(SystemTime::now, |(since, _)| *since);
                *unreachable = Some((since, e.to_string()));
            }
            _ => *unreachable = None,
        }
    }

    fn connection(&self) -> ConnectionState {
        if self.is_closed() {
            return ConnectionState::Closed;
        }
        match &*self.unreachable.lock().unwrap_or_else(|p| p.into_inner()) {
            None => ConnectionState::Connected,
            Some((since, error)) => ConnectionState::Reconnecting {
                since: *since,
                error: error.clone(),
            },
        }
    }

    async fn create_queue(
        &self,
        name: &str,
        attributes: Vec<(QueueAttributeName, String)>,
    ) -> Result<Queue> {
        let mut request = self.sqs.create_queue().queue_name(name);
        for (k, v) in attributes {
            request = request.attributes(k, v);
        }
        let created = request
            .send()
            .await
            .map_err(|e| sdk_error("declare", format!("cannot create queue {name:?}"), e))?;
        let url = created.queue_url().unwrap_or_default().to_string();
        self.with_arn(name, url, "declare").await
    }

    /// The queue at `url`, with its ARN read.
    async fn with_arn(&self, name: &str, url: String, operation: &'static str) -> Result<Queue> {
        let arn = self
            .sqs
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .map_err(|e| sdk_error(operation, format!("cannot read the ARN of {name:?}"), e))?
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
            .unwrap_or_default();
        Ok(Queue { url, arn })
    }

    async fn topic_arn(&self, topic: &str) -> Result<String> {
        if let Some(arn) = self
            .topics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(topic)
        {
            return Ok(arn.clone());
        }
        let name = self.config.aws_name(&[topic])?;
        let arn = match self.config.mode {
            Mode::FanOut => self
                .sns
                .create_topic()
                .name(self.config.resource_name(&name))
                .set_attributes(self.config.fifo.then(|| {
                    HashMap::from([
                        ("FifoTopic".to_string(), "true".to_string()),
                        ("ContentBasedDeduplication".to_string(), "false".to_string()),
                    ])
                }))
                .send()
                .await
                .map_err(|e| {
                    Error::new(
                        ErrorKind::Broker,
                        "declare",
                        format!(
                            "cannot create SNS topic {name:?}: {}",
                            aws_sdk_sns::error::DisplayErrorContext(&e)
                        ),
                    )
                })?
                .topic_arn()
                .unwrap_or_default()
                .to_string(),
            // In queue mode the "topic" is the shared queue, with its DLQ and redrive policy.
            Mode::Queue => {
                let dlq = self
                    .create_queue(
                        &self.config.resource_name(&format!("{name}-dlq")),
                        self.queue_attributes(None),
                    )
                    .await?;
                self.create_queue(
                    &self.config.resource_name(&name),
                    self.queue_attributes(Some(&dlq.arn)),
                )
                .await?
                .url
            }
        };
        self.topics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(topic.to_string(), arn.clone());
        Ok(arn)
    }

    /// The FIFO group and deduplication ids of a message (none on standard queues).
    fn fifo_ids(
        &self,
        id: &str,
        packed: &Packed,
        dedup: Dedup,
    ) -> (Option<String>, Option<String>) {
        if !self.config.fifo {
            return (None, None);
        }
        let dedup_id = match dedup {
            Dedup::MessageId => mapping::fifo_id(id),
            Dedup::Fresh => mapping::fresh_deduplication_id(id),
        };
        (Some(packed.group_id.clone()), Some(dedup_id))
    }

    fn queue_attributes(&self, dlq_arn: Option<&str>) -> Vec<(QueueAttributeName, String)> {
        let mut attributes = vec![(
            QueueAttributeName::VisibilityTimeout,
            self.config.visibility_timeout.as_secs().to_string(),
        )];
        if self.config.fifo {
            // Deduplication by the id busbar sends (the message id), never by content: two
            // events with equal bodies are still two events.
            attributes.push((QueueAttributeName::FifoQueue, "true".into()));
            attributes.push((
                QueueAttributeName::ContentBasedDeduplication,
                "false".into(),
            ));
        }
        if let Some(arn) = dlq_arn {
            attributes.push((
                QueueAttributeName::RedrivePolicy,
                serde_json::json!({ "deadLetterTargetArn": arn, "maxReceiveCount": self.config.max_receive_count.to_string() }).to_string(),
            ));
        }
        attributes
    }

    /// Forgets what was declared for (`topic`, `group`), so the next use declares it again.
    fn forget(&self, topic: &str, group: &str) {
        self.groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(topic.to_string(), group.to_string()));
        self.topics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(topic);
    }

    /// The URL and ARN of the queue `name`, or `None` when it does not exist.
    async fn find_queue(&self, name: &str, operation: &'static str) -> Result<Option<Queue>> {
        let url = match self.sqs.get_queue_url().queue_name(name).send().await {
            Ok(found) => found.queue_url().unwrap_or_default().to_string(),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_queue_does_not_exist()) =>
            {
                return Ok(None)
            }
            Err(e) => {
                return Err(sdk_error(
                    operation,
                    format!("cannot find queue {name:?}"),
                    e,
                ))
            }
        };
        self.with_arn(name, url, operation).await.map(Some)
    }

    /// The queues of (`topic`, `group`) if they exist, without creating anything: what
    /// listing, redriving and purging dead letters work on (a typo in a group name must not
    /// create a group that then receives the topic's messages).
    pub(crate) async fn existing(
        &self,
        topic: &str,
        group: &str,
        operation: &'static str,
    ) -> Result<Option<GroupQueues>> {
        let id = (topic.to_string(), group.to_string());
        if let Some(found) = self
            .groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
        {
            return Ok(Some(found.clone()));
        }
        let name = match self.config.mode {
            Mode::FanOut => self.config.aws_name(&[topic, group])?,
            Mode::Queue => self.config.aws_name(&[topic])?,
        };
        let (queue, dlq) = self.find_queues(&name, operation).await?;
        Ok(queue
            .zip(dlq)
            .map(|(queue, dlq)| GroupQueues { queue, dlq }))
    }

    /// The queue named `name` (before the configured prefix) and its DLQ, each if it exists.
    async fn find_queues(
        &self,
        name: &str,
        operation: &'static str,
    ) -> Result<(Option<Queue>, Option<Queue>)> {
        let queue = self
            .find_queue(&self.config.resource_name(name), operation)
            .await?;
        let dlq = self
            .find_queue(
                &self.config.resource_name(&format!("{name}-dlq")),
                operation,
            )
            .await?;
        Ok((queue, dlq))
    }

    /// Removes a fan-out group: its subscription to the topic, its queue and its DLQ.
    async fn delete_group(&self, topic: &str, group: &str) -> Result<()> {
        const OPERATION: &str = "delete a group";
        let name = self.config.aws_name(&[topic, group])?;
        let (queue, dlq) = self.find_queues(&name, OPERATION).await?;
        if let Some(queue) = &queue {
            let topic_arn = self.topic_arn(topic).await?;
            let mut next: Option<String> = None;
            loop {
                let page = self
                    .sns
                    .list_subscriptions_by_topic()
                    .topic_arn(&topic_arn)
                    .set_next_token(next.take())
                    .send()
                    .await
                    .map_err(|e| {
                        sns_error(OPERATION, "cannot list the topic's subscriptions", e)
                    })?;
                for subscription in page.subscriptions() {
                    if subscription.endpoint() != Some(queue.arn.as_str()) {
                        continue;
                    }
                    if let Some(arn) = subscription.subscription_arn() {
                        self.sns
                            .unsubscribe()
                            .subscription_arn(arn)
                            .send()
                            .await
                            .map_err(|e| {
                                sns_error(OPERATION, &format!("cannot unsubscribe {name:?}"), e)
                            })?;
                    }
                }
                match page.next_token() {
                    Some(token) if !token.is_empty() => next = Some(token.to_string()),
                    _ => break,
                }
            }
        }
        for found in [queue, dlq].into_iter().flatten() {
            self.sqs
                .delete_queue()
                .queue_url(&found.url)
                .send()
                .await
                .map_err(|e| sdk_error(OPERATION, format!("cannot delete {}", found.url), e))?;
        }
        Ok(())
    }

    /// Declares what (`topic`, `group`) needs; returns its queues.
    pub(crate) async fn declare(&self, topic: &str, group: &str) -> Result<GroupQueues> {
        let id = (topic.to_string(), group.to_string());
        if let Some(found) = self
            .groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
        {
            return Ok(found.clone());
        }
        // In queue mode the shared queue is declared below with its redrive policy.
        let topic_ref = match self.config.mode {
            Mode::FanOut => self.topic_arn(topic).await?,
            Mode::Queue => String::new(),
        };
        let queues = match self.config.mode {
            Mode::FanOut => {
                let name = self.config.aws_name(&[topic, group])?;
                let dlq = self
                    .create_queue(
                        &self.config.resource_name(&format!("{name}-dlq")),
                        self.queue_attributes(None),
                    )
                    .await?;
                let mut attributes = self.queue_attributes(Some(&dlq.arn));
                // Let the topic deliver into the queue (AWS checks this; local servers ignore it).
                attributes.push((
                    QueueAttributeName::Policy,
                    serde_json::json!({
                        "Version": "2012-10-17",
                        "Statement": [{
                            "Effect": "Allow",
                            "Principal": { "Service": "sns.amazonaws.com" },
                            "Action": "sqs:SendMessage",
                            "Resource": "*",
                            "Condition": { "ArnEquals": { "aws:SourceArn": topic_ref } }
                        }]
                    })
                    .to_string(),
                ));
                let queue = self
                    .create_queue(&self.config.resource_name(&name), attributes)
                    .await?;
                self.sns
                    .subscribe()
                    .topic_arn(&topic_ref)
                    .protocol("sqs")
                    .endpoint(&queue.arn)
                    .attributes("RawMessageDelivery", "true")
                    .return_subscription_arn(true)
                    .send()
                    .await
                    .map_err(|e| {
                        Error::new(
                            ErrorKind::Broker,
                            "declare",
                            format!(
                                "cannot subscribe {name:?} to the topic: {}",
                                aws_sdk_sns::error::DisplayErrorContext(&e)
                            ),
                        )
                    })?;
                GroupQueues { queue, dlq }
            }
            Mode::Queue => {
                let name = self.config.aws_name(&[topic])?;
                let dlq = self
                    .create_queue(
                        &self.config.resource_name(&format!("{name}-dlq")),
                        self.queue_attributes(None),
                    )
                    .await?;
                let queue = self
                    .create_queue(
                        &self.config.resource_name(&name),
                        self.queue_attributes(Some(&dlq.arn)),
                    )
                    .await?;
                GroupQueues { queue, dlq }
            }
        };

        self.groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, queues.clone());
        Ok(queues)
    }

    /// Runs a send (`publish` or `dead-letter`) within `publish_timeout_ms`. An SQS or SNS
    /// endpoint that accepts connections and never answers (one shutting down, a network that
    /// drops replies) would otherwise hold it for as long as that lasts: the SDK sets no time
    /// limit on a call by default. `describe` gives the error's detail and resource.
    pub(crate) async fn within_publish_timeout(
        &self,
        operation: &'static str,
        send: impl std::future::Future<Output = Result<()>>,
        describe: impl FnOnce() -> (String, String),
    ) -> Result<()> {
        let limit = self.config.publish_timeout;
        match tokio::time::timeout(limit, send).await {
            Ok(result) => result,
            Err(_elapsed) => {
                let (detail, resource) = describe();
                Err(Error::new(
                    ErrorKind::Timeout,
                    operation,
                    format!(
                        "SQS/SNS did not answer within {limit:?} (`publish_timeout_ms`); {detail}"
                    ),
                )
                .with_resource(resource)
                .with_retryable(true))
            }
        }
    }

    /// Publishes packed messages, grouped by busbar topic, to their SNS topic (fan-out mode) or
    /// queue (queue mode); errors name the topic.
    async fn publish_packed(&self, by_topic: BTreeMap<Text, Vec<(Text, Packed)>>) -> Result<()> {
        for (topic, packed) in by_topic {
            let named = |e: Error| {
                if e.resource().is_some() {
                    e
                } else {
                    e.with_resource(format!("topic {topic}"))
                }
            };
            let target = self.topic_arn(&topic).await.map_err(named)?;
            match self.config.mode {
                Mode::FanOut => self
                    .publish_to_topic(&target, packed)
                    .await
                    .map_err(named)?,
                Mode::Queue => self
                    .send_to_queue(&target, packed, "publish", Dedup::MessageId)
                    .await
                    .map_err(named)?,
            }
        }
        Ok(())
    }

    /// Sends packed messages straight to a queue, 10 per batch call, reporting every failed entry.
    pub(crate) async fn send_to_queue(
        &self,
        queue_url: &str,
        messages: Vec<(Text, Packed)>,
        operation: &'static str,
        dedup: Dedup,
    ) -> Result<()> {
        for chunk in batches(messages) {
            let mut request = self.sqs.send_message_batch().queue_url(queue_url);
            for (i, (id, packed)) in chunk.iter().enumerate() {
                let (group, dedup_id) = self.fifo_ids(id, packed, dedup);
                let mut entry = aws_sdk_sqs::types::SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(&packed.body)
                    .set_message_group_id(group)
                    .set_message_deduplication_id(dedup_id);
                for (k, v) in &packed.attributes {
                    entry = entry.message_attributes(k, sqs_attribute(v)?);
                }
                request = request.entries(entry.build().map_err(|e| build_error(operation, e))?);
            }
            let out = request.send().await.map_err(|e| {
                sdk_error(
                    operation,
                    format!("cannot send {} messages", chunk.len()),
                    e,
                )
            })?;
            let failed = failed_entries(
                &chunk,
                out.failed().iter().map(|f| (f.id(), f.code(), f.message())),
            );
            if !failed.is_empty() {
                return Err(not_accepted(operation, chunk.len(), &failed));
            }
        }
        Ok(())
    }

    async fn publish_to_topic(&self, topic_arn: &str, messages: Vec<(Text, Packed)>) -> Result<()> {
        for chunk in batches(messages) {
            let mut request = self.sns.publish_batch().topic_arn(topic_arn);
            for (i, (id, packed)) in chunk.iter().enumerate() {
                let (group, dedup_id) = self.fifo_ids(id, packed, Dedup::MessageId);
                let mut entry = aws_sdk_sns::types::PublishBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message(&packed.body)
                    .set_message_group_id(group)
                    .set_message_deduplication_id(dedup_id);
                for (k, v) in &packed.attributes {
                    let value = aws_sdk_sns::types::MessageAttributeValue::builder()
                        .data_type("String")
                        .string_value(v)
                        .build()
                        .map_err(|e| {
                            Error::new(
                                ErrorKind::Encode,
                                "publish",
                                format!("bad attribute {k:?}: {e}"),
                            )
                        })?;
                    entry = entry.message_attributes(k, value);
                }
                request = request.publish_batch_request_entries(entry.build().map_err(|e| {
                    Error::new(
                        ErrorKind::Encode,
                        "publish",
                        format!("bad batch entry: {e}"),
                    )
                })?);
            }
            let out = request.send().await.map_err(|e| {
                Error::new(
                    ErrorKind::Connection,
                    "publish",
                    format!(
                        "SNS PublishBatch failed: {}",
                        aws_sdk_sns::error::DisplayErrorContext(&e)
                    ),
                )
                .with_retryable(true)
            })?;
            let failed = failed_entries(
                &chunk,
                out.failed().iter().map(|f| (f.id(), f.code(), f.message())),
            );
            if !failed.is_empty() {
                return Err(not_accepted("publish", chunk.len(), &failed));
            }
        }
        Ok(())
    }
}

/// Describes the failed entries of a batch call (entry ids are indexes into `chunk`).
fn failed_entries<'a>(
    chunk: &[(Text, Packed)],
    failed: impl Iterator<Item = (&'a str, &'a str, Option<&'a str>)>,
) -> Vec<String> {
    failed
        .map(|(entry, code, message)| {
            let id = entry
                .parse::<usize>()
                .ok()
                .and_then(|i| chunk.get(i))
                .map_or("?", |m| m.0.as_str());
            format!("{id} ({code}: {})", message.unwrap_or_default())
        })
        .collect()
}

fn not_accepted(operation: &'static str, total: usize, failed: &[String]) -> Error {
    Error::new(
        ErrorKind::Broker,
        operation,
        format!(
            "{} of {total} messages were not accepted and not published: {}",
            failed.len(),
            failed.join(", ")
        ),
    )
    .with_retryable(true)
}

fn build_error(operation: &'static str, e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Encode, operation, format!("bad request: {e}"))
}

pub(crate) fn sqs_attribute(value: &str) -> Result<aws_sdk_sqs::types::MessageAttributeValue> {
    aws_sdk_sqs::types::MessageAttributeValue::builder()
        .data_type("String")
        .string_value(value)
        .build()
        .map_err(|e| build_error("publish", e))
}

/// Splits into batch calls: at most 10 entries and at most 256 KiB together.
fn batches(messages: Vec<(Text, Packed)>) -> Vec<Vec<(Text, Packed)>> {
    let mut out: Vec<Vec<(Text, Packed)>> = Vec::new();
    let mut size = 0;
    for message in messages {
        let this = message.1.sqs_size();
        match out.last_mut() {
            Some(batch) if batch.len() < 10 && size + this <= SQS_MAX_BYTES => {
                size += this;
                batch.push(message);
            }
            _ => {
                size = this;
                out.push(vec![message]);
            }
        }
    }
    out
}

/// The SQS transport (`sqs://`).
#[derive(Clone)]
pub struct SqsTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SqsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqsTransport")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl SqsTransport {
    /// Connects with the settings of `url`, and checks the service answers.
    pub async fn connect(url: &TransportUrl) -> Result<Self> {
        SqsTransport::connect_with(SqsConfig::from_url(url)?).await
    }

    /// Connects with explicit settings.
    pub async fn connect_with(config: SqsConfig) -> Result<Self> {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(region) = &config.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(endpoint) = &config.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        if let Some((key, secret)) = &config.credentials {
            loader = loader.credentials_provider(aws_sdk_sqs::config::Credentials::new(
                key,
                secret,
                None,
                None,
                "busbar-url",
            ));
        }
        let shared = loader.load().await;
        let sqs = aws_sdk_sqs::Client::new(&shared);
        let sns = aws_sdk_sns::Client::new(&shared);
        // Fail fast when the service does not answer (or the credentials are refused), and
        // never wait longer than `connect_timeout` for it: the SDK has no time limit on reading
        // an answer, so an endpoint that accepts connections and says nothing would hang here.
        // One attempt, no SDK retries: a refused connection is reported as refused, not as a
        // timeout once the SDK's retries have used up the limit.
        let once = aws_sdk_sqs::config::Builder::default()
            .retry_config(aws_sdk_sqs::config::retry::RetryConfig::disabled());
        let probe = sqs
            .list_queues()
            .max_results(1)
            .customize()
            .config_override(once)
            .send();
        match tokio::time::timeout(config.connect_timeout, probe).await {
            Ok(answered) => answered.map_err(|e| {
                sdk_error("connect", "SQS did not answer".into(), e)
                    .with_resource(config.url.to_string())
            })?,
            Err(_) => {
                let limit = config.connect_timeout;
                let endpoint = config
                    .endpoint
                    .as_deref()
                    .unwrap_or("the regional endpoint");
                return Err(Error::new(
                    ErrorKind::Timeout,
                    "connect",
                    format!(
                        "no answer from {endpoint} within {limit:?}: is it an SQS endpoint? \
                         `connect_timeout_ms` sets the limit"
                    ),
                )
                .with_resource(config.url.to_string())
                .with_retryable(true));
            }
        };
        Ok(SqsTransport {
            inner: Arc::new(Inner {
                config,
                sqs,
                sns,
                topics: Mutex::default(),
                groups: Mutex::default(),
                closed: AtomicBool::new(false),
                unreachable: Mutex::default(),
            }),
        })
    }

    fn ensure_open(&self, operation: &'static str) -> Result<()> {
        if self.inner.is_closed() {
            Err(Error::closed(operation, "SQS transport")
                .with_resource(self.inner.config.url.to_string()))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Transport for SqsTransport {
    fn name(&self) -> &'static str {
        "sqs"
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.config.capabilities()
    }

    async fn publish(&self, messages: Vec<Message>) -> Result<()> {
        self.ensure_open("publish")?;
        let mut by_topic: BTreeMap<Text, Vec<(Text, Packed)>> = BTreeMap::new();
        let max = self
            .capabilities()
            .max_message_bytes
            .unwrap_or(SQS_MAX_BYTES);
        for message in &messages {
            message.check_publishable(max, "SQS")?;
            let packed = pack(message)?;
            if packed.sqs_size() > SQS_MAX_BYTES {
                return Err(Error::new(
                    ErrorKind::PayloadTooLarge,
                    "publish",
                    format!(
                        "message is {} bytes as SQS counts it; SQS accepts at most {SQS_MAX_BYTES}",
                        packed.sqs_size()
                    ),
                )
                .with_resource(format!("message {} on topic {}", message.id, message.topic)));
            }
            by_topic
                .entry(message.topic.clone())
                .or_default()
                .push((message.id.clone(), packed));
        }
        let published = self.inner.publish_packed(by_topic);
        let result = self
            .inner
            .within_publish_timeout("publish", published, || {
                // Only when the time ran out: what the error names.
                let topics: BTreeSet<&str> = messages.iter().map(|m| m.topic.as_str()).collect();
                let ids: Vec<&str> = messages.iter().map(|m| m.id.as_str()).collect();
                (
                    format!(
                        "{} messages may or may not be published (at-least-once: send again): {}",
                        ids.len(),
                        ids.join(", ")
                    ),
                    format!(
                        "topic {}",
                        topics.into_iter().collect::<Vec<_>>().join(", ")
                    ),
                )
            })
            .await;
        self.inner.saw(&result);
        result
    }

    async fn declare(&self, topic: &str, group: &str) -> Result<()> {
        self.ensure_open("declare")?;
        validate_name("topic", topic)?;
        validate_name("group", group)?;
        // An explicit declare creates (idempotently) even what this transport declared before:
        // after the queues were deleted, or the server restarted empty, it brings them back.
        self.inner.forget(topic, group);
        self.inner.declare(topic, group).await.map(drop)
    }

    async fn consume(
        &self,
        topic: &str,
        group: &str,
        options: ConsumeOptions,
    ) -> Result<DeliveryStream> {
        self.ensure_open("consume")?;
        validate_name("topic", topic)?;
        validate_name("group", group)?;
        if options.start == StartFrom::Earliest {
            return Err(no_history("SQS", topic, group));
        }
        let queues = self.inner.declare(topic, group).await?;
        Ok(consumer::consume(
            Arc::clone(&self.inner),
            topic,
            queues,
            options,
        ))
    }

    async fn dead_letters(
        &self,
        topic: &str,
        group: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        self.ensure_open("list dead letters")?;
        let Some(queues) = self
            .inner
            .existing(topic, group, "list dead letters")
            .await?
        else {
            return Ok(Vec::new());
        };
        dead_letters::list(&self.inner, topic, group, &queues, limit).await
    }

    async fn redrive(
        &self,
        topic: &str,
        group: &str,
        selection: RedriveSelection,
    ) -> Result<usize> {
        self.ensure_open("redrive")?;
        let Some(queues) = self.inner.existing(topic, group, "redrive").await? else {
            return Ok(0);
        };
        dead_letters::settle(
            &self.inner,
            topic,
            group,
            &queues,
            selection,
            Settle::Redrive,
        )
        .await
    }

    async fn purge_dead_letters(
        &self,
        topic: &str,
        group: &str,
        selection: RedriveSelection,
    ) -> Result<usize> {
        self.ensure_open("purge dead letters")?;
        let Some(queues) = self
            .inner
            .existing(topic, group, "purge dead letters")
            .await?
        else {
            return Ok(0);
        };
        dead_letters::settle(&self.inner, topic, group, &queues, selection, Settle::Purge).await
    }

    /// Unsubscribes the group's queue from the topic, then deletes the queue and its DLQ.
    /// In queue mode every group shares the topic's queue: refused.
    async fn delete_group(&self, topic: &str, group: &str) -> Result<()> {
        self.ensure_open("delete a group")?;
        validate_name("topic", topic)?;
        validate_name("group", group)?;
        if self.inner.config.mode == Mode::Queue {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "delete a group",
                "in queue mode every group shares the topic's queue, so a group has nothing of \
                 its own to delete",
            )
            .with_resource(format!("topic {topic}, group {group}"))
            .with_retryable(false));
        }
        let result = self.inner.delete_group(topic, group).await;
        self.inner.forget(topic, group);
        self.inner.saw(&result);
        result
    }

    async fn depth(&self, topic: &str, group: &str) -> Result<Depth> {
        self.ensure_open("report queue depth")?;
        let found = self
            .inner
            .existing(topic, group, "report queue depth")
            .await;
        self.inner.saw(&found);
        let Some(queues) = found? else {
            return Err(Error::new(
                ErrorKind::Broker,
                "report queue depth",
                "the group's queues do not exist: declare the group first",
            )
            .with_resource(format!("topic {topic}, group {group}"))
            .with_retryable(false));
        };
        let pending = dead_letters::count(&self.inner, &queues.queue.url).await;
        self.inner.saw(&pending);
        let dead_letters = dead_letters::count(&self.inner, &queues.dlq.url).await?;
        Ok(Depth::new(Some(pending?), Some(dead_letters)))
    }

    fn connection(&self) -> ConnectionState {
        self.inner.connection()
    }

    async fn close(&self) -> Result<()> {
        self.inner.closed.store(true, Ordering::Release);
        Ok(())
    }
}
