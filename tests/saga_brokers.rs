//! Sagas on every transport with the PostgreSQL store: the fulfilment saga end to end on
//! memory, RabbitMQ, Kafka (Tansu) and SQS (LocalStack); a saga process killed with SIGKILL
//! mid-transition; two processes applying a burst of events to one instance; a timeout with
//! two service instances. `BUSBAR_POSTGRES_URL`, `BUSBAR_RABBITMQ_URL`, `BUSBAR_KAFKA_URL` and
//! `BUSBAR_SQS_URL` override the local servers.
//!
//! The crash and two-process tests run this test binary again as the child process.

#![cfg(all(
    feature = "postgres",
    feature = "rabbitmq",
    feature = "kafka",
    feature = "sqs"
))]

#[path = "../examples/fulfilment/shop.rs"]
mod shop;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use busbar::postgres::sqlx::{self, postgres::PgPoolOptions, PgPool};
use busbar::postgres::{PostgresOutbox, PostgresSagaStore, Relay};
use busbar::saga::{
    Committed, Fired, Loaded, RunningSaga, Saga, SagaCommit, SagaFilter, SagaRecord, SagaStatus,
    SagaStore, Step,
};
use busbar::{Bus, Envelope, Event, MemoryTransport, Message, RetryPolicy, Text, Transport};
use busbar_testkit::conformance::{brokers_required, unique, wait_limit};
use busbar_testkit::faults::FaultyTransport;
use serde::{Deserialize, Serialize};
use shop::{order, start_saga, start_services, Stock, Topics};

fn pg_url() -> String {
    std::env::var("BUSBAR_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

async fn pool() -> Option<PgPool> {
    match PgPoolOptions::new()
        .max_connections(10)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&pg_url())
        .await
    {
        Ok(pool) => Some(pool),
        Err(e) if !brokers_required() => {
            eprintln!("SKIPPED: PostgreSQL unreachable: {e}");
            None
        }
        Err(e) => panic!("PostgreSQL unreachable: {e}"),
    }
}

fn rabbitmq_url() -> String {
    std::env::var("BUSBAR_RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn kafka_url() -> String {
    std::env::var("BUSBAR_KAFKA_URL")
        .unwrap_or_else(|_| "kafka://127.0.0.1:9092?session_timeout_ms=6000".into())
}

fn sqs_url() -> String {
    std::env::var("BUSBAR_SQS_URL").unwrap_or_else(|_| {
        "sqs://?endpoint=http://127.0.0.1:4566&region=us-east-1&access_key_id=test&secret_access_key=test&wait_time_s=1&visibility_timeout_s=10".into()
    })
}

/// The broker's transport, or `None` (skipped) when it is unreachable outside CI.
async fn transport(url: &str) -> Option<Arc<dyn Transport>> {
    if url == "memory://" {
        return Some(Arc::new(MemoryTransport::new()));
    }
    match busbar::connect(url).await {
        Ok(bus) => Some(Arc::clone(bus.transport())),
        Err(e) if !brokers_required() => {
            eprintln!("SKIPPED: {url} unreachable: {e}");
            None
        }
        Err(e) => panic!("{url} unreachable: {e}"),
    }
}

fn bus_on(transport: Arc<dyn Transport>) -> Bus {
    Bus::builder(transport)
        .retry(
            RetryPolicy::exponential(5)
                .with_initial_backoff(Duration::from_millis(20))
                .with_max_backoff(Duration::from_millis(200)),
        )
        .build()
}

/// An outbox and a saga store in fresh tables, and the tables to drop afterwards.
async fn tables(
    bus: &Bus,
    pool: &PgPool,
    outbox_table: &str,
    saga_table: &str,
) -> (PostgresOutbox, PostgresSagaStore) {
    let outbox = PostgresOutbox::with_table(bus, pool.clone(), outbox_table).unwrap();
    outbox.ensure_schema().await.unwrap();
    let store = PostgresSagaStore::with_table(&outbox, saga_table).unwrap();
    store.ensure_schema().await.unwrap();
    store.ensure_schema().await.unwrap(); // idempotent
    (outbox, store)
}

fn table_name(prefix: &str) -> String {
    unique(prefix).replace('-', "_")
}

async fn drop_tables(pool: &PgPool, outbox: &str, saga: &str) {
    for table in [
        format!("{saga}_applied"),
        format!("{saga}_timeouts"),
        saga.to_string(),
        outbox.to_string(),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE IF EXISTS {table}")))
            .execute(pool)
            .await
            .unwrap();
    }
}

/// Waits (with the conformance deadline) until `instance` is finished; returns it.
async fn finished<S: busbar::saga::SagaData>(saga: &RunningSaga<S>, instance: &str) -> SagaRecord {
    let deadline = tokio::time::Instant::now() + wait_limit();
    loop {
        if let Some(record) = saga.get(instance).await.unwrap() {
            if record.status.is_finished() {
                return record;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "saga instance {instance} did not finish within {:?}: {:?}",
            wait_limit(),
            saga.get(instance).await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The short type names of what was published about `order_id` on the shop's topics, in
/// publish order, each id once (asserting no message was published twice).
fn sent_about(published: &[Message], topics: &Topics, order_id: &str) -> Vec<String> {
    let ours = [
        &topics.orders,
        &topics.inventory,
        &topics.payments,
        &topics.shipping,
    ];
    let mut seen = HashMap::new();
    let mut types = Vec::new();
    for m in published
        .iter()
        .filter(|m| ours.iter().any(|t| **t == m.topic) && m.key.as_deref() == Some(order_id))
    {
        *seen.entry(m.id.clone()).or_insert(0) += 1;
        if seen[&m.id] == 1 {
            let t = m.header("ce_type").unwrap_or("?");
            types.push(
                t.trim_start_matches("shop.")
                    .trim_end_matches(".v1")
                    .to_string(),
            );
        }
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "published more than once: {twice:?}");
    types
}

/// Happy path, declined payment and timeout on one transport, PostgreSQL store: final
/// states and the exact messages sent, in order.
async fn fulfilment_on(url: &str) {
    let Some(pool) = pool().await else { return };
    let Some(inner) = transport(url).await else {
        return;
    };
    let recorder = FaultyTransport::new(inner);
    let bus = bus_on(Arc::new(recorder.clone()));
    let topics = Topics::new(&unique("s"));
    let (outbox_table, saga_table) = (table_name("outbox"), table_name("saga"));
    let (outbox, store) = tables(&bus, &pool, &outbox_table, &saga_table).await;
    let relay = outbox.relay().start().await.unwrap();
    let stock = Stock::default();
    let services = start_services(&bus, &topics, &stock).await.unwrap();
    let saga = start_saga(&bus, &topics, Arc::new(store), Duration::from_secs(2))
        .await
        .unwrap();

    for (id, card) in [("o-1", "visa"), ("o-2", "declined"), ("o-3", "silent")] {
        bus.publish(&topics.orders, order(id, id, 100, card))
            .await
            .unwrap();
    }
    let paid = finished(&saga, "o-1").await;
    let declined = finished(&saga, "o-2").await;
    let silent = finished(&saga, "o-3").await;
    assert_eq!(paid.status, SagaStatus::Completed, "{paid:?}");
    assert_eq!(declined.status, SagaStatus::Compensated, "{declined:?}");
    assert_eq!(
        declined.failure.as_deref(),
        Some("payment declined: insufficient funds")
    );
    assert_eq!(silent.status, SagaStatus::Compensated, "{silent:?}");
    assert_eq!(
        silent.failure.as_deref(),
        Some("payment not confirmed in time")
    );

    // The compensations' own messages are relayed after their commit: wait for the last.
    let deadline = tokio::time::Instant::now() + wait_limit();
    while sent_about(&recorder.faults().published(), &topics, "o-3").len() < 5 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "o-3's cancellation was never published"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let published = recorder.faults().published();
    let happy = [
        "order_placed",
        "reserve_inventory",
        "charge_payment",
        "ship_order",
    ];
    let undone = [
        "order_placed",
        "reserve_inventory",
        "charge_payment",
        "release_inventory",
        "order_cancelled",
    ];
    assert_eq!(sent_about(&published, &topics, "o-1"), happy);
    assert_eq!(sent_about(&published, &topics, "o-2"), undone);
    assert_eq!(sent_about(&published, &topics, "o-3"), undone);
    // The inventory service handled the releases: only the paid order holds stock.
    let deadline = tokio::time::Instant::now() + wait_limit();
    while stock.reserved("o-2") + stock.reserved("o-3") != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the inventory was never released"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stock.reserved("o-1"), 1);
    let stats = saga.stats();
    assert_eq!(
        (stats.completed, stats.compensated, stats.timeouts_fired),
        (1, 2, 1),
        "{stats:?}"
    );

    saga.shutdown(Duration::from_secs(5)).await.unwrap();
    for subscription in services {
        subscription.shutdown(Duration::from_secs(5)).await.unwrap();
    }
    relay.shutdown(Duration::from_secs(5)).await.unwrap();
    drop_tables(&pool, &outbox_table, &saga_table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fulfilment_on_memory() {
    fulfilment_on("memory://").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fulfilment_on_rabbitmq() {
    fulfilment_on(&rabbitmq_url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fulfilment_on_kafka() {
    fulfilment_on(&kafka_url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fulfilment_on_sqs() {
    fulfilment_on(&sqs_url()).await;
}

// The crash: a saga process killed with SIGKILL mid-transition.

const CHILD: &str = "BUSBAR_SAGA_CHILD";

/// A store that hangs forever when the fulfilment saga commits its move to `charging`:
/// before the commit (nothing stored) or after it (stored, the delivery not yet acked).
struct HangsOnCharging {
    inner: PostgresSagaStore,
    after_commit: bool,
}

impl HangsOnCharging {
    async fn hang(&self, commit: &SagaCommit) {
        if commit.record.state == "charging" && commit.record.version == 2 {
            println!("HUNG {}", commit.record.instance_id);
            let _ = std::io::stdout().flush();
            std::future::pending::<()>().await;
        }
    }
}

#[async_trait]
impl SagaStore for HangsOnCharging {
    async fn load(&self, saga: &str, instance_id: &str, event_id: &str) -> busbar::Result<Loaded> {
        self.inner.load(saga, instance_id, event_id).await
    }
    async fn find_by_correlation(
        &self,
        saga: &str,
        correlation_id: &str,
    ) -> busbar::Result<Option<SagaRecord>> {
        self.inner.find_by_correlation(saga, correlation_id).await
    }
    async fn commit(&self, bus: &Bus, commit: SagaCommit) -> busbar::Result<Committed> {
        if !self.after_commit {
            self.hang(&commit).await;
        }
        let hang = commit.clone();
        let committed = self.inner.commit(bus, commit).await?;
        if self.after_commit {
            self.hang(&hang).await;
        }
        Ok(committed)
    }
    async fn fire_due_timeouts(
        &self,
        bus: &Bus,
        saga: &str,
        topic: &str,
        limit: usize,
    ) -> busbar::Result<Fired> {
        self.inner.fire_due_timeouts(bus, saga, topic, limit).await
    }
    async fn list(&self, saga: &str, filter: &SagaFilter) -> busbar::Result<Vec<SagaRecord>> {
        self.inner.list(saga, filter).await
    }
}

/// This test binary run again as a child process, running one test; its stdout line by line.
struct ChildProcess {
    child: Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl ChildProcess {
    fn spawn(test: &str, env: &[(String, String)]) -> Self {
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (send, lines) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = send.send(line);
            }
        });
        ChildProcess { child, lines }
    }

    /// Waits for a line starting with `prefix`.
    async fn said(&mut self, prefix: &str) -> String {
        let wait = async {
            while let Some(line) = self.lines.recv().await {
                // The first line also carries the test harness's "test … " prefix.
                if let Some(at) = line.find(prefix) {
                    return line[at..].to_string();
                }
            }
            panic!("the child ended without saying {prefix}");
        };
        tokio::time::timeout(Duration::from_secs(90), wait)
            .await
            .unwrap_or_else(|_| panic!("the child said no {prefix} within 90 s"))
    }

    /// SIGKILL, by its pid.
    fn kill(mut self) {
        // Drop kills too; this one waits and fails loudly.
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(format!("{CHILD}_{name}")).ok()
}

/// The child: the fulfilment saga on RabbitMQ with a store that hangs on the move to
/// `charging`. A no-op unless run by `saga_killed_mid_transition`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_child_saga() {
    let (Some(suffix), Some(outbox_table), Some(saga_table), Some(mode)) =
        (env("TOPICS"), env("OUTBOX"), env("SAGA"), env("MODE"))
    else {
        return;
    };
    let pool = pool().await.unwrap();
    let bus = bus_on(transport(&rabbitmq_url()).await.unwrap());
    let outbox = PostgresOutbox::with_table(&bus, pool, &outbox_table).unwrap();
    let store = HangsOnCharging {
        inner: PostgresSagaStore::with_table(&outbox, &saga_table).unwrap(),
        after_commit: mode == "after",
    };
    let topics = Topics::new(&suffix);
    let _saga = start_saga(&bus, &topics, Arc::new(store), Duration::from_secs(60))
        .await
        .unwrap();
    println!("READY");
    let _ = std::io::stdout().flush();
    std::future::pending::<()>().await;
}

async fn killed_mid_transition(mode: &str) {
    let Some(pool) = pool().await else { return };
    let Some(inner) = transport(&rabbitmq_url()).await else {
        return;
    };
    let recorder = FaultyTransport::new(inner);
    let bus = bus_on(Arc::new(recorder.clone()));
    let suffix = unique("c");
    let topics = Topics::new(&suffix);
    let (outbox_table, saga_table) = (table_name("outbox"), table_name("saga"));
    let (outbox, store) = tables(&bus, &pool, &outbox_table, &saga_table).await;
    // This process runs the services and the relay; the child runs the saga.
    let relay = outbox.relay().start().await.unwrap();
    let stock = Stock::default();
    let services = start_services(&bus, &topics, &stock).await.unwrap();
    let vars = [
        (format!("{CHILD}_TOPICS"), suffix.clone()),
        (format!("{CHILD}_OUTBOX"), outbox_table.clone()),
        (format!("{CHILD}_SAGA"), saga_table.clone()),
        (format!("{CHILD}_MODE"), mode.to_string()),
    ];
    let mut saga_process = ChildProcess::spawn("crash_child_saga", &vars);
    saga_process.said("READY").await;
    bus.publish(&topics.orders, order("o-1", "sku", 100, "visa"))
        .await
        .unwrap();

    // The child hangs in the move to `charging`; killed there.
    saga_process.said("HUNG o-1").await;
    let before = store
        .load("fulfilment", "o-1", "")
        .await
        .unwrap()
        .record
        .unwrap();
    saga_process.kill();
    let expected_version = if mode == "after" { 2 } else { 1 };
    assert_eq!(
        before.version, expected_version,
        "the crash point is not where the test meant it"
    );

    // A new saga process (here) takes over: the order ends as if nothing had happened.
    let saga = start_saga(&bus, &topics, Arc::new(store), Duration::from_secs(60))
        .await
        .unwrap();
    let record = finished(&saga, "o-1").await;
    assert_eq!(record.status, SagaStatus::Completed, "{record:?}");
    let deadline = tokio::time::Instant::now() + wait_limit();
    while sent_about(&recorder.faults().published(), &topics, "o-1").len() < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the shipment was never published"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        sent_about(&recorder.faults().published(), &topics, "o-1"),
        [
            "order_placed",
            "reserve_inventory",
            "charge_payment",
            "ship_order"
        ],
        "a step ran twice or is missing"
    );
    saga.shutdown(Duration::from_secs(5)).await.unwrap();
    for subscription in services {
        subscription.shutdown(Duration::from_secs(5)).await.unwrap();
    }
    relay.shutdown(Duration::from_secs(5)).await.unwrap();
    drop_tables(&pool, &outbox_table, &saga_table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saga_killed_before_its_commit_redoes_the_transition_once() {
    killed_mid_transition("before").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saga_killed_after_its_commit_skips_the_redelivered_event() {
    killed_mid_transition("after").await;
}

// Two processes applying a burst of events to one instance.

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Add {
    counter: String,
    n: u64,
}
impl Event for Add {
    const TYPE: &'static str = "test.saga_add.v1";
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Sum {
    total: u64,
    adds: u64,
}

/// Sums `Add` events per counter; events have no key, so they are handled concurrently, and
/// several processes share the group.
fn sums(topic: &str, group: &str) -> Saga<Sum> {
    Saga::<Sum>::new("sums")
        .listen(topic)
        .group(group)
        .own_topic(&format!("{topic}-saga"))
        .concurrency(8)
        .correlate(|add: &Envelope<Add>| add.payload.counter.clone())
        .initially(|s| {
            s.on(|add: Envelope<Add>, mut step: Step<Sum>| async move {
                step.data_mut().total += add.payload.n;
                step.data_mut().adds += 1;
                Ok(step)
            })
        })
}

/// The child: the `sums` saga on RabbitMQ, until killed. A no-op unless run by the test below.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_child_saga() {
    let (Some(topic), Some(group), Some(outbox_table), Some(saga_table)) =
        (env("TOPIC"), env("GROUP"), env("OUTBOX"), env("SAGA"))
    else {
        return;
    };
    let pool = pool().await.unwrap();
    let bus = bus_on(transport(&rabbitmq_url()).await.unwrap());
    let outbox = PostgresOutbox::with_table(&bus, pool, &outbox_table).unwrap();
    let store = PostgresSagaStore::with_table(&outbox, &saga_table).unwrap();
    let saga = sums(&topic, &group)
        .start(&bus, Arc::new(store))
        .await
        .unwrap();
    println!("READY");
    let _ = std::io::stdout().flush();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        println!("TRANSITIONS {}", saga.stats().transitions);
        let _ = std::io::stdout().flush();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_apply_a_burst_for_one_instance_without_losing_an_update() {
    let Some(pool) = pool().await else { return };
    let Some(inner) = transport(&rabbitmq_url()).await else {
        return;
    };
    let bus = bus_on(inner);
    let (topic, group) = (unique("sums"), unique("sums"));
    let (outbox_table, saga_table) = (table_name("outbox"), table_name("saga"));
    let (_outbox, store) = tables(&bus, &pool, &outbox_table, &saga_table).await;
    bus.declare(&topic, &group).await.unwrap();
    let vars = [
        (format!("{CHILD}_TOPIC"), topic.clone()),
        (format!("{CHILD}_GROUP"), group.clone()),
        (format!("{CHILD}_OUTBOX"), outbox_table.clone()),
        (format!("{CHILD}_SAGA"), saga_table.clone()),
    ];
    let mut other = ChildProcess::spawn("burst_child_saga", &vars);
    other.said("READY").await;
    let saga = sums(&topic, &group)
        .start(&bus, Arc::new(store))
        .await
        .unwrap();

    let adds: Vec<Add> = (1..=200)
        .map(|n| Add {
            counter: "c".into(),
            n,
        })
        .collect();
    bus.publish_batch(&topic, adds).await.unwrap();
    let deadline = tokio::time::Instant::now() + wait_limit();
    let sum = loop {
        let sum: Sum = saga
            .get("c")
            .await
            .unwrap()
            .map(|r| r.data().unwrap())
            .unwrap_or_default();
        if sum.adds >= 200 || tokio::time::Instant::now() > deadline {
            break sum;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        (sum.adds, sum.total),
        (200, 200 * 201 / 2),
        "an update was lost or applied twice"
    );
    // Each process counts a transition just after committing it: read both until they add up
    // (or the limit passes, and the assertion below says by how much they do not).
    let deadline = tokio::time::Instant::now() + wait_limit();
    let (here, there) = loop {
        let line = other.said("TRANSITIONS").await;
        let there: u64 = line["TRANSITIONS ".len()..].parse().unwrap();
        let here = saga.stats().transitions;
        if here + there >= 200 || tokio::time::Instant::now() > deadline {
            break (here, there);
        }
    };
    assert_eq!(
        here + there,
        200,
        "each event applied once across both processes"
    );
    assert!(
        here > 0 && there > 0,
        "one process did everything ({here} here, {there} there)"
    );
    eprintln!(
        "applied {here} here and {there} in the other process; {} conflicts here",
        saga.stats().conflicts
    );
    other.kill();
    saga.shutdown(Duration::from_secs(5)).await.unwrap();
    drop_tables(&pool, &outbox_table, &saga_table).await;
}

// A timeout with two service instances.

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Opened {
    id: String,
}
impl Event for Opened {
    const TYPE: &'static str = "test.saga_opened.v1";
    fn key(&self) -> Option<Text> {
        Some(self.id.as_str().into())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Closed {
    id: String,
}
impl Event for Closed {
    const TYPE: &'static str = "test.saga_closed.v1";
    fn key(&self) -> Option<Text> {
        Some(self.id.as_str().into())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Reminder {
    id: String,
}
impl Event for Reminder {
    const TYPE: &'static str = "test.saga_reminder.v1";
    fn key(&self) -> Option<Text> {
        Some(self.id.as_str().into())
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Ticket {
    id: String,
}

fn tickets(topic: &str, group: &str, reminders: &str) -> Saga<Ticket> {
    let reminders = reminders.to_string();
    Saga::<Ticket>::new("tickets")
        .listen(topic)
        .group(group)
        .own_topic(&format!("{topic}-saga"))
        .timeout_poll(Duration::from_millis(100))
        .initially(|s| {
            s.on(
                |opened: Envelope<Opened>, mut step: Step<Ticket>| async move {
                    step.data_mut().id = opened.payload.id;
                    step.schedule("remind", Duration::from_millis(500));
                    step.transition_to("open");
                    Ok(step)
                },
            )
        })
        .during("open", move |s| {
            let reminders = reminders.clone();
            s.on(|_: Envelope<Closed>, mut step: Step<Ticket>| async move {
                step.complete();
                Ok(step)
            })
            .on_timeout("remind", move |mut step: Step<Ticket>| {
                let reminders = reminders.clone();
                async move {
                    let id = step.data().id.clone();
                    step.send(&reminders, Reminder { id })?;
                    step.complete();
                    Ok(step)
                }
            })
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_fires_once_with_two_instances_and_not_after_the_awaited_event() {
    let Some(pool) = pool().await else { return };
    let (Some(first), Some(second)) = (
        transport(&rabbitmq_url()).await,
        transport(&rabbitmq_url()).await,
    ) else {
        return;
    };
    let (topic, group, reminders) = (unique("tickets"), unique("tickets"), unique("reminders"));
    let (outbox_table, saga_table) = (table_name("outbox"), table_name("saga"));
    let (bus_a, bus_b) = (bus_on(first), bus_on(second));
    let (outbox_a, store_a) = tables(&bus_a, &pool, &outbox_table, &saga_table).await;
    let (outbox_b, store_b) = tables(&bus_b, &pool, &outbox_table, &saga_table).await;
    // Both instances run a relay (one is active) and the saga.
    let relays: Vec<Relay> = vec![
        outbox_a.relay().start().await.unwrap(),
        outbox_b.relay().start().await.unwrap(),
    ];
    let received = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = Arc::clone(&received);
    let watcher = bus_a
        .subscribe::<Reminder>(&reminders, &unique("watch"))
        .start(move |reminder: Envelope<Reminder>, _| {
            let seen = Arc::clone(&seen);
            async move {
                seen.lock().unwrap().push(reminder.payload.id);
                Ok(())
            }
        })
        .await
        .unwrap();
    let saga_a = tickets(&topic, &group, &reminders)
        .start(&bus_a, Arc::new(store_a))
        .await
        .unwrap();
    let saga_b = tickets(&topic, &group, &reminders)
        .start(&bus_b, Arc::new(store_b))
        .await
        .unwrap();

    bus_a
        .publish(&topic, Opened { id: "late".into() })
        .await
        .unwrap();
    bus_a
        .publish(
            &topic,
            Opened {
                id: "closed".into(),
            },
        )
        .await
        .unwrap();
    bus_a
        .publish(
            &topic,
            Closed {
                id: "closed".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        finished(&saga_a, "late").await.status,
        SagaStatus::Completed
    );
    assert_eq!(
        finished(&saga_a, "closed").await.status,
        SagaStatus::Completed
    );
    let deadline = tokio::time::Instant::now() + wait_limit();
    while received.lock().unwrap().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the reminder never arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Past the cancelled timeout's due time, with both pollers (every 100 ms) running
    // several rounds since.
    let opened = saga_a.get("closed").await.unwrap().unwrap().created_at;
    wait_until_past(opened + chrono_ms(500 + 5 * 100)).await;
    assert_eq!(
        *received.lock().unwrap(),
        ["late"],
        "fired twice, or after its event"
    );
    let fired = saga_a.stats().timeouts_fired + saga_b.stats().timeouts_fired;
    assert_eq!(
        fired, 1,
        "one timeout was due; both pollers together fired {fired}"
    );

    saga_a.shutdown(Duration::from_secs(5)).await.unwrap();
    saga_b.shutdown(Duration::from_secs(5)).await.unwrap();
    watcher.shutdown(Duration::from_secs(5)).await.unwrap();
    for relay in relays {
        relay.shutdown(Duration::from_secs(5)).await.unwrap();
    }
    drop_tables(&pool, &outbox_table, &saga_table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_survives_a_restart_of_the_service() {
    let Some(pool) = pool().await else { return };
    let bus = bus_on(Arc::new(MemoryTransport::new()));
    let (topic, group, reminders) = (unique("tickets"), unique("tickets"), unique("reminders"));
    let (outbox_table, saga_table) = (table_name("outbox"), table_name("saga"));
    let (outbox, store) = tables(&bus, &pool, &outbox_table, &saga_table).await;
    let relay = outbox.relay().start().await.unwrap();
    let received = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = Arc::clone(&received);
    let watcher = bus
        .subscribe::<Reminder>(&reminders, "watch")
        .start(move |reminder: Envelope<Reminder>, _| {
            let seen = Arc::clone(&seen);
            async move {
                seen.lock().unwrap().push(reminder.payload.id);
                Ok(())
            }
        })
        .await
        .unwrap();
    let saga = tickets(&topic, &group, &reminders)
        .start(&bus, Arc::new(store.clone()))
        .await
        .unwrap();
    bus.publish(&topic, Opened { id: "t-1".into() })
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + wait_limit();
    while saga
        .get("t-1")
        .await
        .unwrap()
        .is_none_or(|r| r.timeouts.is_empty())
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the ticket never opened"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The service stops before the timeout is due, and comes back after.
    let due_at = saga.get("t-1").await.unwrap().unwrap().timeouts[0].due_at;
    saga.shutdown(Duration::from_secs(5)).await.unwrap();
    wait_until_past(due_at).await;
    let saga = tickets(&topic, &group, &reminders)
        .start(&bus, Arc::new(store))
        .await
        .unwrap();
    assert_eq!(finished(&saga, "t-1").await.status, SagaStatus::Completed);
    assert_eq!(saga.stats().timeouts_fired, 1);
    let deadline = tokio::time::Instant::now() + wait_limit();
    while received.lock().unwrap().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the reminder never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(*received.lock().unwrap(), ["t-1"]);
    watcher.shutdown(Duration::from_secs(5)).await.unwrap();
    saga.shutdown(Duration::from_secs(5)).await.unwrap();
    relay.shutdown(Duration::from_secs(5)).await.unwrap();
    drop_tables(&pool, &outbox_table, &saga_table).await;
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Booking {
    id: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_compensation_is_dead_lettered_on_the_broker_and_shown_on_the_instance() {
    let Some(pool) = pool().await else { return };
    let Some(inner) = transport(&rabbitmq_url()).await else {
        return;
    };
    let bus = Bus::builder(inner)
        .retry(RetryPolicy::exponential(3).with_initial_backoff(Duration::from_millis(10)))
        .build();
    let (topic, group) = (unique("bookings"), unique("bookings"));
    let (outbox_table, saga_table) = (table_name("outbox"), table_name("saga"));
    let (outbox, store) = tables(&bus, &pool, &outbox_table, &saga_table).await;
    let relay = outbox.relay().start().await.unwrap();
    let saga = Saga::<Booking>::new("bookings")
        .listen(&topic)
        .group(&group)
        .own_topic(&format!("{topic}-saga"))
        .initially(|s| {
            s.on(
                |opened: Envelope<Opened>, mut step: Step<Booking>| async move {
                    step.data_mut().id = opened.payload.id;
                    step.compensate_with("refund")?;
                    step.transition_to("booked");
                    Ok(step)
                },
            )
        })
        .during("booked", |s| {
            s.on(|_: Envelope<Closed>, mut step: Step<Booking>| async move {
                step.fail("the hotel cancelled");
                Ok(step)
            })
        })
        .compensation("refund", |_: Booking, _| async {
            Err(busbar::HandlerError::transient(
                "the payment provider is down",
            ))
        })
        .start(&bus, Arc::new(store))
        .await
        .unwrap();
    bus.publish(&topic, Opened { id: "b-1".into() })
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + wait_limit();
    while saga.get("b-1").await.unwrap().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the booking never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bus.publish(&topic, Closed { id: "b-1".into() })
        .await
        .unwrap();
    let record = finished(&saga, "b-1").await;
    assert_eq!(record.status, SagaStatus::Failed, "{record:?}");
    let failed = record.failed_compensation.unwrap();
    assert_eq!((failed.name.as_str(), failed.attempts), ("refund", 3));
    assert!(
        failed.error.contains("the payment provider is down"),
        "{}",
        failed.error
    );

    let deadline = tokio::time::Instant::now() + wait_limit();
    let dead = loop {
        let dead = bus
            .dead_letters(saga.own_topic(), &group, 10)
            .await
            .unwrap();
        if !dead.is_empty() || tokio::time::Instant::now() > deadline {
            break dead;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(dead.len(), 1, "the compensation was not dead-lettered");
    assert_eq!(dead[0].info.attempts, 3);
    let body: serde_json::Value = serde_json::from_slice(&dead[0].message.payload).unwrap();
    assert_eq!(
        (body["saga"].as_str(), body["instance_id"].as_str()),
        (Some("bookings"), Some("b-1"))
    );
    assert_eq!(
        (body["state"].as_str(), body["data"]["id"].as_str()),
        (Some("booked"), Some("b-1"))
    );
    saga.shutdown(Duration::from_secs(5)).await.unwrap();
    relay.shutdown(Duration::from_secs(5)).await.unwrap();
    drop_tables(&pool, &outbox_table, &saga_table).await;
}

/// Waits until the wall clock is past `at`.
async fn wait_until_past(at: chrono::DateTime<chrono::Utc>) {
    while chrono::Utc::now() <= at {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn chrono_ms(ms: i64) -> chrono::Duration {
    chrono::Duration::milliseconds(ms)
}
