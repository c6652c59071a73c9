//! The attribute layout seen from outside busbar (LocalStack): a plain aws-sdk-sqs consumer on
//! a queue subscribed to busbar's SNS topic with a filter policy on `ce_correlationid` receives
//! only the matching event, with its correlation, causation and trace context as attributes of
//! their own; and a plain producer's structured-mode event is handled as that event.

use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use busbar_core::{Bus, Event};
use busbar_sqs::SqsTransport;
use busbar_testkit::conformance::{probe, reachable, unique, wait_limit, Probe};

const LOCAL: &str = "sqs://?endpoint=http://127.0.0.1:4566&region=us-east-1&access_key_id=test&secret_access_key=test&wait_time_s=1";
const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

async fn aws() -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url("http://127.0.0.1:4566")
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            "test", "test", None, None, "raw",
        ))
        .load()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sns_filter_policy_on_correlation_id_selects_busbars_events() {
    let url = std::env::var("BUSBAR_SQS_URL").unwrap_or_else(|_| LOCAL.to_string());
    let Some(transport) = reachable(SqsTransport::connect(&url.parse().unwrap()).await) else {
        return;
    };
    let bus = Bus::new(transport);
    let topic = unique("attrs");
    bus.declare(&topic, "busbar-group").await.unwrap(); // creates the SNS topic

    // A plain queue, subscribed with a filter policy on the correlation id.
    let conf = aws().await;
    let (sqs, sns) = (
        aws_sdk_sqs::Client::new(&conf),
        aws_sdk_sns::Client::new(&conf),
    );
    let topic_arn = sns
        .list_topics()
        .send()
        .await
        .unwrap()
        .topics()
        .iter()
        .filter_map(|t| t.topic_arn())
        .find(|arn| arn.ends_with(&topic))
        .expect("busbar's SNS topic")
        .to_string();
    let queue_url = sqs
        .create_queue()
        .queue_name(unique("plain"))
        .send()
        .await
        .unwrap()
        .queue_url()
        .unwrap()
        .to_string();
    let queue_arn = sqs
        .get_queue_attributes()
        .queue_url(&queue_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap()
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
        .unwrap();
    sns.subscribe()
        .topic_arn(&topic_arn)
        .protocol("sqs")
        .endpoint(&queue_arn)
        .attributes("RawMessageDelivery", "true")
        .attributes(
            "FilterPolicy",
            r#"{"ce_correlationid": ["conversation-A"]}"#,
        )
        .send()
        .await
        .unwrap();

    // Two events through busbar, in two conversations.
    let other = bus
        .envelope(probe(1, "k"))
        .with_correlation_id("conversation-B")
        .with_causation_id("cause-B")
        .with_traceparent(TRACEPARENT);
    let wanted = bus
        .envelope(probe(2, "k"))
        .with_correlation_id("conversation-A")
        .with_causation_id("cause-A")
        .with_traceparent(TRACEPARENT);
    bus.publish_envelope(&topic, &other).await.unwrap();
    bus.publish_envelope(&topic, &wanted).await.unwrap();

    // Read until the wanted one is in, then once more: the other never comes.
    let mut received = Vec::new();
    let deadline = tokio::time::Instant::now() + wait_limit();
    let mut after_wanted = 0;
    while after_wanted < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the filtered queue never received the matching event"
        );
        let batch = sqs
            .receive_message()
            .queue_url(&queue_url)
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .send()
            .await
            .unwrap();
        received.extend(batch.messages().iter().cloned());
        if received
            .iter()
            .any(|m| attribute(m, "ce_id").as_deref() == Some(wanted.id.as_str()))
        {
            after_wanted += 1;
        }
    }
    assert_eq!(received.len(), 1, "the filter let other events through");
    let message = &received[0];
    assert_eq!(attribute(message, "ce_type").as_deref(), Some(Probe::TYPE));
    assert_eq!(
        attribute(message, "ce_correlationid").as_deref(),
        Some("conversation-A")
    );
    assert_eq!(
        attribute(message, "ce_causationid").as_deref(),
        Some("cause-A")
    );
    assert_eq!(
        attribute(message, "ce_traceparent").as_deref(),
        Some(TRACEPARENT)
    );
    assert_eq!(attribute(message, "busbar.key").as_deref(), Some("k"));
    assert!(message.message_attributes().is_some_and(|a| a.len() <= 10));
    let body: Probe = serde_json::from_str(message.body().unwrap_or_default()).unwrap();
    assert_eq!(body, probe(2, "k"));
    let _ = sqs.delete_queue().queue_url(&queue_url).send().await;
}

fn attribute(message: &aws_sdk_sqs::types::Message, name: &str) -> Option<String> {
    message
        .message_attributes()?
        .get(name)?
        .string_value()
        .map(str::to_string)
}

/// A plain SQS producer sends a CloudEvent in structured mode (the whole event as the JSON
/// body, `content-type: application/cloudevents+json`): busbar handles it as that event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_structured_mode_event_from_a_plain_producer_is_handled() {
    use aws_sdk_sqs::types::MessageAttributeValue;
    use busbar_core::{Context, Envelope, HandlerError};

    let url = std::env::var("BUSBAR_SQS_URL").unwrap_or_else(|_| LOCAL.to_string());
    let Some(transport) =
        reachable(SqsTransport::connect(&format!("{url}&mode=queue").parse().unwrap()).await)
    else {
        return;
    };
    let bus = Bus::new(transport);
    let topic = unique("structured");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let sub = bus
        .subscribe::<Probe>(&topic, "g")
        .start(move |e: Envelope<Probe>, ctx: Context| {
            let tx = tx.clone();
            async move {
                let _ = tx.send((e, ctx.message_id().to_string()));
                Ok::<(), HandlerError>(())
            }
        })
        .await
        .unwrap();
    let sqs = aws_sdk_sqs::Client::new(&aws().await);
    let queue_url = sqs
        .get_queue_url()
        .queue_name(format!("busbar-{topic}"))
        .send()
        .await
        .unwrap()
        .queue_url()
        .unwrap()
        .to_string();
    let body = serde_json::json!({
        "specversion": "1.0",
        "id": "structured-1",
        "type": Probe::TYPE,
        "source": "https://example.com/plain-sqs",
        "correlationid": "conversation-S",
        "partitionkey": "k",
        "datacontenttype": "application/json",
        "data": { "seq": 4, "key": "k", "note": "" }
    });
    sqs.send_message()
        .queue_url(&queue_url)
        .message_body(body.to_string())
        .message_attributes(
            "content-type",
            MessageAttributeValue::builder()
                .data_type("String")
                .string_value("application/cloudevents+json; charset=utf-8")
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    let (envelope, context_id) = tokio::time::timeout(wait_limit(), rx.recv())
        .await
        .expect("busbar handled the structured event in time")
        .unwrap();
    assert_eq!(
        (envelope.id.as_str(), context_id.as_str()),
        ("structured-1", "structured-1")
    );
    assert_eq!(envelope.source, "https://example.com/plain-sqs");
    assert_eq!(envelope.correlation_id.as_deref(), Some("conversation-S"));
    assert_eq!(envelope.key.as_deref(), Some("k"));
    assert_eq!(envelope.payload, probe(4, "k"));
    sub.shutdown(std::time::Duration::from_secs(10))
        .await
        .unwrap();
}
