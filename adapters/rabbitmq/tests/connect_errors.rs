//! Connecting never hangs, and a failure says whether retrying can help: a refused login, an
//! unknown vhost, a URL with no host and TLS spoken to a plain port cannot be fixed by
//! retrying; a silent listener times out naming the host. Against the real broker
//! (`scripts/local-brokers.sh rabbitmq`) and local listeners that are not RabbitMQ.

use std::time::{Duration, Instant};

use busbar_core::{Error, ErrorKind};
use busbar_rabbitmq::RabbitTransport;
use busbar_testkit::endpoints::{
    connect_failures_classify_alike, listening, unused_address, ConnectCase, ConnectFailure,
    SilentListener,
};
use tokio::io::AsyncWriteExt;

const BROKER: &str = "127.0.0.1:5672";

/// Connects to `url`, failing the test if that takes longer than `within`.
async fn refused(url: &str, within: Duration) -> Error {
    let started = Instant::now();
    let connected = tokio::time::timeout(within, RabbitTransport::connect(&url.parse().unwrap()))
        .await
        .unwrap_or_else(|_| panic!("connecting to {url} hung for {within:?}"));
    let error = connected.expect_err(url);
    assert!(started.elapsed() < within);
    error
}

/// The shared table (`busbar_testkit::endpoints`): every connect failure RabbitMQ can have,
/// classified as every adapter classifies it.
#[tokio::test]
async fn connect_failures_classify_as_on_every_adapter() {
    if !listening(BROKER, "RabbitMQ") {
        return;
    }
    let silent = SilentListener::new();
    let (quiet, down) = (silent.address(), unused_address());
    let cases = vec![
        ConnectCase::new(
            ConnectFailure::Silent,
            format!("amqp://guest:guest@{quiet}/%2f?connect_timeout_ms=1500"),
            format!("no AMQP handshake from {quiet} within 1.5s"),
        ),
        ConnectCase::new(
            ConnectFailure::Refused,
            format!("amqp://guest:guest@{down}/%2f"),
            "cannot connect to RabbitMQ",
        ),
        ConnectCase::new(
            ConnectFailure::NoHost,
            "amqp://guest:guest@/",
            "the URL names no host",
        ),
        ConnectCase::new(
            ConnectFailure::BadCredentials,
            format!("amqp://guest:wrong-secret@{BROKER}/%2f"),
            "refused the login: check the user and password",
        )
        .secret("wrong-secret"),
        ConnectCase::new(
            ConnectFailure::UnknownNamespace,
            format!("amqp://guest:guest@{BROKER}/no-such-vhost"),
            "does not allow this vhost",
        ),
        ConnectCase::new(
            ConnectFailure::TlsMismatch,
            format!("amqps://guest:guest@{BROKER}/%2f"),
            "the TLS handshake failed: the port does not answer in TLS",
        ),
    ];
    connect_failures_classify_alike(
        |url| async move { RabbitTransport::connect(&url).await },
        cases,
        &[],
    )
    .await;
}

#[tokio::test]
async fn an_http_port_fails_fast() {
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = http.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = http.accept().await {
            let _ = socket
                .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                .await;
        }
    });
    let url = format!("amqp://guest:guest@{host}/%2f?connect_timeout_ms=3000");
    let error = refused(&url, Duration::from_secs(10)).await;
    assert!(
        matches!(error.kind(), ErrorKind::Connection | ErrorKind::Timeout),
        "{error}"
    );
}
