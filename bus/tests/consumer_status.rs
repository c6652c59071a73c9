//! What a transport's consumer reports reaches the subscription: `consuming` waits for the
//! consumer to be assigned, and `shutdown` for it to let go of everything.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use busbar_core::{
    Bus, Capabilities, ConsumeOptions, ConsumerStatus, Context, DeliveryStream, Envelope,
    ErrorKind, MemoryTransport, Message, Result, Transport,
};
use common::{numbered, unique, Numbered};

/// The memory transport, with a consumer that joins like a Kafka one (not consuming until told)
/// and keeps a hold for a moment after its stream is dropped, like one leaving its group.
#[derive(Debug)]
struct Joining {
    inner: MemoryTransport,
    status: Mutex<Option<ConsumerStatus>>,
    left: Arc<AtomicBool>,
}

#[async_trait]
impl Transport for Joining {
    fn name(&self) -> &'static str {
        "joining"
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn publish(&self, messages: Vec<Message>) -> Result<()> {
        self.inner.publish(messages).await
    }
    async fn declare(&self, topic: &str, group: &str) -> Result<()> {
        self.inner.declare(topic, group).await
    }
    async fn consume(
        &self,
        topic: &str,
        group: &str,
        options: ConsumeOptions,
    ) -> Result<DeliveryStream> {
        let status = options.status.clone();
        status.joining();
        *self.status.lock().unwrap() = Some(status.clone());
        let stream = self.inner.consume(topic, group, options).await?;
        // Let go 200 ms after the stream is dropped.
        let hold = status.hold();
        let left = Arc::clone(&self.left);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = rx.await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            left.store(true, Ordering::SeqCst);
            drop(hold);
        });
        let guarded = futures::stream::unfold((stream, tx), |(mut stream, tx)| async move {
            use futures::StreamExt;
            stream.next().await.map(|item| (item, (stream, tx)))
        });
        Ok(Box::pin(guarded))
    }
    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

#[tokio::test]
async fn consuming_waits_for_the_assignment_and_shutdown_for_the_consumer_to_let_go() {
    let transport = Arc::new(Joining {
        inner: MemoryTransport::new(),
        status: Mutex::default(),
        left: Arc::default(),
    });
    let bus = Bus::builder(Arc::clone(&transport) as Arc<dyn Transport>).build();
    let topic = unique("status");
    let sub = bus
        .subscribe::<Numbered>(&topic, "g")
        .start(|_: Envelope<Numbered>, _: Context| async { Ok(()) })
        .await
        .expect("subscribe");

    assert!(!sub.is_consuming(), "the transport said it is joining");
    let err = sub
        .consuming(Duration::from_millis(50))
        .await
        .expect_err("not assigned yet");
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(
        err.to_string().contains(&topic),
        "names the subscription: {err}"
    );

    let status = transport.status.lock().unwrap().clone().expect("consumed");
    status.set_consuming(true);
    sub.consuming(Duration::from_secs(5))
        .await
        .expect("assigned");
    assert!(sub.is_consuming());

    bus.publish(&topic, numbered("", 1)).await.expect("publish");
    let handled = || std::future::ready(sub.stats().handled == 1);
    common::eventually(Duration::from_secs(10), "the event handled", handled).await;
    sub.shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
    assert!(
        transport.left.load(Ordering::SeqCst),
        "shutdown returned before the transport's consumer let go"
    );
}
