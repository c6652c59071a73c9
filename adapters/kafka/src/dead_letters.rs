//! Listing, redriving and purging a group's dead letters.
//!
//! A Kafka log cannot lose a record, so redrive is recorded, not deleted: the dead letter is
//! produced to the group's redrive topic (only that group consumes it, so other groups do not
//! see the message again), then a marker naming it is appended to the DLQ topic. A purge
//! appends only the marker. Listing reads
//! the DLQ topic from its reader group's committed position and leaves out redriven ones;
//! redriving everything moves that position to the end.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use busbar_core::{DeadLetter, Error, ErrorKind, Message, RedriveSelection, Result, Text};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};

use crate::mapping::from_record;
use crate::Inner;

/// The header of a marker record: the id of a redriven dead letter.
pub const REDRIVEN: &str = "busbar.dlq.redriven";
/// The header of a marker record: the id of a purged dead letter.
pub const PURGED: &str = "busbar.dlq.purged";

/// What happens to the selected dead letters.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settle {
    /// Produced to the group's redrive topic, then marked.
    Redrive,
    /// Only marked: listings leave it out for good.
    Purge,
}

/// The consumer group that reads `group`'s DLQ (its committed position skips what was
/// redriven or purged as a whole).
pub(crate) fn reader_group(group: &str) -> String {
    format!("{group}.busbar-dlq-reader")
}

struct Read {
    dead: Vec<DeadLetter>,
    consumer: BaseConsumer,
}

/// Reads the DLQ of (`topic`, `group`) from the reader group's position until it stays quiet.
fn read(inner: &Inner, topic: &str, group: &str) -> Result<Read> {
    let config = &inner.config;
    let dlq = config.dead_letter_topic(topic, group);
    let consumer: BaseConsumer = config
        .client_config()
        .set("group.id", reader_group(group))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set(
            "session.timeout.ms",
            config.session_timeout.as_millis().to_string(),
        )
        .create()
        .map_err(|e| inner.kafka_error("list dead letters", "cannot create a DLQ reader", e))?;
    // A group never declared has no DLQ topic, so no dead letters (as on the other brokers);
    // subscribing to a missing topic would fail, and log an error, instead.
    let limit = config.connect_timeout.max(Duration::from_secs(5));
    let metadata = consumer.fetch_metadata(Some(&dlq), limit).map_err(|e| {
        inner.kafka_error("list dead letters", format!("cannot look up {dlq:?}"), e)
    })?;
    // Only a topic the broker says it does not know is missing; any other answer (a leader
    // being elected, say) is left to the reader below, which waits for it.
    let missing = metadata
        .topics()
        .iter()
        .find(|t| t.name() == dlq)
        .is_none_or(|t| {
            t.error()
                == Some(rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART)
        });
    if missing {
        return Ok(Read {
            dead: Vec::new(),
            consumer,
        });
    }
    consumer
        .subscribe(&[dlq.as_str()])
        .map_err(|e| inner.kafka_error("list dead letters", format!("cannot read {dlq:?}"), e))?;
    let mut records = Vec::new();
    let mut redriven = HashSet::new();
    // The end of a log is "nothing more for a while once partitions are assigned": joining the
    // reader group takes a moment (poll returns early while it happens), then a quiet second
    // means everything was read.
    let started = Instant::now();
    let mut active_at: Option<Instant> = None;
    loop {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Err(e)) => {
                return Err(inner.kafka_error(
                    "list dead letters",
                    format!("cannot read {dlq:?}"),
                    e,
                ))
            }
            Some(Ok(record)) => {
                active_at = Some(Instant::now());
                let message = from_record(topic, &record);
                match message.header(REDRIVEN).or(message.header(PURGED)) {
                    Some(id) => {
                        redriven.insert(id.to_string());
                    }
                    None => records.push(message),
                }
            }
            None => {
                let assigned = consumer.assignment().is_ok_and(|a| a.count() > 0);
                match active_at {
                    None if assigned => active_at = Some(Instant::now()),
                    Some(at) if at.elapsed() >= Duration::from_secs(1) => break,
                    _ => {}
                }
                if started.elapsed() > config.session_timeout * 3 {
                    return Err(Error::new(
                        ErrorKind::Timeout,
                        "list dead letters",
                        format!("the DLQ reader of {dlq:?} got no partitions assigned in time"),
                    )
                    .with_resource(config.url.to_string()));
                }
            }
        }
    }
    let dead = records
        .into_iter()
        .filter(|m| !redriven.contains(m.id.as_str()))
        .filter_map(|m| DeadLetter::from_message(m).ok())
        .collect();
    Ok(Read { dead, consumer })
}

async fn read_blocking(inner: &Arc<Inner>, topic: &str, group: &str) -> Result<Read> {
    let (inner, topic, group) = (Arc::clone(inner), topic.to_string(), group.to_string());
    tokio::task::spawn_blocking(move || read(&inner, &topic, &group))
        .await
        .map_err(|e| {
            Error::new(
                ErrorKind::Broker,
                "list dead letters",
                "the DLQ reader task failed",
            )
            .with_source(e)
        })?
}

pub(crate) async fn list(
    inner: &Arc<Inner>,
    topic: &str,
    group: &str,
    limit: usize,
) -> Result<Vec<DeadLetter>> {
    let read = read_blocking(inner, topic, group).await?;
    Ok(read.dead.into_iter().take(limit).collect())
}

/// Redrives or purges the selected dead letters of (`topic`, `group`); returns how many.
pub(crate) async fn settle(
    inner: &Arc<Inner>,
    topic: &str,
    group: &str,
    selection: RedriveSelection,
    action: Settle,
) -> Result<usize> {
    let (operation, marker_header) = match action {
        Settle::Redrive => ("redrive", REDRIVEN),
        Settle::Purge => ("purge dead letters", PURGED),
    };
    let read = read_blocking(inner, topic, group).await?;
    let redrive_topic = inner.config.redrive_topic(topic, group);
    let dlq = inner.config.dead_letter_topic(topic, group);
    let mut moved = 0;
    for dead in &read.dead {
        if !selection.matches(&dead.message.id) {
            continue;
        }
        if action == Settle::Redrive {
            let mut back = dead.message.clone();
            back.topic = Text::new(&redrive_topic);
            crate::producer::send(inner, vec![back], operation).await?;
        }
        let mut marker = Message::new(
            format!("{}.settled", dead.message.id),
            dlq.clone(),
            Vec::new(),
        );
        marker.key = dead.message.key.clone();
        marker.headers.insert(
            busbar_core::HeaderName::from_static(marker_header),
            dead.message.id.clone(),
        );
        crate::producer::send(inner, vec![marker], operation).await?;
        moved += 1;
    }
    if selection == RedriveSelection::All {
        // Everything read is handled: start later listings after it.
        let consumer = read.consumer;
        let committed =
            tokio::task::spawn_blocking(move || consumer.commit_consumer_state(CommitMode::Sync))
                .await;
        if !matches!(committed, Ok(Ok(()))) {
            tracing::debug!("could not move the DLQ reader position; listings stay correct thanks to the markers");
        }
    }
    Ok(moved)
}
