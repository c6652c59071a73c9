//! A group's consumer lag: what [`Transport::depth`](busbar_core::Transport::depth) reports
//! on Kafka.
//!
//! The lag is read without joining the group (an offset fetch is no membership): for every
//! partition of the topic and of the group's redrive topic, the high watermark minus the
//! group's committed offset (the low watermark where it committed none). Dead letters are
//! not counted: a DLQ topic keeps redriven records and their markers, so only reading it
//! tells (use [`Bus::dead_letters`](busbar_core::Bus::dead_letters)).

use std::sync::Arc;
use std::time::Duration;

use busbar_core::{Depth, Error, ErrorKind, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::Inner;

const OPERATION: &str = "report queue depth";

fn lag(inner: &Inner, topic: &str, group: &str) -> Result<u64> {
    let config = &inner.config;
    let limit = config.connect_timeout.max(Duration::from_secs(5));
    let consumer: BaseConsumer = config
        .client_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| inner.kafka_error(OPERATION, "cannot create a client to read the lag", e))?;
    let mut partitions = TopicPartitionList::new();
    for name in [topic.to_owned(), config.redrive_topic(topic, group)] {
        let metadata = consumer.fetch_metadata(Some(&name), limit).map_err(|e| {
            inner.kafka_error(
                OPERATION,
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
            OPERATION,
            format!("topic {topic:?} does not exist: declare the group first"),
        )
        .with_resource(format!("topic {topic}, group {group}"))
        .with_retryable(false));
    }
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
