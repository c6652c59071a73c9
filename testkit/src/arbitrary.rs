//! [`proptest`](mod@proptest) strategies for property tests of an adapter's message mapping (feature
//! `proptest`): messages busbar itself would publish, with every envelope field and free-form
//! header drawn at random, and any payload bytes.
//!
//! ```
//! use busbar_testkit::arbitrary::publishable_message;
//! use proptest::prelude::*;
//!
//! proptest!(|(message in publishable_message())| {
//!     // encode with the adapter's mapping, decode, compare
//!     prop_assert!(!message.id.is_empty());
//! });
//! ```

use busbar_core::codec::Json;
use busbar_core::envelope::validate_header;
use busbar_core::{Envelope, Message};
use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;

use crate::conformance::{probe, Probe};

/// Header names busbar accepts for free-form headers (those it refuses are filtered out).
pub fn header_name() -> impl Strategy<Value = String> {
    "[a-zA-Z][a-zA-Z0-9_.-]{0,30}".prop_filter("busbar accepts the name", |name| {
        validate_header(name, "v").is_ok()
    })
}

/// Any text, with the characters brokers trip over (NUL, controls, U+FFFE/U+FFFF, quotes,
/// backslashes, astral-plane characters) far more often than uniform sampling would give.
pub fn any_text() -> impl Strategy<Value = String> {
    let awkward = prop_oneof![
        Just('\0'),
        Just('\u{1}'),
        Just('\u{8}'),
        Just('\n'),
        Just('"'),
        Just('\\'),
        Just('\u{fffe}'),
        Just('\u{ffff}'),
        Just('\u{1f600}'),
        Just('é'),
    ];
    prop_oneof![
        any::<String>(),
        vec(prop_oneof![any::<char>(), awkward], 0..24).prop_map(String::from_iter),
    ]
}

/// Non-empty text (see [`any_text`]).
pub fn some_text() -> impl Strategy<Value = String> {
    any_text().prop_filter("not empty", |s| !s.is_empty())
}

/// A message as [`Envelope::to_message`] makes it, with random source, key, correlation,
/// causation and free-form headers, and (half the time) a payload of arbitrary bytes in place
/// of the JSON, as a foreign or binary producer would send.
pub fn publishable_message() -> impl Strategy<Value = Message> {
    (
        some_text(),
        option::of(any_text()),
        option::of(some_text()),
        option::of(some_text()),
        btree_map(header_name(), any_text(), 0..12),
        option::of(vec(any::<u8>(), 0..300)),
        any::<u64>(),
    )
        .prop_filter_map(
            "busbar accepts every header value",
            |(source, key, correlation, causation, headers, payload, seq)| {
                let mut envelope = Envelope::<Probe>::new(source, probe(seq, "k"));
                if let Some(key) = key {
                    envelope = envelope.with_key(key);
                }
                if let Some(correlation) = correlation {
                    envelope = envelope.with_correlation_id(correlation);
                }
                if let Some(causation) = causation {
                    envelope = envelope.with_causation_id(causation);
                }
                for (name, value) in headers {
                    envelope = envelope.with_header(name, value);
                }
                let mut message = envelope.to_message(&Json, "topic").ok()?;
                if let Some(payload) = payload {
                    message.payload = payload.into();
                }
                Some(message)
            },
        )
}
