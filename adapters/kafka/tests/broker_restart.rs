//! A Tansu that keeps its log (S3 storage in LocalStack, `scripts/local-brokers.sh
//! kafka-durable`) stopped and started again during a 5,000-message run: see
//! `busbar_testkit::restart::loses_nothing_across_a_durable_restart`.
//!
//! It restarts a Tansu of its own (127.0.0.1:9094), so no other test sees the outage; it is
//! skipped unless brokers are required or `BUSBAR_RESTART_TESTS=1`.
//!
//! Afterwards it reads the topic back with a raw rdkafka consumer, so that a message Tansu
//! acknowledged but never stored (it can, when killed between its three S3 writes of a
//! produce; see the README) is told apart from one busbar lost. librdkafka reports such blind
//! acknowledgements in its `eos` debug log ("DUPSEQ"), which this test counts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use busbar_kafka::KafkaTransport;
use busbar_testkit::conformance::unique;
use busbar_testkit::restart::{
    broker_script, enabled, loses_nothing_across_a_durable_restart, BrokerLog,
};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Headers;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// What librdkafka's DUPSEQ reports said: per topic, the messages of batches it marked
/// delivered because the broker answered their retry "duplicate sequence number", and the
/// reports this test could not read (checked in `read_log`: the layer runs on librdkafka's
/// threads, where a panic would abort the process).
#[derive(Default)]
struct DupSeqReports {
    blind_acks: HashMap<String, u64>,
    unreadable: Vec<String>,
}

fn dupseq_reports() -> &'static Mutex<DupSeqReports> {
    static REPORTS: OnceLock<Mutex<DupSeqReports>> = OnceLock::new();
    REPORTS.get_or_init(Default::default)
}

/// Counts librdkafka's DUPSEQ reports: "ProduceRequest for <topic> [<partition>] with <n>
/// message(s) failed due to duplicate sequence number: previous send succeeded but was not
/// acknowledged (…): marking the messages successfully delivered".
struct DupSeqCounter;

impl<S: tracing::Subscriber> Layer<S> for DupSeqCounter {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Text(String);
        impl tracing::field::Visit for Text {
            fn record_debug(&mut self, _: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                self.0.push_str(&format!("{value:?}"));
            }
        }
        let mut text = Text(String::new());
        event.record(&mut text);
        let line = text.0;
        if !line.contains("marking the messages successfully delivered") {
            return;
        }
        let parsed = line
            .split_once("ProduceRequest for ")
            .and_then(|(_, rest)| {
                let (topic, rest) = rest.split_once(" [")?;
                let (_, rest) = rest.split_once("] with ")?;
                let (count, _) = rest.split_once(" message(s)")?;
                Some((topic.to_string(), count.parse::<u64>().ok()?))
            });
        let mut reports = dupseq_reports()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match parsed {
            Some((topic, count)) => *reports.blind_acks.entry(topic).or_default() += count,
            None => reports.unreadable.push(line),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_acknowledged_is_lost_when_the_broker_restarts() {
    if !enabled("restarts a local Tansu") {
        return;
    }
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(tracing_subscriber::EnvFilter::from_default_env()),
        )
        .with(
            DupSeqCounter.with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target("librdkafka", tracing::Level::DEBUG),
            ),
        )
        .try_init();
    tokio::task::spawn_blocking(|| broker_script("kafka-durable"))
        .await
        .expect("the broker script ran");
    let url = std::env::var("BUSBAR_KAFKA_RESTART_URL").unwrap_or_else(|_| {
        "kafka://127.0.0.1:9094?session_timeout_ms=6000&publish_timeout_ms=30000&debug=eos".into()
    });
    let transport = KafkaTransport::connect(&url.parse().unwrap())
        .await
        .expect("the durable Tansu reachable");
    let servers = transport.config().bootstrap_servers();
    let report = loses_nothing_across_a_durable_restart(
        Arc::new(transport),
        || broker_script("kafka-durable-restart"),
        |topic| async move {
            tokio::task::spawn_blocking(move || read_log(&servers, &topic))
                .await
                .expect("the log reader ran")
        },
    )
    .await;
    println!("{report}");
    for id in &report.lost_by_the_broker {
        println!("acknowledged by Tansu, missing from its log: {id}");
    }
}

/// Every record of `topic` from the start of each partition to its end (the `ce_id`s), and
/// the blind acknowledgements librdkafka reported for it.
fn read_log(servers: &str, topic: &str) -> BrokerLog {
    const PARTITIONS: i32 = 4;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("group.id", unique("log-reader"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .expect("a raw consumer");
    let mut assignment = TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        assignment
            .add_partition_offset(topic, partition, Offset::Beginning)
            .expect("an assignment");
    }
    consumer.assign(&assignment).expect("assign");
    let mut at_end: HashMap<i32, bool> = HashMap::new();
    let mut log = BrokerLog::default();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while at_end.values().filter(|end| **end).count() < PARTITIONS as usize {
        assert!(
            std::time::Instant::now() < deadline,
            "the log of {topic} was not read to its end in 60 s"
        );
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                at_end.insert(partition, true);
            }
            Some(Err(e)) => panic!("reading the log of {topic}: {e}"),
            Some(Ok(record)) => {
                at_end.insert(record.partition(), false);
                let id = record
                    .headers()
                    .and_then(|headers| headers.iter().find(|h| h.key == "ce_id"))
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned());
                if let Some(id) = id {
                    log.ids.insert(id.into());
                }
            }
        }
    }
    let reports = dupseq_reports()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    assert!(
        reports.unreadable.is_empty(),
        "DUPSEQ reports this test cannot read: {:?}",
        reports.unreadable
    );
    log.blind_acks = reports.blind_acks.get(topic).copied().unwrap_or(0);
    log
}
