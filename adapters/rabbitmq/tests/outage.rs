//! The network to RabbitMQ goes down (a proxy in front of the local broker is cut) and comes
//! back: a publish during the outage fails with a clear error naming the message and that
//! message is not on the broker; after the outage publishing and consuming recover by themselves.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use busbar_core::{Bus, ConsumeOptions, ErrorKind, Transport};
use busbar_rabbitmq::RabbitTransport;
use busbar_testkit::conformance::{probe, reachable, unique, wait_for, Ledger, Probe};
use futures::StreamExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A TCP proxy to 127.0.0.1:5672 whose connections can all be cut, and new ones refused.
struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let links = Arc::new(Mutex::new(Vec::new()));
        let (flag, list) = (Arc::clone(&up), Arc::clone(&links));
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !flag.load(Ordering::SeqCst) {
                    continue; // refused: dropped at once
                }
                list.lock().unwrap().push(tokio::spawn(async move {
                    if let Ok(mut broker) = TcpStream::connect("127.0.0.1:5672").await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut broker).await;
                    }
                }));
            }
        });
        Proxy { port, up, links }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_during_an_outage_fails_clearly_and_everything_recovers_after() {
    let direct_url = "amqp://guest:guest@127.0.0.1:5672/%2f?queue_expires_ms=600000";
    let Some(direct) = reachable(RabbitTransport::connect(&direct_url.parse().unwrap()).await)
    else {
        return;
    };
    let proxy = Proxy::start().await;
    let url = format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f?publish_timeout_ms=1500&reconnect_max_ms=100&queue_expires_ms=600000",
        proxy.port
    );
    let bus = Bus::new(
        RabbitTransport::connect(&url.parse().unwrap())
            .await
            .unwrap(),
    );
    let (topic, group) = (unique("outage"), unique("g"));
    let ledger = Ledger::default();
    let sub = bus
        .subscribe::<Probe>(&topic, &group)
        .start(ledger.handler())
        .await
        .unwrap();
    let before = bus.publish(&topic, probe(1, "")).await.unwrap();
    wait_for("delivered before the outage", || {
        ledger.distinct().contains(&before)
    })
    .await;

    proxy.cut();
    let lost = bus.envelope(probe(2, ""));
    let err = bus
        .publish_envelope(&topic, &lost)
        .await
        .expect_err("no broker, no confirm: the publish must fail");
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    assert!(err.is_retryable());
    assert!(
        err.to_string().contains(lost.id.as_str()),
        "the error must name the unconfirmed message: {err}"
    );
    assert!(!err.to_string().contains("guest:guest"), "{err}");

    proxy.restore();
    // Publishing recovers by itself (reconnect within the publish deadline)...
    let after = bus
        .publish(&topic, probe(3, ""))
        .await
        .expect("publishing recovers after the outage");
    // ...and so does the consumer.
    wait_for("delivered after the outage", || {
        ledger.distinct().contains(&after)
    })
    .await;
    ledger.assert_nothing_lost(&[before.clone(), after.clone()]);
    assert!(
        !ledger.distinct().contains(&lost.id),
        "the failed publish must not have reached the broker"
    );
    sub.shutdown(Duration::from_secs(5)).await.unwrap();

    // Nothing else is waiting in the group queue: the refused message was never stored.
    let mut stream = direct
        .consume(&topic, &group, ConsumeOptions::default())
        .await
        .unwrap();
    let extra = tokio::time::timeout(Duration::from_millis(500), stream.next()).await;
    assert!(
        extra.is_err(),
        "an unconfirmed message was stored after all: {:?}",
        extra
            .ok()
            .flatten()
            .map(|d| d.map(|d| d.message().id.clone()))
    );
}

/// A delivery whose channel dies before it is acked: the ack must fail (not hang, and not
/// pass for success, which lapin reports as `Ok(false)` or leaves pending forever), and the
/// message comes back on the next connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_after_the_connection_dropped_fails_and_the_message_comes_back() {
    let proxy = Proxy::start().await;
    let url = format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f?publish_timeout_ms=5000&reconnect_max_ms=100&queue_expires_ms=600000",
        proxy.port
    );
    let Some(transport) = reachable(RabbitTransport::connect(&url.parse().unwrap()).await) else {
        return;
    };
    let transport: Arc<dyn Transport> = Arc::new(transport);
    let bus = Bus::builder(Arc::clone(&transport)).build();
    let (topic, group) = (unique("ackloss"), unique("g"));
    bus.declare(&topic, &group).await.unwrap();
    let id = bus.publish(&topic, probe(1, "")).await.unwrap();
    let mut stream = transport
        .consume(&topic, &group, ConsumeOptions::default())
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("delivered")
        .expect("stream open")
        .expect("a delivery");
    assert_eq!(first.message().id, id);

    proxy.cut();
    // Once the consumer has noticed the loss (the stream says so), the ack cannot reach the
    // broker. (An ack written just before the client notices is indistinguishable from a
    // delivered one: AMQP does not confirm acks.)
    let noticed = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("the consumer notices the lost connection")
        .expect("stream open");
    let Err(lost) = noticed else {
        panic!("no delivery can arrive through a cut connection")
    };
    assert_eq!(lost.kind(), ErrorKind::Connection, "{lost}");
    let acked = tokio::time::timeout(Duration::from_secs(10), first.ack())
        .await
        .expect("an ack on a dead channel must not hang");
    let err = acked.expect_err("an ack that never reached the broker must not pass for success");
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    assert!(
        err.to_string().contains("deliver the message again"),
        "{err}"
    );

    proxy.restore();
    // The consumer reconnects by itself and the broker hands the message out again.
    let again = loop {
        let next = tokio::time::timeout(Duration::from_secs(20), stream.next())
            .await
            .expect("redelivered after the outage")
            .expect("stream open");
        match next {
            Ok(delivery) => break delivery,
            Err(e) => assert_eq!(e.kind(), ErrorKind::Connection, "{e}"),
        }
    };
    assert_eq!(again.message().id, id);
    assert!(again.attempt() >= 2, "a redelivery counts as a new attempt");
    again.ack().await.unwrap();
}
