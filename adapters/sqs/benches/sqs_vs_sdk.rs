//! busbar on SQS (queue mode) against raw aws-sdk-sqs, same server, same batching, one run:
//! 1 KiB messages, SendMessageBatch of 10, ReceiveMessage of 10 with DeleteMessageBatch.
//! The raw client runs twice: with the same envelope attributes busbar sends (the fair
//! comparison: a hand-written service carries its event's id, type and time too) and bare.
//!
//! `cargo bench -p busbar-sqs --bench sqs_vs_sdk` (LocalStack on 127.0.0.1:4566, or
//! `BUSBAR_SQS_URL`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, MessageAttributeValue, QueueAttributeName,
    SendMessageBatchRequestEntry,
};
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

const ROUNDS: usize = 5;

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn rate(d: Duration) -> f64 {
    N as f64 / d.as_secs_f64()
}

/// The attributes busbar puts on such a message: the CloudEvents core and the packed rest
/// (correlation id), so the raw client can be measured carrying the same information.
fn envelope_attributes(n: usize) -> Vec<(&'static str, String)> {
    vec![
        ("ce_specversion", "1.0".into()),
        ("ce_id", format!("01a20224-7ee1-7178-9c02-{n:012}")),
        ("ce_type", "bench.blob.v1".into()),
        ("ce_source", "/bench".into()),
        ("ce_time", "2026-11-22T07:24:35.943409Z".into()),
        ("content-type", "application/json".into()),
        (
            "busbar.headers",
            format!(r#"{{"correlationid":"01a20224-7ee1-7178-9c02-{n:012}"}}"#),
        ),
    ]
}

async fn raw(run: &str, with_attributes: bool) -> (Duration, Duration) {
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url("http://127.0.0.1:4566")
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            "test", "test", None, None, "bench",
        ))
        .load()
        .await;
    let sqs = aws_sdk_sqs::Client::new(&conf);
    // The same queue settings busbar declares: a visibility timeout and a redrive policy.
    let dlq_url = sqs
        .create_queue()
        .queue_name(format!("raw-bench-{run}-{with_attributes}-dlq"))
        .send()
        .await
        .expect("dlq")
        .queue_url()
        .unwrap_or_default()
        .to_string();
    let dlq_arn = sqs
        .get_queue_attributes()
        .queue_url(&dlq_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .expect("dlq arn")
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
        .unwrap_or_default();
    let url = sqs
        .create_queue()
        .queue_name(format!("raw-bench-{run}-{with_attributes}"))
        .attributes(QueueAttributeName::VisibilityTimeout, "30")
        .attributes(
            QueueAttributeName::RedrivePolicy,
            format!(r#"{{"deadLetterTargetArn":"{dlq_arn}","maxReceiveCount":"10"}}"#),
        )
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
            let mut entry = SendMessageBatchRequestEntry::builder()
                .id(format!("{b}-{i}"))
                .message_body(&body);
            if with_attributes {
                for (name, value) in envelope_attributes(b * 10 + i) {
                    entry = entry.message_attributes(
                        name,
                        MessageAttributeValue::builder()
                            .data_type("String")
                            .string_value(value)
                            .build()
                            .expect("attribute"),
                    );
                }
            }
            req = req.entries(entry.build().expect("entry"));
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
            .set_message_attribute_names(with_attributes.then(|| vec!["All".to_string()]))
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
        // LocalStack's speed drifts by tens of percent within a minute, so the three clients
        // take turns over several rounds, in rotating order, and each reports its median.
        let mut rates: [[Vec<f64>; 2]; 3] = Default::default();
        for round in 0..ROUNDS {
            for turn in 0..3 {
                let client = (round + turn) % 3;
                let run = format!("{:x}-{round}", std::process::id());
                let (publish, consume) = match client {
                    0 => raw(&run, false).await,
                    1 => raw(&run, true).await,
                    _ => busbar(&run).await,
                };
                rates[client][0].push(rate(publish));
                rates[client][1].push(rate(consume));
            }
        }
        println!(
            "SQS (LocalStack), {N} x 1 KiB, batches of 10, receive 10 + DeleteMessageBatch, median of {ROUNDS} rounds"
        );
        println!("raw = aws-sdk-sqs sending the same 7 envelope attributes busbar sends; bare = body only");
        for (i, what) in ["publish", "consume"].into_iter().enumerate() {
            let [bare, raw, bb] = [0, 1, 2].map(|c| median(&mut rates[c][i]));
            println!(
                "{what}  bare {bare:>6.0} msg/s | raw {raw:>6.0} msg/s | busbar {bb:>6.0} msg/s | busbar/raw {:.2} | busbar/bare {:.2}",
                bb / raw,
                bb / bare
            );
        }
    });
}
