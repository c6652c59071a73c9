//! Property tests of the SQS mapping: what busbar publishes survives pack → unpack exactly,
//! within SQS's rules (at most 10 attributes, no empty values, only characters SQS accepts);
//! and unpacking anything a foreign producer can send never panics.

use std::collections::BTreeMap;

use busbar_core::codec::Json;
use busbar_core::Envelope;
use busbar_sqs::mapping::{pack, sqs_text, unpack, ENCODING, ID, KEY, PACKED};
use busbar_testkit::arbitrary::publishable_message;
use busbar_testkit::conformance::Probe;
use proptest::collection::btree_map;
use proptest::prelude::*;

/// Attribute names a foreign producer might send, busbar's own included.
fn attribute_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(PACKED.to_string()),
        Just(ENCODING.to_string()),
        Just(KEY.to_string()),
        Just(ID.to_string()),
        Just("ce_id".to_string()),
        Just("ce_type".to_string()),
        Just("ce_time".to_string()),
        Just("ce_specversion".to_string()),
        Just("ce_correlationid".to_string()),
        Just("ce_traceparent".to_string()),
        Just("content-type".to_string()),
        any::<String>(),
    ]
}

/// Attribute values: garbage, JSON objects (for the packed attribute) and `base64`.
fn attribute_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        Just("base64".to_string()),
        btree_map(any::<String>(), any::<String>(), 0..4)
            .prop_map(|m| serde_json::to_string(&m).unwrap_or_default()),
        Just("{\"not\": [\"strings\"]}".to_string()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn what_busbar_publishes_survives_pack_and_unpack(message in publishable_message()) {
        let packed = pack(&message).unwrap();
        prop_assert!(packed.attributes.len() <= 10, "{:?}", packed.attributes.keys());
        prop_assert!(packed.attributes.values().all(|v| !v.is_empty() && sqs_text(v)));
        prop_assert!(!packed.body.is_empty() && sqs_text(&packed.body));
        let back = unpack("topic", &packed.body, packed.attributes.clone(), "sqs-id");
        prop_assert_eq!(back, message);
    }

    #[test]
    fn unpacking_anything_never_panics(
        body in any::<String>(),
        attributes in btree_map(attribute_name(), attribute_value(), 0..12),
        fallback_id in any::<String>(),
    ) {
        let message = unpack("topic", &body, attributes.clone(), &fallback_id);
        prop_assert!(!message.id.is_empty() || fallback_id.is_empty());
        // Decoding may fail (with a typed error), but never panics.
        let _ = Envelope::<Probe>::from_message(&Json, &message);
    }
}

#[test]
fn characters_sqs_refuses_are_escaped_not_sent() {
    let mut message = busbar_core::Message::new("id\u{1}", "t", "body\u{0}".as_bytes().to_vec());
    message.key = Some("key\u{fffe}".into());
    message.headers.insert("ce_source", "/src\u{8}");
    let packed = pack(&message).unwrap();
    assert!(
        packed.attributes.values().all(|v| sqs_text(v)),
        "{packed:?}"
    );
    assert!(sqs_text(&packed.body));
    assert_eq!(
        unpack("t", &packed.body, packed.attributes.clone(), "x"),
        message,
        "{packed:?}"
    );
    let _: BTreeMap<String, String> = packed.attributes;
}
