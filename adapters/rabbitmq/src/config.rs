//! Settings of the RabbitMQ transport, read from the `amqp://` / `amqps://` URL.

use std::time::Duration;

use busbar_core::message::validate_name;
use busbar_core::{Error, ErrorKind, Result, TransportUrl};

/// The queue type of group queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    /// Replicated Raft queues. They count deliveries (`x-delivery-count`), so a message that
    /// crashes its consumer again and again is dead-lettered after `delivery_limit` deliveries.
    Quorum,
    /// Classic queues: no delivery count, so no crash backstop; a redelivered message is only
    /// flagged `redelivered`.
    Classic,
}

impl QueueType {
    /// The `x-queue-type` argument value.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        }
    }
}

/// Settings of a [`crate::RabbitTransport`].
///
/// Read from the URL's query, next to lapin's own parameters (`heartbeat`, `frame_max`,
/// `channel_max`, `connection_timeout`, `auth_mechanism`), which are passed through:
///
/// | parameter | default | meaning |
/// |---|---|---|
/// | `exchange` | `busbar` | the durable topic exchange all topics are routing keys of |
/// | `queue_type` | `quorum` | `quorum` or `classic` group queues |
/// | `delivery_limit` | `20` | quorum only: deliveries before RabbitMQ itself dead-letters a message (crash backstop) |
/// | `max_message_bytes` | 16 MiB | larger messages are refused before sending |
/// | `publish_timeout_ms` | `30000` | how long a publish waits (reconnecting) for the broker's confirm |
/// | `publish_channels` | `4` | confirming channels concurrent publishes spread over (a batch stays on one) |
/// | `reconnect_max_ms` | `5000` | the longest wait between reconnect attempts (each wait is shortened at random by up to half, so that many instances do not reconnect in step) |
/// | `connect_timeout_ms` | `10000` | how long one connection attempt may take, TCP, TLS and the AMQP handshake together: a listener that never answers gives a `Timeout` error naming the host |
/// | `tls_ca_file` | none | `amqps://` only: a PEM file of CA certificates to trust besides the system's |
/// | `queue_expires_ms` | none | delete queues unused this long (`x-expires`), messages included: for tests and ephemeral environments |
#[derive(Clone)]
pub struct RabbitConfig {
    /// The broker URL (password redacted when printed).
    pub url: TransportUrl,
    /// The exchange name.
    pub exchange: String,
    /// The type of group queues.
    pub queue_type: QueueType,
    /// Quorum delivery limit.
    pub delivery_limit: u32,
    /// The largest message accepted.
    pub max_message_bytes: usize,
    /// How long a publish may take, reconnects included.
    pub publish_timeout: Duration,
    /// Confirming channels that concurrent publishes spread over; each batch goes on one.
    pub publish_channels: usize,
    /// The longest pause between reconnect attempts.
    pub reconnect_max: Duration,
    /// How long one connection attempt (TCP, TLS, AMQP handshake) may take.
    pub connect_timeout: Duration,
    /// Extra CA certificates (PEM) for `amqps://`, read from `tls_ca_file`.
    pub tls_ca_pem: Option<String>,
    /// `x-expires` of every queue busbar declares, when set.
    pub queue_expires: Option<Duration>,
    /// The URL handed to lapin: busbar's own parameters removed.
    pub(crate) lapin_uri: String,
}

impl std::fmt::Debug for RabbitConfig {
    /// Leaves out the lapin URI: it carries the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitConfig")
            .field("url", &self.url)
            .field("exchange", &self.exchange)
            .field("queue_type", &self.queue_type)
            .field("delivery_limit", &self.delivery_limit)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("publish_timeout", &self.publish_timeout)
            .field("publish_channels", &self.publish_channels)
            .field("reconnect_max", &self.reconnect_max)
            .field("connect_timeout", &self.connect_timeout)
            .field("tls_ca_pem", &self.tls_ca_pem.as_ref().map(|_| "<PEM>"))
            .field("queue_expires", &self.queue_expires)
            .finish_non_exhaustive()
    }
}

const OWN_PARAMS: [&str; 10] = [
    "exchange",
    "queue_type",
    "delivery_limit",
    "max_message_bytes",
    "publish_timeout_ms",
    "publish_channels",
    "reconnect_max_ms",
    "connect_timeout_ms",
    "tls_ca_file",
    "queue_expires_ms",
];
const LAPIN_PARAMS: [&str; 5] = [
    "heartbeat",
    "frame_max",
    "channel_max",
    "connection_timeout",
    "auth_mechanism",
];

impl RabbitConfig {
    /// Reads the settings from an `amqp://` or `amqps://` URL.
    ///
    /// ```
    /// use busbar_rabbitmq::{QueueType, RabbitConfig};
    /// let config = RabbitConfig::from_url(
    ///     &"amqp://app:secret@rabbit:5672/%2f?queue_type=classic&heartbeat=10".parse().unwrap(),
    /// ).unwrap();
    /// assert_eq!(config.queue_type, QueueType::Classic);
    /// assert!(!format!("{config:?}").contains("secret"));
    /// ```
    pub fn from_url(url: &TransportUrl) -> Result<Self> {
        let config_error = |message: String| {
            Error::new(ErrorKind::Config, "connect", message).with_resource(url.to_string())
        };
        if !matches!(url.scheme(), "amqp" | "amqps") {
            return Err(config_error(format!(
                "the RabbitMQ transport takes amqp:// or amqps:// URLs, not {}://",
                url.scheme()
            )));
        }
        if url.hosts().iter().all(|host| host.trim().is_empty()) {
            return Err(config_error(
                "the URL names no host: write amqp://user:password@host:5672/vhost".into(),
            ));
        }
        if url.hosts().len() > 1 {
            return Err(config_error(
                "give one RabbitMQ host; for a cluster, put a load balancer in front".into(),
            ));
        }
        let mut config = RabbitConfig {
            url: url.clone(),
            exchange: "busbar".into(),
            queue_type: QueueType::Quorum,
            delivery_limit: 20,
            max_message_bytes: 16 * 1024 * 1024,
            publish_timeout: Duration::from_secs(30),
            publish_channels: 4,
            reconnect_max: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            tls_ca_pem: None,
            queue_expires: None,
            lapin_uri: String::new(),
        };
        let positive = |name: &str, value: &str| {
            value.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| {
                config_error(format!(
                    "`{name}` must be a positive integer, got {value:?}"
                ))
            })
        };
        let mut passthrough = Vec::new();
        for (name, value) in url.query_pairs() {
            match name.as_str() {
                "exchange" => {
                    validate_name("exchange", &value)?;
                    config.exchange = value;
                }
                "queue_type" => {
                    config.queue_type = match value.as_str() {
                        "quorum" => QueueType::Quorum,
                        "classic" => QueueType::Classic,
                        other => {
                            return Err(config_error(format!(
                                "`queue_type` must be `quorum` or `classic`, got {other:?}"
                            )))
                        }
                    }
                }
                "delivery_limit" => {
                    config.delivery_limit =
                        u32::try_from(positive(&name, &value)?).unwrap_or(u32::MAX)
                }
                "max_message_bytes" => {
                    config.max_message_bytes =
                        usize::try_from(positive(&name, &value)?).unwrap_or(usize::MAX)
                }
                "publish_timeout_ms" => {
                    config.publish_timeout = Duration::from_millis(positive(&name, &value)?)
                }
                "reconnect_max_ms" => {
                    config.reconnect_max = Duration::from_millis(positive(&name, &value)?)
                }
                "connect_timeout_ms" => {
                    config.connect_timeout = Duration::from_millis(positive(&name, &value)?)
                }
                "publish_channels" => {
                    let channels = positive(&name, &value)?;
                    if channels > 64 {
                        return Err(config_error(format!(
                            "`publish_channels` must be at most 64, got {channels}"
                        )));
                    }
                    config.publish_channels = usize::try_from(channels).unwrap_or(1);
                }
                "queue_expires_ms" => {
                    config.queue_expires = Some(Duration::from_millis(positive(&name, &value)?))
                }
                "tls_ca_file" => {
                    if url.scheme() != "amqps" {
                        return Err(config_error("`tls_ca_file` needs an amqps:// URL".into()));
                    }
                    let pem = std::fs::read_to_string(&value).map_err(|e| {
                        config_error(format!("cannot read tls_ca_file {value:?}: {e}"))
                    })?;
                    if !pem.contains("-----BEGIN CERTIFICATE-----") {
                        return Err(config_error(format!(
                            "tls_ca_file {value:?} holds no PEM certificate"
                        )));
                    }
                    config.tls_ca_pem = Some(pem);
                }
                lapin if LAPIN_PARAMS.contains(&lapin) => passthrough.push((name, value)),
                other => {
                    return Err(config_error(format!(
                        "unknown query parameter `{other}`; busbar's: {}; lapin's: {}",
                        OWN_PARAMS.join(", "),
                        LAPIN_PARAMS.join(", ")
                    )))
                }
            }
        }
        config.lapin_uri = lapin_uri(url.expose(), &passthrough);
        Ok(config)
    }

    /// What a transport with these settings guarantees. Per-key order holds for messages that
    /// do not fail: a retried message goes back through a retry queue, behind later ones.
    pub fn capabilities(&self) -> busbar_core::Capabilities {
        busbar_core::Capabilities {
            fan_out: true,
            competing_consumers: true,
            ordered_by_key: true,
            // A retried message goes back through a retry queue, behind later ones.
            ordered_across_retries: false,
            delayed_nack: true,
            may_duplicate: false,
            native_dead_letter: self.queue_type == QueueType::Quorum,
            redrive: true,
            persistent: true,
            max_message_bytes: Some(self.max_message_bytes),
        }
    }

    /// The group queue of (`topic`, `group`).
    pub fn queue(&self, topic: &str, group: &str) -> String {
        format!("{}:{topic}:{group}", self.exchange)
    }

    /// The dead-letter queue of a group queue.
    pub fn dead_letter_queue(&self, queue: &str) -> String {
        format!("{queue}:dlq")
    }

    /// The retry queue holding messages of `queue` for `delay_ms` before they return.
    pub fn retry_queue(&self, queue: &str, delay_ms: u64) -> String {
        format!("{queue}:retry:{delay_ms}ms")
    }
}

/// The URL without its query, plus only lapin's own parameters.
fn lapin_uri(raw: &str, passthrough: &[(String, String)]) -> String {
    let base = raw.split_once('?').map_or(raw, |(base, _)| base);
    if passthrough.is_empty() {
        return base.to_string();
    }
    let query: Vec<String> = passthrough
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    format!("{base}?{}", query.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<RabbitConfig> {
        RabbitConfig::from_url(&url.parse()?)
    }

    #[test]
    fn busbar_parameters_are_read_and_lapin_ones_passed_through() {
        let c = parse("amqp://u:p@h:5672/vh?exchange=shop&delivery_limit=3&heartbeat=10&publish_timeout_ms=500&publish_channels=8").unwrap();
        assert_eq!(c.exchange, "shop");
        assert_eq!(c.publish_channels, 8);
        assert_eq!(parse("amqp://h/").unwrap().publish_channels, 4);
        assert_eq!(c.delivery_limit, 3);
        assert_eq!(c.publish_timeout, Duration::from_millis(500));
        assert_eq!(c.lapin_uri, "amqp://u:p@h:5672/vh?heartbeat=10");
        assert_eq!(c.queue("orders", "billing"), "shop:orders:billing");
    }

    #[test]
    fn bad_parameters_are_config_errors_without_the_password() {
        for url in [
            "amqp://u:hunter2@h/?queue_type=stream",
            "amqp://u:hunter2@h/?delivery_limit=0",
            "amqp://u:hunter2@h/?publish_channels=0",
            "amqp://u:hunter2@h/?publish_channels=65",
            "amqp://u:hunter2@h/?prefetch=10",
            "amqp://u:hunter2@h1,h2/",
            "amqp://u:hunter2@h/?exchange=a%20b",
            "amqp://u:hunter2@h/?tls_ca_file=/etc/hostname",
            "amqps://u:hunter2@h/?tls_ca_file=/nonexistent.pem",
            "amqps://u:hunter2@h/?tls_ca_file=/etc/hostname",
        ] {
            let err = parse(url).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Config, "{url}");
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
        let err = parse("amqp://h/?prefetch=1").unwrap_err();
        assert!(err.to_string().contains("heartbeat"), "{err}");
    }
}
