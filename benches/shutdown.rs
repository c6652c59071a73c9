//! How long starting and stopping a subscription takes on each transport, with nothing in
//! flight: `start` → consuming (`Subscription::consuming`), and `shutdown` of a subscription
//! that handled five messages and is now idle (which returns once the transport's consumer let go of everything: left its
//! group, gave back what it received, ended its long poll).
//!
//! ```text
//! scripts/local-brokers.sh rabbitmq kafka sqs
//! cargo bench --bench shutdown --all-features
//! BUSBAR_BENCH_URLS='memory:// amqp://guest:guest@127.0.0.1:5672/%2f' cargo bench --bench shutdown --all-features
//! ```
//!
//! Each line gives the median and the worst of five rounds, each on a fresh group.

use std::time::{Duration, Instant};

use busbar::{Context, Envelope, Event};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Tick;

impl Event for Tick {
    const TYPE: &'static str = "bench.tick.v1";
}

const ROUNDS: usize = 5;

/// The local brokers `scripts/local-brokers.sh` starts, with the settings the test suites use.
const LOCAL: &[&str] = &[
    "memory://",
    "amqp://guest:guest@127.0.0.1:5672/%2f",
    "kafka://127.0.0.1:9092?session_timeout_ms=6000",
    "sqs://?endpoint=http://127.0.0.1:4566&region=us-east-1&access_key_id=test&secret_access_key=test&wait_time_s=1",
    "sqs://?endpoint=http://127.0.0.1:4566&region=us-east-1&access_key_id=test&secret_access_key=test",
];

fn summary(mut times: Vec<Duration>) -> String {
    times.sort();
    format!(
        "median {:>9.1?}, worst {:>9.1?}",
        times[times.len() / 2],
        times[times.len() - 1]
    )
}

#[tokio::main]
async fn main() {
    let urls: Vec<String> = match std::env::var("BUSBAR_BENCH_URLS") {
        Ok(urls) => urls.split_whitespace().map(str::to_string).collect(),
        Err(_) => LOCAL.iter().map(|u| u.to_string()).collect(),
    };
    for url in urls {
        let bus = match busbar::connect(&url).await {
            Ok(bus) => bus,
            Err(e) => {
                println!("{url}: skipped ({e})");
                continue;
            }
        };
        let (mut ready, mut stop) = (Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            let topic = format!("bench-shutdown-{:x}", fastrand::u64(..));
            let group = format!("g{round}");
            let started = Instant::now();
            let sub = match bus
                .subscribe::<Tick>(&topic, &group)
                .start(|_: Envelope<Tick>, _: Context| async { Ok(()) })
                .await
            {
                Ok(sub) => sub,
                Err(e) => {
                    println!("{url}: subscribe failed ({e})");
                    break;
                }
            };
            if let Err(e) = sub.consuming(Duration::from_secs(60)).await {
                println!("{url}: {e}");
                break;
            }
            ready.push(started.elapsed());
            // A few messages handled first, then idle: whatever the consumer keeps open while
            // waiting for messages is open.
            let handled = sub.stats().handled;
            if let Err(e) = bus.publish_batch(&topic, (0..5).map(|_| Tick)).await {
                println!("{url}: publish failed ({e})");
                break;
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            while sub.stats().handled < handled + 5 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let stopping = Instant::now();
            if let Err(e) = sub.shutdown(Duration::from_secs(10)).await {
                println!("{url}: shutdown failed ({e})");
                break;
            }
            stop.push(stopping.elapsed());
        }
        if !stop.is_empty() {
            let shown = url.split('?').next().unwrap_or(&url);
            let query = url.split_once('?').map_or("", |(_, q)| q);
            let wait = query
                .split('&')
                .find(|p| p.starts_with("wait_time_s"))
                .map_or(String::new(), |p| format!(" ({p})"));
            println!(
                "{shown}{wait}\n  start → consuming: {}\n  idle shutdown:     {}",
                summary(ready),
                summary(stop)
            );
        }
        let _ = bus.close().await;
    }
}
