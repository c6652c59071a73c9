//! A password or secret in a URL never shows: not in the `Debug` or `Display` of any config or
//! transport URL, not in any error (its whole source chain included), not in any log line or
//! span busbar or its clients emit while connecting and failing.
//!
//! Every URL points at a closed port or holds a bad parameter, so each connect fails and its
//! error is checked; the log output of all of it is captured and checked too.

use std::io::Write;
use std::sync::{Arc, Mutex};

use busbar::{BusConfig, TransportUrl};

const SECRET: &str = "S3cr3t-pw-9f2";

/// Log output, captured in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every way `error` can be printed: Display and Debug of it and of each of its sources.
fn printed(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = format!("{error}\n{error:?}\n");
    let mut source = error.source();
    while let Some(e) = source {
        out.push_str(&format!("{e}\n{e:?}\n"));
        source = e.source();
    }
    out
}

fn urls() -> Vec<String> {
    let mut urls = vec![
        format!("memory://?token={SECRET}"),
        format!("memory://user:{SECRET}@host/?capacity=oops"),
    ];
    if cfg!(feature = "rabbitmq") {
        urls.push(format!("amqp://guest:{SECRET}@127.0.0.1:1/%2f"));
        urls.push(format!(
            "amqps://guest:{SECRET}@127.0.0.1:1/%2f?tls_ca_file=/nonexistent/ca.pem"
        ));
        urls.push(format!(
            "amqp://guest:{SECRET}@127.0.0.1:1/%2f?prefetch=lots"
        ));
    }
    if cfg!(feature = "kafka") {
        urls.push(format!(
            "kafka://127.0.0.1:1?security.protocol=SASL_PLAINTEXT&sasl.mechanism=PLAIN&sasl.username=u&sasl.password={SECRET}"
        ));
        urls.push(format!(
            "kafka://127.0.0.1:1?sasl.mechanism=BOGUS&sasl.password={SECRET}&ssl.key.pem={SECRET}"
        ));
    }
    if cfg!(feature = "sqs") {
        urls.push(format!(
            "sqs://?endpoint=http://127.0.0.1:1&region=us-east-1&access_key_id=AKIDEXAMPLE&secret_access_key={SECRET}"
        ));
        urls.push(format!(
            "sqs://?region=us-east-1&access_key_id=AKIDEXAMPLE&secret_access_key={SECRET}&mode=sideways"
        ));
    }
    urls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_password_or_secret_is_ever_printed() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_env_filter("debug")
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let mut seen = String::new();
    let mut failures = 0;
    // Connect to all at once: some clients take seconds to give up.
    let attempts = futures::future::join_all(urls().into_iter().map(|url| async move {
        let connected = busbar::connect(&url).await;
        (url, connected)
    }))
    .await;
    for (url, connected) in attempts {
        let parsed: TransportUrl = url.parse().expect("a URL");
        seen.push_str(&format!("{parsed}\n{parsed:?}\n"));
        match BusConfig::from_url(&url) {
            Ok(config) => seen.push_str(&format!("{config:?}\n")),
            Err(e) => seen.push_str(&printed(&e)),
        }
        match connected {
            Ok(bus) => {
                seen.push_str(&format!("{:?}\n", bus.transport()));
                let _ = bus.close().await;
            }
            Err(e) => {
                failures += 1;
                tracing::error!(error = %e, "connect failed");
                seen.push_str(&printed(&e));
            }
        }
    }
    #[cfg(feature = "rabbitmq")]
    {
        let url = format!("amqp://guest:{SECRET}@127.0.0.1:1/%2f")
            .parse()
            .unwrap();
        let config = busbar::rabbitmq::RabbitConfig::from_url(&url).unwrap();
        seen.push_str(&format!("{config:?}\n"));
    }
    #[cfg(feature = "kafka")]
    {
        let url = format!("kafka://127.0.0.1:1?sasl.password={SECRET}")
            .parse()
            .unwrap();
        let config = busbar::kafka::KafkaConfig::from_url(&url).unwrap();
        seen.push_str(&format!("{config:?}\n"));
    }
    #[cfg(feature = "sqs")]
    {
        let url = format!("sqs://?access_key_id=AKIDEXAMPLE&secret_access_key={SECRET}")
            .parse()
            .unwrap();
        let config = busbar::sqs::SqsConfig::from_url(&url).unwrap();
        seen.push_str(&format!("{config:?}\n"));
    }
    #[cfg(all(feature = "postgres", feature = "redis"))]
    {
        let postgres = format!("postgres://busbar:{SECRET}@127.0.0.1:1/test");
        let redis = format!("redis://:{SECRET}@127.0.0.1:1");
        let (pg, rd) = tokio::join!(
            busbar::postgres::PostgresIdempotencyStore::connect(&postgres),
            busbar::redis::RedisIdempotencyStore::connect(&redis),
        );
        for err in [pg.err(), rd.err()] {
            let err = err.expect("nothing listens on port 1");
            failures += 1;
            seen.push_str(&printed(&err));
        }
    }

    let logs = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    assert!(failures >= 2, "the failing connects did fail");
    assert!(
        seen.contains("***"),
        "redaction marks are shown where the secret was:\n{seen}"
    );
    for (what, text) in [("printed values", &seen), ("logs", &logs)] {
        if let Some(at) = text.find(SECRET) {
            let from = at.saturating_sub(300);
            panic!(
                "the secret appears in the {what}:\n…{}…",
                &text[from..(at + SECRET.len() + 100).min(text.len())]
            );
        }
    }
}
