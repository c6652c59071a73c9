//! Operations: metrics for Prometheus to scrape, and probe endpoints for Kubernetes.
//!
//! `cargo run --example operations` serves on 127.0.0.1:9464 until Ctrl-C:
//! - `GET /metrics`: busbar's metrics in Prometheus' text format (metrics-exporter-prometheus
//!   as the `metrics` recorder), the queue depth refreshed on each scrape;
//! - `GET /ready`: 200 when the bus and the subscription are ready, else 503 with why;
//! - `GET /live`: 200 while they are live, else 503.
//!
//! It runs on the memory transport, or on the broker `BUSBAR_URL` names. With `--once` it
//! publishes a few events, prints its own three endpoints' answers and exits.

use std::sync::Arc;
use std::time::Duration;

use busbar::{Bus, Context, Envelope, Event, HandlerError, Subscription};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Serialize, Deserialize)]
struct Tick {
    n: u64,
}

impl Event for Tick {
    const TYPE: &'static str = "ops.tick.v1";
}

const TOPIC: &str = "ops.ticks";
const GROUP: &str = "ops";

struct Service {
    bus: Bus,
    subscription: Subscription,
    metrics: PrometheusHandle,
}

impl Service {
    /// The answer to one request line: status and body.
    async fn answer(&self, path: &str) -> (u16, String) {
        match path {
            "/metrics" => {
                // Depth is read from the broker when scraped (where the transport reports it).
                let _ = self.bus.depth(TOPIC, GROUP).await;
                (200, self.metrics.render())
            }
            "/ready" => {
                let (bus, sub) = (self.bus.health(), self.subscription.health());
                match bus.is_ready() && sub.is_ready() {
                    true => (200, "ready\n".into()),
                    false => (503, format!("not ready: {bus:?} {sub:?}\n")),
                }
            }
            "/live" => {
                let (bus, sub) = (self.bus.health(), self.subscription.health());
                match bus.is_live() && sub.is_live() {
                    true => (200, "live\n".into()),
                    false => (503, format!("not live: {bus:?} {sub:?}\n")),
                }
            }
            _ => (404, "not found\n".into()),
        }
    }
}

/// A minimal HTTP/1.1 server: one request per connection, GET only.
async fn serve(listener: TcpListener, service: Arc<Service>) {
    while let Ok((mut socket, _)) = listener.accept().await {
        let service = Arc::clone(&service);
        tokio::spawn(async move {
            let mut request = [0u8; 1024];
            let Ok(read) = socket.read(&mut request).await else {
                return;
            };
            let head = String::from_utf8_lossy(&request[..read]);
            let path = head.split_whitespace().nth(1).unwrap_or("/");
            let (status, body) = service.answer(path).await;
            let response = format!(
                "HTTP/1.1 {status} {}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                if status == 200 { "OK" } else { "Service Unavailable" },
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
        });
    }
}

async fn get(address: &str, path: &str) -> std::io::Result<String> {
    let mut socket = tokio::net::TcpStream::connect(address).await?;
    socket
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: {address}\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    socket.read_to_string(&mut response).await?;
    Ok(response)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The recorder comes first: busbar makes its metric handles when a subscription starts.
    let metrics = PrometheusBuilder::new().install_recorder()?;
    let url = std::env::var("BUSBAR_URL").unwrap_or_else(|_| "memory://".into());
    let bus = busbar::connect(&url).await?;
    bus.declare(TOPIC, GROUP).await?;
    let subscription = bus
        .subscribe::<Tick>(TOPIC, GROUP)
        .start(|tick: Envelope<Tick>, _: Context| async move {
            match tick.payload.n % 10 {
                7 => Err(HandlerError::permanent("every tenth tick is poison")),
                _ => Ok(()),
            }
        })
        .await?;
    let service = Arc::new(Service {
        bus: bus.clone(),
        subscription,
        metrics,
    });
    let address = std::env::var("OPERATIONS_ADDRESS").unwrap_or_else(|_| "127.0.0.1:9464".into());
    let listener = TcpListener::bind(&address).await?;
    tokio::spawn(serve(listener, Arc::clone(&service)));

    if std::env::args().any(|arg| arg == "--once") {
        for n in 0..20 {
            bus.publish(TOPIC, Tick { n }).await?;
        }
        let handled = |stats: busbar::SubscriptionStats| stats.handled + stats.dead_lettered;
        while handled(service.subscription.stats()) < 20 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for path in ["/live", "/ready", "/metrics"] {
            let response = get(&address, path).await?;
            let lines: Vec<&str> = response.lines().filter(|l| !l.is_empty()).collect();
            println!("GET {path}\n{}\n", lines.join("\n"));
        }
    } else {
        println!("serving http://{address}/metrics, /ready and /live until Ctrl-C");
        let publisher = {
            let bus = bus.clone();
            tokio::spawn(async move {
                for n in 0.. {
                    if let Err(error) = bus.publish(TOPIC, Tick { n }).await {
                        eprintln!("publish failed: {error}");
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            })
        };
        tokio::signal::ctrl_c().await?;
        publisher.abort();
    }
    let Ok(service) = Arc::try_unwrap(service) else {
        return Err("a request is still being served".into());
    };
    service
        .subscription
        .shutdown(Duration::from_secs(10))
        .await?;
    bus.close().await?;
    Ok(())
}
