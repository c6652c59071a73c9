//! Connecting never hangs and says why, checked against the shared table
//! (`busbar_testkit::endpoints`): every connect failure Kafka can have, classified as every
//! adapter classifies it. The credential and TLS rows need the `tls` feature and the secured
//! brokers (`scripts/local-brokers.sh kafka-secured`).

use busbar_kafka::KafkaTransport;
use busbar_testkit::endpoints::{
    connect_failures_classify_alike, unused_address, ConnectCase, ConnectFailure, SilentListener,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failures_classify_as_on_every_adapter() {
    let silent = SilentListener::new();
    let (quiet, down) = (silent.address(), unused_address());
    #[allow(unused_mut)]
    let mut cases = vec![
        ConnectCase::new(
            ConnectFailure::Silent,
            format!("kafka://{quiet}?connect_timeout_ms=1500"),
            format!("no answer from {quiet} within 1.5s"),
        ),
        ConnectCase::new(
            ConnectFailure::Refused,
            format!("kafka://{down}?connect_timeout_ms=1500"),
            "Connection refused",
        ),
        ConnectCase::new(
            ConnectFailure::NoHost,
            "kafka://",
            "give at least one bootstrap server",
        ),
    ];
    #[allow(unused_mut)]
    let mut not_applicable = vec![(
        ConnectFailure::UnknownNamespace,
        "Kafka has no namespaces (vhosts) to connect to",
    )];
    #[cfg(feature = "tls")]
    let secured = busbar_testkit::endpoints::listening(
        "127.0.0.1:9098",
        "the SCRAM Tansu (scripts/local-brokers.sh kafka-secured)",
    ) && busbar_testkit::endpoints::listening(
        "127.0.0.1:9097",
        "the TLS Tansu (scripts/local-brokers.sh kafka-secured)",
    );
    #[cfg(feature = "tls")]
    if !secured {
        let why =
            "the secured brokers are not running here (scripts/local-brokers.sh kafka-secured)";
        not_applicable.push((ConnectFailure::BadCredentials, why));
        not_applicable.push((ConnectFailure::TlsMismatch, why));
    }
    #[cfg(feature = "tls")]
    if secured {
        let home = std::env::var("BROKERS_HOME").unwrap_or_else(|_| "/tmp/busbar-brokers".into());
        cases.push(
            ConnectCase::new(
                ConnectFailure::BadCredentials,
                "kafka://127.0.0.1:9098?security.protocol=SASL_PLAINTEXT&sasl.mechanism=SCRAM-SHA-512\
                 &sasl.username=busbar&sasl.password=hunter2-not-a-user",
                "SASL SCRAM authentication failed",
            )
            .secret("hunter2"),
        );
        cases.push(ConnectCase::new(
            ConnectFailure::TlsMismatch,
            format!(
                "kafka://127.0.0.1:9097?security.protocol=SSL&ssl.ca.location={home}/tls/other-ca.pem"
            ),
            "certificate verify failed",
        ));
    }
    #[cfg(not(feature = "tls"))]
    {
        let why = "this build has no TLS or SASL (the `tls` feature; see tls.rs)";
        not_applicable.push((ConnectFailure::BadCredentials, why));
        not_applicable.push((ConnectFailure::TlsMismatch, why));
    }
    connect_failures_classify_alike(
        |url| async move { KafkaTransport::connect(&url).await },
        cases,
        &not_applicable,
    )
    .await;
}
