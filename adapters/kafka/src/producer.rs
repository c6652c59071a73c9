//! Publishing: acks=all, idempotent producer; a batch is handed to librdkafka at once (it
//! batches on the wire) and `publish` returns when every record is acknowledged.

use busbar_core::{Error, ErrorKind, Message, Result, Text};
use futures::future::join_all;
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureRecord;
use rdkafka::types::RDKafkaErrorCode;

use crate::mapping::to_headers;
use crate::Inner;

/// Sends `messages` (each to its `topic`, as a Kafka topic name) and waits for every ack.
pub(crate) async fn send(
    inner: &Inner,
    messages: Vec<Message>,
    operation: &'static str,
) -> Result<()> {
    let total = messages.len();
    // For the error, should one come: the messages themselves are freed once queued, while
    // librdkafka lingers, instead of after the acks, when the next batch waits on it.
    let topics = topics(&messages);
    let mut pending = Vec::with_capacity(total);
    for message in messages {
        let headers = to_headers(&message);
        let mut record = FutureRecord::to(&message.topic)
            .payload(message.payload.as_ref())
            .headers(headers);
        if let Some(key) = &message.key {
            record = record.key(key.as_str());
        }
        // A full local queue is backpressure: wait for room rather than fail.
        let mut record = record;
        let future = loop {
            match inner.producer.send_result(record) {
                Ok(future) => break future,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                Err((e, _)) => {
                    return Err(inner.kafka_error(
                        operation,
                        format!(
                            "cannot queue message {} for topic {}",
                            message.id, message.topic
                        ),
                        e,
                    ))
                }
            }
        };
        pending.push((message.id, future));
    }
    let (ids, futures): (Vec<Text>, Vec<_>) = pending.into_iter().unzip();
    let mut failed = Vec::new();
    let mut first_error = None;
    for (id, result) in ids.into_iter().zip(join_all(futures).await) {
        match result {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => {
                failed.push(id);
                first_error.get_or_insert(e);
            }
            Err(_canceled) => failed.push(id),
        }
    }
    if failed.is_empty() {
        return Ok(());
    }
    let mut error = Error::new(
        ErrorKind::Broker,
        operation,
        format!(
            "Kafka did not acknowledge {} of {total} messages: {}; they were not published",
            failed.len(),
            failed.join(", ")
        ),
    )
    .with_resource(format!("topic {topics} on {}", inner.config.url))
    .with_retryable(true);
    if let Some(e) = first_error {
        error = error.with_source(e);
    }
    Err(error)
}

/// The distinct topics of `messages`, comma-separated, for errors.
fn topics(messages: &[Message]) -> String {
    let mut topics: Vec<&str> = messages.iter().map(|m| m.topic.as_str()).collect();
    topics.sort_unstable();
    topics.dedup();
    topics.join(", ")
}
