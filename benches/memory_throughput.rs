//! Throughput of the memory transport: 1 KiB events, publish → handled, no-op handler.
//!
//! Run with `cargo bench --bench memory_throughput`. Prints messages per second for
//! (a) the full bus (typed envelopes, JSON, consumer runtime) and (b) the bare transport SPI
//! (publish `Message`s, consume and ack), so the runtime's own cost is visible as a ratio.

use std::sync::Arc;
use std::time::{Duration, Instant};

use busbar::{
    Bus, ConsumeOptions, Context, Envelope, Event, HandlerError, MemoryTransport, Message,
    Transport,
};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

const MESSAGES: usize = 200_000;
const BATCH: usize = 100;

#[derive(Clone, Serialize, Deserialize)]
struct Blob {
    seq: u64,
    data: String,
}

impl Event for Blob {
    const TYPE: &'static str = "bench.blob.v1";
}

fn blob(seq: u64) -> Blob {
    // ~1 KiB once encoded as JSON.
    Blob {
        seq,
        data: "x".repeat(1000),
    }
}

async fn bus_run(concurrency: usize) -> Duration {
    let bus = Bus::memory();
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
    let events: Vec<Blob> = (0..MESSAGES as u64).map(blob).collect();
    let started = Instant::now();
    for chunk in events.chunks(BATCH) {
        bus.publish_batch("bench", chunk.to_vec())
            .await
            .expect("publish");
    }
    let _all = handled.acquire_many(MESSAGES as u32).await.expect("count");
    let elapsed = started.elapsed();
    sub.shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
    elapsed
}

async fn transport_run() -> Duration {
    let transport = MemoryTransport::new();
    let mut stream = transport
        .consume("bench", "g", ConsumeOptions { max_in_flight: 64 })
        .await
        .expect("consume");
    let payload = bytes::Bytes::from(vec![b'x'; 1024]);
    let consumer = tokio::spawn(async move {
        for _ in 0..MESSAGES {
            let delivery = stream.next().await.expect("stream").expect("delivery");
            delivery.ack().await.expect("ack");
        }
    });
    let started = Instant::now();
    for batch in 0..MESSAGES / BATCH {
        let messages = (0..BATCH)
            .map(|i| Message::new(format!("{batch}-{i}"), "bench", payload.clone()))
            .collect();
        transport.publish(messages).await.expect("publish");
    }
    consumer.await.expect("consumer");
    started.elapsed()
}

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let raw = transport_run().await;
        let raw_rate = MESSAGES as f64 / raw.as_secs_f64();
        println!("memory transport SPI  : {MESSAGES} msgs in {raw:?} = {raw_rate:>10.0} msg/s (1 KiB, publish batches of {BATCH}, ack each)");
        for concurrency in [1, 8, 32] {
            let took = bus_run(concurrency).await;
            let rate = MESSAGES as f64 / took.as_secs_f64();
            println!(
                "bus, concurrency {concurrency:>2}  : {MESSAGES} msgs in {took:?} = {rate:>10.0} msg/s (typed JSON envelopes, no-op handler), {:.2} of SPI",
                rate / raw_rate
            );
        }
        if let Some(kib) = peak_rss_kib() {
            println!("peak RSS: {} MiB", kib / 1024);
        }
    });
}
