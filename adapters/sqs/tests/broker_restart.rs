//! LocalStack stopped and started again under a running bus (`scripts/local-brokers.sh
//! sqs-restart`). LocalStack's community build keeps no state, so it comes back empty: what is
//! tested is the client side. Publishes during the outage fail with a clear, typed error (never
//! a silent success); once the topology is declared again, publishing works, and the same
//! subscription, never restarted, handles everything published after the recovery.
//!
//! It restarts the shared local LocalStack, so it lives alone in this test binary (cargo runs
//! test binaries one after another) and is skipped unless brokers are required or
//! `BUSBAR_RESTART_TESTS=1`.

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use busbar_core::{Bus, Context, Envelope, ErrorKind, Event, HandlerError, RetryPolicy};
use busbar_sqs::SqsTransport;
use busbar_testkit::conformance::{brokers_required, unique};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Tick {
    seq: u64,
}
impl Event for Tick {
    const TYPE: &'static str = "test.tick.v1";
}

const URL: &str = "sqs://?endpoint=http://127.0.0.1:4566&region=us-east-1&access_key_id=test&secret_access_key=test&wait_time_s=1&visibility_timeout_s=5&mode=queue";

fn restart_localstack() {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../scripts/local-brokers.sh"
    );
    let status = Command::new("bash")
        .args([script, "sqs-restart"])
        .status()
        .expect("the broker script runs");
    assert!(status.success(), "local-brokers.sh sqs-restart failed");
}

async fn publish_all(bus: &Bus, topic: &str, seqs: std::ops::Range<u64>) -> Vec<String> {
    let mut ids = Vec::new();
    let all: Vec<Tick> = seqs.map(|seq| Tick { seq }).collect();
    for batch in all.chunks(10) {
        ids.extend(
            bus.publish_batch(topic, batch.to_vec())
                .await
                .expect("publish"),
        );
    }
    ids
}

async fn wait_handled(handled: &Mutex<HashMap<String, u32>>, ids: &[String], what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let missing = {
            let handled = handled.lock().unwrap();
            ids.iter().filter(|id| !handled.contains_key(*id)).count()
        };
        if missing == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{missing} of the {} messages {what} were never handled",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bus_recovers_from_a_broker_restart_by_itself() {
    if !brokers_required() && std::env::var("BUSBAR_RESTART_TESTS").is_err() {
        eprintln!("SKIPPED: restarts the local LocalStack; set CI=true or BUSBAR_RESTART_TESTS=1");
        return;
    }
    let transport = SqsTransport::connect(&URL.parse().unwrap())
        .await
        .expect("LocalStack reachable");
    let bus = Bus::builder(Arc::new(transport))
        .retry(
            RetryPolicy::exponential(8)
                .with_initial_backoff(Duration::from_millis(100))
                .with_max_backoff(Duration::from_secs(1)),
        )
        .build();
    let (topic, group) = (unique("restart"), unique("g"));
    bus.declare(&topic, &group).await.unwrap();
    let handled = Arc::new(Mutex::new(HashMap::<String, u32>::new()));
    let record = Arc::clone(&handled);
    let sub = bus
        .subscribe::<Tick>(&topic, &group)
        .concurrency(16)
        .start(move |e: Envelope<Tick>, _c: Context| {
            let record = Arc::clone(&record);
            async move {
                *record.lock().unwrap().entry(e.id.clone()).or_default() += 1;
                Ok::<(), HandlerError>(())
            }
        })
        .await
        .unwrap();

    let before = publish_all(&bus, &topic, 0..300).await;
    wait_handled(&handled, &before, "published before the restart").await;

    // Publish one message every 50 ms while LocalStack goes down and comes back.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let during = {
        let (bus, topic, stop) = (bus.clone(), topic.clone(), Arc::clone(&stop));
        tokio::spawn(async move {
            let (mut ok, mut errors) = (Vec::new(), Vec::new());
            let mut seq = 1_000;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                match bus.publish(&topic, Tick { seq }).await {
                    Ok(id) => ok.push(id),
                    Err(e) => errors.push(e),
                }
                seq += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (ok, errors)
        })
    };
    tokio::task::spawn_blocking(restart_localstack)
        .await
        .expect("restart task");
    // The application declares its topology again (at start-up, or on a "does not exist").
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while let Err(e) = bus.declare(&topic, &group).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "declare never worked again: {e}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (during_ok, during_errors) = during.await.unwrap();

    let after = publish_all(&bus, &topic, 2_000..2_300).await;
    wait_handled(&handled, &after, "published after the recovery").await;

    let lost_with_the_broker = {
        let handled = handled.lock().unwrap();
        during_ok
            .iter()
            .filter(|id| !handled.contains_key(*id))
            .count()
    };
    println!(
        "before: {} handled | during the outage: {} publishes failed, {} succeeded ({} of them lost with LocalStack's memory) | after: {} of {} handled by the same subscription",
        before.len(),
        during_errors.len(),
        during_ok.len(),
        lost_with_the_broker,
        after.len(),
        after.len()
    );
    if let Some(first) = during_errors.first() {
        println!("first publish error: {first}");
    }
    assert!(
        !during_errors.is_empty(),
        "publishing while LocalStack was down never failed"
    );
    for e in &during_errors {
        assert!(
            matches!(
                e.kind(),
                ErrorKind::Connection | ErrorKind::Broker | ErrorKind::Timeout
            ),
            "an outage error of kind {:?}: {e}",
            e.kind()
        );
        assert!(
            e.to_string().contains(&topic),
            "the error names the topic: {e}"
        );
    }
    sub.shutdown(Duration::from_secs(10)).await.unwrap();
}
