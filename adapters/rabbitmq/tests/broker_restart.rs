//! RabbitMQ restarted twice (`rabbitmqctl stop_app` / `start_app`) while 10,000 messages are
//! published and consumed (Watermill's reconnect scenario): publishers and consumers recover by
//! themselves and every message is accounted for (published = handled + dead-lettered). A
//! second bus that only connected, and neither publishes nor consumes, is ready again too.
//!
//! It restarts the shared local broker, so it lives alone in this test binary (cargo runs test
//! binaries one after another) and is skipped unless brokers are required or
//! `BUSBAR_RESTART_TESTS=1`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use busbar_core::{
    Bus, ConnectionState, Context, Envelope, Event, HandlerError, RetryPolicy, Text,
};
use busbar_rabbitmq::RabbitTransport;
use busbar_testkit::conformance::unique;
use busbar_testkit::restart::rabbitmqctl;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Tick {
    seq: u64,
}
impl Event for Tick {
    const TYPE: &'static str = "test.tick.v1";
    fn key(&self) -> Option<Text> {
        Some(Text::from_display(&format_args!("k{}", self.seq % 8)))
    }
}

fn url() -> String {
    std::env::var("BUSBAR_RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_run_loses_nothing() {
    if !busbar_testkit::restart::enabled("restarts the local RabbitMQ") {
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    const N: u64 = 10_000;
    let url = format!(
        "{}?publish_timeout_ms=60000&reconnect_max_ms=500&queue_expires_ms=600000",
        url()
    );
    let transport = RabbitTransport::connect(&url.parse().unwrap())
        .await
        .expect("RabbitMQ reachable");
    let bus = Bus::builder(Arc::new(transport))
        .retry(
            RetryPolicy::exponential(20)
                .with_initial_backoff(Duration::from_millis(20))
                .with_max_backoff(Duration::from_millis(500)),
        )
        .build();
    // Needs nothing after connecting: its probe must still see the broker back.
    let idle = Bus::new(
        RabbitTransport::connect(&url.parse().unwrap())
            .await
            .expect("RabbitMQ reachable"),
    );
    let (topic, group) = (unique("restart"), unique("g"));
    bus.declare(&topic, &group).await.unwrap();
    let handled = Arc::new(Mutex::new(HashMap::<busbar_core::Text, u32>::new()));
    let record = Arc::clone(&handled);
    let sub = bus
        .subscribe::<Tick>(&topic, &group)
        .concurrency(8)
        .start(move |e: Envelope<Tick>, _c: Context| {
            let record = Arc::clone(&record);
            async move {
                if e.payload.seq % 500 == 7 {
                    return Err(HandlerError::permanent("known poison message"));
                }
                *record.lock().unwrap().entry(e.id.clone()).or_default() += 1;
                Ok(())
            }
        })
        .await
        .unwrap();

    let publisher = {
        let (bus, topic) = (bus.clone(), topic.clone());
        tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut errors = 0;
            let mut seq = 0;
            while seq < N {
                let batch: Vec<Tick> = (seq..(seq + 50).min(N)).map(|s| Tick { seq: s }).collect();
                match bus.publish_batch(&topic, batch.clone()).await {
                    Ok(batch_ids) => {
                        ids.extend(batch_ids);
                        seq += batch.len() as u64;
                    }
                    // A clear error: this batch is not published; send it again.
                    Err(e) => {
                        errors += 1;
                        eprintln!("publish failed during the outage (retrying): {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            (ids, errors)
        })
    };

    // Restart twice: once a good part of the run is in flight, and again later.
    for at in [1_000, 4_000] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while handled.lock().unwrap().len() < at {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the run did not reach {at} handled"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (before, sub_before) = (bus.health(), sub.health());
        assert!(
            before.is_ready() && sub_before.is_ready(),
            "ready before the restart: {before:?} {sub_before:?}"
        );
        rabbitmqctl(&["stop_app"]);
        // The probes see the outage: not ready (reconnecting), yet live.
        wait_health("not ready during the outage", || {
            !bus.health().is_ready() && !sub.health().is_ready() && !idle.health().is_ready()
        })
        .await;
        let (during, sub_during) = (bus.health(), sub.health());
        assert!(
            during.is_live() && sub_during.is_live(),
            "live during the outage: {during:?} {sub_during:?}"
        );
        assert!(
            matches!(during.connection, ConnectionState::Reconnecting { .. }),
            "{during:?}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await; // the outage itself
        rabbitmqctl(&["start_app"]);
        rabbitmqctl(&["await_startup"]);
        wait_health("ready again after the restart", || {
            bus.health().is_ready() && sub.health().is_ready() && idle.health().is_ready()
        })
        .await;
        let recovered = sub.health();
        assert!(
            recovered.last_error.is_some(),
            "the outage is the last transport error: {recovered:?}"
        );
    }

    let (published, publish_errors) = publisher.await.unwrap();
    let published: HashSet<busbar_core::Text> = published.into_iter().collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let dead = loop {
        let dead = bus
            .dead_letters(&topic, &group, usize::MAX)
            .await
            .unwrap_or_default();
        let done = handled.lock().unwrap().len() + dead.len();
        if published.iter().all(|id| {
            handled.lock().unwrap().contains_key(id) || dead.iter().any(|d| &d.message.id == id)
        }) {
            break dead;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {done} of {} accounted for",
            published.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let handled = handled.lock().unwrap().clone();
    let dead_ids: HashSet<busbar_core::Text> = dead.iter().map(|d| d.message.id.clone()).collect();
    let lost: Vec<_> = published
        .iter()
        .filter(|id| !handled.contains_key(*id) && !dead_ids.contains(*id))
        .collect();
    let twice = handled.values().filter(|n| **n > 1).count();
    let poison = published.len() as u64 / 500;
    println!(
        "published {} | handled {} (twice: {twice}) | dead-lettered {} | lost {} | publish errors during outage {publish_errors}",
        published.len(),
        handled.len(),
        dead.len(),
        lost.len()
    );
    assert_eq!(published.len() as u64, N);
    assert!(lost.is_empty(), "lost: {lost:?}");
    assert_eq!(
        dead_ids.len() as u64,
        poison,
        "only the poison messages are dead letters"
    );
    assert!(handled.keys().all(|id| !dead_ids.contains(id)));
    sub.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// Waits until `condition` holds, at most 60 s.
async fn wait_health(what: &str, condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
