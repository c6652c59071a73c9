//! A broker restarted under a running bus. Two scenarios, for the two kinds of test server:
//!
//! [`recovers_from_an_empty_restart`], for a server that comes back empty (LocalStack keeps no
//! state): what can be tested is the client side.
//!
//! - publishes while the broker is down fail with a clear, typed error naming the topic (never
//!   a silent success);
//! - once the application declares its topology again, publishing works;
//! - the same subscription, never restarted, handles everything published after the recovery.
//! - a readiness probe ([`Bus::health`]) sees the bus ready, then not ready while the broker
//!   is down (yet live throughout); bus and subscription are ready again after the recovery.
//!
//! [`loses_nothing_across_a_durable_restart`], for a server that keeps its log (Tansu on S3
//! storage): [`DURABLE_MESSAGES`] messages published at a steady pace, the broker restarted
//! partway, and every acknowledged message accounted for.
//!
//! - a publish either fails with a clear, typed error naming the topic, or is acknowledged; an
//!   acknowledged message is handled, whether it was published before, during or after the
//!   outage (nothing acknowledged is lost);
//! - publisher and subscription recover by themselves: nobody declares again or restarts them;
//! - a readiness probe sees the bus ready, then not ready during the outage, then ready again.
//!
//! The test reads the broker's log back afterwards ([`BrokerLog`]), so a loss is pinned on
//! the side that caused it: a message in the log but never handled is busbar's, and fails the
//! run; a message missing from the log fails it too, unless the client saw the broker
//! acknowledge it blindly (Tansu's S3 storage, killed mid-write, answers a producer's retry of
//! a batch it never stored with "duplicate sequence number", which a Kafka client must count
//! as delivered; see the Kafka adapter's README).
//!
//! ```no_run
//! use busbar_testkit::restart::{broker_script, enabled, recovers_from_an_empty_restart};
//! # async fn run(transport: std::sync::Arc<dyn busbar_core::Transport>) {
//! if !enabled("restarts the local LocalStack") {
//!     return;
//! }
//! let report =
//!     recovers_from_an_empty_restart(transport, || broker_script("sqs-restart")).await;
//! println!("{report}");
//! # }
//! ```

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use busbar_core::Text;
use busbar_core::{Bus, Error, ErrorKind, RetryPolicy, Transport};

use crate::conformance::{probe, unique, Ledger};

/// Whether restart tests run: they stop a shared local broker, so they run only where brokers
/// are required (`CI=true`, where they never skip) or with `BUSBAR_RESTART_TESTS=1`. When not,
/// says on stderr that the test (which `what`) is skipped.
pub fn enabled(what: &str) -> bool {
    if crate::conformance::brokers_required() || std::env::var_os("BUSBAR_RESTART_TESTS").is_some()
    {
        return true;
    }
    eprintln!("SKIPPED: {what}; set CI=true or BUSBAR_RESTART_TESTS=1");
    false
}

/// Runs `scripts/local-brokers.sh <service>` (e.g. `sqs-restart`, `kafka-durable-restart`)
/// and panics when it fails. It blocks: call it from a restart closure, or on a blocking
/// thread.
pub fn broker_script(service: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/local-brokers.sh");
    let status = std::process::Command::new("bash")
        .args([script, service])
        .status()
        .expect("the broker script runs");
    assert!(status.success(), "local-brokers.sh {service} failed");
}

/// Runs `rabbitmqctl <args>` against the local node (`rabbit@localhost`, as
/// `scripts/local-brokers.sh rabbitmq` starts it) and panics when it fails; e.g.
/// `["stop_app"]`, `["start_app"]`, `["await_startup"]` to restart the broker under a test.
pub fn rabbitmqctl(args: &[&str]) {
    rabbitmqctl_output(args);
}

/// Runs `rabbitmqctl <args>` as [`rabbitmqctl`] does and returns what it printed, e.g.
/// `["list_connections", "--quiet", "--no-table-headers", "state"]`.
pub fn rabbitmqctl_output(args: &[&str]) -> String {
    let output = std::process::Command::new("rabbitmqctl")
        .args(args)
        .env("RABBITMQ_NODENAME", "rabbit@localhost")
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// How many messages the durable-restart run publishes, with the broker restarted partway.
pub const DURABLE_MESSAGES: u64 = 5_000;

/// What the broker's log holds for the topic after the run, read back with the raw client.
#[derive(Debug, Default)]
pub struct BrokerLog {
    /// The ids of the messages in the log.
    pub ids: HashSet<Text>,
    /// Messages the broker acknowledged without storing them, as far as the client can tell
    /// (on Kafka: messages of batches answered `DUPLICATE_SEQUENCE_NUMBER`, which the protocol
    /// says were written before). Zero on a broker that loses nothing.
    pub blind_acks: u64,
}

/// What a durable-restart run saw: the accounting table. It is returned only when nothing
/// acknowledged was lost (the run fails otherwise, naming the lost messages).
#[derive(Debug)]
pub struct DurableRestartReport {
    /// Messages the broker acknowledged (the publish returned `Ok`).
    pub published: usize,
    /// Messages whose publish failed with a clear error (checked: typed, naming the topic).
    pub failed: usize,
    /// Of the acknowledged, how many were acknowledged while the restart ran.
    pub published_during: usize,
    /// Deliveries beyond the first (at-least-once redelivery across the restart).
    pub redelivered: usize,
    /// Acknowledged messages the broker's log does not hold, each explained by a blind
    /// acknowledgement: the broker lost them, not busbar.
    pub lost_by_the_broker: Vec<Text>,
    /// The broker's blind acknowledgements (see [`BrokerLog::blind_acks`]).
    pub blind_acks: u64,
    /// The first error a publish got.
    pub first_error: Option<String>,
}

impl std::fmt::Display for DurableRestartReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "| attempted | published (acked) | acked during the restart | failed publishes | handled | dead-lettered | lost by busbar | lost by the broker (blind acks) | redelivered |"
        )?;
        writeln!(f, "|---|---|---|---|---|---|---|---|---|")?;
        write!(
            f,
            "| {} | {} | {} | {} | {} | 0 | 0 | {} ({}) | {} |",
            self.published + self.failed,
            self.published,
            self.published_during,
            self.failed,
            // Every acknowledged message in the broker's log was handled (the run fails
            // otherwise): all but those the broker lost.
            self.published - self.lost_by_the_broker.len(),
            self.lost_by_the_broker.len(),
            self.blind_acks,
            self.redelivered,
        )?;
        if let Some(first) = &self.first_error {
            write!(f, "\nfirst publish error: {first}")?;
        }
        Ok(())
    }
}

/// How many messages are published before the restart, and again after the recovery.
pub const MESSAGES: u64 = 300;

/// How many publishers keep publishing while the broker restarts, in the empty-restart run.
const DURING_PUBLISHERS: u64 = 8;

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
    let Running {
        bus,
        topic,
        group,
        ledger,
        sub,
    } = start(transport).await;

    let before = publish_all(&bus, &topic, 0..MESSAGES).await;
    wait_handled(&ledger, &before, "published before the restart").await;

    // While the broker goes down and comes back, each of several publishers publishes one
    // message every 50 ms. Several: a client may spend seconds on one publish (its own
    // retries), and the outage must be seen by more than one or two of them.
    let stop = Arc::new(AtomicBool::new(false));
    let during: Vec<_> = (0..DURING_PUBLISHERS)
        .map(|publisher| {
            let (bus, topic, stop) = (bus.clone(), topic.clone(), Arc::clone(&stop));
            tokio::spawn(async move {
                let (mut ok, mut errors): (Vec<Text>, Vec<Error>) = (Vec::new(), Vec::new());
                let mut seq = 10_000 + publisher * 1_000;
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
        })
        .collect();
    let probing = sample_readiness(&bus, &stop);
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
    let (mut during_ok, mut during_errors) = (Vec::new(), Vec::new());
    for publisher in during {
        let (ok, errors) = publisher.await.expect("publisher task");
        during_ok.extend(ok);
        during_errors.extend(errors);
    }

    saw_the_outage(probing).await;
    let after = publish_all(&bus, &topic, 20_000..20_000 + MESSAGES).await;
    wait_handled(&ledger, &after, "published after the recovery").await;
    ready_again(&bus, &sub).await;
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
    assert_outage_errors(&during_errors, &topic);
    let _ = sub.shutdown(Duration::from_secs(10)).await;
    report
}

/// Runs the durable scenario (see the module docs). The publisher sends [`DURABLE_MESSAGES`]
/// messages in batches of 10, one batch every 20 ms; once 1,000 are acknowledged, `restart`
/// stops the broker and starts it again (on a blocking thread). Then 300 more are published,
/// and `read_log` reads the topic (its argument) back from the broker. Panics, saying what
/// broke, when a guarantee does not hold.
pub async fn loses_nothing_across_a_durable_restart<F, L, Fut>(
    transport: Arc<dyn Transport>,
    restart: F,
    read_log: L,
) -> DurableRestartReport
where
    F: FnOnce() + Send + 'static,
    L: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = BrokerLog>,
{
    let Running {
        bus,
        topic,
        group: _,
        ledger,
        sub,
    } = start(transport).await;

    let restarting = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(std::sync::Mutex::new(Vec::<Text>::new()));
    let publisher = {
        let (bus, topic) = (bus.clone(), topic.clone());
        let (restarting, acked) = (Arc::clone(&restarting), Arc::clone(&acked));
        tokio::spawn(async move {
            let (mut during, mut failed, mut errors) = (0, 0, Vec::<Error>::new());
            let mut last_batch_ok = false;
            let all: Vec<_> = (0..DURABLE_MESSAGES).map(|seq| probe(seq, "")).collect();
            for batch in all.chunks(10) {
                match bus.publish_batch(&topic, batch.to_vec()).await {
                    Ok(ids) => {
                        if restarting.load(Ordering::SeqCst) {
                            during += ids.len();
                        }
                        crate::conformance::lock(&acked).extend(ids);
                        last_batch_ok = true;
                    }
                    Err(e) => {
                        failed += batch.len();
                        errors.push(e);
                        last_batch_ok = false;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (during, failed, errors, last_batch_ok)
        })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while crate::conformance::lock(&acked).len() < 1_000 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "1,000 publishes were never acknowledged before the restart"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let probing = sample_readiness(&bus, &stop);
    restarting.store(true, Ordering::SeqCst);
    tokio::task::spawn_blocking(restart)
        .await
        .expect("the restart ran");
    restarting.store(false, Ordering::SeqCst);
    let (published_during, failed, errors, last_batch_ok) =
        publisher.await.expect("publisher task");
    stop.store(true, Ordering::SeqCst);
    saw_the_outage(probing).await;
    let mut published = std::mem::take(&mut *crate::conformance::lock(&acked));
    published.extend(publish_all(&bus, &topic, DURABLE_MESSAGES..DURABLE_MESSAGES + 300).await);
    let first_error = errors.first().map(ToString::to_string);
    assert_outage_errors(&errors, &topic);
    assert!(
        last_batch_ok,
        "the publisher had not recovered by its last batch: {first_error:?}"
    );
    let log = read_log(topic.clone()).await;
    let (in_log, lost_by_the_broker): (Vec<Text>, Vec<Text>) = published
        .iter()
        .cloned()
        .partition(|id| log.ids.contains(id));
    wait_handled(&ledger, &in_log, "acknowledged and in the broker's log").await;
    assert!(
        lost_by_the_broker.len() as u64 <= log.blind_acks,
        "{} acknowledged messages are missing from the broker's log, and the broker \
         acknowledged only {} blindly: lost without a trace, e.g. {:?}",
        lost_by_the_broker.len(),
        log.blind_acks,
        &lost_by_the_broker[..lost_by_the_broker.len().min(5)]
    );
    let report = DurableRestartReport {
        published: published.len(),
        failed,
        published_during,
        redelivered: ledger.len() - ledger.distinct().len(),
        lost_by_the_broker,
        blind_acks: log.blind_acks,
        first_error,
    };
    ready_again(&bus, &sub).await;
    let _ = sub.shutdown(Duration::from_secs(10)).await;
    report
}

/// A readiness probe sampling [`Bus::health`] every 20 ms until `stop`: the changes it saw
/// (`true` for ready). It fails if the bus is ever not live.
fn sample_readiness(bus: &Bus, stop: &Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<bool>> {
    let (bus, stop) = (bus.clone(), Arc::clone(stop));
    tokio::spawn(async move {
        let mut seen = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            let health = bus.health();
            assert!(
                health.is_live(),
                "a bus whose broker restarts stays live: {health:?}"
            );
            if seen.last() != Some(&health.is_ready()) {
                seen.push(health.is_ready());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        seen
    })
}

/// Checks that the probe saw the bus ready, then not ready while the broker was down.
async fn saw_the_outage(probing: tokio::task::JoinHandle<Vec<bool>>) {
    let readiness = probing.await.expect("the probe ran");
    assert!(
        readiness.starts_with(&[true, false]),
        "the probe saw the bus ready, then not ready while the broker was down: {readiness:?}"
    );
}

/// Waits (at most 60 s) until bus and subscription are ready again after the recovery.
async fn ready_again(bus: &Bus, sub: &busbar_core::Subscription) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (health, sub_health) = (bus.health(), sub.health());
        if health.is_ready() && sub_health.is_ready() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not ready again after the recovery: {health:?} {sub_health:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A bus with a subscription recording every probe on fresh names: what both scenarios run.
struct Running {
    bus: Bus,
    topic: String,
    group: String,
    ledger: Ledger,
    sub: busbar_core::Subscription,
}

async fn start(transport: Arc<dyn Transport>) -> Running {
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
    Running {
        bus,
        topic,
        group,
        ledger,
        sub,
    }
}

fn assert_outage_errors(errors: &[Error], topic: &str) {
    for e in errors {
        assert!(
            matches!(
                e.kind(),
                ErrorKind::Connection | ErrorKind::Broker | ErrorKind::Timeout
            ),
            "an outage error of kind {:?}: {e}",
            e.kind()
        );
        assert!(
            e.to_string().contains(topic),
            "the error names the topic: {e}"
        );
    }
}

async fn publish_all(bus: &Bus, topic: &str, seqs: std::ops::Range<u64>) -> Vec<Text> {
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

async fn wait_handled(ledger: &Ledger, ids: &[Text], what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let handled = ledger.distinct();
        let missing: Vec<&Text> = ids.iter().filter(|id| !handled.contains(*id)).collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of the {} messages {what} were never handled, e.g. {:?}",
            missing.len(),
            ids.len(),
            &missing[..missing.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
