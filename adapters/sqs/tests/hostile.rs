//! Messages sent by a plain aws-sdk-sqs client, not busbar, that are malformed in every way
//! `busbar_testkit::hostile` lists (but the empty body and the many headers, which SQS itself refuses): each ends in
//! the DLQ with a clear reason, and the consumer keeps running.

use std::sync::Arc;

use aws_sdk_sqs::types::MessageAttributeValue;
use busbar_sqs::SqsTransport;
use busbar_testkit::conformance::reachable;
use busbar_testkit::hostile::foreign_messages_are_dead_lettered_clearly;

const LOCAL: &str = "sqs://?endpoint=http://127.0.0.1:4566&region=us-east-1&access_key_id=test&secret_access_key=test&wait_time_s=1&mode=queue";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_and_malformed_messages_are_dead_lettered_with_a_clear_reason() {
    let Some(transport) = reachable(SqsTransport::connect(&LOCAL.parse().unwrap()).await) else {
        return;
    };
    foreign_messages_are_dead_lettered_clearly(
        Arc::new(transport),
        // SQS refuses an empty body and more than 10 message attributes.
        &["empty-body", "many-headers"],
        |topic, cases| async move {
            let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
                .region(aws_config::Region::new("us-east-1"))
                .endpoint_url("http://127.0.0.1:4566")
                .credentials_provider(aws_sdk_sqs::config::Credentials::new(
                    "test", "test", None, None, "raw",
                ))
                .load()
                .await;
            let sqs = aws_sdk_sqs::Client::new(&conf);
            // In queue mode the topic is the queue `busbar-<topic>`.
            let url = sqs
                .get_queue_url()
                .queue_name(format!("busbar-{topic}").replace('.', "_"))
                .send()
                .await
                .expect("the topic's queue")
                .queue_url()
                .unwrap_or_default()
                .to_string();
            for case in cases {
                let body = String::from_utf8(case.payload.clone()).expect("text bodies");
                let mut send = sqs.send_message().queue_url(&url).message_body(body);
                for (name, value) in &case.headers {
                    send = send.message_attributes(
                        name,
                        MessageAttributeValue::builder()
                            .data_type("String")
                            .string_value(value)
                            .build()
                            .expect("attribute"),
                    );
                }
                for (name, value) in &case.binary_headers {
                    send = send.message_attributes(
                        name,
                        MessageAttributeValue::builder()
                            .data_type("Binary")
                            .binary_value(aws_sdk_sqs::primitives::Blob::new(value.clone()))
                            .build()
                            .expect("attribute"),
                    );
                }
                send.send().await.expect("raw send");
            }
        },
    )
    .await;
}
