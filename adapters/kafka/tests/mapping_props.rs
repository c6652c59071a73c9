//! Property tests of the Kafka mapping: what busbar publishes survives headers → record →
//! message exactly; and reading any record a foreign producer can write never panics.

use busbar_core::codec::Json;
use busbar_core::Envelope;
use busbar_kafka::mapping::{from_record, to_headers};
use busbar_testkit::arbitrary::publishable_message;
use busbar_testkit::conformance::Probe;
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};

fn record(
    payload: Option<Vec<u8>>,
    key: Option<Vec<u8>>,
    headers: Option<OwnedHeaders>,
) -> OwnedMessage {
    OwnedMessage::new(
        payload,
        key,
        "wire-topic".into(),
        Timestamp::NotAvailable,
        3,
        42,
        headers,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn what_busbar_publishes_survives_the_record(message in publishable_message()) {
        let headers = to_headers(&message);
        let wire = record(
            Some(message.payload.to_vec()),
            message.key.as_ref().map(|k| k.as_bytes().to_vec()),
            Some(headers),
        );
        prop_assert_eq!(from_record("topic", &wire), message);
    }

    #[test]
    fn reading_any_record_never_panics(
        payload in option::of(vec(any::<u8>(), 0..200)),
        key in option::of(vec(any::<u8>(), 0..40)),
        headers in option::of(vec(
            (
                prop_oneof![Just("ce_id".to_string()), Just("busbar.id".to_string()), Just("ce_type".to_string()), any::<String>()],
                option::of(vec(any::<u8>(), 0..60)),
            ),
            0..12,
        )),
    ) {
        let headers = headers.map(|list| {
            list.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
                h.insert(Header { key: k.as_str(), value: v.as_deref() })
            })
        });
        let message = from_record("topic", &record(payload, key, headers));
        prop_assert!(!message.id.is_empty());
        let _ = Envelope::<Probe>::from_message(&Json, &message);
    }
}
