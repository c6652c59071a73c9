//! Property tests of the AMQP mapping: what busbar publishes survives properties → message
//! exactly; and reading any headers a foreign producer can send never panics.

use busbar_core::codec::Json;
use busbar_core::Envelope;
use busbar_rabbitmq::mapping::{from_amqp, to_amqp};
use busbar_testkit::arbitrary::publishable_message;
use busbar_testkit::conformance::Probe;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

/// AMQP field values of every common type, nested arrays included.
fn amqp_value() -> impl Strategy<Value = AMQPValue> {
    let leaf = prop_oneof![
        any::<String>().prop_map(|s| AMQPValue::LongString(LongString::from(s))),
        vec(any::<u8>(), 0..40).prop_map(|b| AMQPValue::LongString(LongString::from(b))),
        any::<bool>().prop_map(AMQPValue::Boolean),
        any::<i64>().prop_map(AMQPValue::LongLongInt),
        any::<i32>().prop_map(AMQPValue::LongInt),
        any::<f64>().prop_map(AMQPValue::Double),
        any::<u64>().prop_map(AMQPValue::Timestamp),
        vec(any::<u8>(), 0..40).prop_map(|b| AMQPValue::ByteArray(b.into())),
        Just(AMQPValue::Void),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        vec(inner, 0..4).prop_map(|items| AMQPValue::FieldArray(FieldArray::from(items)))
    })
}

fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("cloudEvents:id".to_string()),
        Just("cloudEvents_type".to_string()),
        Just("cloudEvents:partitionkey".to_string()),
        Just("cloudEvents:time".to_string()),
        Just("cloudEvents_time".to_string()),
        Just("busbar.attempt".to_string()),
        Just("x-delivery-count".to_string()),
        Just("x-death".to_string()),
        "[ -~]{1,40}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn what_busbar_publishes_survives_the_amqp_properties(message in publishable_message()) {
        let properties = to_amqp(&message, None).unwrap();
        let (back, attempt) = from_amqp("topic", &properties, message.payload.to_vec(), false);
        prop_assert_eq!(attempt, 1);
        prop_assert_eq!(back, message);
    }

    #[test]
    fn reading_any_headers_never_panics(
        headers in vec((header_name(), amqp_value()), 0..12),
        content_type in option::of("[ -~]{0,40}"),
        message_id in option::of("[ -~]{0,40}"),
        payload in vec(any::<u8>(), 0..200),
        redelivered in any::<bool>(),
    ) {
        let mut table = FieldTable::default();
        for (name, value) in headers {
            table.insert(ShortString::from(name), value);
        }
        let mut properties = BasicProperties::default().with_headers(table);
        if let Some(content_type) = content_type {
            properties = properties.with_content_type(ShortString::from(content_type));
        }
        if let Some(id) = message_id {
            properties = properties.with_message_id(ShortString::from(id));
        }
        let (message, attempt) = from_amqp("topic", &properties, payload, redelivered);
        prop_assert!(attempt >= 1);
        let _ = busbar_core::structured::from_structured(&message);
        let _ = Envelope::<Probe>::from_message(&Json, &message);
    }

    /// The binding's native AMQP types, under either prefix, read as the canonical strings.
    #[test]
    fn native_typed_attributes_read_as_their_canonical_strings(
        seconds in 0u64..253_402_300_799,
        bytes in vec(any::<u8>(), 0..40),
        n in any::<i64>(),
        flag in any::<bool>(),
        prefix in prop_oneof![Just("cloudEvents:"), Just("cloudEvents_")],
    ) {
        let mut table = FieldTable::default();
        table.insert(format!("{prefix}time").into(), AMQPValue::Timestamp(seconds));
        table.insert(format!("{prefix}sig").into(), AMQPValue::ByteArray(bytes.clone().into()));
        table.insert(format!("{prefix}n").into(), AMQPValue::LongLongInt(n));
        table.insert(format!("{prefix}flag").into(), AMQPValue::Boolean(flag));
        let properties = BasicProperties::default().with_headers(table);
        let (message, _) = from_amqp("topic", &properties, Vec::new(), false);
        let time = chrono::DateTime::parse_from_rfc3339(message.header("ce_time").unwrap()).unwrap();
        prop_assert_eq!(u64::try_from(time.timestamp()).unwrap(), seconds);
        prop_assert_eq!(
            message.header("ce_sig").unwrap(),
            busbar_core::structured::canonical_binary(&bytes)
        );
        prop_assert_eq!(message.header("ce_n").unwrap().parse::<i64>().unwrap(), n);
        prop_assert_eq!(message.header("ce_flag").unwrap().parse::<bool>().unwrap(), flag);
    }
}
