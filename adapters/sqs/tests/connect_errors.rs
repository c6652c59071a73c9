//! Connecting never hangs and says why, checked against the shared table
//! (`busbar_testkit::endpoints`): every connect failure SQS can have, classified as every
//! adapter classifies it. The TLS row needs LocalStack (`scripts/local-brokers.sh sqs`).

use busbar_sqs::SqsTransport;
use busbar_testkit::endpoints::{
    connect_failures_classify_alike, listening, unused_address, ConnectCase, ConnectFailure,
    SilentListener,
};

const LOCALSTACK: &str = "127.0.0.1:4566";
const KEYS: &str = "region=us-east-1&access_key_id=test&secret_access_key=test";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failures_classify_as_on_every_adapter() {
    if !listening(LOCALSTACK, "LocalStack (scripts/local-brokers.sh sqs)") {
        return;
    }
    let silent = SilentListener::new();
    let (quiet, down) = (silent.address(), unused_address());
    let cases = vec![
        ConnectCase::new(
            ConnectFailure::Silent,
            format!("sqs://?endpoint=http://{quiet}&{KEYS}&connect_timeout_ms=1500"),
            format!("no answer from http://{quiet} within 1.5s"),
        ),
        ConnectCase::new(
            ConnectFailure::Refused,
            format!("sqs://?endpoint=http://{down}&{KEYS}&connect_timeout_ms=1500"),
            "Connection refused",
        ),
        ConnectCase::new(
            ConnectFailure::NoHost,
            format!("sqs://?endpoint=http://&{KEYS}"),
            "`endpoint` must be an http:// or https:// URL with a host",
        ),
        ConnectCase::new(
            ConnectFailure::TlsMismatch,
            format!("sqs://?endpoint=https://{LOCALSTACK}&{KEYS}&connect_timeout_ms=1500"),
            "TLS",
        ),
    ];
    let not_applicable = [
        (
            ConnectFailure::BadCredentials,
            "LocalStack accepts any credentials, so a refusal cannot be produced here",
        ),
        (
            ConnectFailure::UnknownNamespace,
            "SQS has no namespace (vhost) to connect to",
        ),
    ];
    connect_failures_classify_alike(
        |url| async move { SqsTransport::connect(&url).await },
        cases,
        &not_applicable,
    )
    .await;
}
