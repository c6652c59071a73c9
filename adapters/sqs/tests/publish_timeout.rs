//! A publish has a time limit (`publish_timeout_ms`): an SQS endpoint that accepts
//! connections and never answers (LocalStack shutting down does that for seconds; so does a
//! network that drops replies) fails the publish with a `Timeout` error that names the topic
//! and the messages, instead of holding it for as long as the silence lasts.
//!
//! The silence is made by a TCP relay in front of LocalStack that stops passing bytes on.

use std::sync::Arc;
use std::time::Duration;

use busbar_core::{ConsumeOptions, ErrorKind, Message, Transport};
use busbar_sqs::SqsTransport;
use busbar_testkit::conformance::{reachable, unique};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// LocalStack's address: `BUSBAR_SQS_URL`'s endpoint, or 127.0.0.1:4566.
fn upstream() -> String {
    std::env::var("BUSBAR_SQS_URL")
        .ok()
        .and_then(|url| {
            let endpoint = url.split("endpoint=").nth(1)?.split('&').next()?;
            let host = endpoint.strip_prefix("http://")?.trim_end_matches('/');
            Some(host.to_string())
        })
        .unwrap_or_else(|| "127.0.0.1:4566".into())
}

/// A relay that passes bytes both ways until it is silenced; then it keeps accepting and
/// reading, and passes nothing on (what it holds goes through once it speaks again).
struct Relay {
    port: u16,
    silent: watch::Sender<bool>,
}

impl Relay {
    async fn start() -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (silent, watching) = watch::channel(false);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let watching = watching.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream()).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::join!(
                        pass(client_read, server_write, watching.clone()),
                        pass(server_read, client_write, watching),
                    );
                });
            }
        });
        Relay { port, silent }
    }

    fn silence(&self, silent: bool) {
        self.silent.send_replace(silent);
    }
}

async fn pass(
    mut from: impl AsyncReadExt + Unpin,
    mut to: impl AsyncWriteExt + Unpin,
    mut silent: watch::Receiver<bool>,
) {
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if silent.wait_for(|silent| !silent).await.is_err() {
            return;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_to_an_endpoint_that_never_answers_fails_within_the_time_limit() {
    let relay = Relay::start().await;
    let url = format!(
        "sqs://?endpoint=http://127.0.0.1:{}&region=us-east-1&access_key_id=test&secret_access_key=test&wait_time_s=1&publish_timeout_ms=1500",
        relay.port
    );
    let Some(transport) = reachable(SqsTransport::connect(&url.parse().unwrap()).await) else {
        return;
    };
    let transport = Arc::new(transport);
    let (topic, group) = (unique("silent"), unique("g"));
    transport.declare(&topic, &group).await.unwrap();
    transport
        .publish(vec![Message::new("before", topic.clone(), "{}")])
        .await
        .unwrap();

    relay.silence(true);
    // Without a limit this publish waits as long as the silence; the test's own bound only
    // keeps a regression from hanging the suite.
    let publish = transport.publish(vec![
        Message::new("during-1", topic.clone(), "{}"),
        Message::new("during-2", topic.clone(), "{}"),
    ]);
    let err = tokio::time::timeout(Duration::from_secs(60), publish)
        .await
        .expect("the publish outlived its 1.5 s limit by a minute")
        .expect_err("a publish nobody answered succeeded");
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(err.is_retryable(), "{err}");
    let text = err.to_string();
    for needed in ["publish_timeout_ms", "during-1", "during-2", topic.as_str()] {
        assert!(
            text.contains(needed),
            "the error does not name {needed:?}: {text}"
        );
    }

    // Once the endpoint answers again, publishing works again, and nothing acknowledged was
    // lost. The timed-out messages may or may not have arrived: at-least-once.
    relay.silence(false);
    transport
        .publish(vec![Message::new("after", topic.clone(), "{}")])
        .await
        .unwrap();
    let mut stream = transport
        .consume(&topic, &group, ConsumeOptions::default())
        .await
        .unwrap();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !(seen.contains(&"before".to_string()) && seen.contains(&"after".to_string())) {
        let delivery = tokio::time::timeout_at(deadline, stream.next())
            .await
            .unwrap_or_else(|_| panic!("only {seen:?} arrived"))
            .expect("stream ended")
            .expect("consume error");
        seen.push(delivery.message().id.to_string());
        delivery.ack().await.unwrap();
    }
}

#[test]
fn the_time_limit_is_read_from_the_url_and_must_be_positive() {
    let config = |limit: &str| {
        busbar_sqs::SqsConfig::from_url(
            &format!("sqs://?region=us-east-1&publish_timeout_ms={limit}")
                .parse()
                .unwrap(),
        )
    };
    assert_eq!(
        config("2500").unwrap().publish_timeout,
        Duration::from_millis(2500)
    );
    for bad in ["0", "-1", "soon"] {
        let err = config(bad).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config, "{err}");
        assert!(err.to_string().contains("publish_timeout_ms"), "{err}");
    }
}
