//! busbar on SQS (queue mode) against raw aws-sdk-sqs, same server, same batching, one run:
//! 1 KiB messages, SendMessageBatch of 10, ReceiveMessage of 10 with DeleteMessageBatch.
//!
//! `cargo bench -p busbar-sqs --bench sqs_vs_sdk` (LocalStack on 127.0.0.1:4566, or
//! `BUSBAR_SQS_URL`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, SendMessageBatchRequestEntry};
use busbar_core::{Bus, Context, Envelope, Event, HandlerError};
use busbar_sqs::SqsTransport;
use serde::{Deserialize, Serialize};

const N: usize = 2_000;
const LOCAL: &str = "sqs://?endpoint=http://127.0.0.1:4566&region=us-east-1&access_key_id=test&secret_access_key=test&wait_time_s=1";

#[derive(Clone, Serialize, Deserialize)]
struct Blob {
    data: String,
}
impl Event for Blob {
    const TYPE: &'static str = "bench.blob.v1";
}

fn rate(d: Duration) -> f64 {
    N as f64 / d.as_secs_f64()
}

async fn raw(run: &str) -> (Duration, Duration) {
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url("http://127.0.0.1:4566")
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            "test", "test", None, None, "bench",
        ))
        .load()
        .await;
    let sqs = aws_sdk_sqs::Client::new(&conf);
    let url = sqs
        .create_queue()
        .queue_name(format!("raw-bench-{run}"))
        .send()
        .await
        .expect("queue")
        .queue_url()
        .unwrap_or_default()
        .to_string();
    let body = "x".repeat(1024);
    let start = Instant::now();
    for b in 0..N / 10 {
        let mut req = sqs.send_message_batch().queue_url(&url);
        for i in 0..10 {
            req = req.entries(
                SendMessageBatchRequestEntry::builder()
                    .id(format!("{b}-{i}"))
                    .message_body(&body)
                    .build()
                    .expect("entry"),
            );
        }
        assert!(req.send().await.expect("send").failed().is_empty());
    }
    let publish = start.elapsed();
    let start = Instant::now();
    let mut received = 0;
    while received < N {
        let out = sqs
            .receive_message()
            .queue_url(&url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .send()
            .await
            .expect("receive");
        let mut del = sqs.delete_message_batch().queue_url(&url);
        for (i, m) in out.messages().iter().enumerate() {
            del = del.entries(
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(m.receipt_handle().unwrap_or_default())
                    .build()
                    .expect("entry"),
            );
        }
        received += out.messages().len();
        if !out.messages().is_empty() {
            del.send().await.expect("delete");
        }
    }
    (publish, start.elapsed())
}

async fn busbar(run: &str) -> (Duration, Duration) {
    let url = std::env::var("BUSBAR_SQS_URL").unwrap_or_else(|_| LOCAL.to_string());
    let transport = SqsTransport::connect(&format!("{url}&mode=queue").parse().expect("url"))
        .await
        .expect("connect");
    let bus = Bus::new(transport);
    let topic = format!("bb-bench-{run}");
    bus.declare(&topic, "g").await.expect("declare");
    let blob = Blob {
        data: "x".repeat(1024 - 11),
    };
    let start = Instant::now();
    for _ in 0..N / 10 {
        bus.publish_batch(&topic, vec![blob.clone(); 10])
            .await
            .expect("publish");
    }
    let publish = start.elapsed();
    let handled = Arc::new(tokio::sync::Semaphore::new(0));
    let done = Arc::clone(&handled);
    let start = Instant::now();
    let sub = bus
        .subscribe::<Blob>(&topic, "g")
        .concurrency(10)
        .max_in_flight(10)
        .key_ordered(false)
        .start(move |_e: Envelope<Blob>, _c: Context| {
            done.add_permits(1);
            async { Ok::<_, HandlerError>(()) }
        })
        .await
        .expect("subscribe");
    let _all = handled.acquire_many(N as u32).await.expect("count");
    let consume = start.elapsed();
    sub.shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
    (publish, consume)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let run = format!("{:x}", std::process::id());
        let (raw_publish, raw_consume) = raw(&run).await;
        let (bb_publish, bb_consume) = busbar(&run).await;
        println!("SQS (LocalStack), {N} x 1 KiB, batches of 10, receive 10 + DeleteMessageBatch");
        println!(
            "publish  raw aws-sdk-sqs {:>7.0} msg/s | busbar {:>7.0} msg/s | busbar/raw {:.2}",
            rate(raw_publish),
            rate(bb_publish),
            rate(bb_publish) / rate(raw_publish)
        );
        println!(
            "consume  raw aws-sdk-sqs {:>7.0} msg/s | busbar {:>7.0} msg/s | busbar/raw {:.2}",
            rate(raw_consume),
            rate(bb_consume),
            rate(bb_consume) / rate(raw_consume)
        );
    });
}
