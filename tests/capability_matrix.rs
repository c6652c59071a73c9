//! The README's capability matrix is generated from `capabilities()`; this keeps them in step.

use busbar::{MemoryTransport, Transport};

#[test]
fn readme_matrix_rows_match_the_transports_capabilities() {
    let readme = include_str!("../README.md");
    #[allow(unused_mut)]
    let mut rows = vec![MemoryTransport::new().capabilities().matrix_row("memory")];
    #[cfg(feature = "rabbitmq")]
    for (name, url) in [
        ("RabbitMQ (quorum, default)", "amqp://localhost/%2f"),
        (
            "RabbitMQ (`queue_type=classic`)",
            "amqp://localhost/%2f?queue_type=classic",
        ),
    ] {
        let config = busbar::rabbitmq::RabbitConfig::from_url(&url.parse().unwrap()).unwrap();
        rows.push(config.capabilities().matrix_row(name));
    }
    #[cfg(feature = "kafka")]
    {
        let config =
            busbar::kafka::KafkaConfig::from_url(&"kafka://localhost:9092".parse().unwrap())
                .unwrap();
        rows.push(config.capabilities().matrix_row("Kafka"));
    }
    #[cfg(feature = "sqs")]
    for (name, url) in [
        ("SQS (fan-out, default)", "sqs://"),
        ("SQS (`mode=queue`)", "sqs://?mode=queue"),
        ("SQS (`fifo=true`)", "sqs://?fifo=true"),
        (
            "SQS (`mode=queue&fifo=true`)",
            "sqs://?mode=queue&fifo=true",
        ),
    ] {
        let config = busbar::sqs::SqsConfig::from_url(&url.parse().unwrap()).unwrap();
        rows.push(config.capabilities().matrix_row(name));
    }
    for row in rows {
        assert!(
            readme.lines().any(|line| line.trim() == row),
            "README.md's capability matrix is out of date; expected the row\n{row}"
        );
    }
}
