//! Envelope: correlation, headers and size limits survive the trip.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use busbar_core::codec::Json;
use busbar_core::Text;
use busbar_core::{Context, Envelope, ErrorKind};

use super::{claims, lock, probe, unique, wait_for, Echo, Harness, Ledger, Probe};

const GRACE: Duration = Duration::from_secs(10);

/// An event published from inside a handler keeps the conversation (correlation id) and names
/// the handled event as its cause.
pub async fn correlation_and_causation_propagate_through_a_handler(h: Harness) {
    let Some(bus) = h.bus().await else { return };
    let (first, second, group) = (unique("corr-a"), unique("corr-b"), unique("g"));
    let echo_topic = second.clone();
    let relay = bus
        .subscribe::<Probe>(&first, &group)
        .start(move |env: Envelope<Probe>, ctx: Context| {
            let topic = echo_topic.clone();
            async move {
                ctx.publish(
                    &topic,
                    Echo {
                        seq: env.payload.seq,
                    },
                )
                .await?;
                Ok(())
            }
        })
        .await
        .expect("subscribe relay");
    let echoes = Arc::new(Mutex::new(Vec::<Envelope<Echo>>::new()));
    let keep = Arc::clone(&echoes);
    let sink = bus
        .subscribe::<Echo>(&second, &group)
        .start(move |env: Envelope<Echo>, _ctx: Context| {
            lock(&keep).push(env);
            async { Ok(()) }
        })
        .await
        .expect("subscribe sink");
    let original = bus
        .envelope(probe(5, ""))
        .with_correlation_id("conversation-42");
    bus.publish_envelope(&first, &original)
        .await
        .expect("publish");
    wait_for("the echo arrived", || !lock(&echoes).is_empty()).await;
    let echo = lock(&echoes)[0].clone();
    assert_eq!(echo.payload.seq, 5);
    assert_eq!(
        echo.correlation_id.as_deref(),
        Some("conversation-42"),
        "correlation lost"
    );
    assert_eq!(
        echo.causation_id.as_deref(),
        Some(original.id.as_str()),
        "causation must be the handled id"
    );
    assert_ne!(echo.id, original.id);
    let trace = |tp: &Option<Text>| {
        tp.as_deref()
            .and_then(|t| t.split('-').nth(1))
            .map(str::to_string)
    };
    assert_eq!(
        trace(&echo.traceparent),
        trace(&original.traceparent),
        "the trace id must carry over"
    );
    for s in [relay, sink] {
        let _ = s.shutdown(GRACE).await;
    }
}

/// Twenty custom headers, with non-ASCII names and values, arrive unchanged.
pub async fn custom_headers_survive(h: Harness) {
    let Some(bus) = h.bus().await else { return };
    let (topic, group) = (unique("headers"), unique("g"));
    let ledger = Ledger::default();
    let sub = bus
        .subscribe::<Probe>(&topic, &group)
        .start(ledger.handler())
        .await
        .expect("subscribe");
    let mut envelope = bus.envelope(probe(1, "k"));
    let mut expected = HashMap::new();
    for i in 0..20 {
        let (name, value) = (
            format!("x-header-{i}-ñ"),
            format!("value {i}: grüße ✓ \"quoted\" = ; , tab\there"),
        );
        envelope = envelope.with_header(name.clone(), value.clone());
        expected.insert(name, value);
    }
    bus.publish_envelope(&topic, &envelope)
        .await
        .expect("publish");
    wait_for("delivered", || !ledger.is_empty()).await;
    let received = &ledger.envelopes()[0];
    for (name, value) in &expected {
        assert_eq!(
            received.headers.get(name.as_str()),
            Some(value.as_str()),
            "header {name} changed or lost"
        );
    }
    assert_eq!(
        received.headers.len(),
        expected.len(),
        "unexpected extra headers: {:?}",
        received.headers
    );
    let _ = sub.shutdown(GRACE).await;
}

/// A message of exactly the transport's maximum size round-trips; one byte more is a
/// `PayloadTooLarge` error and nothing is delivered.
pub async fn largest_allowed_message_round_trips_and_larger_is_rejected(h: Harness) {
    let Some(bus) = h.bus().await else { return };
    let caps = bus.capabilities();
    let Some(max) = caps.max_message_bytes else {
        claims(&caps, false, "max_message_bytes");
        return;
    };
    let (topic, group) = (unique("size"), unique("g"));
    let ledger = Ledger::default();
    let sub = bus
        .subscribe::<Probe>(&topic, &group)
        .start(ledger.handler())
        .await
        .expect("subscribe");
    // The size of this very envelope with an empty note; each ASCII note byte adds one byte.
    let sized = |len: usize| {
        let mut envelope = bus.envelope(probe(1, ""));
        let base = envelope
            .to_message(&Json, &topic)
            .expect("encode")
            .wire_size();
        envelope.payload.note = "x".repeat(len.saturating_sub(base));
        envelope
    };
    let too_big = sized(max + 1);
    let err = bus
        .publish_envelope(&topic, &too_big)
        .await
        .expect_err("a message over the limit must be refused");
    assert_eq!(err.kind(), ErrorKind::PayloadTooLarge, "{err}");
    assert!(
        err.to_string().contains(too_big.id.as_str()),
        "the error should name the message: {err}"
    );
    let largest = sized(max);
    assert_eq!(
        largest
            .to_message(&Json, &topic)
            .expect("encode")
            .wire_size(),
        max
    );
    bus.publish_envelope(&topic, &largest)
        .await
        .expect("the largest allowed message is accepted");
    wait_for("the largest message delivered", || !ledger.is_empty()).await;
    let received = ledger.envelopes();
    assert_eq!(received.len(), 1, "only the accepted message may arrive");
    assert_eq!(received[0].payload.note.len(), largest.payload.note.len());
    let _ = sub.shutdown(GRACE).await;
}
