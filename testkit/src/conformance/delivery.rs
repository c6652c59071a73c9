//! Delivery: what is published arrives, once, intact, to the right groups.

use std::time::Duration;

use busbar_core::Text;
use busbar_core::{Envelope, Subscription};

use super::{bus_over, claims, probe, unique, wait_for, Harness, Ledger, Probe};

const GRACE: Duration = Duration::from_secs(10);

async fn stop(subscriptions: impl IntoIterator<Item = Subscription>) {
    for s in subscriptions {
        let _ = s.shutdown(GRACE).await;
    }
}

/// A declared group gets what was published before its consumer started and after, with the
/// payload and every envelope field intact.
pub async fn published_before_and_after_subscribing_arrives_intact(h: Harness) {
    let Some(bus) = h.bus().await else { return };
    let caps = bus.capabilities();
    let (topic, group) = (unique("intact"), unique("g"));
    bus.declare(&topic, &group).await.expect("declare");
    let make = |seq: u64| {
        let mut env = bus
            .envelope(Probe {
                note: format!("ünïcødé ✓ {seq}"),
                ..probe(seq, &format!("k{}", seq % 3))
            })
            .with_header("tenant", "acme")
            .with_header("x-seq", seq.to_string())
            .with_causation_id(format!("cause-{seq}"));
        env.tracestate = Some("vendor=value".into());
        env
    };
    let mut sent = Vec::new();
    for seq in 0..5 {
        let env = make(seq);
        bus.publish_envelope(&topic, &env)
            .await
            .expect("publish before subscribing");
        sent.push(env);
    }
    let ledger = Ledger::default();
    let sub = bus
        .subscribe::<Probe>(&topic, &group)
        .start(ledger.handler())
        .await
        .expect("subscribe");
    for seq in 5..10 {
        let env = make(seq);
        bus.publish_envelope(&topic, &env)
            .await
            .expect("publish after subscribing");
        sent.push(env);
    }
    let ids: Vec<Text> = sent.iter().map(|e| e.id.clone()).collect();
    wait_for("all 10 messages handled", || ledger.distinct().len() == 10).await;
    ledger.assert_nothing_lost(&ids);
    ledger.assert_nothing_duplicated(&caps);
    for received in ledger.envelopes() {
        let original = sent.iter().find(|e| e.id == received.id).expect("known id");
        assert_eq!(&received, original, "envelope changed in transit");
    }
    stop([sub]).await;
}

/// A group of one topic never sees another topic's messages.
pub async fn topics_are_isolated(h: Harness) {
    let Some(bus) = h.bus().await else { return };
    let (a, b, group) = (unique("iso-a"), unique("iso-b"), unique("g"));
    let (la, lb) = (Ledger::default(), Ledger::default());
    let sa = bus
        .subscribe::<Probe>(&a, &group)
        .start(la.handler())
        .await
        .expect("subscribe a");
    let sb = bus
        .subscribe::<Probe>(&b, &group)
        .start(lb.handler())
        .await
        .expect("subscribe b");
    let ids_a = bus
        .publish_batch(&a, (0..5).map(|i| probe(i, "")))
        .await
        .expect("publish a");
    let ids_b = bus
        .publish_batch(&b, (100..103).map(|i| probe(i, "")))
        .await
        .expect("publish b");
    wait_for("both topics delivered", || {
        la.distinct().len() == 5 && lb.distinct().len() == 3
    })
    .await;
    la.assert_nothing_lost(&ids_a);
    lb.assert_nothing_lost(&ids_b);
    assert!(
        la.envelopes().iter().all(|e| e.payload.seq < 100),
        "topic a got b's messages"
    );
    assert!(
        lb.envelopes().iter().all(|e| e.payload.seq >= 100),
        "topic b got a's messages"
    );
    stop([sa, sb]).await;
}

/// Fan-out: two groups each get every message.
pub async fn every_group_gets_every_message(h: Harness) {
    let Some(bus) = h.bus().await else { return };
    let caps = bus.capabilities();
    if !claims(&caps, caps.fan_out, "fan_out") {
        return;
    }
    let topic = unique("fanout");
    let (l1, l2) = (Ledger::default(), Ledger::default());
    let s1 = bus
        .subscribe::<Probe>(&topic, "billing")
        .start(l1.handler())
        .await
        .expect("subscribe 1");
    let s2 = bus
        .subscribe::<Probe>(&topic, "shipping")
        .start(l2.handler())
        .await
        .expect("subscribe 2");
    let ids = bus
        .publish_batch(&topic, (0..20).map(|i| probe(i, &format!("k{}", i % 4))))
        .await
        .expect("publish");
    wait_for("both groups got all 20", || {
        l1.distinct().len() == 20 && l2.distinct().len() == 20
    })
    .await;
    for ledger in [&l1, &l2] {
        ledger.assert_nothing_lost(&ids);
        ledger.assert_nothing_duplicated(&caps);
    }
    stop([s1, s2]).await;
}

/// Two consumers (two connections) of one group share its messages: each message is handled
/// by one of them, both do some of the work, nothing is lost.
pub async fn competing_consumers_split_the_work_with_nothing_lost(h: Harness) {
    let Some(first) = h.transport().await else {
        return;
    };
    let Some(second) = h.transport().await else {
        return;
    };
    let caps = first.capabilities();
    if !claims(&caps, caps.competing_consumers, "competing_consumers") {
        return;
    }
    let (topic, group) = (unique("compete"), unique("g"));
    let (bus1, bus2) = (bus_over(first), bus_over(second));
    let (l1, l2, all) = (Ledger::default(), Ledger::default(), Ledger::default());
    let handler = |mine: &Ledger| {
        let (mine, all) = (mine.clone(), all.clone());
        move |env: Envelope<Probe>, _ctx: busbar_core::Context| {
            let (mine, all) = (mine.clone(), all.clone());
            async move {
                // Slow enough that one consumer cannot take everything.
                tokio::time::sleep(Duration::from_millis(2)).await;
                mine.record(env.clone());
                all.record(env);
                Ok(())
            }
        }
    };
    let s1 = bus1
        .subscribe::<Probe>(&topic, &group)
        .concurrency(1)
        .max_in_flight(2)
        .start(handler(&l1))
        .await
        .expect("consumer 1");
    let s2 = bus2
        .subscribe::<Probe>(&topic, &group)
        .concurrency(1)
        .max_in_flight(2)
        .start(handler(&l2))
        .await
        .expect("consumer 2");
    // Publish in rounds until both consumers have worked (a group rebalance may take a while).
    let mut ids = Vec::new();
    let deadline = tokio::time::Instant::now() + super::wait_limit();
    while (l1.is_empty() || l2.is_empty())
        && tokio::time::Instant::now() < deadline
        && ids.len() < 4000
    {
        let base = ids.len() as u64;
        ids.extend(
            bus1.publish_batch(
                &topic,
                (base..base + 20).map(|i| probe(i, &format!("k{}", i % 16))),
            )
            .await
            .expect("publish"),
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_for("every published message handled", || {
        all.distinct().len() == ids.len()
    })
    .await;
    all.assert_nothing_lost(&ids);
    all.assert_nothing_duplicated(&caps);
    assert!(
        !l1.is_empty() && !l2.is_empty(),
        "one consumer did all the work: {} vs {}",
        l1.len(),
        l2.len()
    );
    stop([s1, s2]).await;
}

/// Four publishers and two consumers at once: every message handled, none twice.
pub async fn concurrent_publishers_and_consumers_lose_nothing(h: Harness) {
    let Some(first) = h.transport().await else {
        return;
    };
    let Some(second) = h.transport().await else {
        return;
    };
    let caps = first.capabilities();
    let (topic, group) = (unique("busy"), unique("g"));
    let (bus1, bus2) = (bus_over(first), bus_over(second));
    bus1.declare(&topic, &group).await.expect("declare");
    let ledger = Ledger::default();
    let s1 = bus1
        .subscribe::<Probe>(&topic, &group)
        .concurrency(4)
        .start(ledger.handler())
        .await
        .expect("consumer 1");
    let s2 = if caps.competing_consumers {
        Some(
            bus2.subscribe::<Probe>(&topic, &group)
                .concurrency(4)
                .start(ledger.handler())
                .await
                .expect("consumer 2"),
        )
    } else {
        None
    };
    let mut publishers = Vec::new();
    for p in 0..4u64 {
        let bus = if p % 2 == 0 {
            bus1.clone()
        } else {
            bus2.clone()
        };
        let topic = topic.clone();
        publishers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..100u64 {
                let seq = p * 1000 + i;
                ids.push(
                    bus.publish(&topic, probe(seq, &format!("p{p}-k{}", i % 5)))
                        .await
                        .expect("publish"),
                );
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for p in publishers {
        ids.extend(p.await.expect("publisher task"));
    }
    wait_for("all 400 handled", || ledger.distinct().len() == 400).await;
    ledger.assert_nothing_lost(&ids);
    ledger.assert_nothing_duplicated(&caps);
    stop([s1].into_iter().chain(s2)).await;
}

/// A publisher that closes right after its publishes returned loses none of them.
pub async fn messages_acknowledged_before_close_are_not_lost(h: Harness) {
    let Some(publisher) = h.transport().await else {
        return;
    };
    let Some(consumer) = h.transport().await else {
        return;
    };
    let caps = consumer.capabilities();
    let (topic, group) = (unique("close"), unique("g"));
    let (pub_bus, sub_bus) = (bus_over(publisher), bus_over(consumer));
    sub_bus.declare(&topic, &group).await.expect("declare");
    let mut ids = Vec::new();
    for i in 0..50 {
        ids.push(
            pub_bus
                .publish(&topic, probe(i, ""))
                .await
                .expect("publish"),
        );
    }
    pub_bus.close().await.expect("close publisher");
    let ledger = Ledger::default();
    let sub = sub_bus
        .subscribe::<Probe>(&topic, &group)
        .start(ledger.handler())
        .await
        .expect("subscribe");
    wait_for("all 50 handled", || ledger.distinct().len() == 50).await;
    ledger.assert_nothing_lost(&ids);
    ledger.assert_nothing_duplicated(&caps);
    stop([sub]).await;
}
