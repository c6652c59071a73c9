//! Dead letters: a message that could not be handled, with why, when and where.
//!
//! The core writes this metadata once for every transport, as `busbar.dlq.*` headers beside the
//! original headers and payload, so a dead letter explains itself on every broker and can be
//! redriven unchanged.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, SecondsFormat, Utc};

use crate::error::{Error, ErrorKind, Result};
use crate::message::{HeaderName, Headers, Message};

/// Header names of the dead-letter metadata.
pub mod header {
    /// Why the message was dead-lettered ([`super::DeadLetterReason::as_str`]).
    pub const REASON: &str = "busbar.dlq.reason";
    /// The last error's text, truncated to [`super::MAX_ERROR_TEXT`] bytes.
    pub const ERROR: &str = "busbar.dlq.error";
    /// How many delivery attempts were made.
    pub const ATTEMPTS: &str = "busbar.dlq.attempts";
    /// The topic the message was consumed from.
    pub const TOPIC: &str = "busbar.dlq.topic";
    /// The subscription group that gave up on it.
    pub const GROUP: &str = "busbar.dlq.group";
    /// When it was dead-lettered (RFC 3339).
    pub const FAILED_AT: &str = "busbar.dlq.failed_at";
    /// All of the above.
    pub const ALL: [&str; 6] = [REASON, ERROR, ATTEMPTS, TOPIC, GROUP, FAILED_AT];
}

/// The longest error text kept in a dead letter; longer texts are cut at a char boundary so the
/// headers fit every broker's frame.
pub const MAX_ERROR_TEXT: usize = 1024;

/// Why a message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadLetterReason {
    /// The handler failed on every one of the retry policy's attempts.
    RetriesExhausted,
    /// The handler returned a permanent error.
    Permanent,
    /// The message could not be decoded into the event type its CloudEvents `type` names.
    Undecodable,
    /// No handler of the subscription handles the message's CloudEvents `type` (see
    /// [`UnknownTypes`](crate::UnknownTypes)).
    UnknownType,
    /// The broker gave up on the message on its own (e.g. a delivery limit after crashes).
    DeliveryLimit,
}

impl DeadLetterReason {
    /// The stable name written to the `busbar.dlq.reason` header.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::RetriesExhausted => "retries_exhausted",
            DeadLetterReason::Permanent => "permanent_error",
            DeadLetterReason::Undecodable => "undecodable",
            DeadLetterReason::UnknownType => "unknown_type",
            DeadLetterReason::DeliveryLimit => "delivery_limit",
        }
    }
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DeadLetterReason {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        [
            DeadLetterReason::RetriesExhausted,
            DeadLetterReason::Permanent,
            DeadLetterReason::Undecodable,
            DeadLetterReason::UnknownType,
            DeadLetterReason::DeliveryLimit,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Decode,
                "read dead letter",
                format!("unknown dead-letter reason {s:?}"),
            )
        })
    }
}

/// The metadata attached to a dead letter.
///
/// What [`Bus::dead_letters`](crate::Bus::dead_letters) returns beside each message:
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use std::time::Duration;
/// use serde::{Deserialize, Serialize};
/// use busbar_core::{Bus, Context, DeadLetterReason, Envelope, Event, HandlerError};
///
/// #[derive(Serialize, Deserialize)]
/// struct Charge { card: String }
/// impl Event for Charge { const TYPE: &'static str = "pay.charge.v1"; }
///
/// let bus = Bus::memory();
/// let payments = bus
///     .subscribe::<Charge>("charges", "payments")
///     .start(|_: Envelope<Charge>, _: Context| async {
///         Err(HandlerError::permanent("card declined"))
///     })
///     .await?;
/// bus.publish("charges", Charge { card: "4000-0002".into() }).await?;
/// # while payments.stats().dead_lettered == 0 { tokio::task::yield_now().await; }
///
/// let dead = bus.dead_letters("charges", "payments", 10).await?;
/// let info = &dead[0].info;
/// assert_eq!(info.reason, DeadLetterReason::Permanent);
/// assert_eq!((info.error.as_str(), info.attempts), ("card declined", 1));
/// assert_eq!((info.topic.as_str(), info.group.as_str()), ("charges", "payments"));
/// // Once the cause is fixed, send them back to the group:
/// bus.redrive("charges", "payments").await?;
/// # payments.shutdown(Duration::from_secs(1)).await?;
/// # Ok::<(), busbar_core::Error>(())
/// # }).unwrap();
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterInfo {
    /// Why it was dead-lettered.
    pub reason: DeadLetterReason,
    /// The last error's text (at most [`MAX_ERROR_TEXT`] bytes).
    pub error: String,
    /// Delivery attempts made.
    pub attempts: u32,
    /// The topic it was consumed from.
    pub topic: String,
    /// The group that gave up.
    pub group: String,
    /// When it was dead-lettered.
    pub failed_at: DateTime<Utc>,
}

impl DeadLetterInfo {
    /// Metadata for a message of `topic`/`group` that failed now; `error` is truncated.
    pub fn new(
        reason: DeadLetterReason,
        error: impl Into<String>,
        attempts: u32,
        topic: impl Into<String>,
        group: impl Into<String>,
    ) -> Self {
        DeadLetterInfo {
            reason,
            error: truncate(error.into(), MAX_ERROR_TEXT),
            attempts,
            topic: topic.into(),
            group: group.into(),
            failed_at: Utc::now(),
        }
    }

    /// Writes the metadata as `busbar.dlq.*` headers.
    pub fn write_headers(&self, headers: &mut Headers) {
        let mut set = |k: &'static str, v: String| {
            headers.insert(HeaderName::from_static(k), v);
        };
        set(header::REASON, self.reason.as_str().to_string());
        set(header::ERROR, self.error.clone());
        set(header::ATTEMPTS, self.attempts.to_string());
        set(header::TOPIC, self.topic.clone());
        set(header::GROUP, self.group.clone());
        set(
            header::FAILED_AT,
            self.failed_at.to_rfc3339_opts(SecondsFormat::AutoSi, true),
        );
    }

    /// Reads the metadata back from headers written by [`DeadLetterInfo::write_headers`].
    pub fn read_headers(headers: &Headers) -> Result<Self> {
        let get = |k: &str| {
            headers.get(k).ok_or_else(|| {
                Error::new(
                    ErrorKind::Decode,
                    "read dead letter",
                    format!("dead-letter header `{k}` is missing"),
                )
            })
        };
        let attempts = get(header::ATTEMPTS)?;
        let failed_at = get(header::FAILED_AT)?;
        Ok(DeadLetterInfo {
            reason: get(header::REASON)?.parse()?,
            error: get(header::ERROR)?.to_owned(),
            attempts: attempts.parse().map_err(|_| {
                Error::new(
                    ErrorKind::Decode,
                    "read dead letter",
                    format!("`{}` is not a count: {attempts:?}", header::ATTEMPTS),
                )
            })?,
            topic: get(header::TOPIC)?.to_owned(),
            group: get(header::GROUP)?.to_owned(),
            failed_at: DateTime::parse_from_rfc3339(failed_at)
                .map_err(|e| {
                    Error::new(
                        ErrorKind::Decode,
                        "read dead letter",
                        format!("`{}` is not RFC 3339: {e}", header::FAILED_AT),
                    )
                })?
                .with_timezone(&Utc),
        })
    }
}

/// A dead-lettered message: the original message (original headers and payload) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The message as it was published.
    pub message: Message,
    /// Why, when and where it failed.
    pub info: DeadLetterInfo,
}

impl DeadLetter {
    /// The message with the metadata headers added, as an adapter stores it in its DLQ.
    pub fn to_message(&self) -> Message {
        let mut message = self.message.clone();
        self.info.write_headers(&mut message.headers);
        message
    }

    /// Splits a stored dead-letter message into the original message and its metadata.
    pub fn from_message(message: Message) -> Result<Self> {
        let info = DeadLetterInfo::read_headers(&message.headers)
            .map_err(|e| e.with_resource(format!("dead letter {}", message.id)))?;
        Ok(DeadLetter::strip(message, info))
    }

    /// The dead letter of a stored message whose metadata `info` was read: the metadata
    /// headers come off, leaving the original message.
    fn strip(mut message: Message, info: DeadLetterInfo) -> DeadLetter {
        for name in header::ALL {
            message.headers.remove(name);
        }
        DeadLetter { message, info }
    }
}

impl DeadLetter {
    /// Reads a message from a dead-letter queue. busbar's own dead letters carry their metadata;
    /// a message the broker moved there by itself (its delivery limit, after consumers crashed
    /// or abandoned it) has none, and gets [`DeadLetterReason::DeliveryLimit`] with the broker's
    /// `explanation` of what happened, `attempts` and the queue's `topic` and `group`.
    ///
    /// ```
    /// use busbar_core::{DeadLetter, DeadLetterReason, Message};
    /// let moved = DeadLetter::from_dlq(Message::new("m", "t", "{}"), "t", "g", 5, || "the broker gave up after 5 deliveries".into());
    /// assert_eq!(moved.info.reason, DeadLetterReason::DeliveryLimit);
    /// assert!(moved.info.error.ends_with("its consumer crashed or abandoned it every time"));
    /// ```
    pub fn from_dlq(
        message: Message,
        topic: &str,
        group: &str,
        attempts: u32,
        explanation: impl FnOnce() -> String,
    ) -> DeadLetter {
        if let Ok(info) = DeadLetterInfo::read_headers(&message.headers) {
            return DeadLetter::strip(message, info);
        }
        let error = format!(
            "{}: its consumer crashed or abandoned it every time",
            explanation()
        );
        DeadLetter {
            message,
            info: DeadLetterInfo::new(
                DeadLetterReason::DeliveryLimit,
                error,
                attempts,
                topic,
                group,
            ),
        }
    }
}

/// Cuts `text` to at most `max` bytes at a char boundary, marking the cut with `…`.
fn truncate(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let marker = '…';
    let mut cut = max - marker.len_utf8();
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.truncate(cut);
    text.push(marker);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trips_through_headers_and_original_headers_survive() {
        let mut original = Message::new("m1", "orders", "{}");
        original.headers.insert("tenant", "acme");
        let dl = DeadLetter {
            message: original.clone(),
            info: DeadLetterInfo::new(
                DeadLetterReason::RetriesExhausted,
                "boom",
                5,
                "orders",
                "billing",
            ),
        };
        let stored = dl.to_message();
        assert_eq!(stored.header(header::REASON), Some("retries_exhausted"));
        let back = DeadLetter::from_message(stored).unwrap();
        assert_eq!(back, dl);
        assert_eq!(back.message, original);
    }

    #[test]
    fn long_error_text_is_truncated_at_a_char_boundary() {
        let info = DeadLetterInfo::new(DeadLetterReason::Permanent, "é".repeat(5000), 1, "t", "g");
        assert!(info.error.len() <= MAX_ERROR_TEXT);
        assert!(info.error.ends_with('…'));
    }

    #[test]
    fn missing_metadata_is_a_decode_error() {
        let err = DeadLetter::from_message(Message::new("m", "t", "")).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Decode);
        assert!(err.to_string().contains("busbar.dlq."), "{err}");
    }
}
