//! `amqps://` end to end: a TLS-terminating proxy with a certificate made for this test sits in
//! front of the local RabbitMQ. With `tls_ca_file` naming that certificate, busbar connects,
//! publishes and consumes over TLS; without it, the untrusted certificate is refused.

use std::sync::Arc;
use std::time::Duration;

use busbar_core::{Bus, ErrorKind};
use busbar_rabbitmq::RabbitTransport;
use busbar_testkit::conformance::{brokers_required, probe, unique, wait_for, Ledger, Probe};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;

/// Starts a TLS proxy to RabbitMQ on 127.0.0.1; returns its port and the CA (its own cert) PEM.
async fn tls_proxy() -> (u16, String) {
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let pem = cert.cert.pem();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(client).await else {
                    return;
                };
                let Ok(mut broker) = TcpStream::connect("127.0.0.1:5672").await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut broker).await;
            });
        }
    });
    (port, pem)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_a_trusted_ca_round_trips_and_an_untrusted_certificate_is_refused() {
    if TcpStream::connect("127.0.0.1:5672").await.is_err() {
        assert!(
            !brokers_required(),
            "RabbitMQ unreachable on 127.0.0.1:5672"
        );
        return eprintln!("SKIPPED: RabbitMQ unreachable");
    }
    let (port, pem) = tls_proxy().await;
    let ca = std::env::temp_dir().join(format!("{}.pem", unique("busbar-test-ca")));
    std::fs::write(&ca, pem).unwrap();

    // Not trusted: the handshake fails, with a connection error that keeps the password out.
    let untrusted = format!("amqps://guest:guest@localhost:{port}/%2f");
    let err = RabbitTransport::connect(&untrusted.parse().unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    assert!(!err.to_string().contains("guest:guest"), "{err}");

    // Trusted through tls_ca_file: a full publish → consume round trip over TLS.
    let url = format!(
        "amqps://guest:guest@localhost:{port}/%2f?queue_expires_ms=600000&tls_ca_file={}",
        ca.display()
    );
    let transport = RabbitTransport::connect(&url.parse().unwrap())
        .await
        .expect("TLS connection through the proxy");
    let bus = Bus::new(transport);
    let (topic, group) = (unique("tls"), unique("g"));
    let ledger = Ledger::default();
    let sub = bus
        .subscribe::<Probe>(&topic, &group)
        .start(ledger.handler())
        .await
        .unwrap();
    let id = bus.publish(&topic, probe(1, "")).await.unwrap();
    wait_for("the message came back over TLS", || !ledger.is_empty()).await;
    ledger.assert_nothing_lost(&[id]);
    sub.shutdown(Duration::from_secs(5)).await.unwrap();
    let _ = std::fs::remove_file(ca);
}
