//! Connecting never hangs, and a failure says whether retrying can help: a refused login, an
//! unknown vhost, a URL with no host and TLS spoken to a plain port cannot be fixed by
//! retrying; a silent listener times out naming the host. Against the real broker
//! (`scripts/local-brokers.sh rabbitmq`) and local listeners that are not RabbitMQ.

use std::time::{Duration, Instant};

use busbar_core::{Error, ErrorKind};
use busbar_rabbitmq::RabbitTransport;
use busbar_testkit::conformance::brokers_required;
use busbar_testkit::endpoints::{unused_address, SilentListener};
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

fn broker_up() -> bool {
    let up = std::net::TcpStream::connect(BROKER).is_ok();
    assert!(
        up || !brokers_required(),
        "RabbitMQ is not running on {BROKER}"
    );
    up
}

#[tokio::test]
async fn failures_retrying_cannot_fix_say_what_to_fix_and_are_not_retryable() {
    if !broker_up() {
        return;
    }
    let within = Duration::from_secs(10);
    for (url, kind, says) in [
        (
            format!("amqp://guest:wrong@{BROKER}/%2f"),
            ErrorKind::Connection,
            "refused the login: check the user and password",
        ),
        (
            format!("amqp://guest:guest@{BROKER}/no-such-vhost"),
            ErrorKind::Connection,
            "does not allow this vhost",
        ),
        (
            format!("amqps://guest:guest@{BROKER}/%2f"),
            ErrorKind::Connection,
            "the TLS handshake failed: the port does not answer in TLS",
        ),
        (
            "amqp://guest:guest@/".to_string(),
            ErrorKind::Config,
            "the URL names no host",
        ),
    ] {
        let error = refused(&url, within).await;
        let text = error.to_string();
        assert_eq!(error.kind(), kind, "{text}");
        assert!(!error.is_retryable(), "{url}: {text}");
        assert!(text.contains(says), "{url}: {text}");
        assert!(!text.contains("wrong"), "the password leaked: {text}");
    }
}

#[tokio::test]
async fn a_listener_that_never_speaks_amqp_times_out_naming_the_host() {
    let silent = SilentListener::new();
    let host = silent.address();
    let url = format!("amqp://guest:guest@{host}/%2f?connect_timeout_ms=1500");
    let error = refused(&url, Duration::from_secs(10)).await;
    assert_eq!(error.kind(), ErrorKind::Timeout, "{error}");
    assert!(error.is_retryable(), "{error}");
    let text = error.to_string();
    assert!(
        text.contains(&format!("no AMQP handshake from {host} within 1.5s")),
        "{text}"
    );
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

#[tokio::test]
async fn a_port_nobody_listens_on_is_a_retryable_connection_error() {
    let host = unused_address();
    let error = refused(
        &format!("amqp://guest:guest@{host}/%2f"),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(error.kind(), ErrorKind::Connection, "{error}");
    assert!(
        error.is_retryable(),
        "a broker that is down may come up: {error}"
    );
}
