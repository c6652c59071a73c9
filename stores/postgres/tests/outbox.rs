//! The transactional outbox against the local PostgreSQL, relayed to every transport:
//! memory, RabbitMQ, Kafka (Tansu) and SQS FIFO (LocalStack). `BUSBAR_POSTGRES_URL`,
//! `BUSBAR_RABBITMQ_URL`, `BUSBAR_KAFKA_URL` and `BUSBAR_SQS_URL` override the local servers.
//!
//! The relay killed between the broker's confirm and the mark (a real process, SIGKILL) is
//! `relay_killed_between_publish_and_mark_republishes_the_same_ids` below: the test binary runs
//! itself as the child.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use busbar_core::transport::{ConsumeOptions, DeliveryStream};
use busbar_core::{
    Bus, Capabilities, Context, Envelope, ErrorKind, HandlerError, MemoryOptions, MemoryTransport,
    Message, RetryPolicy, Transport,
};
use busbar_postgres::sqlx::{self, postgres::PgPoolOptions, PgPool, Row};
use busbar_postgres::{PostgresIdempotencyStore, PostgresOutbox};
use busbar_testkit::conformance::{brokers_required, probe, unique, wait_for, Probe};
use busbar_testkit::faults::FaultyTransport;

fn pg_url() -> String {
    std::env::var("BUSBAR_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

async fn pool() -> Option<PgPool> {
    match PgPoolOptions::new()
        .max_connections(12)
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

/// A connected transport, or `None` (skipped) when the broker is unreachable outside CI.
async fn broker(
    name: &str,
    connect: impl std::future::Future<Output = busbar_core::Result<Arc<dyn Transport>>>,
) -> Option<Arc<dyn Transport>> {
    match connect.await {
        Ok(transport) => Some(transport),
        Err(e) if !brokers_required() => {
            eprintln!("SKIPPED: {name} unreachable: {e}");
            None
        }
        Err(e) => panic!("{name} unreachable: {e}"),
    }
}

fn rabbitmq_url() -> String {
    std::env::var("BUSBAR_RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

async fn rabbitmq() -> Option<Arc<dyn Transport>> {
    broker("RabbitMQ", async {
        let url = rabbitmq_url().parse()?;
        Ok(Arc::new(busbar_rabbitmq::RabbitTransport::connect(&url).await?) as Arc<dyn Transport>)
    })
    .await
}

async fn kafka() -> Option<Arc<dyn Transport>> {
    broker("Kafka", async {
        let url = std::env::var("BUSBAR_KAFKA_URL")
            .unwrap_or_else(|_| "kafka://127.0.0.1:9092?session_timeout_ms=6000".into())
            .parse()?;
        Ok(Arc::new(busbar_kafka::KafkaTransport::connect(&url).await?) as Arc<dyn Transport>)
    })
    .await
}

async fn sqs_fifo() -> Option<Arc<dyn Transport>> {
    broker("SQS", async {
        let base = std::env::var("BUSBAR_SQS_URL").unwrap_or_else(|_| {
            "sqs://?endpoint=http://127.0.0.1:4566&region=us-east-1&access_key_id=test&secret_access_key=test&wait_time_s=1&visibility_timeout_s=10".into()
        });
        let url = format!("{base}&fifo=true").parse()?;
        Ok(Arc::new(busbar_sqs::SqsTransport::connect(&url).await?) as Arc<dyn Transport>)
    })
    .await
}

async fn outbox_on(bus: &Bus, pool: &PgPool) -> PostgresOutbox {
    let table = unique("outbox").replace('-', "_");
    let outbox = PostgresOutbox::with_table(bus, pool.clone(), &table).unwrap();
    outbox.ensure_schema().await.unwrap();
    outbox.ensure_schema().await.unwrap(); // idempotent
    outbox
}

fn fast(transport: Arc<dyn Transport>) -> Bus {
    Bus::builder(transport)
        .retry(
            RetryPolicy::exponential(3)
                .with_initial_backoff(Duration::from_millis(10))
                .with_max_backoff(Duration::from_millis(50)),
        )
        .build()
}

/// What a consumer saw: every delivery's (id, key, seq), in arrival order.
#[derive(Default, Clone)]
struct Seen(Arc<Mutex<Vec<(busbar_core::Text, String, u64)>>>);

impl Seen {
    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    fn ids(&self) -> HashSet<busbar_core::Text> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(id, ..)| id.clone())
            .collect()
    }
    async fn consume(&self, bus: &Bus, topic: &str, group: &str) -> busbar_core::Subscription {
        let seen = self.clone();
        bus.subscribe::<Probe>(topic, group)
            .start(move |e: Envelope<Probe>, _ctx: Context| {
                let seen = seen.clone();
                async move {
                    seen.0.lock().unwrap().push((
                        e.id.clone(),
                        e.payload.key.clone(),
                        e.payload.seq,
                    ));
                    Ok::<(), HandlerError>(())
                }
            })
            .await
            .unwrap()
    }
}

/// The outbox end to end on one transport:
/// - a rolled-back write publishes nothing; committed writes are published once;
/// - writers in parallel, two relays on one table: one active, no row published twice,
///   per-key order at the consumer; the active relay shut down midway, the other takes over.
async fn relays_committed_rows_once_in_key_order(transport: Arc<dyn Transport>) {
    let Some(pool) = pool().await else { return };
    let bus = fast(Arc::clone(&transport));
    let other_instance = fast(Arc::clone(&transport));
    let (topic, group) = (unique("outbox"), unique("g"));
    bus.declare(&topic, &group).await.unwrap();
    let outbox = outbox_on(&bus, &pool).await;
    let outbox_b =
        PostgresOutbox::with_table(&other_instance, pool.clone(), outbox.table()).unwrap();

    // Rolled back: never published.
    let mut tx = pool.begin().await.unwrap();
    let rolled_back = outbox
        .publish(&mut tx, &topic, probe(9_999, "k0"))
        .await
        .unwrap();
    tx.rollback().await.unwrap();

    let seen = Seen::default();
    let sub = seen.consume(&bus, &topic, &group).await;
    let relay_a = outbox
        .relay()
        .batch_size(50)
        .takeover_interval(Duration::from_millis(50))
        .start()
        .await
        .unwrap();
    let relay_b = outbox_b
        .relay()
        .batch_size(50)
        .takeover_interval(Duration::from_millis(50))
        .start()
        .await
        .unwrap();
    wait_for("one relay becomes active", || {
        relay_a.stats().active || relay_b.stats().active
    })
    .await;
    assert!(
        !(relay_a.stats().active && relay_b.stats().active),
        "two relays active on one table"
    );

    // Four writers, each owning two keys, 20 transactions of 5 events each.
    const WRITERS: u64 = 4;
    const TXS: u64 = 20;
    const PER_TX: u64 = 5;
    let total = (WRITERS * TXS * PER_TX) as usize;
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (pool, outbox, topic) = (pool.clone(), outbox.clone(), topic.clone());
        writers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for t in 0..TXS {
                let mut tx = pool.begin().await.unwrap();
                let events = (0..PER_TX).map(|i| {
                    let seq = t * PER_TX + i;
                    probe(seq, &format!("w{w}-k{}", seq % 2))
                });
                ids.extend(outbox.publish_batch(&mut tx, &topic, events).await.unwrap());
                tx.commit().await.unwrap();
            }
            ids
        }));
    }
    // Midway, the active relay steps down; the standby takes over.
    wait_for("some rows published", || {
        relay_a.stats().published + relay_b.stats().published > 50
    })
    .await;
    let (active, standby) = if relay_a.stats().active {
        (relay_a, relay_b)
    } else {
        (relay_b, relay_a)
    };
    let first_share = active
        .shutdown(Duration::from_secs(30))
        .await
        .unwrap()
        .published;
    let mut written = HashSet::new();
    for writer in writers {
        written.extend(writer.await.unwrap());
    }
    assert_eq!(written.len(), total);
    wait_for("every committed event handled", || seen.len() >= total).await;
    wait_for("the standby took over", || standby.stats().active).await;
    wait_for("every row marked sent", || {
        first_share + standby.stats().published >= total as u64
    })
    .await;
    assert_eq!(
        first_share + standby.stats().published,
        total as u64,
        "the relays published some rows twice (or missed some)"
    );
    assert_eq!(seen.ids(), written, "handled ≠ committed");
    assert!(
        !seen.ids().contains(&rolled_back),
        "a rolled-back event was published"
    );
    let caps = transport.capabilities();
    if !caps.may_duplicate {
        assert_eq!(
            seen.len(),
            total,
            "duplicates on a transport that claims none"
        );
    }
    if caps.ordered_by_key {
        let mut last: HashMap<String, u64> = HashMap::new();
        for (_, key, seq) in seen.0.lock().unwrap().iter() {
            if let Some(previous) = last.insert(key.clone(), *seq) {
                assert!(*seq > previous, "key {key}: {seq} after {previous}");
            }
        }
    }
    let stats = outbox.stats().await.unwrap();
    assert_eq!(
        (stats.pending, stats.failed, stats.oldest_pending),
        (0, 0, None)
    );
    standby.shutdown(Duration::from_secs(30)).await.unwrap();
    sub.shutdown(Duration::from_secs(10)).await.unwrap();
    drop_table(&pool, outbox.table()).await;
}

async fn drop_table(pool: &PgPool, table: &str) {
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {table}")))
        .execute(pool)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_on_memory() {
    relays_committed_rows_once_in_key_order(Arc::new(MemoryTransport::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_on_rabbitmq() {
    let Some(transport) = rabbitmq().await else {
        return;
    };
    relays_committed_rows_once_in_key_order(transport).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_on_kafka() {
    let Some(transport) = kafka().await else {
        return;
    };
    relays_committed_rows_once_in_key_order(transport).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_on_sqs_fifo() {
    let Some(transport) = sqs_fifo().await else {
        return;
    };
    relays_committed_rows_once_in_key_order(transport).await;
}

/// A keyed write waits for an uncommitted write of the same key (so sequence order is commit
/// order per key), and does not wait for other keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_of_one_key_are_numbered_in_commit_order() {
    let Some(pool) = pool().await else { return };
    let bus = Bus::memory();
    let outbox = outbox_on(&bus, &pool).await;
    let topic = unique("t");
    let mut first = pool.begin().await.unwrap();
    let first_id = outbox
        .publish(&mut first, &topic, probe(1, "k"))
        .await
        .unwrap();

    // Another key: not held up.
    let mut other = pool.begin().await.unwrap();
    outbox
        .publish(&mut other, &topic, probe(1, "other"))
        .await
        .unwrap();
    other.commit().await.unwrap();

    let second = tokio::spawn({
        let (pool, outbox, topic) = (pool.clone(), outbox.clone(), topic.clone());
        async move {
            let mut tx = pool.begin().await.unwrap();
            let id = outbox
                .publish(&mut tx, &topic, probe(2, "k"))
                .await
                .unwrap();
            tx.commit().await.unwrap();
            id
        }
    });
    // Observable: the second writer waits on the key's advisory lock.
    let waiting = || async {
        sqlx::query("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
            .fetch_one(&pool)
            .await
            .unwrap()
            .get::<i64, _>(0)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while waiting().await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the second write never waited"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        !second.is_finished(),
        "a write of the same key did not wait"
    );
    first.commit().await.unwrap();
    let second_id = second.await.unwrap();
    let order: Vec<String> = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT id FROM {} WHERE key = 'k' ORDER BY seq",
        outbox.table()
    )))
    .fetch_all(&pool)
    .await
    .unwrap()
    .iter()
    .map(|row| row.get("id"))
    .collect();
    assert_eq!(order, vec![first_id, second_id]);
    drop_table(&pool, outbox.table()).await;
}

/// A message that can never be published fails in the caller's transaction, before commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_transport_would_refuse_fails_at_write_time() {
    let Some(pool) = pool().await else { return };
    let bus = Bus::new(MemoryTransport::with_options(MemoryOptions {
        max_message_bytes: 2_000,
        ..MemoryOptions::default()
    }));
    let outbox = outbox_on(&bus, &pool).await;
    let mut tx = pool.begin().await.unwrap();
    let big = Probe {
        note: "x".repeat(4_000),
        ..probe(1, "")
    };
    let err = outbox.publish(&mut tx, "t", big).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PayloadTooLarge, "{err}");
    let err = outbox
        .publish(&mut tx, "bad topic name", probe(2, ""))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("topic"), "{err}");
    tx.commit().await.unwrap();
    assert_eq!(outbox.stats().await.unwrap().pending, 0);
    drop_table(&pool, outbox.table()).await;
}

/// Rows the broker refuses for good are marked failed, visible and retryable; the rows around
/// them are published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_row_is_marked_failed_and_the_others_go_on() {
    let Some(pool) = pool().await else { return };
    let transport = Arc::new(MemoryTransport::new());
    let writer_bus = Bus::builder(Arc::clone(&transport) as Arc<dyn Transport>).build();
    let outbox = outbox_on(&writer_bus, &pool).await;
    let (topic, group) = (unique("t"), unique("g"));
    writer_bus.declare(&topic, &group).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    let small_a = outbox
        .publish(&mut tx, &topic, probe(1, "k"))
        .await
        .unwrap();
    let big = Probe {
        note: "x".repeat(4_000),
        ..probe(2, "k")
    };
    let big_id = outbox.publish(&mut tx, &topic, big).await.unwrap();
    let small_b = outbox
        .publish(&mut tx, &topic, probe(3, "k"))
        .await
        .unwrap();
    tx.commit().await.unwrap();

    // The relay's transport takes at most 2,000 bytes (a configuration changed after the
    // write, say).
    let strict = Bus::new(Limited {
        inner: Arc::clone(&transport) as Arc<dyn Transport>,
        max: 2_000,
    });
    let relay_side = PostgresOutbox::with_table(&strict, pool.clone(), outbox.table()).unwrap();
    assert_eq!(relay_side.flush().await.unwrap(), 2);
    let stats = outbox.stats().await.unwrap();
    assert_eq!((stats.pending, stats.failed), (0, 1));
    let failed = outbox.failed(10).await.unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].message.id, big_id);
    assert!(
        failed[0].error.contains("at most 2000"),
        "{}",
        failed[0].error
    );

    let seen = Seen::default();
    let sub = seen.consume(&writer_bus, &topic, &group).await;
    wait_for("the two small ones handled", || seen.len() == 2).await;
    assert_eq!(
        seen.ids(),
        HashSet::from([small_a.clone(), small_b.clone()])
    );

    // Put back and relayed by a transport that takes it: same id.
    assert_eq!(
        outbox
            .retry_failed(Some(std::slice::from_ref(&big_id.to_string())))
            .await
            .unwrap(),
        1
    );
    assert_eq!(outbox.retry_failed(None).await.unwrap(), 0);
    assert_eq!(outbox.flush().await.unwrap(), 1);
    wait_for("the big one handled", || seen.len() == 3).await;
    assert!(seen.ids().contains(&big_id));
    assert_eq!(outbox.stats().await.unwrap().failed, 0);
    sub.shutdown(Duration::from_secs(5)).await.unwrap();
    drop_table(&pool, outbox.table()).await;
}

/// A transport with a smaller size limit than the one underneath.
#[derive(Debug)]
struct Limited {
    inner: Arc<dyn Transport>,
    max: usize,
}

#[async_trait]
impl Transport for Limited {
    fn name(&self) -> &'static str {
        "limited"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_message_bytes: Some(self.max),
            ..self.inner.capabilities()
        }
    }
    async fn publish(&self, messages: Vec<Message>) -> busbar_core::Result<()> {
        for message in &messages {
            message.check_publishable(self.max, "limited")?;
        }
        self.inner.publish(messages).await
    }
    async fn declare(&self, topic: &str, group: &str) -> busbar_core::Result<()> {
        self.inner.declare(topic, group).await
    }
    async fn consume(
        &self,
        topic: &str,
        group: &str,
        options: ConsumeOptions,
    ) -> busbar_core::Result<DeliveryStream> {
        self.inner.consume(topic, group, options).await
    }
    async fn close(&self) -> busbar_core::Result<()> {
        self.inner.close().await
    }
}

/// The broker refusing publishes: rows wait, the relay backs off and drains them when it
/// takes them again; nothing is lost or failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_broker_refuses_rows_wait_and_then_drain() {
    let Some(pool) = pool().await else { return };
    let faulty = Arc::new(FaultyTransport::new(Arc::new(MemoryTransport::new())));
    let bus = Bus::builder(Arc::clone(&faulty) as Arc<dyn Transport>).build();
    let (topic, group) = (unique("t"), unique("g"));
    bus.declare(&topic, &group).await.unwrap();
    let outbox = outbox_on(&bus, &pool).await;
    faulty.faults().reject_publishes(4);
    let relay = outbox
        .relay()
        .backoff(RetryPolicy::exponential(1).with_initial_backoff(Duration::from_millis(20)))
        .start()
        .await
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    let ids = outbox
        .publish_batch(&mut tx, &topic, (0..20).map(|i| probe(i, "k")))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    wait_for("all published after the refusals", || {
        relay.stats().published == 20
    })
    .await;
    let stats = relay.stats();
    assert_eq!(stats.retries, 4, "{stats:?}");
    assert_eq!(stats.failed, 0);
    let seen = Seen::default();
    let sub = seen.consume(&bus, &topic, &group).await;
    wait_for("all handled", || seen.len() == 20).await;
    assert_eq!(seen.ids(), ids.into_iter().collect());
    relay.shutdown(Duration::from_secs(5)).await.unwrap();
    sub.shutdown(Duration::from_secs(5)).await.unwrap();
    drop_table(&pool, outbox.table()).await;
}

/// `flush` refuses to run beside an active relay (which does the same work).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_refuses_while_a_relay_runs() {
    let Some(pool) = pool().await else { return };
    let bus = Bus::memory();
    let outbox = outbox_on(&bus, &pool).await;
    let relay = outbox.relay().start().await.unwrap();
    wait_for("the relay is active", || relay.stats().active).await;
    let err = outbox.flush().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Store);
    assert!(err.to_string().contains("a relay is running"), "{err}");
    relay.shutdown(Duration::from_secs(5)).await.unwrap();
    assert_eq!(outbox.flush().await.unwrap(), 0);
    drop_table(&pool, outbox.table()).await;
}

/// The consumer outbox: a handler's follow-up events are written in its transaction: an
/// attempt that fails after publishing publishes nothing, a successful one exactly its events,
/// with the handled message's correlation and causation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_outbox_publishes_only_what_committed_handlings_published() {
    let Some(pool) = pool().await else { return };
    let bus = fast(Arc::new(MemoryTransport::new()));
    let (orders, follow_ups, group) = (unique("orders"), unique("follow"), unique("g"));
    bus.declare(&follow_ups, "audit").await.unwrap();
    let outbox = outbox_on(&bus, &pool).await;
    let store_table = unique("inbox").replace('-', "_");
    let store = PostgresIdempotencyStore::new(pool.clone(), &store_table).unwrap();
    store.ensure_schema().await.unwrap();
    let inbox = store.inbox(Duration::from_secs(3600)).with_outbox(&outbox);
    let attempts = Arc::new(Mutex::new(HashMap::<u64, u32>::new()));
    let kept: Arc<Mutex<Option<Context>>> = Arc::default();
    let sub = bus
        .subscribe::<Probe>(&orders, &group)
        .start(inbox.handler({
            let (attempts, kept, follow_ups) = (attempts.clone(), kept.clone(), follow_ups.clone());
            move |e: Envelope<Probe>, ctx: Context, tx| {
                let (attempts, kept, follow_ups) =
                    (attempts.clone(), kept.clone(), follow_ups.clone());
                async move {
                    let attempt = {
                        let mut attempts = attempts.lock().unwrap();
                        let n = attempts.entry(e.payload.seq).or_default();
                        *n += 1;
                        *n
                    };
                    ctx.publish(
                        &follow_ups,
                        probe(e.payload.seq * 100 + u64::from(attempt), "f"),
                    )
                    .await?;
                    match e.payload.note.as_str() {
                        "fail once" if attempt == 1 => {
                            Err(HandlerError::transient("failed after publishing"))
                        }
                        "always fail" => Err(HandlerError::permanent("failed after publishing")),
                        _ => {
                            *kept.lock().unwrap() = Some(ctx);
                            Ok(tx)
                        }
                    }
                }
            }
        }))
        .await
        .unwrap();
    let relay = outbox.relay().start().await.unwrap();
    let seen = Seen::default();
    let audit = seen.consume(&bus, &follow_ups, "audit").await;

    let fail_once = bus.envelope(Probe {
        note: "fail once".into(),
        ..probe(1, "")
    });
    let always = bus.envelope(Probe {
        note: "always fail".into(),
        ..probe(2, "")
    });
    let fine = bus
        .envelope(probe(3, ""))
        .with_correlation_id("conversation-3");
    for envelope in [&fail_once, &always, &fine] {
        bus.publish_envelope(&orders, envelope).await.unwrap();
    }
    wait_for("two handled, one dead-lettered", || {
        let s = sub.stats();
        s.handled == 2 && s.dead_lettered == 1
    })
    .await;
    wait_for("the committed follow-ups handled", || seen.len() >= 2).await;
    // Exactly one follow-up per committed handling: 1 × 100 + attempt 2, and 3 × 100 + 1.
    let seqs: HashSet<u64> = seen
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|(_, _, seq)| *seq)
        .collect();
    assert_eq!(seqs, HashSet::from([102, 301]));
    assert_eq!(seen.len(), 2);
    wait_for("both rows marked sent", || relay.stats().published == 2).await;
    let stats = outbox.stats().await.unwrap();
    assert_eq!((stats.pending, stats.failed), (0, 0));

    // The follow-up continues the conversation.
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT headers->>'ce_correlationid' AS c, headers->>'ce_causationid' AS k FROM {} \
         WHERE headers->>'ce_causationid' = $1",
        outbox.table()
    )))
    .bind(fine.id.as_str())
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(row.get::<String, _>("c"), "conversation-3");

    // A context kept past its handler cannot publish into a finished transaction.
    let kept = kept.lock().unwrap().take().unwrap();
    let err = kept.publish(&follow_ups, probe(9, "")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed, "{err}");

    relay.shutdown(Duration::from_secs(5)).await.unwrap();
    sub.shutdown(Duration::from_secs(5)).await.unwrap();
    audit.shutdown(Duration::from_secs(5)).await.unwrap();
    drop_table(&pool, outbox.table()).await;
    drop_table(&pool, &store_table).await;
}

// --- The relay killed between the broker's confirm and the mark ---------------------------

/// Set in the child process: the outbox table and topic to relay.
const CHILD_TABLE: &str = "BUSBAR_OUTBOX_CHILD_TABLE";

/// A transport that publishes, says so on stdout, then never returns: the relay is stuck
/// between the broker's confirm and its mark, where the parent kills it.
#[derive(Debug)]
struct StopsAfterPublishing(Arc<dyn Transport>);

#[async_trait]
impl Transport for StopsAfterPublishing {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }
    async fn publish(&self, messages: Vec<Message>) -> busbar_core::Result<()> {
        let ids: Vec<busbar_core::Text> = messages.iter().map(|m| m.id.clone()).collect();
        self.0.publish(messages).await?;
        println!("PUBLISHED {}", ids.join(","));
        std::future::pending::<()>().await;
        Ok(())
    }
    async fn declare(&self, topic: &str, group: &str) -> busbar_core::Result<()> {
        self.0.declare(topic, group).await
    }
    async fn consume(
        &self,
        topic: &str,
        group: &str,
        options: ConsumeOptions,
    ) -> busbar_core::Result<DeliveryStream> {
        self.0.consume(topic, group, options).await
    }
    async fn close(&self) -> busbar_core::Result<()> {
        self.0.close().await
    }
}

/// The child: relays the table given in the environment until killed. A no-op otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_child_relay() {
    let Ok(table) = std::env::var(CHILD_TABLE) else {
        return;
    };
    let pool = pool().await.unwrap();
    let transport = rabbitmq().await.unwrap();
    let bus = Bus::new(StopsAfterPublishing(transport));
    let outbox = PostgresOutbox::with_table(&bus, pool, &table).unwrap();
    let _relay = outbox.relay().start().await.unwrap();
    std::future::pending::<()>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_between_publish_and_mark_republishes_the_same_ids() {
    let Some(pool) = pool().await else { return };
    let Some(transport) = rabbitmq().await else {
        return;
    };
    let bus = fast(transport);
    let (topic, group) = (unique("outbox-crash"), unique("g"));
    bus.declare(&topic, &group).await.unwrap();
    let outbox = outbox_on(&bus, &pool).await;
    let mut tx = pool.begin().await.unwrap();
    let ids = outbox
        .publish_batch(&mut tx, &topic, (0..10).map(|i| probe(i, "k")))
        .await
        .unwrap();
    tx.commit().await.unwrap();

    // The child relays the batch to RabbitMQ, then hangs before marking it; killed there.
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_child_relay",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_TABLE, outbox.table())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let published = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|line| {
                line.split_once("PUBLISHED ")
                    .map(|(_, ids)| ids.to_string())
            })
    });
    let published = tokio::time::timeout(Duration::from_secs(60), published)
        .await
        .expect("the child relay published within 60 s")
        .unwrap()
        .expect("the child relay said what it published");
    child.kill().unwrap(); // SIGKILL, by its pid
    child.wait().unwrap();
    let mut published: Vec<String> = published.split(',').map(str::to_string).collect();
    published.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(published, expected, "the child published other ids");
    assert_eq!(
        outbox.stats().await.unwrap().pending,
        10,
        "the rows were marked although the relay died before marking"
    );

    // The next relay publishes them again, same ids; the inbox handles each once.
    let store_table = unique("inbox").replace('-', "_");
    let store = PostgresIdempotencyStore::new(pool.clone(), &store_table).unwrap();
    store.ensure_schema().await.unwrap();
    let effects = unique("effects").replace('-', "_");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {effects} (id text NOT NULL)"
    )))
    .execute(&pool)
    .await
    .unwrap();
    let deliveries = Arc::new(Mutex::new(Vec::<String>::new()));
    let inbox = store.inbox(Duration::from_secs(3600));
    let sub = bus
        .subscribe::<Probe>(&topic, &group)
        .start(inbox.handler({
            let (deliveries, effects) = (deliveries.clone(), effects.clone());
            move |e: Envelope<Probe>, _ctx: Context, mut tx| {
                let (deliveries, effects) = (deliveries.clone(), effects.clone());
                async move {
                    deliveries.lock().unwrap().push(e.id.to_string());
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "INSERT INTO {effects} (id) VALUES ($1)"
                    )))
                    .bind(e.id.as_str())
                    .execute(&mut *tx)
                    .await?;
                    Ok(tx)
                }
            }
        }))
        .await
        .unwrap();
    let relay = outbox.relay().start().await.unwrap();
    wait_for("the republished rows marked", || {
        relay.stats().published == 10
    })
    .await;
    wait_for("both copies of each delivered", || {
        sub.stats().handled >= 20
    })
    .await;
    let effect_count: i64 = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT count(DISTINCT id) FROM {effects}"
    )))
    .fetch_one(&pool)
    .await
    .unwrap()
    .get(0);
    let rows: i64 = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {effects}"
    )))
    .fetch_one(&pool)
    .await
    .unwrap()
    .get(0);
    assert_eq!(
        (effect_count, rows),
        (10, 10),
        "an effect applied twice or missing"
    );
    let mut delivered = deliveries.lock().unwrap().clone();
    delivered.sort();
    delivered.dedup();
    assert_eq!(delivered, expected, "the republish used other ids");
    relay.shutdown(Duration::from_secs(5)).await.unwrap();
    sub.shutdown(Duration::from_secs(5)).await.unwrap();
    drop_table(&pool, outbox.table()).await;
    drop_table(&pool, &store_table).await;
    drop_table(&pool, &effects).await;
}

/// The pattern for a service's own tests: the outbox over a `TestBus`, a real transaction,
/// `flush`, then the `TestBus` assertions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_test_outbox_writes_with_flush_and_a_test_bus() {
    let Some(pool) = pool().await else { return };
    let test = busbar_testkit::TestBus::new();
    let outbox = outbox_on(test.bus(), &pool).await;

    let mut tx = pool.begin().await.unwrap();
    outbox
        .publish(&mut tx, "orders", probe(1, "k"))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(outbox.flush().await.unwrap(), 0);
    test.assert_not_published::<Probe>();

    let mut tx = pool.begin().await.unwrap();
    let id = outbox
        .publish(&mut tx, "orders", probe(2, "k"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(outbox.flush().await.unwrap(), 1);
    let published = test.assert_published_one::<Probe>();
    assert_eq!((published.id, published.payload.seq), (id, 2));
    drop_table(&pool, outbox.table()).await;
}

/// Sent rows are kept for the retention window, then deleted; with no retention, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sent_rows_are_deleted_after_their_retention() {
    let Some(pool) = pool().await else { return };
    let bus = Bus::memory();
    let outbox = outbox_on(&bus, &pool).await;
    let rows = || async {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {}",
            outbox.table()
        )))
        .fetch_one(&pool)
        .await
        .unwrap()
        .get::<i64, _>(0)
    };
    let mut tx = pool.begin().await.unwrap();
    outbox
        .publish_batch(&mut tx, "t", (0..3).map(|i| probe(i, "")))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(outbox.flush().await.unwrap(), 3);
    assert_eq!(
        rows().await,
        3,
        "sent rows are kept for the retention window"
    );
    assert_eq!(
        outbox
            .purge_sent(Duration::from_secs(3600), 100)
            .await
            .unwrap(),
        0
    );
    assert_eq!(outbox.purge_sent(Duration::ZERO, 100).await.unwrap(), 3);
    assert_eq!(rows().await, 0);

    // A relay with no retention deletes each batch once the broker confirmed it.
    let relay = outbox
        .relay()
        .retention(Duration::ZERO)
        .start()
        .await
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    outbox
        .publish_batch(&mut tx, "t", (0..3).map(|i| probe(i, "")))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    wait_for("published", || relay.stats().published == 3).await;
    assert_eq!(rows().await, 0);
    relay.shutdown(Duration::from_secs(5)).await.unwrap();
    drop_table(&pool, outbox.table()).await;
}

/// Instances starting at once all create the schema without failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_schema_is_safe_when_instances_race() {
    let Some(pool) = pool().await else { return };
    let bus = Bus::memory();
    let table = unique("outbox_race").replace('-', "_");
    let racers: Vec<_> = (0..6)
        .map(|_| {
            let outbox = PostgresOutbox::with_table(&bus, pool.clone(), &table).unwrap();
            tokio::spawn(async move { outbox.ensure_schema().await })
        })
        .collect();
    for racer in racers {
        racer.await.unwrap().unwrap();
    }
    let outbox = PostgresOutbox::with_table(&bus, pool.clone(), &table).unwrap();
    assert_eq!(outbox.stats().await.unwrap().pending, 0);
    drop_table(&pool, &table).await;
}
