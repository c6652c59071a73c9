//! Connecting never hangs and says why: brokers that accept the connection and never answer
//! give a `Timeout` naming them within `connect_timeout_ms`; a refused connection stays a
//! retryable `Connection` error. (Refused credentials and failed TLS handshakes: `tls.rs`.)

use std::time::{Duration, Instant};

use busbar_core::ErrorKind;
use busbar_kafka::KafkaTransport;
use busbar_testkit::endpoints::{unused_address, SilentListener};

#[tokio::test]
async fn a_listener_that_never_answers_times_out_naming_the_host() {
    let silent = SilentListener::new();
    let host = silent.address();
    let url = format!("kafka://{host}?connect_timeout_ms=1500");
    let started = Instant::now();
    let error = KafkaTransport::connect(&url.parse().unwrap())
        .await
        .expect_err("nothing answers");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(error.kind(), ErrorKind::Timeout, "{error}");
    assert!(error.is_retryable(), "{error}");
    assert!(
        error
            .to_string()
            .contains(&format!("no answer from {host} within 1.5s")),
        "{error}"
    );
}

#[tokio::test]
async fn a_port_nobody_listens_on_is_a_retryable_connection_error() {
    let host = unused_address();
    let url = format!("kafka://{host}?connect_timeout_ms=1500");
    let error = KafkaTransport::connect(&url.parse().unwrap())
        .await
        .expect_err("nothing listens");
    assert_eq!(error.kind(), ErrorKind::Connection, "{error}");
    assert!(
        error.is_retryable(),
        "a broker that is down may come up: {error}"
    );
    assert!(error.to_string().contains("Connection refused"), "{error}");
}
