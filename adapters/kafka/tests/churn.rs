//! Group churn on a real broker (`scripts/local-brokers.sh kafka`): a subscription stopped in
//! the middle of joining its group does not wedge the group, and a group the broker keeps
//! rebalancing is reported.
//!
//! Tansu keeps a member that left while its group was forming as the group's leader (see the
//! README's Tansu notes). A plain rdkafka consumer closed 1.5 s after subscribing does just
//! that; a busbar subscription finishes its join first.

use std::time::Duration;

use busbar_core::{Bus, ErrorKind};
use busbar_kafka::{KafkaConfig, KafkaTransport};
use busbar_testkit::conformance::{probe, reachable, unique, wait_for, Ledger, Probe};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

const SESSION: &str = "session_timeout_ms=6000";

fn url() -> String {
    std::env::var("BUSBAR_KAFKA_URL")
        .unwrap_or_else(|_| format!("kafka://127.0.0.1:9092?{SESSION}"))
}

async fn bus() -> Option<Bus> {
    let connected = async { Ok(Bus::new(KafkaTransport::connect(&url().parse()?).await?)) };
    reachable(connected.await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_stopped_while_joining_does_not_wedge_its_group() {
    let (Some(first), Some(next)) = (bus().await, bus().await) else {
        return;
    };
    let (topic, group) = (unique("joining"), unique("g"));
    let ledger = Ledger::default();
    for _ in 0..2 {
        let sub = first
            .subscribe::<Probe>(&topic, &group)
            .start(ledger.handler())
            .await
            .expect("subscribe");
        // Tansu holds a member's JoinGroup for 3 s: this shutdown comes in the middle.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        sub.shutdown(Duration::from_secs(10))
            .await
            .expect("shutdown");
    }
    let id = first.publish(&topic, probe(1, "")).await.expect("publish");
    let sub = next
        .subscribe::<Probe>(&topic, &group)
        .start(ledger.handler())
        .await
        .expect("subscribe the next");
    sub.consuming(Duration::from_secs(30))
        .await
        .expect("the next subscription is assigned its share");
    wait_for("the message published after the stops", || {
        ledger.distinct().contains(&id)
    })
    .await;
    assert_eq!(sub.stats().transport_errors, 0, "{:?}", sub.stats());
    let _ = sub.shutdown(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_the_broker_keeps_rebalancing_is_reported() {
    let Some(bus) = bus().await else { return };
    let (topic, group) = (unique("wedged"), unique("g"));
    bus.declare(&topic, &group).await.expect("declare");
    // A plain consumer that leaves in the middle of its join, as any client would if stopped
    // then: on Tansu the group is left with a leader that is gone.
    let config = KafkaConfig::from_url(&url().parse().expect("url")).expect("config");
    let plain: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", config.bootstrap_servers())
        .set("group.id", &group)
        .set(
            "session.timeout.ms",
            config.session_timeout.as_millis().to_string(),
        )
        .create()
        .expect("plain consumer");
    plain.subscribe(&[topic.as_str()]).expect("subscribe");
    let joining = std::time::Instant::now();
    while joining.elapsed() < Duration::from_millis(1500) {
        let _ = plain.poll(Duration::from_millis(50));
    }
    tokio::task::spawn_blocking(move || drop(plain))
        .await
        .expect("close the plain consumer");

    let sub = bus
        .subscribe::<Probe>(&topic, &group)
        .start(Ledger::default().handler())
        .await
        .expect("subscribe");
    let err = sub
        .consuming(Duration::from_secs(5))
        .await
        .expect_err("the group is wedged: no assignment comes");
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(!sub.is_consuming());
    // Reported after three session timeouts without an assignment (18 s here).
    let limit = Duration::from_secs(40);
    let waiting = std::time::Instant::now();
    while sub.stats().transport_errors == 0 {
        assert!(
            waiting.elapsed() < limit,
            "a consumer without an assignment for {limit:?} was not reported"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!sub.is_consuming());
    // Dropped, not shut down: a shutdown would wait for a join that never completes.
    drop(sub);
}
