//! What metrics and traces cost: the whole bus on the memory transport (`publish_batch` of 100
//! → handled, concurrency 8, 1 KiB events, no-op handler), with nothing installed, with a
//! Prometheus recorder, and with the recorder plus an OpenTelemetry SDK tracer provider
//! (busbar's consume spans through the SDK's batch processor, as a service exports them, to its
//! in-memory exporter, emptied between rounds) keeping every trace, one in ten, one in a
//! hundred.
//!
//! A recorder and a subscriber are process-wide and cannot be taken back, so each setting runs
//! in its own process; without `BUSBAR_BENCH_OBSERVE` the bench runs itself once per setting:
//!
//! ```text
//! cargo bench --bench observability                                   # all three, a table
//! BUSBAR_BENCH_OBSERVE=metrics cargo bench --bench observability      # one setting
//! ```
//!
//! `BUSBAR_BENCH_MESSAGES` (default 50,000) and `BUSBAR_BENCH_ROUNDS` (default 5) size it;
//! each setting reports its median round.

use std::sync::Arc;
use std::time::{Duration, Instant};

use busbar::{Bus, Context, Envelope, Event, HandlerError, MemoryOptions, MemoryTransport};
use opentelemetry_sdk::trace::{InMemorySpanExporter, Sampler, SdkTracerProvider};
use serde::{Deserialize, Serialize};

const BATCH: usize = 100;
const SETTINGS: [&str; 5] = [
    "off",
    "metrics",
    "metrics+traces",
    "metrics+traces-1/10",
    "metrics+traces-1/100",
];

#[derive(Clone, Serialize, Deserialize)]
struct Blob {
    seq: u64,
    data: String,
}

impl Event for Blob {
    const TYPE: &'static str = "bench.blob.v1";
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

/// One round: messages per second, publish → handled.
async fn round(messages: usize) -> f64 {
    let transport = MemoryTransport::with_options(MemoryOptions {
        queue_capacity: messages + BATCH,
        ..MemoryOptions::default()
    });
    let bus = Bus::new(transport);
    let handled = Arc::new(tokio::sync::Semaphore::new(0));
    let done = Arc::clone(&handled);
    let sub = bus
        .subscribe::<Blob>("bench", "g")
        .concurrency(8)
        .key_ordered(false)
        .start(move |_e: Envelope<Blob>, _c: Context| {
            done.add_permits(1);
            async { Ok::<_, HandlerError>(()) }
        })
        .await
        .expect("subscribe");
    let data = "x".repeat(1000);
    let batches: Vec<Vec<Blob>> = (0..(messages / BATCH) as u64)
        .map(|b| {
            (0..BATCH as u64)
                .map(|i| Blob {
                    seq: b * 1000 + i,
                    data: data.clone(),
                })
                .collect()
        })
        .collect();
    let started = Instant::now();
    for batch in batches {
        bus.publish_batch("bench", batch).await.expect("publish");
    }
    let _all = handled.acquire_many(messages as u32).await.expect("count");
    let rate = messages as f64 / started.elapsed().as_secs_f64();
    sub.shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
    rate
}

/// Runs one setting in this process; returns its median rate.
fn measure(setting: &str) -> f64 {
    let (messages, rounds) = (
        env("BUSBAR_BENCH_MESSAGES", 50_000),
        env("BUSBAR_BENCH_ROUNDS", 5),
    );
    let mut exporter = None;
    if setting.contains("metrics") {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .expect("the recorder installs");
    }
    if setting.contains("traces") {
        let spans = InMemorySpanExporter::default();
        let mut provider = SdkTracerProvider::builder().with_batch_exporter(spans.clone());
        if let Some((_, one_in)) = setting.split_once("1/") {
            let one_in: f64 = one_in.parse().expect("a sampling ratio 1/N");
            provider = provider.with_sampler(Sampler::TraceIdRatioBased(1.0 / one_in));
        }
        let provider = provider.build();
        opentelemetry::global::set_tracer_provider(provider.clone());
        exporter = Some((spans, provider));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut rates: Vec<f64> = (0..rounds)
        .map(|_| {
            let rate = runtime.block_on(round(messages));
            if let Some((spans, _)) = &exporter {
                spans.reset();
            }
            rate
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

fn main() {
    if let Ok(setting) = std::env::var("BUSBAR_BENCH_OBSERVE") {
        println!("{}", measure(&setting));
        return;
    }
    let me = std::env::current_exe().expect("the bench knows its path");
    let rates: Vec<(&str, f64)> = SETTINGS
        .iter()
        .map(|setting| {
            let out = std::process::Command::new(&me)
                .arg("--bench")
                .env("BUSBAR_BENCH_OBSERVE", setting)
                .output()
                .expect("the bench runs itself");
            let text = String::from_utf8_lossy(&out.stdout);
            let rate = text
                .lines()
                .last()
                .and_then(|line| line.trim().parse().ok())
                .unwrap_or_else(|| panic!("{setting}: no rate in {text:?}"));
            (*setting, rate)
        })
        .collect();
    let off = rates[0].1;
    println!("bus end to end, memory transport, 1 KiB, concurrency 8, median of the rounds\n");
    println!("| setting | msg/s | against off |");
    println!("|---|---|---|");
    for (setting, rate) in rates {
        println!("| {setting} | {rate:.0} | {:.3} |", rate / off);
    }
}
