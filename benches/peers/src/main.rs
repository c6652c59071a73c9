//! busbar's memory transport side by side with mq-bridge's memory endpoint, omniqueue's
//! in-memory backend and a bare tokio channel, in one process, taking turns: N events of 1 KiB
//! (`{seq, data}` as JSON) published in batches of 100 (omniqueue and the channel send one by
//! one: they have no batch send), each decoded by one consumer with a no-op handler and
//! acknowledged. Reports each one's median rate over the rounds and the process's CPU time per
//! message (user + system: the process's CPU clock), which a busy machine disturbs less than
//! the rate.
//!
//! What each carries differs, and the table says so: busbar writes and reads a CloudEvents
//! envelope (id, type, source, time, correlation, traceparent) and runs its retry,
//! dead-letter and per-key bookkeeping; mq-bridge gives each message an id and nothing else
//! here; omniqueue and the bare channel move only the JSON bytes. mq-bridge runs a second
//! time carrying busbar's own messages (the same JSON, and the CloudEvents attributes made by
//! busbar's envelope as mq-bridge's metadata); its consumer still reads only the JSON, where
//! busbar's reads the attributes back into an envelope.
//!
//! With `BUSBAR_BENCH_BROKER=rabbitmq`, the same on RabbitMQ (127.0.0.1:5672, or
//! `BUSBAR_RABBITMQ_URL`): busbar's RabbitMQ transport against mq-bridge's AMQP endpoint, with
//! the same guarantees on both sides: a durable classic queue, persistent messages, a batch's
//! publisher confirms awaited together, prefetch 100, an ack per message. busbar goes through
//! its topic exchange (the queue bound to it), mq-bridge through the default exchange.
//! mq-bridge runs twice there: as it sends (the JSON, a message id), and carrying the same
//! CloudEvents attributes as AMQP headers that busbar carries (busbar's own messages, their
//! attributes as mq-bridge's metadata), so the difference of work on the wire is seen.
//! (omniqueue's RabbitMQ backend is left out: its producer sends without publisher confirms,
//! so a message the broker never took goes unnoticed; not the same guarantee.)
//!
//! ```text
//! cargo run --release --manifest-path benches/peers/Cargo.toml
//! BUSBAR_BENCH_BROKER=rabbitmq cargo run --release --manifest-path benches/peers/Cargo.toml
//! ```
//! `BUSBAR_BENCH_MESSAGES` (default 100,000 in memory, 20,000 on RabbitMQ) and
//! `BUSBAR_BENCH_ROUNDS` (default 5) size it; `BUSBAR_BENCH_BYTES` (default 1,000) is the
//! length of each event's string; `BUSBAR_BENCH_ONLY` (a prefix of the names in the table)
//! runs those alone, e.g. under a profiler.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use busbar_core::{Bus, Context, Envelope, Event, HandlerError, MemoryOptions, MemoryTransport};
use mq_bridge::endpoints::amqp::{AmqpConsumer, AmqpPublisher};
use mq_bridge::endpoints::memory::{MemoryConsumer, MemoryPublisher};
use mq_bridge::models::{AmqpConfig, MemoryConfig};
use mq_bridge::traits::{MessageConsumer, MessageDisposition, MessagePublisher};
use mq_bridge::CanonicalMessage;
use omniqueue::backends::InMemoryBackend;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

#[path = "../../common/stage.rs"]
#[allow(dead_code)] // The timed stages are the broker benches'.
mod stage;
use stage::{cpu, env, median};

/// With `--features mimalloc`, every client allocates through mimalloc: with the system
/// allocator, memory allocated on one thread and freed on another makes the threads wait on
/// its arena locks.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: usize = 100;

#[derive(Clone, Serialize, Deserialize)]
struct Blob {
    seq: u64,
    data: String,
}

impl Event for Blob {
    const TYPE: &'static str = "bench.blob.v1";
}

fn events(n: usize) -> Vec<Blob> {
    let data = "x".repeat(env("BUSBAR_BENCH_BYTES", 1000));
    (0..n as u64)
        .map(|seq| Blob {
            seq,
            data: data.clone(),
        })
        .collect()
}

/// One timed run: (messages per second, CPU µs per message).
struct Run {
    rate: f64,
    cpu_us: f64,
}

/// Counts handled messages; wakes the run when all are.
#[derive(Clone)]
struct Done {
    count: Arc<AtomicUsize>,
    all: Arc<Notify>,
    target: usize,
}

impl Done {
    fn new(target: usize) -> Self {
        Done {
            count: Arc::new(AtomicUsize::new(0)),
            all: Arc::new(Notify::new()),
            target,
        }
    }

    fn handled(&self, n: usize) {
        if self.count.fetch_add(n, Ordering::SeqCst) + n >= self.target {
            self.all.notify_one();
        }
    }

    async fn wait(&self) {
        while self.count.load(Ordering::SeqCst) < self.target {
            self.all.notified().await;
        }
    }
}

async fn timed(n: usize, publish: impl std::future::Future<Output = ()>, done: &Done) -> Run {
    let (started, cpu_before) = (Instant::now(), cpu());
    publish.await;
    done.wait().await;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_us = (cpu() - cpu_before).as_secs_f64() * 1e6 / n as f64;
    Run {
        rate: n as f64 / elapsed,
        cpu_us,
    }
}

async fn busbar(n: usize, concurrency: usize) -> Run {
    let bus = Bus::new(MemoryTransport::with_options(MemoryOptions {
        queue_capacity: n + BATCH,
        ..MemoryOptions::default()
    }));
    busbar_run(&bus, "g", n, concurrency, None).await
}

/// busbar: batches of 100 through `publish_batch`, a subscription of `group` with a no-op
/// handler (its prefetch `max_in_flight` when given).
async fn busbar_run(
    bus: &Bus,
    group: &str,
    n: usize,
    concurrency: usize,
    max_in_flight: Option<usize>,
) -> Run {
    let done = Done::new(n);
    let handled = done.clone();
    let mut subscription = bus
        .subscribe::<Blob>("peers", group)
        .concurrency(concurrency);
    if let Some(max) = max_in_flight {
        subscription = subscription.max_in_flight(max);
    }
    let sub = subscription
        .start(move |_e: Envelope<Blob>, _c: Context| {
            handled.handled(1);
            async { Ok::<_, HandlerError>(()) }
        })
        .await
        .expect("subscribe");
    // busbar's publish takes the events by value (the others encode from a reference): the
    // batches are made before the clock starts, of the events themselves (not copies, which
    // callgrind would count as busbar's: 750 instructions a message).
    let mut events = events(n).into_iter();
    let batches: Vec<Vec<Blob>> = std::iter::from_fn(|| {
        let batch: Vec<Blob> = events.by_ref().take(BATCH).collect();
        (!batch.is_empty()).then_some(batch)
    })
    .collect();
    let publish = async {
        for batch in batches {
            bus.publish_batch("peers", batch).await.expect("publish");
        }
    };
    let run = timed(n, publish, &done).await;
    sub.shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
    run
}

async fn mq_bridge(n: usize, round: usize, cloudevents: bool) -> Run {
    let topic = format!("peers-{round}-{cloudevents}-{}", std::process::id());
    let config = MemoryConfig {
        topic: topic.clone(),
        capacity: Some(n / BATCH + 10),
        ..MemoryConfig::default()
    };
    let publisher = MemoryPublisher::new(&config).expect("publisher");
    let consumer = MemoryConsumer::new(&config).expect("consumer");
    mq_bridge_run(n, publisher, consumer, cloudevents).await
}

/// mq-bridge, through its leanest API: batches of 100 sent, received, decoded and acked. With
/// `cloudevents`, each message is the one busbar would send (made by busbar's envelope: the
/// same JSON and the same CloudEvents attributes), its attributes as mq-bridge's metadata,
/// which its AMQP endpoint sends as headers: the same work on the wire as busbar's.
async fn mq_bridge_run(
    n: usize,
    publisher: impl MessagePublisher,
    mut consumer: impl MessageConsumer + 'static,
    cloudevents: bool,
) -> Run {
    let done = Done::new(n);
    let handled = done.clone();
    let consuming = tokio::spawn(async move {
        let mut seen = 0;
        while seen < n {
            let batch = consumer.receive_batch(BATCH).await.expect("receive");
            for message in &batch.messages {
                let _event: Blob = serde_json::from_slice(&message.payload).expect("decode");
            }
            let count = batch.messages.len();
            (batch.commit)(vec![MessageDisposition::Ack; count])
                .await
                .expect("commit");
            seen += count;
            handled.handled(count);
        }
    });
    let events = events(n);
    let publish = async {
        if !cloudevents {
            for batch in events.chunks(BATCH) {
                let messages = batch
                    .iter()
                    .map(|e| CanonicalMessage::new(serde_json::to_vec(e).expect("encode"), None))
                    .collect();
                publisher.send_batch(messages).await.expect("publish");
            }
            return;
        }
        // busbar's envelope takes the event by value.
        let mut events = events.into_iter();
        loop {
            let messages: Vec<CanonicalMessage> = events
                .by_ref()
                .take(BATCH)
                .map(cloudevents_message)
                .collect();
            if messages.is_empty() {
                break;
            }
            publisher.send_batch(messages).await.expect("publish");
        }
    };
    let run = timed(n, publish, &done).await;
    consuming.await.expect("consumer");
    run
}

/// The message busbar sends for `event`, as mq-bridge's (see [`mq_bridge_run`]).
fn cloudevents_message(event: Blob) -> CanonicalMessage {
    let message = Envelope::new("/peers", event)
        .into_message(&busbar_core::codec::Json, "peers")
        .expect("encode");
    let mut canonical = CanonicalMessage::new_bytes(message.payload, None);
    canonical.metadata = message
        .headers
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect();
    canonical
}

async fn omniqueue(n: usize) -> Run {
    let (producer, mut consumer) = InMemoryBackend::builder().build_pair().await.expect("pair");
    let done = Done::new(n);
    let handled = done.clone();
    let consuming = tokio::spawn(async move {
        let mut seen = 0;
        while seen < n {
            let deliveries = consumer
                .receive_all(BATCH, Duration::from_millis(1))
                .await
                .expect("receive");
            let count = deliveries.len();
            for delivery in deliveries {
                let _event: Option<Blob> = delivery.payload_serde_json().expect("decode");
                delivery.ack().await.map_err(|(e, _)| e).expect("ack");
            }
            seen += count;
            handled.handled(count);
        }
    });
    let events = events(n);
    let publish = async {
        for event in &events {
            producer.send_serde_json(event).await.expect("publish");
        }
    };
    let run = timed(n, publish, &done).await;
    consuming.await.expect("consumer");
    run
}

async fn channel(n: usize) -> Run {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let done = Done::new(n);
    let handled = done.clone();
    let consuming = tokio::spawn(async move {
        while let Some(bytes) = rx.recv().await {
            let _event: Blob = serde_json::from_slice(&bytes).expect("decode");
            handled.handled(1);
        }
    });
    let events = events(n);
    let publish = async {
        for event in &events {
            tx.send(serde_json::to_vec(event).expect("encode"))
                .expect("send");
        }
    };
    let run = timed(n, publish, &done).await;
    drop(tx);
    consuming.await.expect("consumer");
    run
}

const PREFETCH: u16 = 100;

fn rabbitmq_url() -> String {
    std::env::var("BUSBAR_RABBITMQ_URL").unwrap_or_else(|_| "amqp://127.0.0.1:5672/%2f".into())
}

/// busbar on RabbitMQ: a classic queue (as mq-bridge declares), the subscription's prefetch
/// that of mq-bridge's consumer.
async fn busbar_rabbitmq(n: usize, round: usize, concurrency: usize) -> Run {
    let run = format!("{round}-{concurrency}-{}", std::process::id());
    let transport = busbar_rabbitmq::RabbitTransport::connect(
        &format!(
            "{}?exchange=bb-peers-{run}&queue_type=classic&queue_expires_ms=600000",
            rabbitmq_url()
        )
        .parse()
        .expect("url"),
    )
    .await
    .expect("connect");
    let bus = Bus::new(transport);
    let group = format!("g-{run}");
    bus.declare("peers", &group).await.expect("declare");
    let run = busbar_run(&bus, &group, n, concurrency, Some(usize::from(PREFETCH))).await;
    bus.close().await.expect("close");
    run
}

/// mq-bridge's AMQP endpoint: publisher confirms awaited per batch, persistent messages, a
/// durable queue, and its consumer acking each message of a batch; with `cloudevents`, the
/// messages busbar sends (see [`mq_bridge_run`]).
async fn mq_bridge_rabbitmq(n: usize, round: usize, cloudevents: bool) -> Run {
    let config = AmqpConfig {
        url: rabbitmq_url(),
        queue: Some(format!("mqb-peers-{round}-{}", std::process::id())),
        prefetch_count: Some(PREFETCH),
        ..AmqpConfig::default()
    };
    let publisher = AmqpPublisher::new(&config).await.expect("publisher");
    let consumer = AmqpConsumer::new(&config).await.expect("consumer");
    mq_bridge_run(n, publisher, consumer, cloudevents).await
}

fn main() {
    let rabbitmq = std::env::var("BUSBAR_BENCH_BROKER").is_ok_and(|broker| broker == "rabbitmq");
    let (n, rounds) = (
        env(
            "BUSBAR_BENCH_MESSAGES",
            if rabbitmq { 20_000 } else { 100_000 },
        ),
        env("BUSBAR_BENCH_ROUNDS", 5),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let names: &[&str] = if rabbitmq {
        &[
            "busbar on RabbitMQ, concurrency 1",
            "busbar on RabbitMQ, concurrency 8",
            "mq-bridge AMQP endpoint",
            "mq-bridge AMQP endpoint, busbar's CloudEvents headers",
        ]
    } else {
        &[
            "busbar, concurrency 1",
            "busbar, concurrency 8",
            "mq-bridge memory endpoint",
            "mq-bridge memory endpoint, busbar's CloudEvents headers",
            "omniqueue in-memory",
            "tokio channel + serde_json",
        ]
    };
    // `BUSBAR_BENCH_ONLY=<name prefix>`: runs those alone, e.g. under a profiler.
    let only = std::env::var("BUSBAR_BENCH_ONLY").ok();
    let mut runs: Vec<Vec<Run>> = names.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        // Each round starts with the next one, so none always runs on a cold or warm machine.
        for turn in 0..names.len() {
            let which = (turn + round) % names.len();
            if only
                .as_ref()
                .is_some_and(|only| !names[which].starts_with(only.as_str()))
            {
                continue;
            }
            let run = runtime.block_on(async {
                match (rabbitmq, which) {
                    (true, 0) => busbar_rabbitmq(n, round, 1).await,
                    (true, 1) => busbar_rabbitmq(n, round, 8).await,
                    (true, 2) => mq_bridge_rabbitmq(n, round, false).await,
                    (true, _) => mq_bridge_rabbitmq(n, round, true).await,
                    (false, 0) => busbar(n, 1).await,
                    (false, 1) => busbar(n, 8).await,
                    (false, 2) => mq_bridge(n, round, false).await,
                    (false, 3) => mq_bridge(n, round, true).await,
                    (false, 4) => omniqueue(n).await,
                    (false, _) => channel(n).await,
                }
            });
            runs[which].push(run);
        }
    }
    let bytes = env("BUSBAR_BENCH_BYTES", 1000);
    println!("{n} events of {bytes} bytes, publish → handled, medians of {rounds} rounds\n");
    println!("| | msg/s | CPU µs/msg |");
    println!("|---|---|---|");
    for (name, runs) in names.iter().zip(runs).filter(|(_, runs)| !runs.is_empty()) {
        let rate = median(runs.iter().map(|r| r.rate).collect());
        let cpu_us = median(runs.iter().map(|r| r.cpu_us).collect());
        println!("| {name} | {rate:.0} | {cpu_us:.2} |");
    }
}
