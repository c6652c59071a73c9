//! The cost of one message through busbar's hot path, stage by stage, on the memory transport:
//! time, allocations and bytes allocated per message (a counting allocator wraps the system
//! one), for 1 KiB events (`BUSBAR_BENCH_BYTES` for another size) and a no-op handler.
//!
//! ```text
//! cargo bench --bench hot_path                       # every stage
//! BUSBAR_BENCH_STAGE=bus BUSBAR_BENCH_MESSAGES=20000 cargo bench --bench hot_path   # one stage
//! benches/instructions.sh                            # instructions per message, by callgrind
//! ```
//!
//! Stages:
//! - `encode`: a fresh envelope for the event, moved into a `Message` (what `publish` does
//!   before the transport);
//! - `decode`: a received `Message` decoded to an `Envelope` (what the consumer does first);
//! - `spi`: the bare transport SPI, publish (batches of 100) → consume → ack;
//! - `publish`: encoded messages through `Bus::publish_messages` (batches of 100) into the
//!   memory transport: the bus's publish path (checks, metrics, span) and the enqueue;
//! - `consume`: messages already waiting in the group's queue, received, decoded, dispatched
//!   to a no-op handler and acked, concurrency 1: the consumer side of the bus;
//! - `bus`: the whole bus, `publish_batch` (batches of 100) → handled, concurrency 1 and 8.
//!
//! What `consume` costs beyond `decode` and the SPI's receive and ack is the consumer
//! runtime's (dispatch, handler call, settle).

use std::alloc::System;
use std::sync::Arc;
use std::time::{Duration, Instant};

use busbar::codec::Json;
use busbar::{
    Bus, ConsumeOptions, Context, Envelope, Event, HandlerError, MemoryOptions, MemoryTransport,
    Message, Transport,
};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

/// The system allocator, counting every allocation on every thread.
#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const BATCH: usize = 100;

#[derive(Clone, Serialize, Deserialize)]
struct Blob {
    seq: u64,
    data: String,
}

impl Event for Blob {
    const TYPE: &'static str = "bench.blob.v1";
}

/// The payload size: `BUSBAR_BENCH_BYTES`, default 1,024. Read once: a lookup of the
/// environment per message would be counted as the bus's.
fn payload_bytes() -> usize {
    static BYTES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BYTES.get_or_init(|| {
        std::env::var("BUSBAR_BENCH_BYTES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(1024)
    })
}

fn blob(seq: u64) -> Blob {
    // About `payload_bytes()` once encoded as JSON.
    Blob {
        seq,
        data: "x".repeat(payload_bytes().saturating_sub(24)),
    }
}

/// The counted part of a stage: started by [`Start::now`], ended by [`Start::cost`].
struct Start {
    at: Instant,
    region: Region<'static, System>,
}

/// Whether to stop after each stage's set-up (for `benches/instructions.sh`, which subtracts
/// the set-up's instructions).
fn setup_only() -> bool {
    std::env::var_os("BUSBAR_BENCH_SETUP_ONLY").is_some()
}

impl Start {
    fn now() -> Start {
        Start {
            at: Instant::now(),
            region: Region::new(GLOBAL),
        }
    }

    fn cost(self, messages: usize) -> Cost {
        let took = self.at.elapsed();
        let stats = self.region.change();
        Cost {
            took,
            // A reallocation that moves is an allocation too.
            allocations: (stats.allocations + stats.reallocations) as u64,
            bytes: (stats.bytes_allocated + stats.bytes_reallocated.max(0) as usize) as u64,
            messages,
        }
    }
}

/// What one stage cost over `messages` messages.
struct Cost {
    took: Duration,
    allocations: u64,
    bytes: u64,
    messages: usize,
}

impl Cost {
    fn row(&self, stage: &str) -> String {
        let n = self.messages as f64;
        format!(
            "| {stage:<28} | {:>9.2} | {:>12.0} | {:>7.1} | {:>8.0} |",
            self.took.as_secs_f64() * 1e6 / n,
            n / self.took.as_secs_f64(),
            self.allocations as f64 / n,
            self.bytes as f64 / n,
        )
    }
}

async fn encode(messages: usize) -> Cost {
    let bus = Bus::memory();
    let events: Vec<Blob> = (0..messages as u64).map(blob).collect();
    if setup_only() {
        return Start::now().cost(messages);
    }
    let start = Start::now();
    for event in events {
        let message = bus
            .envelope(event)
            .into_message(&Json, "bench")
            .expect("encode");
        std::hint::black_box(message);
    }
    start.cost(messages)
}

async fn decode(messages: usize) -> Cost {
    let bus = Bus::memory();
    let encoded: Vec<Message> = (0..messages as u64)
        .map(|seq| {
            bus.envelope(blob(seq))
                .to_message(&Json, "bench")
                .expect("encode")
        })
        .collect();
    if setup_only() {
        return Start::now().cost(messages);
    }
    let start = Start::now();
    for message in &encoded {
        let envelope = Envelope::<Blob>::from_message(&Json, message).expect("decode");
        std::hint::black_box(envelope);
    }
    start.cost(messages)
}

fn big_memory() -> MemoryTransport {
    MemoryTransport::with_options(MemoryOptions {
        queue_capacity: 10_000_000,
        ..MemoryOptions::default()
    })
}

async fn spi(messages: usize) -> Cost {
    let transport = big_memory();
    let mut stream = transport
        .consume("bench", "g", ConsumeOptions::new(64))
        .await
        .expect("consume");
    let payload = bytes::Bytes::from(vec![b'x'; payload_bytes()]);
    let batches: Vec<Vec<Message>> = (0..messages / BATCH)
        .map(|batch| {
            (0..BATCH)
                .map(|i| Message::new(format!("{batch}-{i}"), "bench", payload.clone()))
                .collect()
        })
        .collect();
    if setup_only() {
        return Start::now().cost(messages);
    }
    let start = Start::now();
    let consumer = tokio::spawn(async move {
        for _ in 0..messages {
            let delivery = stream.next().await.expect("stream").expect("delivery");
            delivery.ack().await.expect("ack");
        }
    });
    for batch in batches {
        transport.publish(batch).await.expect("publish");
    }
    consumer.await.expect("consumer");
    start.cost(messages)
}

/// `messages` encoded 1 KiB events, in batches for `publish_messages`.
fn encoded_batches(bus: &Bus, messages: usize) -> Vec<Vec<Message>> {
    (0..(messages / BATCH) as u64)
        .map(|b| {
            (0..BATCH as u64)
                .map(|i| {
                    bus.envelope(blob(b * 1000 + i))
                        .into_message(&Json, "bench")
                        .expect("encode")
                })
                .collect()
        })
        .collect()
}

async fn publish(messages: usize) -> Cost {
    let bus = Bus::new(big_memory());
    bus.declare("bench", "g").await.expect("declare");
    let batches = encoded_batches(&bus, messages);
    if setup_only() {
        return Start::now().cost(messages);
    }
    let start = Start::now();
    for batch in batches {
        bus.publish_messages(batch).await.expect("publish");
    }
    start.cost(messages)
}

async fn consume(messages: usize) -> Cost {
    let bus = Bus::new(big_memory());
    bus.declare("bench", "g").await.expect("declare");
    for batch in encoded_batches(&bus, messages) {
        bus.publish_messages(batch).await.expect("publish");
    }
    if setup_only() {
        return Start::now().cost(messages);
    }
    let handled = Arc::new(tokio::sync::Semaphore::new(0));
    let done = Arc::clone(&handled);
    let start = Start::now();
    let sub = bus
        .subscribe::<Blob>("bench", "g")
        .concurrency(1)
        .key_ordered(false)
        .start(move |_e: Envelope<Blob>, _c: Context| {
            done.add_permits(1);
            async { Ok::<_, HandlerError>(()) }
        })
        .await
        .expect("subscribe");
    let _all = handled.acquire_many(messages as u32).await.expect("count");
    let cost = start.cost(messages);
    sub.shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
    cost
}

async fn bus(messages: usize, concurrency: usize) -> Cost {
    let bus = Bus::new(big_memory());
    let handled = Arc::new(tokio::sync::Semaphore::new(0));
    let done = Arc::clone(&handled);
    let sub = bus
        .subscribe::<Blob>("bench", "g")
        .concurrency(concurrency)
        .key_ordered(false)
        .start(move |_e: Envelope<Blob>, _c: Context| {
            done.add_permits(1);
            async { Ok::<_, HandlerError>(()) }
        })
        .await
        .expect("subscribe");
    let batches: Vec<Vec<Blob>> = (0..(messages / BATCH) as u64)
        .map(|b| (0..BATCH as u64).map(|i| blob(b * 1000 + i)).collect())
        .collect();
    if setup_only() {
        sub.shutdown(Duration::from_secs(5))
            .await
            .expect("shutdown");
        return Start::now().cost(messages);
    }
    let start = Start::now();
    for batch in batches {
        bus.publish_batch("bench", batch).await.expect("publish");
    }
    let _all = handled.acquire_many(messages as u32).await.expect("count");
    let cost = start.cost(messages);
    sub.shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
    cost
}

fn main() {
    let messages: usize = std::env::var("BUSBAR_BENCH_MESSAGES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000)
        .max(BATCH)
        / BATCH
        * BATCH;
    let only = std::env::var("BUSBAR_BENCH_STAGE").ok();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let wanted = |stage: &str| only.as_deref().is_none_or(|only| only == stage);
    println!(
        "{messages} messages of {} bytes per stage, no-op handler, memory transport\n",
        payload_bytes()
    );
    println!("| stage                        | µs/msg    | msg/s        | allocs  | bytes    |");
    println!("|---|---|---|---|---|");
    runtime.block_on(async {
        if wanted("encode") {
            println!(
                "{}",
                encode(messages).await.row("encode (envelope → message)")
            );
        }
        if wanted("decode") {
            println!(
                "{}",
                decode(messages).await.row("decode (message → envelope)")
            );
        }
        if wanted("spi") {
            println!("{}", spi(messages).await.row("transport SPI end to end"));
        }
        if wanted("publish") {
            println!("{}", publish(messages).await.row("publish (bus → queue)"));
        }
        if wanted("consume") {
            println!(
                "{}",
                consume(messages).await.row("consume (queue → handled)")
            );
        }
        for concurrency in [1, 8] {
            if wanted("bus") || wanted(&format!("bus-{concurrency}")) {
                let cost = bus(messages, concurrency).await;
                println!(
                    "{}",
                    cost.row(&format!("bus end to end, conc. {concurrency}"))
                );
            }
        }
    });
}
