//! Kafka secured: the conformance suite against Tansu behind stunnel's TLS
//! (`scripts/local-brokers.sh kafka-secured`: 127.0.0.1:9097, a certificate for 127.0.0.1
//! signed by a CA the script makes), a server the client must not trust, and credentials a
//! SCRAM-requiring Tansu refuses (127.0.0.1:9098). Without the `tls` feature, TLS settings are
//! refused with a hint to enable it.

#[cfg(feature = "tls")]
use std::sync::Arc;
#[cfg(feature = "tls")]
use std::time::Instant;

use busbar_core::ErrorKind;
#[cfg(feature = "tls")]
use busbar_core::Transport;
use busbar_kafka::KafkaTransport;
#[cfg(feature = "tls")]
use busbar_testkit::conformance::brokers_required;

/// Where `scripts/local-brokers.sh` keeps its certificates.
fn tls_dir() -> String {
    let home = std::env::var("BROKERS_HOME").unwrap_or_else(|_| "/tmp/busbar-brokers".into());
    format!("{home}/tls")
}

fn url(ca: &str) -> String {
    format!(
        "kafka://127.0.0.1:9097?session_timeout_ms=6000&security.protocol=SSL&ssl.ca.location={}/{ca}",
        tls_dir()
    )
}

#[cfg(feature = "tls")]
async fn kafka_tls() -> busbar_core::Result<Arc<dyn Transport>> {
    Ok(Arc::new(
        KafkaTransport::connect(&url("ca.pem").parse()?).await?,
    ))
}

#[cfg(feature = "tls")]
busbar_testkit::conformance_suite!(kafka_tls, without_churn);

#[cfg(not(feature = "tls"))]
#[tokio::test]
async fn without_the_tls_feature_tls_settings_are_refused_with_a_hint() {
    let error = match KafkaTransport::connect(&url("ca.pem").parse().unwrap()).await {
        Ok(_) => panic!("TLS accepted by a librdkafka built without OpenSSL"),
        Err(e) => e,
    };
    assert_eq!(error.kind(), ErrorKind::Config, "{error}");
    assert!(error.to_string().contains("`kafka-tls` feature"), "{error}");
}

#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_certificate_is_not_trusted_is_refused_clearly() {
    if !std::path::Path::new(&format!("{}/other-ca.pem", tls_dir())).exists() {
        assert!(
            !brokers_required(),
            "no test certificates: run scripts/local-brokers.sh kafka-secured"
        );
        eprintln!("SKIPPED: no test certificates (scripts/local-brokers.sh kafka-secured)");
        return;
    }
    let started = Instant::now();
    let error = match KafkaTransport::connect(&url("other-ca.pem").parse().unwrap()).await {
        Ok(_) => panic!("connected to a server signed by a CA the client does not trust"),
        Err(e) => e,
    };
    let text = error.to_string();
    println!("{text} (after {:?})", started.elapsed());
    assert_eq!(error.kind(), ErrorKind::Connection, "{text}");
    assert!(text.contains("certificate verify failed"), "{text}");
    assert!(
        !error.is_retryable(),
        "retrying cannot make the certificate trusted: {text}"
    );
}

/// A Tansu that requires SASL/SCRAM (127.0.0.1:9098). It has no users: Tansu creates users
/// only through an authenticated connection, so the refusal is what can be tested.
#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_the_broker_refuses_fail_clearly_without_the_password() {
    let url =
        "kafka://127.0.0.1:9098?security.protocol=SASL_PLAINTEXT&sasl.mechanism=SCRAM-SHA-512\
               &sasl.username=busbar&sasl.password=hunter2-not-a-user";
    let error = match KafkaTransport::connect(&url.parse().unwrap()).await {
        Ok(_) => panic!("a broker with no users accepted busbar's credentials"),
        Err(e) => e,
    };
    let text = format!("{error} {error:?}");
    println!("{error}");
    if text.contains("Connection refused") {
        assert!(
            !brokers_required(),
            "the SCRAM Tansu is not running: scripts/local-brokers.sh kafka-secured"
        );
        eprintln!(
            "SKIPPED: the SCRAM Tansu is not running (scripts/local-brokers.sh kafka-secured)"
        );
        return;
    }
    assert_eq!(error.kind(), ErrorKind::Connection, "{error}");
    assert!(
        text.contains("SASL SCRAM authentication failed"),
        "the error says the credentials were refused: {error}"
    );
    assert!(
        !error.is_retryable(),
        "retrying cannot fix credentials: {error}"
    );
    assert!(!text.contains("hunter2"), "the password leaked: {text}");
}
