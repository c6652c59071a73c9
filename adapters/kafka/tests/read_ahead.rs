//! The consumer's reader stops reading ahead once enough messages wait behind keys being
//! handled (records read far ahead are cold in the caches by the time they are handled), but
//! messages waiting behind a key stalled in retries do not count: such a key never holds back
//! the other keys' messages that follow it in the log.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use busbar_core::{Bus, Context, Envelope, HandlerError, RetryPolicy};
use busbar_kafka::KafkaTransport;
use busbar_testkit::conformance::{lock, probe, reachable, unique, wait_for, Probe};

/// Messages of the stalled key behind its first: more than the reader's read-ahead limit
/// (64 at the subscription's in-flight limit of 2).
const FOLLOWERS: u64 = 200;
/// Messages of other keys after them in the log.
const OTHERS: u64 = 20;
/// The wait before the stalled key's first message is tried again: far longer than reading
/// and handling the others takes.
const RETRY_AFTER: Duration = Duration::from_secs(6);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_stalled_in_retries_does_not_hold_back_the_keys_behind_it() {
    // One partition, so that the other keys' messages come after the stalled key's in the log.
    let url = std::env::var("BUSBAR_KAFKA_URL")
        .unwrap_or_else(|_| "kafka://127.0.0.1:9092?session_timeout_ms=6000".into());
    let url = format!(
        "{url}{}partitions=1",
        if url.contains('?') { '&' } else { '?' }
    );
    let Some(transport) = reachable(KafkaTransport::connect(&url.parse().unwrap()).await) else {
        return;
    };
    let bus = Bus::builder(Arc::new(transport))
        .source("/busbar/tests/read-ahead")
        .retry(
            RetryPolicy::exponential(2)
                .with_initial_backoff(RETRY_AFTER)
                .with_jitter(0.0),
        )
        .build();
    let (topic, group) = (unique("bb-read-ahead"), unique("g"));
    bus.declare(&topic, &group).await.unwrap();
    let stalled = (0..=FOLLOWERS).map(|seq| probe(seq, "stalled"));
    let others = (1..=OTHERS).map(|i| probe(FOLLOWERS + i, &format!("other-{i}")));
    bus.publish_batch(&topic, stalled.chain(others).collect::<Vec<Probe>>())
        .await
        .unwrap();

    // (seq, attempt) of every handling, in order.
    let handled: Arc<Mutex<Vec<(u64, u32)>>> = Arc::default();
    let seen = Arc::clone(&handled);
    let subscription = bus
        .subscribe::<Probe>(&topic, &group)
        .concurrency(1)
        .max_in_flight(2)
        .start(move |event: Envelope<Probe>, context: Context| {
            let (seq, attempt) = (event.payload.seq, context.attempt());
            lock(&seen).push((seq, attempt));
            async move {
                if seq == 0 && attempt == 1 {
                    return Err(HandlerError::transient("the stalled key's first attempt"));
                }
                Ok(())
            }
        })
        .await
        .unwrap();

    let others_handled =
        |handled: &[(u64, u32)]| handled.iter().filter(|(seq, _)| *seq > FOLLOWERS).count();
    wait_for("the other keys' messages to be handled", || {
        others_handled(&lock(&handled)) == OTHERS as usize
    })
    .await;
    let stalled_so_far: Vec<(u64, u32)> = lock(&handled)
        .iter()
        .copied()
        .filter(|(seq, _)| *seq <= FOLLOWERS)
        .collect();
    assert!(
        stalled_so_far == [(0, 1)],
        "the other keys are handled while the stalled key waits for its retry, and nothing of \
         the stalled key runs meanwhile; its handlings by then: {:?}…",
        &stalled_so_far[..stalled_so_far.len().min(4)]
    );

    // Then the stalled key goes on, in order.
    wait_for("the stalled key's messages to be handled", || {
        lock(&handled).len() == (1 + FOLLOWERS + 1 + OTHERS) as usize
    })
    .await;
    let stalled: Vec<u64> = lock(&handled)
        .iter()
        .filter(|(seq, _)| *seq <= FOLLOWERS)
        .map(|(seq, _)| *seq)
        .collect();
    let expected: Vec<u64> = std::iter::once(0).chain(0..=FOLLOWERS).collect();
    assert_eq!(
        stalled, expected,
        "the stalled key's messages kept their order"
    );
    subscription
        .shutdown(Duration::from_secs(10))
        .await
        .unwrap();
}
