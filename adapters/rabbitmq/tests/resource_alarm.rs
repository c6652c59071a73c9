//! A resource alarm on RabbitMQ (memory or disk) blocks every connection that publishes until
//! it clears. Consumers must go on draining the queues meanwhile (that is what clears a memory
//! alarm), so the transport consumes on a connection of its own: here a publish is blocked by
//! the alarm, and the consumer still handles and acks everything already queued.
//!
//! It sets an alarm on the shared local broker, so it lives alone in this test binary (cargo
//! runs test binaries one after another) and is skipped unless brokers are required or
//! `BUSBAR_RESTART_TESTS=1`. The alarm is cleared however the test ends.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use busbar_core::{Bus, Context, Envelope, Event, HandlerError};
use busbar_rabbitmq::RabbitTransport;
use busbar_testkit::conformance::{unique, wait_for};
use busbar_testkit::restart::{rabbitmqctl, rabbitmqctl_output};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Tick {
    seq: u64,
}
impl Event for Tick {
    const TYPE: &'static str = "test.tick.v1";
}

fn url() -> String {
    std::env::var("BUSBAR_RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

const ALARM: &str = "{resource_limit, memory, node()}";

/// A memory alarm raised on the local broker for as long as it lives.
struct Alarm;

impl Alarm {
    fn raise() -> Alarm {
        rabbitmqctl(&["eval", &format!("rabbit_alarm:set_alarm({{{ALARM}, []}}).")]);
        Alarm
    }
}

impl Drop for Alarm {
    fn drop(&mut self) {
        rabbitmqctl(&["eval", &format!("rabbit_alarm:clear_alarm({ALARM}).")]);
    }
}

/// Whether the broker holds a connection it blocked (one that published during the alarm).
fn a_connection_is_blocked() -> bool {
    rabbitmqctl_output(&["list_connections", "--quiet", "--no-table-headers", "state"])
        .lines()
        .any(|state| state.trim() == "blocked")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_drain_the_queue_while_an_alarm_blocks_publishing() {
    if !busbar_testkit::restart::enabled("raises a resource alarm on the local RabbitMQ") {
        return;
    }
    const QUEUED: usize = 200;
    let url = format!("{}?publish_timeout_ms=3000&queue_expires_ms=600000", url());
    let bus = Bus::new(
        RabbitTransport::connect(&url.parse().unwrap())
            .await
            .expect("RabbitMQ reachable"),
    );
    let (topic, group) = (unique("alarm"), unique("g"));
    bus.declare(&topic, &group).await.unwrap();
    let ticks: Vec<Tick> = (0..QUEUED as u64).map(|seq| Tick { seq }).collect();
    bus.publish_batch(&topic, ticks).await.unwrap();

    let alarm = Alarm::raise();
    // This publish reaches the broker, which then stops reading from its connection.
    let blocked = {
        let (bus, topic) = (bus.clone(), topic.clone());
        tokio::spawn(async move { bus.publish(&topic, Tick { seq: u64::MAX }).await })
    };
    wait_for("the publishing connection blocked", a_connection_is_blocked).await;
    let handled = Arc::new(Mutex::new(HashSet::new()));
    let seen = Arc::clone(&handled);
    // A prefetch far below what is queued: draining needs acks to reach the broker.
    let sub = bus
        .subscribe::<Tick>(&topic, &group)
        .max_in_flight(10)
        .start(move |e: Envelope<Tick>, _c: Context| {
            seen.lock().unwrap().insert(e.payload.seq);
            async { Ok::<_, HandlerError>(()) }
        })
        .await
        .expect("subscribing while publishing is blocked");
    let drained = || (0..QUEUED as u64).all(|seq| handled.lock().unwrap().contains(&seq));
    wait_for(
        "every queued message handled while publishing is blocked",
        drained,
    )
    .await;
    assert!(
        a_connection_is_blocked(),
        "the publish was still blocked while the queue drained"
    );
    let published = blocked.await.unwrap();
    let error = published.expect_err("a publish during the alarm is not confirmed");
    assert!(error.is_retryable(), "{error}");
    // It says why, and what to fix.
    assert!(error.to_string().contains("resource alarm"), "{error}");
    assert!(
        error.to_string().contains("rabbitmq-diagnostics alarms"),
        "{error}"
    );
    drop(alarm);

    // The alarm cleared: publishing works again, and nothing was lost meanwhile. The publish
    // that timed out may still be delivered once the broker reads it.
    bus.publish(&topic, Tick { seq: QUEUED as u64 })
        .await
        .unwrap();
    wait_for("the publish after the alarm handled", || {
        handled.lock().unwrap().contains(&(QUEUED as u64))
    })
    .await;
    sub.shutdown(Duration::from_secs(10)).await.unwrap();
}
