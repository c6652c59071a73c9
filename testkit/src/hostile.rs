//! Foreign and hostile input: messages written by something other than busbar (an adapter's
//! test sends them with the raw client) must each end in the dead-letter queue with a reason a
//! person understands, while the consumer keeps running.
//!
//! Each case carries its label in the header [`CASE_HEADER`], so its dead letter can be found
//! whatever happened to its id. Headers use busbar's neutral names (`ce_*`, `content-type`); the
//! adapter's test writes them the way its wire format does.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use busbar_core::envelope::attr;
use busbar_core::{Bus, DeadLetterReason, Event, Transport};

use crate::conformance::{unique, wait_for, wait_limit, Ledger, Probe};

/// The header naming a case.
pub const CASE_HEADER: &str = "hostile-case";

/// One foreign message.
#[derive(Debug, Clone)]
pub struct HostileCase {
    /// What is wrong with it (also its [`CASE_HEADER`]).
    pub label: &'static str,
    /// Its headers, with neutral names, [`CASE_HEADER`] included.
    pub headers: BTreeMap<String, String>,
    /// Headers whose values are bytes that are not UTF-8 (an AMQP long string, a Kafka header
    /// value, an SQS `Binary` attribute); empty in most cases.
    pub binary_headers: BTreeMap<String, Vec<u8>>,
    /// Its body.
    pub payload: Vec<u8>,
    /// Text its dead letter's error must contain.
    pub expect: &'static str,
    /// Its dead letter's reason: `undecodable`, or `unknown_type` for a readable event of a
    /// type the subscription does not handle.
    pub reason: DeadLetterReason,
}

fn case(
    label: &'static str,
    headers: &[(&str, &str)],
    payload: &[u8],
    expect: &'static str,
) -> HostileCase {
    let mut map: BTreeMap<String, String> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    map.insert(CASE_HEADER.to_string(), label.to_string());
    HostileCase {
        label,
        headers: map,
        binary_headers: BTreeMap::new(),
        payload: payload.to_vec(),
        expect,
        reason: DeadLetterReason::Undecodable,
    }
}

/// How many headers the `many-headers` case carries.
pub const MANY_HEADERS: usize = 10_000;

/// The cases: a body that is not JSON, JSON of the wrong shape, an empty body, no envelope
/// headers at all, a structured-mode batch and a structured event that is not JSON, garbage
/// envelope headers (specversion, time, content type), an event of
/// another type than the subscription's, a CloudEvents attribute that is not UTF-8, a map of
/// [`MANY_HEADERS`] headers and, when the transport has a size limit (`max_message_bytes`), a
/// message 1 KiB larger than it.
pub fn cases(max_message_bytes: Option<usize>) -> Vec<HostileCase> {
    let good = |id: &'static str| -> Vec<(&'static str, &'static str)> {
        vec![
            (attr::SPECVERSION, "1.0"),
            (attr::ID, id),
            (attr::SOURCE, "/foreign/producer"),
            (attr::TYPE, Probe::TYPE),
            (attr::CONTENT_TYPE, "application/json"),
        ]
    };
    let with = |id: &'static str, name: &'static str, value: &'static str| {
        let mut headers = good(id);
        headers.retain(|(n, _)| *n != name);
        headers.push((name, value));
        headers
    };
    let body = br#"{"seq": 1, "key": "", "note": ""}"#;
    let mut not_utf8 = case(
        "invalid-utf8-attribute",
        &good("h-9")
            .into_iter()
            .filter(|(n, _)| *n != attr::SOURCE)
            .collect::<Vec<_>>(),
        body,
        "`ce_source` is not valid UTF-8",
    );
    not_utf8
        .binary_headers
        .insert(attr::SOURCE.to_string(), b"/foreign/\xff\xfe".to_vec());
    let mut many = case(
        "many-headers",
        &good("h-10"),
        body,
        "headers; busbar reads at most",
    );
    for n in 0..MANY_HEADERS {
        many.headers.insert(format!("x{n:04}"), "v".to_string());
    }
    let oversize = max_message_bytes.map(|max| {
        let note = "x".repeat(max + 1024);
        let body = format!(r#"{{"seq": 1, "key": "", "note": "{note}"}}"#);
        case(
            "oversize",
            &good("h-11"),
            body.as_bytes(),
            "bytes, more than the",
        )
    });
    let mut all =
        vec![
        not_utf8,
        many,
        case("not-json", &good("h-1"), b"this is not JSON", Probe::TYPE),
        case("wrong-shape", &good("h-2"), br#"{"seq": "seven"}"#, "seq"),
        case("empty-body", &good("h-3"), b"", Probe::TYPE),
        case("no-envelope", &[], body, "not a CloudEvent: no `specversion`"),
        case(
            "structured-batch",
            &[(attr::CONTENT_TYPE, "application/cloudevents-batch+json")],
            br#"[{"specversion": "1.0", "id": "h-12", "source": "/f", "type": "test.probe.v1"}]"#,
            "a batch of CloudEvents",
        ),
        case(
            "structured-not-json",
            &[(attr::CONTENT_TYPE, "application/cloudevents+json; charset=utf-8")],
            b"<event/>",
            "is not a JSON object",
        ),
        case(
            "bad-specversion",
            &with("h-5", attr::SPECVERSION, "banana"),
            body,
            "specversion",
        ),
        case(
            "bad-time",
            &with("h-6", attr::TIME, "yesterday"),
            body,
            "RFC 3339",
        ),
        case(
            "bad-content-type",
            &with("h-7", attr::CONTENT_TYPE, "application/x-pickle"),
            body,
            "content type",
        ),
        HostileCase {
            reason: DeadLetterReason::UnknownType,
            ..case(
                "wrong-type",
                &with("h-8", attr::TYPE, "someone.else.v1"),
                body,
                "\"someone.else.v1\" is not handled by this subscription",
            )
        },
    ];
    all.extend(oversize);
    all
}

/// Subscribes to a fresh topic and group with a [`Probe`] handler, has `send` write every
/// case but those labelled in `except` (what the broker itself refuses) to the topic with the
/// raw client, then publishes a good probe through busbar. Checks
/// the good one is handled (the consumer kept running), and that every case is in the
/// dead-letter queue with its reason (`undecodable`, or `unknown_type` for the event of another
/// type) and an error containing its expected text.
pub async fn foreign_messages_are_dead_lettered_clearly<F, Fut>(
    transport: Arc<dyn Transport>,
    except: &[&str],
    send: F,
) where
    F: FnOnce(String, Vec<HostileCase>) -> Fut,
    Fut: Future<Output = ()>,
{
    let bus = Bus::builder(transport).build();
    let (topic, group) = (unique("hostile"), unique("g"));
    bus.declare(&topic, &group).await.expect("declare");
    let ledger = Ledger::default();
    let sub = bus
        .subscribe::<Probe>(&topic, &group)
        .start(ledger.handler())
        .await
        .expect("subscribe");
    let cases: Vec<HostileCase> = cases(bus.capabilities().max_message_bytes)
        .into_iter()
        .filter(|c| !except.contains(&c.label))
        .collect();
    send(topic.clone(), cases.clone()).await;
    let good = bus
        .publish(&topic, crate::conformance::probe(7, ""))
        .await
        .expect("publish");
    wait_for("the good message after the hostile ones is handled", || {
        ledger.distinct().contains(&good)
    })
    .await;

    let deadline = tokio::time::Instant::now() + wait_limit();
    let dead = loop {
        let dead = bus
            .dead_letters(&topic, &group, usize::MAX)
            .await
            .expect("list dead letters");
        if dead.len() >= cases.len() || tokio::time::Instant::now() > deadline {
            break dead;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut problems = Vec::new();
    for case in &cases {
        let found: Vec<_> = dead
            .iter()
            .filter(|d| d.message.header(CASE_HEADER) == Some(case.label))
            .collect();
        match found.as_slice() {
            [one] => {
                if one.info.reason != case.reason {
                    problems.push(format!("{}: reason {}", case.label, one.info.reason));
                }
                if !one.info.error.contains(case.expect) {
                    problems.push(format!(
                        "{}: the error {:?} does not say {:?}",
                        case.label, one.info.error, case.expect
                    ));
                }
                if one.message.payload.as_ref() != case.payload.as_slice() {
                    problems.push(format!("{}: the body changed", case.label));
                }
            }
            other => problems.push(format!(
                "{}: {} dead letters (expected 1)",
                case.label,
                other.len()
            )),
        }
    }
    let stats = sub.stats();
    let _ = sub.shutdown(Duration::from_secs(10)).await;
    assert!(
        problems.is_empty(),
        "{problems:#?}\ndead letters: {:#?}",
        dead.iter()
            .map(|d| (d.message.header(CASE_HEADER), &d.info.reason, &d.info.error))
            .collect::<Vec<_>>()
    );
    assert_eq!(stats.panics, 0);
    assert_eq!(stats.dead_lettered, cases.len() as u64, "{stats:?}");
}
