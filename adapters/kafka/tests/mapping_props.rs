//! Property tests of the Kafka mapping: what busbar publishes survives headers → record →
//! message exactly; the key also travels as the `ce_partitionkey` attribute, and a keyless
//! record takes its key from it; the structured-mode form of a message reads as the message;
//! and reading any record a foreign producer can write never panics.

use busbar_core::codec::Json;
use busbar_core::structured::{canonical_binary, from_structured};
use busbar_core::Envelope;
use busbar_kafka::mapping::{from_record, to_headers, PARTITION_KEY};
use busbar_testkit::arbitrary::publishable_message;
use busbar_testkit::conformance::Probe;
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage, Timestamp};

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
    fn the_key_travels_as_the_partitionkey_attribute_too(message in publishable_message()) {
        let headers = to_headers(&message);
        let attribute = headers
            .iter()
            .find(|h| h.key == PARTITION_KEY)
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned());
        prop_assert_eq!(attribute.as_deref(), message.key.as_deref());
        // A foreign producer that sets only the attribute, no record key: the same message.
        let wire = record(Some(message.payload.to_vec()), None, Some(headers));
        prop_assert_eq!(from_record("topic", &wire), message);
    }

    #[test]
    fn the_structured_form_of_a_message_reads_as_the_message(message in publishable_message()) {
        let mut event = serde_json::Map::new();
        let mut wire_headers = OwnedHeaders::new().insert(Header {
            key: "content-type",
            value: Some("application/cloudevents+json; charset=utf-8"),
        });
        for (name, value) in &message.headers {
            if let Some(attribute) = name.as_str().strip_prefix("ce_") {
                event.insert(attribute.to_string(), value.into());
            } else if name.as_str() == "content-type" {
                event.insert("datacontenttype".into(), value.into());
            } else {
                wire_headers = wire_headers.insert(Header { key: name.as_str(), value: Some(value) });
            }
        }
        event.insert("data_base64".into(), canonical_binary(&message.payload).into());
        let wire = record(
            Some(serde_json::to_vec(&event).unwrap()),
            message.key.as_ref().map(|k| k.as_bytes().to_vec()),
            Some(wire_headers),
        );
        let binary = from_structured(&from_record("topic", &wire)).unwrap().unwrap();
        prop_assert_eq!(binary, message);
    }

    #[test]
    fn reading_any_record_never_panics(
        payload in option::of(vec(any::<u8>(), 0..200)),
        key in option::of(vec(any::<u8>(), 0..40)),
        headers in option::of(vec(
            (
                prop_oneof![
                    Just("ce_id".to_string()),
                    Just("busbar.id".to_string()),
                    Just("ce_type".to_string()),
                    Just("ce_partitionkey".to_string()),
                    Just("content-type".to_string()),
                    any::<String>(),
                ],
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
        let _ = from_structured(&message);
        let _ = Envelope::<Probe>::from_message(&Json, &message);
    }
}
