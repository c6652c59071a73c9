//! Typed events and their envelopes, and the envelope ⇄ [`Message`] mapping.
//!
//! The mapping is CloudEvents 1.0 in binary content mode: envelope attributes become headers
//! named as in the CloudEvents Kafka protocol binding (`ce_id`, `ce_type`, `ce_source`,
//! `ce_specversion`, `ce_time`, `content-type`, and the extensions `ce_correlationid`,
//! `ce_causationid`, `ce_traceparent`, `ce_tracestate`); the payload is the encoded event.
//! Adapters rename these to their broker's binding (AMQP `cloudEvents:` application properties,
//! SQS message attributes), so a service using any CloudEvents SDK reads busbar's events.

use std::cell::Cell;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::Codec;
use crate::error::{Error, ErrorKind, Result};
use crate::message::{HeaderName, Headers, Message, INVALID_UTF8_HEADERS, MAX_HEADERS};
use crate::routing::{EventSet, Payload};
use crate::text::Text;

/// A Rust type that travels as an event: serializable, and naming its CloudEvents `type`.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use busbar_core::Text;
///
/// #[derive(Serialize, Deserialize)]
/// struct OrderPlaced { order_id: String, total_cents: u64 }
///
/// impl busbar_core::Event for OrderPlaced {
///     const TYPE: &'static str = "orders.order_placed.v1";
///     fn key(&self) -> Option<Text> { Some(self.order_id.as_str().into()) }
/// }
/// ```
pub trait Event: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The CloudEvents `type`, e.g. `"orders.order_placed.v1"`. Version it in the name; to
    /// change the shape, make a new version and list the old name in [`ALIASES`](Self::ALIASES).
    const TYPE: &'static str;

    /// Older CloudEvents types this event also accepts, e.g. `&["orders.order_placed.v1"]` on
    /// the v2 type. Subscriptions of this type handle messages of these types too, after
    /// [`upcast`](Self::upcast), so during a rollout the v1 events still in flight (or still
    /// published by services not yet upgraded) reach the v2 handler instead of a dead-letter
    /// queue.
    const ALIASES: &'static [&'static str] = &[];

    /// The ordering/partition key: events with the same key are delivered in publish order
    /// where the transport can order (see [`crate::Capabilities::ordered_by_key`]).
    ///
    /// A [`Text`]: `Some(self.order_id.as_str().into())` copies a key of up to
    /// [`INLINE_CAPACITY`](crate::text::INLINE_CAPACITY) bytes in place, without the allocation
    /// (and the free on another thread) a `String` cost for every event published.
    fn key(&self) -> Option<Text> {
        None
    }

    /// Turns the payload of an older type (one of [`ALIASES`](Self::ALIASES); see
    /// [`Payload::event_type`]) into this event. The default decodes it as this type, which
    /// fits a rename or a shape that only gained optional fields. An error makes the message
    /// `undecodable`.
    ///
    /// ```
    /// use serde::{Deserialize, Serialize};
    /// use busbar_core::{codec::{Codec, Json}, routing::{EventSet, Payload}, Event};
    ///
    /// #[derive(Deserialize)]
    /// struct OrderPlacedV1 { order_id: String, cents: u64 }
    ///
    /// #[derive(Debug, Serialize, Deserialize)]
    /// struct OrderPlaced { order_id: String, cents: u64, currency: String }
    ///
    /// impl Event for OrderPlaced {
    ///     const TYPE: &'static str = "orders.order_placed.v2";
    ///     const ALIASES: &'static [&'static str] = &["orders.order_placed.v1"];
    ///     fn upcast<C: Codec>(old: Payload<'_, C>) -> busbar_core::Result<Self> {
    ///         let v1: OrderPlacedV1 = old.decode()?;
    ///         Ok(OrderPlaced { order_id: v1.order_id, cents: v1.cents, currency: "EUR".into() })
    ///     }
    /// }
    ///
    /// let v1 = Payload::new(&Json, "orders.order_placed.v1", br#"{"order_id":"o-1","cents":5}"#);
    /// let upcast = OrderPlaced::decode(v1).unwrap().unwrap();
    /// assert_eq!(upcast.currency, "EUR");
    /// ```
    fn upcast<C: Codec>(old: Payload<'_, C>) -> Result<Self> {
        old.decode()
    }
}

/// The header names busbar uses for envelope attributes (CloudEvents Kafka binding names).
pub mod attr {
    /// CloudEvents `id`.
    pub const ID: &str = "ce_id";
    /// CloudEvents `type`.
    pub const TYPE: &str = "ce_type";
    /// CloudEvents `source`.
    pub const SOURCE: &str = "ce_source";
    /// CloudEvents `specversion`; busbar writes `1.0`.
    pub const SPECVERSION: &str = "ce_specversion";
    /// CloudEvents `time` (RFC 3339).
    pub const TIME: &str = "ce_time";
    /// CloudEvents `datacontenttype`, which the binary-mode bindings carry as `content-type`.
    pub const CONTENT_TYPE: &str = "content-type";
    /// Extension `correlationid`.
    pub const CORRELATION_ID: &str = "ce_correlationid";
    /// Extension `causationid`.
    pub const CAUSATION_ID: &str = "ce_causationid";
    /// W3C Trace Context `traceparent` (CloudEvents distributed tracing extension).
    pub const TRACEPARENT: &str = "ce_traceparent";
    /// W3C Trace Context `tracestate`.
    pub const TRACESTATE: &str = "ce_tracestate";
    /// The CloudEvents spec version busbar speaks.
    pub const SPECVERSION_1_0: &str = "1.0";
    /// The prefix of every CloudEvents attribute header in the neutral mapping.
    pub const CE_PREFIX: &str = "ce_";
    /// The prefix of headers busbar itself writes (dead-letter metadata); reserved.
    pub const BUSBAR_PREFIX: &str = "busbar.";

    /// The headers that [`crate::Envelope`] owns; users cannot set them as free-form headers.
    pub const RESERVED: [&str; 10] = [
        ID,
        TYPE,
        SOURCE,
        SPECVERSION,
        TIME,
        CONTENT_TYPE,
        CORRELATION_ID,
        CAUSATION_ID,
        TRACEPARENT,
        TRACESTATE,
    ];
}

/// The longest header name busbar accepts (AMQP's short-string limit).
pub const MAX_HEADER_NAME_LEN: usize = 255;

/// A typed event plus its metadata.
///
/// Build one with [`Envelope::new`] (or let [`crate::Bus::publish`] do it), adjust it with the
/// `with_*` methods, and read it in handlers. Every field round-trips through every transport.
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Serialize, Deserialize, Debug, PartialEq)]
/// # struct Ping { n: u32 }
/// # impl busbar_core::Event for Ping { const TYPE: &'static str = "demo.ping.v1"; }
/// use busbar_core::{codec::Json, Envelope};
///
/// let env = Envelope::new("/billing", Ping { n: 7 })
///     .with_header("tenant", "acme")
///     .with_key("customer-42");
/// let msg = env.to_message(&Json, "pings").unwrap();
/// assert_eq!(msg.header("ce_type"), Some("demo.ping.v1"));
///
/// let back = Envelope::<Ping>::from_message(&Json, &msg).unwrap();
/// assert_eq!(back, env);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope<T> {
    /// Unique id (a UUID v7 when busbar creates it; any string from foreign producers).
    pub id: Text,
    /// The CloudEvents `type`; [`Event::TYPE`] for busbar-created envelopes.
    pub event_type: Text,
    /// The CloudEvents `source`: which service produced the event.
    pub source: Text,
    /// When the event was produced.
    pub time: Option<DateTime<Utc>>,
    /// The conversation this event belongs to; shared by every event of one chain.
    pub correlation_id: Option<Text>,
    /// The id of the event whose handling produced this one.
    pub causation_id: Option<Text>,
    /// The payload's MIME type.
    pub content_type: Text,
    /// W3C `traceparent`.
    pub traceparent: Option<Text>,
    /// W3C `tracestate`.
    pub tracestate: Option<Text>,
    /// Free-form headers (names must not be one of [`attr::RESERVED`] or start with `busbar.`).
    pub headers: Headers,
    /// The ordering/partition key.
    pub key: Option<Text>,
    /// The event itself.
    pub payload: T,
}

impl<E: Event> Envelope<E> {
    /// A fresh envelope: new UUID v7 id, `type` = [`Event::TYPE`], the current time, the
    /// event's key, a new correlation (equal to the id) and a new W3C trace.
    pub fn new(source: impl Into<Text>, payload: E) -> Self {
        let now = Utc::now();
        let id = id_at(&now);
        Envelope {
            correlation_id: Some(id.clone()),
            id,
            event_type: Text::from_static(E::TYPE),
            source: source.into(),
            time: Some(now),
            causation_id: None,
            content_type: Text::from_static(crate::codec::Json.content_type()),
            traceparent: Some(new_traceparent(None)),
            tracestate: None,
            headers: Headers::new(),
            key: payload.key(),
            payload,
        }
    }
}

impl<S: EventSet> Envelope<S> {
    /// Decodes a message into an envelope of `S`: an [`Event`] (or one of its older
    /// [`ALIASES`](Event::ALIASES), upcast), or any [`EventSet`].
    ///
    /// Fails with a [`ErrorKind::Decode`] error that names what is wrong: a missing or invalid
    /// CloudEvents attribute, a `type` that `S` does not claim, an unsupported content type, or
    /// the payload field that does not fit.
    pub fn from_message<C: Codec>(codec: &C, message: &Message) -> Result<Self> {
        // The consumer runtime reads structured mode before its decoder; here it is read for
        // callers that decode by hand.
        let structured = crate::structured::from_structured(message)?;
        let message = structured.as_ref().unwrap_or(message);
        Envelope::decode_with(codec, message, S::decode).map_err(|undecoded| match undecoded {
            Undecoded::UnknownType(event_type) => {
                unknown_type_error(message, &event_type, &S::event_types())
            }
            Undecoded::Invalid(error) => error,
        })
    }
}

/// Why a received message did not become an envelope.
#[derive(Debug)]
pub(crate) enum Undecoded {
    /// Its CloudEvents `type`, which the decoder does not claim.
    UnknownType(String),
    /// Not a readable CloudEvent, or a payload that does not fit its claimed type.
    Invalid(Error),
}

impl From<Error> for Undecoded {
    fn from(error: Error) -> Self {
        Undecoded::Invalid(error)
    }
}

/// The error for a message whose `type` is none of `claimed`.
pub(crate) fn unknown_type_error(message: &Message, event_type: &str, claimed: &[&str]) -> Error {
    decode_error(
        message,
        format!(
            "event type {event_type:?} is not handled by this subscription (it handles {})",
            claimed
                .iter()
                .map(|t| format!("{t:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )
}

/// A message's CloudEvents attributes and its free-form headers, read in one pass.
#[derive(Default)]
struct Attributes<'m> {
    specversion: Option<&'m Text>,
    id: Option<&'m Text>,
    event_type: Option<&'m Text>,
    source: Option<&'m Text>,
    time: Option<&'m Text>,
    content_type: Option<&'m Text>,
    correlation_id: Option<&'m Text>,
    causation_id: Option<&'m Text>,
    traceparent: Option<&'m Text>,
    tracestate: Option<&'m Text>,
    invalid_utf8: Option<&'m Text>,
    free_form: Headers,
}

impl<'m> Attributes<'m> {
    fn read(message: &'m Message) -> Self {
        let mut read = Attributes::default();
        for (name, value) in message.headers.entries() {
            let slot = match name.as_str() {
                attr::SPECVERSION => &mut read.specversion,
                attr::ID => &mut read.id,
                attr::TYPE => &mut read.event_type,
                attr::SOURCE => &mut read.source,
                attr::TIME => &mut read.time,
                attr::CONTENT_TYPE => &mut read.content_type,
                attr::CORRELATION_ID => &mut read.correlation_id,
                attr::CAUSATION_ID => &mut read.causation_id,
                attr::TRACEPARENT => &mut read.traceparent,
                attr::TRACESTATE => &mut read.tracestate,
                other => {
                    if other == INVALID_UTF8_HEADERS {
                        read.invalid_utf8 = Some(value);
                    }
                    read.free_form.insert(name.clone(), value.clone());
                    continue;
                }
            };
            *slot = Some(value);
        }
        read
    }
}

impl<T> Envelope<T> {
    /// Reads a message's CloudEvents attributes and decodes its payload with `decode`, which
    /// returns `None` for a `type` it does not claim.
    pub(crate) fn decode_with<C: Codec>(
        codec: &C,
        message: &Message,
        decode: impl FnOnce(Payload<'_, C>) -> Option<Result<T>>,
    ) -> std::result::Result<Self, Undecoded> {
        if message.headers.len() > MAX_HEADERS {
            return Err(Undecoded::Invalid(decode_error(
                message,
                format!(
                    "message has {} headers; busbar reads at most {MAX_HEADERS}",
                    message.headers.len()
                ),
            )));
        }
        // One pass over the headers: each attribute found by one match on its name (a lookup
        // per attribute cost a dozen tree searches per message), the rest kept as free-form.
        let read = Attributes::read(message);
        if let Some(invalid) = read.invalid_utf8 {
            let unreadable: Vec<&str> = invalid
                .split(',')
                .filter(|name| name.starts_with(attr::CE_PREFIX) || *name == attr::CONTENT_TYPE)
                .collect();
            if !unreadable.is_empty() {
                return Err(Undecoded::Invalid(decode_error(
                    message,
                    format!(
                        "CloudEvents attribute `{}` is not valid UTF-8",
                        unreadable.join("`, `")
                    ),
                )));
            }
        }
        fn required<'m>(
            message: &Message,
            value: Option<&'m Text>,
            name: &str,
        ) -> Result<&'m Text> {
            value.ok_or_else(|| {
                decode_error(message, format!("missing CloudEvents attribute `{name}`"))
            })
        }
        let spec = read.specversion.ok_or_else(|| {
            decode_error(
                message,
                match read.content_type {
                    Some(content_type) => format!(
                        "not a CloudEvent: no `specversion` attribute, and content type `{}`",
                        crate::structured::shown(content_type)
                    ),
                    None => {
                        "not a CloudEvent: no `specversion` attribute and no content type".into()
                    }
                },
            )
        })?;
        if *spec != attr::SPECVERSION_1_0 {
            return Err(Undecoded::Invalid(decode_error(
                message,
                format!("unsupported CloudEvents specversion {spec:?}; busbar reads 1.0"),
            )));
        }
        let event_type = required(message, read.event_type, attr::TYPE)?;
        let id = required(message, read.id, attr::ID)?.clone();
        let source = required(message, read.source, attr::SOURCE)?.clone();
        let time = match read.time {
            None => None,
            Some(text) => Some(match utc_time(text) {
                Some(time) => time,
                None => DateTime::parse_from_rfc3339(text)
                    .map_err(|e| {
                        decode_error(
                            message,
                            format!(
                                "`time` is not RFC 3339: got `{}` ({e})",
                                crate::structured::shown(text)
                            ),
                        )
                    })?
                    .with_timezone(&Utc),
            }),
        };
        let content_type = read
            .content_type
            .cloned()
            .unwrap_or(Text::from_static(codec.content_type()));
        if !codec.accepts(&content_type) {
            return Err(Undecoded::Invalid(decode_error(
                message,
                format!(
                    "content type {content_type:?} is not readable by the {} codec",
                    codec.content_type()
                ),
            )));
        }
        let payload = decode(Payload::new(codec, event_type, &message.payload))
            .ok_or_else(|| Undecoded::UnknownType(event_type.to_string()))?
            .map_err(|e| e.with_resource(describe(message)))?;
        Ok(Envelope {
            id,
            event_type: event_type.clone(),
            source,
            time,
            correlation_id: read.correlation_id.cloned(),
            causation_id: read.causation_id.cloned(),
            content_type,
            traceparent: read.traceparent.cloned(),
            tracestate: read.tracestate.cloned(),
            headers: read.free_form,
            key: message.key.clone(),
            payload,
        })
    }
}

impl<T> Envelope<T> {
    /// The same envelope around `f(payload)`, or `f`'s error.
    pub(crate) fn try_map_payload<U, X>(
        self,
        f: impl FnOnce(T) -> std::result::Result<U, X>,
    ) -> std::result::Result<Envelope<U>, X> {
        Ok(Envelope {
            payload: f(self.payload)?,
            id: self.id,
            event_type: self.event_type,
            source: self.source,
            time: self.time,
            correlation_id: self.correlation_id,
            causation_id: self.causation_id,
            content_type: self.content_type,
            traceparent: self.traceparent,
            tracestate: self.tracestate,
            headers: self.headers,
            key: self.key,
        })
    }

    /// The same envelope around `f(payload)`.
    pub(crate) fn map_payload<U>(self, f: impl FnOnce(T) -> U) -> Envelope<U> {
        match self.try_map_payload(|payload| Ok::<_, std::convert::Infallible>(f(payload))) {
            Ok(envelope) => envelope,
            Err(never) => match never {},
        }
    }

    /// Adds a free-form header (checked when the envelope is encoded).
    pub fn with_header(mut self, name: impl Into<HeaderName>, value: impl Into<Text>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Sets the ordering/partition key.
    pub fn with_key(mut self, key: impl Into<Text>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets the correlation id (joins an existing conversation).
    pub fn with_correlation_id(mut self, id: impl Into<Text>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// Sets the causation id (the id of the event that caused this one).
    pub fn with_causation_id(mut self, id: impl Into<Text>) -> Self {
        self.causation_id = Some(id.into());
        self
    }

    /// Sets the W3C `traceparent` (e.g. from the current OpenTelemetry span).
    pub fn with_traceparent(mut self, traceparent: impl Into<Text>) -> Self {
        self.traceparent = Some(traceparent.into());
        self
    }

    /// The correlation id this envelope's follow-up events should carry: its own correlation,
    /// or its id when it has none (a foreign event starts a conversation).
    pub fn conversation_id(&self) -> &str {
        self.correlation_id.as_deref().unwrap_or(&self.id)
    }

    /// Encodes the envelope into a [`Message`] for `topic`.
    ///
    /// Fails with [`ErrorKind::InvalidHeader`] for a free-form header that is reserved, empty,
    /// longer than [`MAX_HEADER_NAME_LEN`], or holds control characters, and with
    /// [`ErrorKind::Encode`] when the payload cannot be encoded.
    pub fn to_message<C: Codec>(&self, codec: &C, topic: &str) -> Result<Message>
    where
        T: Serialize,
    {
        Envelope {
            id: self.id.clone(),
            event_type: self.event_type.clone(),
            source: self.source.clone(),
            time: self.time,
            correlation_id: self.correlation_id.clone(),
            causation_id: self.causation_id.clone(),
            content_type: self.content_type.clone(),
            traceparent: self.traceparent.clone(),
            tracestate: self.tracestate.clone(),
            headers: self.headers.clone(),
            key: self.key.clone(),
            payload: &self.payload,
        }
        .into_message(codec, topic)
    }

    /// Like [`to_message`](Self::to_message), moving the envelope's strings into the message
    /// instead of copying them (what `publish` does with the envelopes it makes).
    pub fn into_message<C: Codec>(self, codec: &C, topic: &str) -> Result<Message>
    where
        T: Serialize,
    {
        for (name, value) in &self.headers {
            validate_header(name, value)?;
        }
        if self.event_type.is_empty() {
            return Err(Error::new(
                ErrorKind::Encode,
                "encode",
                "the envelope's event type is empty",
            )
            .with_resource(format!("message {}", self.id)));
        }
        let payload = codec.encode(&self.event_type, &self.payload)?;
        // The attributes in the order of their names, after the envelope's own headers (which
        // cannot share a name with them): with no headers of its own, the message's are in
        // order as they are, with no sorting, no check of the order and none of the inserts
        // that cost about 230 instructions each.
        let own = !self.headers.is_empty();
        let mut entries = Vec::with_capacity(self.headers.len() + attr::RESERVED.len());
        entries.extend(self.headers);
        // Pushed one by one, not gathered in an array first: each of the ten `Text`s (64 bytes)
        // would be moved twice.
        let mut attribute = |name: &'static str, value: Option<Text>| {
            if let Some(value) = value {
                entries.push((HeaderName::from_static(name), value));
            }
        };
        attribute(attr::CAUSATION_ID, self.causation_id);
        attribute(attr::CORRELATION_ID, self.correlation_id);
        attribute(attr::ID, Some(self.id.clone()));
        attribute(attr::SOURCE, Some(self.source));
        attribute(
            attr::SPECVERSION,
            Some(Text::from_static(attr::SPECVERSION_1_0)),
        );
        attribute(attr::TIME, self.time.as_ref().map(rfc3339));
        attribute(attr::TRACEPARENT, self.traceparent);
        attribute(attr::TRACESTATE, self.tracestate);
        attribute(attr::TYPE, Some(self.event_type));
        attribute(attr::CONTENT_TYPE, Some(self.content_type));
        let headers = if own {
            Headers::from_unsorted(entries)
        } else {
            Headers::from_sorted(entries)
        };
        Ok(Message {
            id: self.id,
            topic: Text::new(topic),
            key: self.key,
            headers,
            payload,
        })
    }
}

/// Checks one free-form header against the rules every transport can carry.
///
/// ```
/// use busbar_core::envelope::validate_header;
/// assert!(validate_header("tenant", "acme").is_ok());
/// assert!(validate_header("ce_id", "x").is_err());      // owned by the envelope
/// assert!(validate_header("note", "a\u{0}b").is_err()); // control character
/// ```
pub fn validate_header(name: &str, value: &str) -> Result<()> {
    let problem = if name.is_empty() {
        Some("the name is empty".to_string())
    } else if name.len() > MAX_HEADER_NAME_LEN {
        Some(format!(
            "the name is {} bytes; the limit is {MAX_HEADER_NAME_LEN}",
            name.len()
        ))
    } else if attr::RESERVED.contains(&name) {
        Some("the name is an envelope attribute; set the envelope field instead".to_string())
    } else if name.starts_with(attr::BUSBAR_PREFIX) {
        Some("names starting with `busbar.` are reserved for busbar's own metadata".to_string())
    } else if name.chars().any(char::is_control) {
        Some("the name contains a control character".to_string())
    } else if value
        .chars()
        .any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
    {
        Some("the value contains a control character other than tab, CR or LF".to_string())
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(problem) => Err(Error::new(
            ErrorKind::InvalidHeader,
            "encode",
            format!("header {name:?} is not allowed: {problem}"),
        )),
    }
}

/// A new W3C `traceparent`: the trace id of `parent` (a new one when `None`) and a new span id.
///
/// With the `otel` feature, inside an OpenTelemetry context with a span, that span's context
/// instead: the trace continues from the span the event is published in.
pub(crate) fn new_traceparent(parent: Option<&str>) -> Text {
    #[cfg(feature = "otel")]
    if let Some((trace, span, flags)) = crate::otel::current_span() {
        let mut traceparent = *b"00-00000000000000000000000000000000-0000000000000000-00";
        put_hex(&mut traceparent[3..35], trace);
        put_hex(&mut traceparent[36..52], u128::from(span));
        put_hex(&mut traceparent[53..55], u128::from(flags));
        return Text::new(std::str::from_utf8(&traceparent).unwrap_or_default());
    }
    let parent_trace = parent.and_then(|p| {
        let mut parts = p.split('-');
        let (version, trace) = (parts.next()?, parts.next()?);
        let valid = version == "00"
            && trace.len() == 32
            && trace.bytes().all(|b| b.is_ascii_hexdigit())
            && trace.bytes().any(|b| b != b'0');
        valid.then_some(trace)
    });
    // Written in place, without the formatting machinery: this runs for every event published.
    let mut traceparent = *b"00-00000000000000000000000000000000-0000000000000000-01";
    match parent_trace {
        Some(trace) => {
            for (out, digit) in traceparent[3..35].iter_mut().zip(trace.bytes()) {
                *out = digit.to_ascii_lowercase();
            }
        }
        // Nonzero, as W3C requires; not by a ranged draw (`u128(1..)` divides by the range).
        None => put_hex(&mut traceparent[3..35], fastrand::u128(..).max(1)),
    }
    put_hex(
        &mut traceparent[36..52],
        u128::from(fastrand::u64(..).max(1)),
    );
    Text::new(std::str::from_utf8(&traceparent).unwrap_or_default())
}

/// A UUID v7 for an event made at `time`: its millisecond, then 74 random bits (from the
/// thread's `fastrand` generator, as the `traceparent`'s ids), written as the hyphenated
/// lowercase form with [`put_hex`]. Not `Uuid::now_v7`, which reads the clock again and takes a
/// process-wide lock for a counter that orders the ids made within one millisecond (RFC 9562
/// leaves that order optional; busbar orders by nothing but the broker's order), draws from a
/// ChaCha generator and formats a digit at a time (`Uuid::new_v7` and its formatting cost about
/// 370 instructions an event, this about 240).
pub(crate) fn id_at(time: &DateTime<Utc>) -> Text {
    let millis = u64::try_from(time.timestamp_millis()).unwrap_or_default();
    let random = fastrand::u128(..).to_le_bytes();
    let mut ten = [0; 10];
    ten.copy_from_slice(&random[..10]);
    let id = uuid::Builder::from_unix_timestamp_millis(millis, &ten)
        .into_uuid()
        .as_u128();
    let mut text = *b"00000000-0000-0000-0000-000000000000";
    put_hex(&mut text[0..8], id >> 96);
    put_hex(&mut text[9..13], id >> 80);
    put_hex(&mut text[14..18], id >> 64);
    put_hex(&mut text[19..23], id >> 48);
    put_hex(&mut text[24..36], id);
    Text::new(std::str::from_utf8(&text).unwrap_or_default())
}

/// Writes the lowest hex digits of `value` into `out` (an even number of them, at most 32),
/// lowercase, zero-padded to its length: what `{:0digits$x}` writes, without the formatting
/// machinery, a byte's two digits at a time (a shift of the `u128` per digit cost about 200
/// instructions a `traceparent`).
fn put_hex(out: &mut [u8], value: u128) {
    /// Each byte's two lowercase hex digits.
    const PAIRS: [[u8; 2]; 256] = {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut pairs = [[0; 2]; 256];
        let mut byte = 0;
        while byte < 256 {
            pairs[byte] = [HEX[byte >> 4], HEX[byte & 0xf]];
            byte += 1;
        }
        pairs
    };
    debug_assert!(out.len() % 2 == 0 && out.len() <= 32);
    let bytes = value.to_be_bytes();
    let low = &bytes[bytes.len().saturating_sub(out.len() / 2)..];
    for (digits, byte) in out.chunks_exact_mut(2).zip(low) {
        digits.copy_from_slice(&PAIRS[usize::from(*byte)]);
    }
}

/// The first and the last Unix second [`rfc3339`] writes itself: years 0 to 9999, the ones
/// RFC 3339's four digits hold (chrono writes the others).
const WRITTEN_SECONDS: std::ops::RangeInclusive<i64> = -62_167_219_200..=253_402_300_799;

thread_local! {
    /// The date and time to the second that [`rfc3339`] last wrote on this thread, by its Unix
    /// second: the events of a batch share it, and working it out is most of the writing.
    static WRITTEN_SECOND: Cell<(i64, [u8; 19])> = const { Cell::new((i64::MIN, [0; 19])) };
    /// The date and time to the second that [`utc_time`] last read on this thread, and its
    /// value; the bytes are never all zero once a time was read, so the first look misses.
    static READ_SECOND: Cell<([u8; 19], chrono::NaiveDateTime)> =
        const { Cell::new(([0; 19], chrono::NaiveDateTime::MIN)) };
}

/// `time` in RFC 3339, as chrono's `to_rfc3339_opts(SecondsFormat::AutoSi, true)` writes it
/// (`2026-11-30T06:45:00.123Z`: 0, 3, 6 or 9 fraction digits, whichever is exact), written
/// into a buffer directly: chrono's formatter costs about 900 instructions per publish. The
/// date and time to the second are written once per second and thread, then copied.
pub(crate) fn rfc3339(time: &DateTime<Utc>) -> Text {
    use chrono::{Datelike, Timelike};
    let second = time.timestamp();
    let nanos = time.timestamp_subsec_nanos();
    // A leap second (chrono keeps it as nanoseconds past 1e9) and a year of more or fewer
    // than four digits are chrono's to write.
    if nanos >= 1_000_000_000 || !WRITTEN_SECONDS.contains(&second) {
        return time.to_rfc3339_opts(SecondsFormat::AutoSi, true).into();
    }
    let mut buf = *b"0000-00-00T00:00:00.000000000Z";
    match WRITTEN_SECOND.try_with(Cell::get) {
        Ok((written, prefix)) if written == second => buf[..19].copy_from_slice(&prefix),
        _ => {
            let (date, clock) = (time.date_naive(), time.time());
            put_digits(&mut buf[0..4], date.year().unsigned_abs());
            put_digits(&mut buf[5..7], date.month());
            put_digits(&mut buf[8..10], date.day());
            put_digits(&mut buf[11..13], clock.hour());
            put_digits(&mut buf[14..16], clock.minute());
            put_digits(&mut buf[17..19], clock.second());
            let mut prefix = [0; 19];
            prefix.copy_from_slice(&buf[..19]);
            let _ = WRITTEN_SECOND.try_with(|written| written.set((second, prefix)));
        }
    }
    let end = match nanos {
        0 => 19,
        n if n % 1_000_000 == 0 => {
            put_digits(&mut buf[20..23], n / 1_000_000);
            23
        }
        n if n % 1_000 == 0 => {
            put_digits(&mut buf[20..26], n / 1_000);
            26
        }
        n => {
            put_digits(&mut buf[20..29], n);
            29
        }
    };
    buf[end] = b'Z';
    Text::new(std::str::from_utf8(&buf[..=end]).unwrap_or_default())
}

/// Reads a time in the form busbar writes (UTC, `Z`, no fraction or one of 3, 6 or 9 digits)
/// at fixed offsets; `None` for any other form (chrono's parser reads those), including a leap
/// second. The date and time to the second are worked out once per second and thread.
fn utc_time(text: &str) -> Option<DateTime<Utc>> {
    use chrono::Timelike;
    let b = text.as_bytes();
    let fraction = match b.len() {
        20 => 0,
        24 | 27 | 30 if b[19] == b'.' => b.len() - 21,
        _ => return None,
    };
    let separators = [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')];
    if b[b.len() - 1] != b'Z' || separators.iter().any(|&(at, byte)| b[at] != byte) {
        return None;
    }
    let number = |digits: &[u8]| {
        digits.iter().try_fold(0u32, |value, &digit| {
            digit
                .is_ascii_digit()
                .then(|| value * 10 + u32::from(digit - b'0'))
        })
    };
    let nanos = number(&b[20..20 + fraction])? * 10u32.pow((9 - fraction) as u32);
    let at_second = match READ_SECOND.try_with(Cell::get) {
        Ok((read, at_second)) if read == b[..19] => at_second,
        _ => {
            let second = number(&b[17..19])?;
            if second > 59 {
                return None;
            }
            let year = i32::try_from(number(&b[0..4])?).ok()?;
            let at_second =
                chrono::NaiveDate::from_ymd_opt(year, number(&b[5..7])?, number(&b[8..10])?)?
                    .and_hms_opt(number(&b[11..13])?, number(&b[14..16])?, second)?;
            let mut read = [0; 19];
            read.copy_from_slice(&b[..19]);
            let _ = READ_SECOND.try_with(|last| last.set((read, at_second)));
            at_second
        }
    };
    // (On the naive time: `DateTime::with_nanosecond` maps through the time zone, ~200
    // instructions.)
    at_second.with_nanosecond(nanos).map(|time| time.and_utc())
}

/// Writes `value`'s lowest decimal digits into `out`, zero-padded to its length.
fn put_digits(out: &mut [u8], mut value: u32) {
    for byte in out.iter_mut().rev() {
        *byte = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

fn describe(message: &Message) -> String {
    format!("message {} on topic {}", message.id, message.topic)
}

fn decode_error(message: &Message, what: String) -> Error {
    Error::new(ErrorKind::Decode, "decode", what).with_resource(describe(message))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `time` as [`rfc3339`] writes it, checked against what chrono writes.
    fn written_as_chrono_writes(time: &DateTime<Utc>) -> Text {
        let written = rfc3339(time);
        assert_eq!(
            written,
            time.to_rfc3339_opts(SecondsFormat::AutoSi, true),
            "{time:?}"
        );
        written
    }

    #[test]
    fn rfc3339_writes_what_chrono_writes() {
        use chrono::TimeZone;
        let mut times = vec![
            Utc.with_ymd_and_hms(2026, 11, 30, 6, 45, 0).unwrap(),
            Utc.with_ymd_and_hms(1, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap(),
            Utc::now(),
        ];
        for nanos in [
            1,
            1_000,
            1_000_000,
            123_000_000,
            123_456_000,
            123_456_789,
            999_999_999,
        ] {
            times.push(times[0] + chrono::Duration::nanoseconds(nanos));
        }
        for _ in 0..2_000 {
            let seconds = fastrand::i64(-62_135_596_800..253_402_300_799);
            let nanos = match fastrand::u8(..4) {
                0 => 0,
                1 => fastrand::u32(..1_000) * 1_000_000,
                2 => fastrand::u32(..1_000_000) * 1_000,
                _ => fastrand::u32(..1_000_000_000),
            };
            times.extend(DateTime::from_timestamp(seconds, nanos));
        }
        // Outside the years 0–9999, and a leap second: chrono's own formatter, or the same.
        times.extend(DateTime::from_timestamp(-70_000_000_000, 5));
        times.extend(DateTime::from_timestamp(300_000_000_000, 0));
        times.extend(
            chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
                .and_then(|d| d.and_hms_nano_opt(23, 59, 59, 1_500_000_000))
                .map(|t| t.and_utc()),
        );
        for time in times {
            let written = written_as_chrono_writes(&time);
            // Read back, by the fast reader where it takes the form, as chrono reads it.
            let chrono = DateTime::parse_from_rfc3339(&written).map(|t| t.with_timezone(&Utc));
            match utc_time(&written) {
                Some(read) => assert_eq!(Ok(read), chrono, "{written}"),
                None => assert!(
                    time.timestamp_subsec_nanos() >= 1_000_000_000
                        || !(0..=9999).contains(&chrono::Datelike::year(&time)),
                    "{written} left to chrono"
                ),
            }
        }
    }

    #[test]
    fn times_of_the_same_and_of_other_seconds_write_and_read_as_chrono_does() {
        use chrono::TimeZone;
        // Each second's date and time are kept once per thread: times in one second, then
        // in the next, then back, across a day, a year and a leap day, each written and read
        // as chrono writes and reads it.
        let starts = [
            Utc.with_ymd_and_hms(2026, 12, 31, 23, 59, 58).unwrap(),
            Utc.with_ymd_and_hms(2028, 2, 28, 23, 59, 59).unwrap(),
            Utc.with_ymd_and_hms(1970, 1, 1, 0, 0, 0).unwrap(),
        ];
        for start in starts {
            let mut times = Vec::new();
            for step in 0..12 {
                times.push(start + chrono::Duration::milliseconds(step * 300));
            }
            times.push(start);
            times.push(start + chrono::Duration::seconds(86_400 * 366));
            times.push(start + chrono::Duration::nanoseconds(7));
            for time in times {
                let written = written_as_chrono_writes(&time);
                assert_eq!(utc_time(&written), Some(time), "{written}");
            }
        }
        // The first and last seconds written in place, and the ones beyond, left to chrono.
        for second in [
            *WRITTEN_SECONDS.start() - 1,
            *WRITTEN_SECONDS.start(),
            *WRITTEN_SECONDS.end(),
            *WRITTEN_SECONDS.end() + 1,
        ] {
            let time = Utc.timestamp_opt(second, 0).unwrap();
            written_as_chrono_writes(&time);
            let year = chrono::Datelike::year(&time);
            assert_eq!(
                WRITTEN_SECONDS.contains(&second),
                (0..=9999).contains(&year),
                "{time:?}"
            );
        }
    }

    #[test]
    fn the_fast_time_reader_reads_as_chrono_or_leaves_it_to_chrono() {
        let good = "2026-12-07T07:01:48.123456Z";
        let mut texts = vec![
            good.to_string(),
            "2026-12-07T07:01:48Z".into(),
            "2026-12-07T07:01:48.1Z".into(),
            "2026-12-07T07:01:48.123+01:00".into(),
            "2026-12-07t07:01:48Z".into(),
            "2026-02-30T07:01:48Z".into(),
            "2026-12-07T24:00:00Z".into(),
            "2016-12-31T23:59:60Z".into(),
            "+2026-12-07T07:01:48Z".into(),
        ];
        // Every single-byte change of a good time.
        for at in 0..good.len() {
            for byte in [b'0', b'9', b'-', b':', b'.', b'T', b'Z', b'a', b' '] {
                let mut text = good.as_bytes().to_vec();
                text[at] = byte;
                texts.extend(String::from_utf8(text).ok());
            }
        }
        for text in texts {
            let chrono = DateTime::parse_from_rfc3339(&text).map(|t| t.with_timezone(&Utc));
            if let Some(read) = utc_time(&text) {
                assert_eq!(Ok(read), chrono, "{text}");
            }
        }
        assert!(utc_time(good).is_some() && utc_time("2016-12-31T23:59:60Z").is_none());
    }

    #[test]
    fn traceparents_are_w3c_and_keep_the_parents_trace() {
        let fresh = new_traceparent(None);
        let parts: Vec<&str> = fresh.split('-').collect();
        assert_eq!(parts.len(), 4, "{fresh}");
        assert_eq!(
            (parts[0], parts[1].len(), parts[2].len(), parts[3]),
            ("00", 32, 16, "01")
        );
        assert!(fresh
            .bytes()
            .all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        let child = new_traceparent(Some(&fresh));
        assert_eq!(&child[..35], &fresh[..35], "the same trace");
        assert_ne!(child, fresh, "a new span id");
        let mut hex = [0u8; 4];
        put_hex(&mut hex, 0xab);
        assert_eq!(&hex, b"00ab");
        let mut hex = [0u8; 32];
        put_hex(&mut hex, 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210);
        assert_eq!(&hex, b"0123456789abcdeffedcba9876543210");
        let mut hex = [0u8; 16];
        put_hex(&mut hex, 0xffff_0000_0000_0000_00f0_0000_0000_000f);
        assert_eq!(&hex, b"00f000000000000f", "the lowest 16 digits");
    }
    use crate::codec::Json;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Note {
        text: String,
        n: i64,
    }
    impl Event for Note {
        const TYPE: &'static str = "test.note.v1";
        fn key(&self) -> Option<Text> {
            Some(Text::from_display(&format_args!("k{}", self.n)))
        }
    }

    fn note() -> Note {
        Note {
            text: "grüße, 世界 🚀 \"quoted\"\n".into(),
            n: -5,
        }
    }

    #[test]
    fn every_field_round_trips_including_unicode_and_many_headers() {
        let mut env = Envelope::new("/svc/ünïcode", note())
            .with_correlation_id("corr-✓")
            .with_causation_id("cause-1")
            .with_key("клавиша");
        env.tracestate = Some("vendor=opaque".into());
        for i in 0..500 {
            env.headers
                .insert(format!("h-{i}-ключ"), format!("value {i} — ✨\ttab"));
        }
        let msg = env.to_message(&Json, "notes").unwrap();
        assert_eq!(msg.id, env.id);
        assert_eq!(msg.topic, "notes");
        assert_eq!(msg.header(attr::SPECVERSION), Some("1.0"));
        let back = Envelope::<Note>::from_message(&Json, &msg).unwrap();
        assert_eq!(back, env);
        assert_eq!(back.headers.len(), 500);
    }

    #[test]
    fn moving_an_envelope_into_a_message_gives_the_same_message_as_copying_it() {
        let mut env = Envelope::new("/svc", note())
            .with_causation_id("cause-1")
            .with_header("tenant", "acme");
        env.tracestate = Some("vendor=opaque".into());
        let copied = env.to_message(&Json, "notes").unwrap();
        let moved = env.clone().into_message(&Json, "notes").unwrap();
        assert_eq!(moved, copied);
        let bad = env.with_header("ce_id", "x");
        assert_eq!(
            bad.into_message(&Json, "t").unwrap_err().kind(),
            ErrorKind::InvalidHeader
        );
    }

    #[test]
    fn absent_optional_attributes_stay_absent() {
        let mut env = Envelope::new("/svc", note());
        env.time = None;
        env.correlation_id = None;
        env.traceparent = None;
        env.key = None;
        let msg = env.to_message(&Json, "notes").unwrap();
        assert!(msg.header(attr::TIME).is_none());
        let back = Envelope::<Note>::from_message(&Json, &msg).unwrap();
        assert_eq!(back, env);
        assert_eq!(back.conversation_id(), back.id);
    }

    #[test]
    fn new_envelope_is_its_own_conversation_with_a_v7_id_and_the_event_key() {
        let env = Envelope::new("/svc", note());
        let id = uuid::Uuid::parse_str(&env.id).unwrap();
        assert_eq!(id.get_version_num(), 7);
        // The id's millisecond is the envelope's time (one clock read for both).
        let (seconds, nanos) = id.get_timestamp().unwrap().to_unix();
        let millis = i64::try_from(seconds * 1000 + u64::from(nanos / 1_000_000)).unwrap();
        assert_eq!(millis, env.time.unwrap().timestamp_millis());
        // Made within the same milliseconds, the ids still differ (74 random bits each).
        let ids: std::collections::HashSet<String> = (0..10_000)
            .map(|_| Envelope::new("/svc", note()).id.to_string())
            .collect();
        assert_eq!(ids.len(), 10_000);
        // The text is the uuid crate's own hyphenated form of the same id, version 7, RFC variant.
        assert_eq!(env.id, id.hyphenated().to_string());
        assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
        assert_eq!(env.correlation_id.as_deref(), Some(env.id.as_str()));
        assert_eq!(env.key.as_deref(), Some("k-5"));
        assert_eq!(env.event_type, "test.note.v1");
    }

    #[test]
    fn reserved_or_malformed_headers_are_rejected_on_encode() {
        for (name, value) in [
            ("ce_type", "x"),
            ("content-type", "x"),
            ("busbar.dlq.reason", "x"),
            ("", "x"),
            ("ok", "bell\u{7}"),
        ] {
            let env = Envelope::new("/svc", note()).with_header(name, value);
            let err = env.to_message(&Json, "t").unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidHeader, "{name:?}: {err}");
        }
        let long = "n".repeat(MAX_HEADER_NAME_LEN + 1);
        let env = Envelope::new("/svc", note()).with_header(long, "v");
        assert!(env.to_message(&Json, "t").is_err());
    }

    /// `headers` as an adapter reads them when one more arrived as the bytes `value`.
    fn received_with(headers: &Headers, name: &str, value: &[u8]) -> Headers {
        let mut received = crate::message::ReceivedHeaders::with_capacity(headers.len() + 1);
        for (known, text) in headers {
            received.text(known.clone(), text.to_owned());
        }
        received.bytes(name, value);
        received.finish()
    }

    #[test]
    fn an_attribute_that_was_not_utf8_makes_the_message_undecodable_but_a_free_header_does_not() {
        let mut msg = Envelope::new("/svc", note())
            .to_message(&Json, "t")
            .unwrap();
        let mut bad_attribute = msg.clone();
        bad_attribute.headers = received_with(&msg.headers, attr::SOURCE, b"/s\xff");
        let err = Envelope::<Note>::from_message(&Json, &bad_attribute).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Decode);
        assert!(
            err.to_string().contains("`ce_source` is not valid UTF-8"),
            "{err}"
        );

        msg.headers = received_with(&msg.headers, "note", b"caf\xe9");
        let env = Envelope::<Note>::from_message(&Json, &msg).unwrap();
        assert_eq!(env.headers.get("note"), Some("caf\u{fffd}"));
        assert_eq!(
            env.headers.get(INVALID_UTF8_HEADERS),
            Some("note"),
            "the handler can tell which value was altered"
        );
    }

    #[test]
    fn more_headers_than_busbar_carries_are_refused_both_ways() {
        let mut msg = Envelope::new("/svc", note())
            .to_message(&Json, "t")
            .unwrap();
        let base = msg.headers.len();
        for n in 0..=(MAX_HEADERS - base) {
            msg.headers.insert(format!("x{n}"), "v");
        }
        assert_eq!(msg.headers.len(), MAX_HEADERS + 1);
        let err = Envelope::<Note>::from_message(&Json, &msg).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Decode);
        assert!(
            err.to_string()
                .contains("1001 headers; busbar reads at most 1000"),
            "{err}"
        );
        let err = msg.check_publishable(usize::MAX, "test").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidHeader);
        assert!(
            err.to_string().contains("busbar carries at most 1000"),
            "{err}"
        );
        msg.headers.remove("x0");
        assert!(Envelope::<Note>::from_message(&Json, &msg).is_ok());
        assert!(msg.check_publishable(usize::MAX, "test").is_ok());
    }

    #[test]
    fn foreign_cloudevent_extensions_are_kept_as_headers() {
        let mut msg = Envelope::new("/svc", note())
            .to_message(&Json, "t")
            .unwrap();
        msg.headers.insert("ce_subject", "order-9");
        let env = Envelope::<Note>::from_message(&Json, &msg).unwrap();
        assert_eq!(env.headers.get("ce_subject"), Some("order-9"));
        let again = env.to_message(&Json, "t").unwrap();
        assert_eq!(again.header("ce_subject"), Some("order-9"));
    }

    #[test]
    fn decode_failures_say_what_is_wrong() {
        let good = Envelope::new("/svc", note())
            .to_message(&Json, "t")
            .unwrap();
        type Mutation = Box<dyn Fn(&mut Message)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (
                Box::new(|m| drop(m.headers.remove(attr::TYPE))),
                "missing CloudEvents attribute `ce_type`",
            ),
            (
                Box::new(|m| drop(m.headers.remove(attr::SPECVERSION))),
                "not a CloudEvent: no `specversion` attribute, and content type `application/json`",
            ),
            (
                Box::new(|m| {
                    m.headers.remove(attr::SPECVERSION);
                    m.headers.remove(attr::CONTENT_TYPE);
                }),
                "not a CloudEvent: no `specversion` attribute and no content type",
            ),
            (
                Box::new(|m| drop(m.headers.insert(attr::SPECVERSION, "0.3"))),
                "specversion \"0.3\"",
            ),
            (
                Box::new(|m| drop(m.headers.insert(attr::TYPE, "other.v1"))),
                "is not handled by this subscription (it handles \"test.note.v1\")",
            ),
            (
                Box::new(|m| drop(m.headers.insert(attr::TIME, "yesterday"))),
                "`time` is not RFC 3339: got `yesterday`",
            ),
            (
                Box::new(|m| drop(m.headers.insert(attr::CONTENT_TYPE, "application/avro"))),
                "not readable",
            ),
            (
                Box::new(|m| m.payload = bytes::Bytes::from_static(b"{\"text\":\"x\"}")),
                "missing field `n`",
            ),
            (
                Box::new(|m| m.payload = bytes::Bytes::from_static(b"\xff\xfe")),
                "not a valid test.note.v1",
            ),
        ];
        for (mutate, expected) in cases {
            let mut msg = good.clone();
            mutate(&mut msg);
            let err = Envelope::<Note>::from_message(&Json, &msg).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Decode);
            assert!(
                err.to_string().contains(expected),
                "expected {expected:?} in {err}"
            );
            assert!(err.to_string().contains(msg.id.as_str()), "{err}");
        }
    }

    #[test]
    fn traceparent_keeps_the_trace_and_makes_a_new_span() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let child = new_traceparent(Some(parent));
        assert!(child.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert_ne!(child, parent);
        assert_eq!(child.len(), parent.len());
        let fresh = new_traceparent(Some("garbage"));
        assert_eq!(fresh.len(), parent.len());
        assert!(!fresh.contains("4bf92f"));
        let shouted = new_traceparent(Some(&parent.to_ascii_uppercase()));
        assert!(
            shouted.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{shouted}"
        );
        for made in [child, fresh, shouted, new_traceparent(None)] {
            let parts: Vec<&str> = made.split('-').collect();
            assert_eq!(parts.len(), 4, "{made}");
            assert_eq!((parts[0], parts[3]), ("00", "01"), "{made}");
            assert_eq!((parts[1].len(), parts[2].len()), (32, 16), "{made}");
            assert!(
                made.bytes()
                    .all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                "{made}"
            );
        }
    }
}
