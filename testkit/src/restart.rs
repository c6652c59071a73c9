//! A broker restarted under a running bus, for test servers that come back empty (Tansu with
//! in-memory storage, LocalStack): what can be tested is the client side.
//!
//! - publishes while the broker is down fail with a clear, typed error naming the topic (never
//!   a silent success);
//! - once the application declares its topology again, publishing works;
//! - the same subscription, never restarted, handles everything published after the recovery.
//!
//! ```no_run
//! # async fn run(transport: std::sync::Arc<dyn busbar_core::Transport>) {
//! let report = busbar_testkit::restart::recovers_from_an_empty_restart(transport, || {
//!     // stop the broker and start it again, e.g. with scripts/local-brokers.sh
//! })
//! .await;
//! println!("{report}");
//! # }
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use busbar_core::{Bus, Error, ErrorKind, RetryPolicy, Transport};

use crate::conformance::{probe, unique, Ledger};

/// How many messages are published before the restart, and again after the recovery.
pub const MESSAGES: u64 = 300;

/// What a restart run saw. [`MESSAGES`] messages were published and handled before the
/// restart, and again after the recovery (the run fails otherwise).
#[derive(Debug)]
pub struct RestartReport {
    /// Publishes that failed while the broker was down (each checked: typed, naming the topic).
    pub failed_during: usize,
    /// Publishes that succeeded around the outage.
    pub succeeded_during: usize,
    /// Of those, how many the broker lost with its memory (reported, not asserted).
    pub lost_with_the_broker: usize,
    /// The first error a publish got during the outage.
    pub first_error: Option<String>,
}

impl std::fmt::Display for RestartReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "before: {MESSAGES} handled | during the outage: {} publishes failed, {} succeeded ({} of them lost with the broker's memory) | after: {MESSAGES} of {MESSAGES} handled by the same subscription",
            self.failed_during,
            self.succeeded_during,
            self.lost_with_the_broker,
        )?;
        if let Some(first) = &self.first_error {
            write!(f, "\nfirst publish error: {first}")?;
        }
        Ok(())
    }
}

/// Runs the scenario (see the module docs): `restart` stops the broker and starts it again (it
/// runs on a blocking thread while a publisher keeps publishing). Panics, saying what broke,
/// when a guarantee does not hold.
pub async fn recovers_from_an_empty_restart<F>(
    transport: Arc<dyn Transport>,
    restart: F,
) -> RestartReport
where
    F: FnOnce() + Send + 'static,
{
    let bus = Bus::builder(transport)
        .retry(
            RetryPolicy::exponential(8)
                .with_initial_backoff(Duration::from_millis(100))
                .with_max_backoff(Duration::from_secs(1)),
        )
        .build();
    let (topic, group) = (unique("restart"), unique("g"));
    bus.declare(&topic, &group).await.expect("declare");
    let ledger = Ledger::default();
    let sub = bus
        .subscribe::<crate::conformance::Probe>(&topic, &group)
        .concurrency(16)
        .start(ledger.handler())
        .await
        .expect("subscribe");

    let before = publish_all(&bus, &topic, 0..MESSAGES).await;
    wait_handled(&ledger, &before, "published before the restart").await;

    // Publish one message every 50 ms while the broker goes down and comes back.
    let stop = Arc::new(AtomicBool::new(false));
    let during = {
        let (bus, topic, stop) = (bus.clone(), topic.clone(), Arc::clone(&stop));
        tokio::spawn(async move {
            let (mut ok, mut errors): (Vec<String>, Vec<Error>) = (Vec::new(), Vec::new());
            let mut seq = 10_000;
            while !stop.load(Ordering::SeqCst) {
                match bus.publish(&topic, probe(seq, "")).await {
                    Ok(id) => ok.push(id),
                    Err(e) => errors.push(e),
                }
                seq += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (ok, errors)
        })
    };
    tokio::task::spawn_blocking(restart)
        .await
        .expect("the restart ran");
    // The application declares its topology again (at start-up, or on a "does not exist").
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while let Err(e) = bus.declare(&topic, &group).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "declare never worked again after the restart: {e}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let (during_ok, during_errors) = during.await.expect("publisher task");

    let after = publish_all(&bus, &topic, 20_000..20_000 + MESSAGES).await;
    wait_handled(&ledger, &after, "published after the recovery").await;
    let handled = ledger.distinct();
    let report = RestartReport {
        failed_during: during_errors.len(),
        succeeded_during: during_ok.len(),
        lost_with_the_broker: during_ok.iter().filter(|id| !handled.contains(*id)).count(),
        first_error: during_errors.first().map(ToString::to_string),
    };
    assert!(
        !during_errors.is_empty(),
        "publishing while the broker was down never failed\n{report}"
    );
    for e in &during_errors {
        assert!(
            matches!(
                e.kind(),
                ErrorKind::Connection | ErrorKind::Broker | ErrorKind::Timeout
            ),
            "an outage error of kind {:?}: {e}",
            e.kind()
        );
        assert!(
            e.to_string().contains(&topic),
            "the error names the topic: {e}"
        );
    }
    let _ = sub.shutdown(Duration::from_secs(10)).await;
    report
}

async fn publish_all(bus: &Bus, topic: &str, seqs: std::ops::Range<u64>) -> Vec<String> {
    let mut ids = Vec::new();
    let all: Vec<_> = seqs.map(|seq| probe(seq, "")).collect();
    for batch in all.chunks(10) {
        ids.extend(
            bus.publish_batch(topic, batch.to_vec())
                .await
                .expect("publish while the broker is up"),
        );
    }
    ids
}

async fn wait_handled(ledger: &Ledger, ids: &[String], what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let handled = ledger.distinct();
        let missing = ids.iter().filter(|id| !handled.contains(*id)).count();
        if missing == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{missing} of the {} messages {what} were never handled",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
