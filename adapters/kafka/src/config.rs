//! Settings of the Kafka transport, read from the `kafka://` URL.

use std::time::Duration;

use busbar_core::{Error, ErrorKind, Result, TransportUrl};

/// Settings of a [`crate::KafkaTransport`].
///
/// `kafka://host1:9092,host2:9092?…` — the hosts are the bootstrap servers. busbar's own query
/// parameters are below; every other parameter is passed to librdkafka as it is (for example
/// `security.protocol=SASL_SSL&sasl.mechanism=PLAIN&sasl.username=…&sasl.password=…`,
/// `ssl.ca.location=…`, `client.id=…`). Passwords never appear in `Debug` or errors.
///
/// | parameter | default | meaning |
/// |---|---|---|
/// | `partitions` | `4` | partitions of topics busbar creates |
/// | `replication` | `1` | replication factor of topics busbar creates |
/// | `publish_timeout_ms` | `30000` | how long a publish waits for acks (librdkafka retries meanwhile) |
/// | `session_timeout_ms` | `10000` | the consumer group session timeout |
/// | `connect_timeout_ms` | `10000` | how long `connect` waits for a broker to answer its metadata request |
#[derive(Clone)]
pub struct KafkaConfig {
    /// The broker URL (secrets redacted when printed).
    pub url: TransportUrl,
    /// Partitions of topics busbar creates.
    pub partitions: i32,
    /// Replication factor of topics busbar creates.
    pub replication: i32,
    /// How long a publish may take.
    pub publish_timeout: Duration,
    /// Consumer group session timeout.
    pub session_timeout: Duration,
    /// How long `connect` waits for a broker to answer.
    pub connect_timeout: Duration,
    /// librdkafka settings passed through (may hold secrets: never printed).
    pub(crate) passthrough: Vec<(String, String)>,
}

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("url", &self.url)
            .field("partitions", &self.partitions)
            .field("replication", &self.replication)
            .field("publish_timeout", &self.publish_timeout)
            .field("session_timeout", &self.session_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .finish_non_exhaustive()
    }
}

impl KafkaConfig {
    /// Reads the settings from a `kafka://` URL.
    ///
    /// ```
    /// let config = busbar_kafka::KafkaConfig::from_url(
    ///     &"kafka://k1:9092,k2:9092?partitions=8&sasl.password=hunter2".parse().unwrap(),
    /// ).unwrap();
    /// assert_eq!(config.partitions, 8);
    /// assert_eq!(config.bootstrap_servers(), "k1:9092,k2:9092");
    /// assert!(!format!("{config:?}").contains("hunter2"));
    /// ```
    pub fn from_url(url: &TransportUrl) -> Result<Self> {
        let config_error = |message: String| {
            Error::new(ErrorKind::Config, "connect", message).with_resource(url.to_string())
        };
        if url.scheme() != "kafka" {
            return Err(config_error(format!(
                "the Kafka transport takes kafka:// URLs, not {}://",
                url.scheme()
            )));
        }
        if url.hosts().is_empty() {
            return Err(config_error(
                "give at least one bootstrap server: kafka://host:9092".into(),
            ));
        }
        let mut config = KafkaConfig {
            url: url.clone(),
            partitions: 4,
            replication: 1,
            publish_timeout: Duration::from_secs(30),
            session_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            passthrough: Vec::new(),
        };
        let positive = |name: &str, value: &str| {
            value.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| {
                config_error(format!(
                    "`{name}` must be a positive integer, got {value:?}"
                ))
            })
        };
        for (name, value) in url.query_pairs() {
            match name.as_str() {
                "partitions" => config.partitions = i32::try_from(positive(&name, &value)?).unwrap_or(i32::MAX),
                "replication" => config.replication = i32::try_from(positive(&name, &value)?).unwrap_or(i32::MAX),
                "publish_timeout_ms" => config.publish_timeout = Duration::from_millis(positive(&name, &value)?),
                "session_timeout_ms" => config.session_timeout = Duration::from_millis(positive(&name, &value)?),
                "connect_timeout_ms" => config.connect_timeout = Duration::from_millis(positive(&name, &value)?),
                "bootstrap.servers" | "group.id" | "enable.auto.commit" | "enable.auto.offset.store"
                | "enable.partition.eof" | "auto.offset.reset" | "enable.idempotence" | "acks" => {
                    return Err(config_error(format!("`{name}` is set by busbar and cannot be overridden")))
                }
                "message.timeout.ms" => {
                    return Err(config_error("`message.timeout.ms` is set by busbar from `publish_timeout_ms`; set that instead".into()))
                }
                "session.timeout.ms" => {
                    return Err(config_error("`session.timeout.ms` is set by busbar from `session_timeout_ms`; set that instead".into()))
                }
                // librdkafka's few settings without a dot that are safe to pass.
                _ if name.contains('.') || name == "debug" => config.passthrough.push((name, value)),
                other => {
                    return Err(config_error(format!(
                        "unknown query parameter `{other}`; busbar's: partitions, replication, publish_timeout_ms, session_timeout_ms, connect_timeout_ms; librdkafka settings contain a dot (e.g. security.protocol), or are `debug`"
                    )))
                }
            }
        }
        Ok(config)
    }

    /// The bootstrap servers, comma-separated.
    pub fn bootstrap_servers(&self) -> String {
        self.url.hosts().join(",")
    }

    /// The dead-letter topic of (`topic`, `group`).
    pub fn dead_letter_topic(&self, topic: &str, group: &str) -> String {
        format!("{topic}.{group}.dlq")
    }

    /// The topic redriven dead letters of (`topic`, `group`) go to; only that group reads it.
    pub fn redrive_topic(&self, topic: &str, group: &str) -> String {
        format!("{topic}.{group}.redrive")
    }

    /// What a transport with these settings guarantees. Duplicates are possible: a message
    /// in flight when its partition moves to another consumer is delivered there again.
    pub fn capabilities(&self) -> busbar_core::Capabilities {
        busbar_core::Capabilities {
            fan_out: true,
            competing_consumers: true,
            ordered_by_key: true,
            ordered_across_retries: true,
            delayed_nack: true,
            may_duplicate: true,
            native_dead_letter: false,
            redrive: true,
            persistent: true,
            // Kafka's default limit (message.max.bytes, 1 MB) counts the record's framing too:
            // keep 10 % for it.
            max_message_bytes: Some(900_000),
        }
    }

    /// A client's settings: the bootstrap servers, then the librdkafka settings from the URL.
    pub(crate) fn client_config(&self) -> rdkafka::ClientConfig {
        self.client_config_over(&[])
    }

    /// Like [`client_config`](Self::client_config), over busbar's `defaults`: a setting the
    /// URL gives wins over busbar's default for it.
    fn client_config_over(&self, defaults: &[(&str, &str)]) -> rdkafka::ClientConfig {
        let mut config = rdkafka::ClientConfig::new();
        config.set("bootstrap.servers", self.bootstrap_servers());
        for (name, value) in defaults {
            config.set(*name, *value);
        }
        for (name, value) in &self.passthrough {
            config.set(name, value);
        }
        config
    }

    /// The consumer's settings. librdkafka's consumer-group debug log is on: the consumer
    /// reads from it whether it leads its group (see `consumer::Role`), which no API tells.
    /// It reaches `tracing` only when the URL asks for `debug`.
    pub(crate) fn consumer_config(&self) -> rdkafka::ClientConfig {
        let mut config = self.client_config();
        let debug = match config.get("debug") {
            Some(own) if own.split(',').any(|c| c == "cgrp" || c == "all") => own.to_string(),
            Some(own) => format!("{own},cgrp"),
            None => "cgrp".to_string(),
        };
        config.set("debug", debug);
        // Else librdkafka drops debug lines before the consumer sees them, unless `tracing`
        // happened to be at debug level for librdkafka when the consumer was made.
        config.set_log_level(rdkafka::config::RDKafkaLogLevel::Debug);
        config
    }

    /// Whether the URL asked for librdkafka debug logs.
    pub(crate) fn wants_debug(&self) -> bool {
        self.passthrough.iter().any(|(name, _)| name == "debug")
    }

    /// The producer's settings: durable (`acks=all`, idempotent), with the publish time limit
    /// as librdkafka's message timeout, and a 5 ms `linger.ms` unless the URL sets its own.
    pub(crate) fn producer_config(&self) -> rdkafka::ClientConfig {
        let mut config = self.client_config_over(&[("linger.ms", "5")]);
        config
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set(
                "message.timeout.ms",
                self.publish_timeout.as_millis().to_string(),
            );
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busbar_owned_settings_cannot_be_overridden_and_unknown_ones_are_named() {
        for url in [
            "kafka://h:9092?enable.auto.commit=true",
            "kafka://h:9092?acks=1",
            "kafka://h:9092?partitionz=3",
            "kafka://?partitions=3",
        ] {
            let err = KafkaConfig::from_url(&url.parse().unwrap()).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Config, "{url}: {err}");
        }
    }

    #[test]
    fn a_setting_the_url_gives_wins_over_busbars_default_and_durability_stays() {
        let config =
            KafkaConfig::from_url(&"kafka://h:9092?linger.ms=50".parse().unwrap()).unwrap();
        let producer = config.producer_config();
        assert_eq!(producer.get("linger.ms"), Some("50"));
        assert_eq!(producer.get("acks"), Some("all"));
        assert_eq!(producer.get("enable.idempotence"), Some("true"));
        assert_eq!(producer.get("message.timeout.ms"), Some("30000"));
        let default = KafkaConfig::from_url(&"kafka://h:9092".parse().unwrap()).unwrap();
        assert_eq!(default.producer_config().get("linger.ms"), Some("5"));
    }

    #[test]
    fn timeouts_busbar_derives_point_to_its_own_parameters() {
        for (name, instead) in [
            ("message.timeout.ms", "publish_timeout_ms"),
            ("session.timeout.ms", "session_timeout_ms"),
        ] {
            let url = format!("kafka://h:9092?{name}=1000");
            let err = KafkaConfig::from_url(&url.parse().unwrap()).unwrap_err();
            assert!(err.to_string().contains(instead), "{err}");
        }
        for owned in ["auto.offset.reset=latest", "enable.auto.offset.store=true"] {
            let url = format!("kafka://h:9092?{owned}");
            let err = KafkaConfig::from_url(&url.parse().unwrap()).unwrap_err();
            assert!(err.to_string().contains("set by busbar"), "{err}");
        }
    }

    #[test]
    fn librdkafka_settings_pass_through_debug_included() {
        let url = "kafka://h:9092?client.id=svc&debug=cgrp";
        let config = KafkaConfig::from_url(&url.parse().unwrap()).unwrap();
        assert_eq!(
            config.passthrough,
            vec![
                ("client.id".to_string(), "svc".to_string()),
                ("debug".to_string(), "cgrp".to_string())
            ]
        );
    }
}
