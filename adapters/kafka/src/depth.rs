//! A group's position without joining it: the consumer lag that
//! [`Transport::depth`](busbar_core::Transport::depth) reports on Kafka, and the start at the
//! end of the log for a new group (`StartFrom::Latest`).
//!
//! The lag is read without joining the group (an offset fetch is no membership): for every
//! partition of the topic and of the group's redrive topic, the high watermark minus the
//! group's committed offset (the low watermark where it committed none). Dead letters are
//! not counted: a DLQ topic keeps redriven records and their markers, so only reading it
//! tells (use [`Bus::dead_letters`](busbar_core::Bus::dead_letters)).

use std::sync::Arc;
use std::time::Duration;

use busbar_core::{Depth, Error, ErrorKind, Result};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::Inner;

const OPERATION: &str = "report queue depth";

/// A client of `group` that does not join it (offset fetches and commits need no membership).
fn client(inner: &Inner, group: &str, operation: &'static str) -> Result<BaseConsumer> {
    inner
        .config
        .client_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| inner.kafka_error(operation, "cannot create a client of the group", e))
}

/// The partitions `group` reads: the topic's and its redrive topic's.
fn partitions(
    inner: &Inner,
    consumer: &BaseConsumer,
    topic: &str,
    group: &str,
    operation: &'static str,
) -> Result<TopicPartitionList> {
    let config = &inner.config;
    let limit = config.connect_timeout.max(Duration::from_secs(5));
    let mut partitions = TopicPartitionList::new();
    for name in [topic.to_owned(), config.redrive_topic(topic, group)] {
        let metadata = consumer.fetch_metadata(Some(&name), limit).map_err(|e| {
            inner.kafka_error(
                operation,
                format!("cannot read the partitions of {name:?}"),
                e,
            )
        })?;
        for found in metadata.topics() {
            // A topic not created yet (a redrive topic nobody used) has no partitions to count.
            if found.error().is_some() {
                continue;
            }
            for partition in found.partitions() {
                partitions.add_partition(found.name(), partition.id());
            }
        }
    }
    if partitions.count() == 0 {
        return Err(Error::new(
            ErrorKind::Broker,
            operation,
            format!("topic {topic:?} does not exist: declare the group first"),
        )
        .with_resource(format!("topic {topic}, group {group}"))
        .with_retryable(false));
    }
    Ok(partitions)
}

/// Commits the end of the log for every partition where `group` has no committed offset, so
/// a new group starts with what is published from now on ([`StartFrom::Latest`]).
///
/// [`StartFrom::Latest`]: busbar_core::StartFrom::Latest
fn start_at_end(inner: &Inner, topic: &str, group: &str) -> Result<()> {
    const START: &str = "consume";
    let limit = inner.config.connect_timeout.max(Duration::from_secs(5));
    let consumer = client(inner, group, START)?;
    let partitions = partitions(inner, &consumer, topic, group, START)?;
    let committed = consumer
        .committed_offsets(partitions, limit)
        .map_err(|e| inner.kafka_error(START, "cannot read the group's committed offsets", e))?;
    let mut ends = TopicPartitionList::new();
    for element in committed.elements() {
        if matches!(element.offset(), Offset::Offset(_)) {
            continue;
        }
        let (_, high) = consumer
            .fetch_watermarks(element.topic(), element.partition(), limit)
            .map_err(|e| {
                inner.kafka_error(
                    START,
                    format!(
                        "cannot read the end of {}/{}",
                        element.topic(),
                        element.partition()
                    ),
                    e,
                )
            })?;
        ends.add_partition_offset(element.topic(), element.partition(), Offset::Offset(high))
            .map_err(|e| inner.kafka_error(START, "cannot note the end of the log", e))?;
    }
    if ends.count() > 0 {
        consumer.commit(&ends, CommitMode::Sync).map_err(|e| {
            inner.kafka_error(START, "cannot start the group at the end of the log", e)
        })?;
    }
    Ok(())
}

pub(crate) async fn start_latest(inner: &Arc<Inner>, topic: &str, group: &str) -> Result<()> {
    let (inner, topic, group) = (Arc::clone(inner), topic.to_owned(), group.to_owned());
    tokio::task::spawn_blocking(move || start_at_end(&inner, &topic, &group))
        .await
        .map_err(|e| {
            Error::new(
                ErrorKind::Broker,
                "consume",
                "the start position task failed",
            )
            .with_source(e)
        })?
}

fn lag(inner: &Inner, topic: &str, group: &str) -> Result<u64> {
    let limit = inner.config.connect_timeout.max(Duration::from_secs(5));
    let consumer = client(inner, group, OPERATION)?;
    let partitions = partitions(inner, &consumer, topic, group, OPERATION)?;
    let committed = consumer.committed_offsets(partitions, limit).map_err(|e| {
        inner.kafka_error(OPERATION, "cannot read the group's committed offsets", e)
    })?;
    let mut lag = 0u64;
    for element in committed.elements() {
        let (low, high) = consumer
            .fetch_watermarks(element.topic(), element.partition(), limit)
            .map_err(|e| {
                inner.kafka_error(
                    OPERATION,
                    format!(
                        "cannot read the offsets of {}/{}",
                        element.topic(),
                        element.partition()
                    ),
                    e,
                )
            })?;
        let position = match element.offset() {
            Offset::Offset(offset) => offset,
            _ => low,
        };
        lag += u64::try_from(high - position.clamp(low, high)).unwrap_or(0);
    }
    Ok(lag)
}

pub(crate) async fn depth(inner: &Arc<Inner>, topic: &str, group: &str) -> Result<Depth> {
    let (inner, topic, group) = (Arc::clone(inner), topic.to_owned(), group.to_owned());
    let lag = tokio::task::spawn_blocking(move || lag(&inner, &topic, &group))
        .await
        .map_err(|e| {
            Error::new(ErrorKind::Broker, OPERATION, "the lag reader task failed").with_source(e)
        })??;
    Ok(Depth::new(Some(lag), None))
}
