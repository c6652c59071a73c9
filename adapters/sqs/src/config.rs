//! Settings of the SQS transport, read from the `sqs://` URL.

use std::time::Duration;

use busbar_core::{Error, ErrorKind, Result, TransportUrl};

/// How busbar topics and groups map onto SQS and SNS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A topic is an SNS topic; each group is an SQS queue subscribed to it with raw delivery,
    /// so every group gets every message.
    FanOut,
    /// A topic is one SQS queue that all groups share: no fan-out.
    Queue,
}

/// Settings of a [`crate::SqsTransport`].
///
/// `sqs://?region=us-east-1&endpoint=http://127.0.0.1:4566&…`
///
/// | parameter | default | meaning |
/// |---|---|---|
/// | `region` | the provider chain's | AWS region |
/// | `endpoint` | AWS | endpoint override (LocalStack, moto) |
/// | `mode` | `fanout` | `fanout` (SNS topic + queue per group) or `queue` (one shared queue per topic) |
/// | `prefix` | `busbar-` | prefix of every queue and topic name busbar creates |
/// | `visibility_timeout_s` | `30` | how long a received message stays hidden (a heartbeat extends it while its handler runs) |
/// | `wait_time_s` | `10` | long-polling wait of each receive |
/// | `max_receive_count` | `10` | receives before SQS moves a message to the DLQ itself (crash backstop); keep it above the retry policy's attempts |
/// | `publish_timeout_ms` | `30000` | how long a publish (its SQS/SNS calls included) or a dead-lettering send may take |
/// | `connect_timeout_ms` | `10000` | how long `connect`'s check that the service answers may take; an endpoint that never answers gives a `Timeout` error naming it |
/// | `fifo` | `false` | FIFO queues (and FIFO SNS topics): per-key order (key → `MessageGroupId`) and publish deduplication (message id → `MessageDeduplicationId`) |
/// | `access_key_id`, `secret_access_key` | the provider chain's | static credentials, for local servers |
#[derive(Clone)]
pub struct SqsConfig {
    /// The URL (secrets redacted when printed).
    pub url: TransportUrl,
    /// AWS region.
    pub region: Option<String>,
    /// Endpoint override.
    pub endpoint: Option<String>,
    /// Topic mapping.
    pub mode: Mode,
    /// Name prefix.
    pub prefix: String,
    /// Visibility timeout.
    pub visibility_timeout: Duration,
    /// Long-poll wait.
    pub wait_time: Duration,
    /// Redrive policy threshold.
    pub max_receive_count: u32,
    /// How long a publish may take, every SQS/SNS call it makes included (the SDK retries
    /// within it); dead-lettering's send has the same limit.
    pub publish_timeout: Duration,
    /// How long `connect`'s check that the service answers may take.
    pub connect_timeout: Duration,
    /// FIFO queues and topics: per-key order and publish deduplication.
    pub fifo: bool,
    pub(crate) credentials: Option<(String, String)>,
}

impl std::fmt::Debug for SqsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqsConfig")
            .field("url", &self.url)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("mode", &self.mode)
            .field("prefix", &self.prefix)
            .field("visibility_timeout", &self.visibility_timeout)
            .field("wait_time", &self.wait_time)
            .field("max_receive_count", &self.max_receive_count)
            .field("publish_timeout", &self.publish_timeout)
            .field("fifo", &self.fifo)
            .finish_non_exhaustive()
    }
}

/// SQS's size limit for one message: body plus attribute names, types and values.
pub const SQS_MAX_BYTES: usize = 262_144;

impl SqsConfig {
    /// Reads the settings from an `sqs://` URL.
    ///
    /// ```
    /// let config = busbar_sqs::SqsConfig::from_url(
    ///     &"sqs://?region=eu-west-1&access_key_id=AKIA1&secret_access_key=hunter2".parse().unwrap(),
    /// ).unwrap();
    /// assert_eq!(config.region.as_deref(), Some("eu-west-1"));
    /// assert!(!format!("{config:?}").contains("hunter2"));
    /// ```
    pub fn from_url(url: &TransportUrl) -> Result<Self> {
        let config_error = |message: String| {
            Error::new(ErrorKind::Config, "connect", message).with_resource(url.to_string())
        };
        if url.scheme() != "sqs" {
            return Err(config_error(format!(
                "the SQS transport takes sqs:// URLs, not {}://",
                url.scheme()
            )));
        }
        let mut config = SqsConfig {
            url: url.clone(),
            region: None,
            endpoint: None,
            mode: Mode::FanOut,
            prefix: "busbar-".into(),
            visibility_timeout: Duration::from_secs(30),
            wait_time: Duration::from_secs(10),
            max_receive_count: 10,
            publish_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            fifo: false,
            credentials: None,
        };
        let (mut key, mut secret) = (None, None);
        let seconds = |name: &str, value: &str, max: u64| {
            value
                .parse::<u64>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| {
                    config_error(format!(
                        "`{name}` must be a whole number of seconds from 0 to {max}, got {value:?}"
                    ))
                })
        };
        for (name, value) in url.query_pairs() {
            match name.as_str() {
                "region" => config.region = Some(value),
                "endpoint" => {
                    // The SDK would take an endpoint without a host and fail each request later.
                    let parsed = url::Url::parse(&value).ok();
                    let host = parsed.as_ref().and_then(url::Url::host_str).unwrap_or_default();
                    let scheme = parsed.as_ref().map(url::Url::scheme).unwrap_or_default();
                    if host.is_empty() || !matches!(scheme, "http" | "https") {
                        return Err(config_error(format!(
                            "`endpoint` must be an http:// or https:// URL with a host (e.g. http://127.0.0.1:4566), got {value:?}"
                        )));
                    }
                    config.endpoint = Some(value)
                }
                "mode" => {
                    config.mode = match value.as_str() {
                        "fanout" => Mode::FanOut,
                        "queue" => Mode::Queue,
                        other => return Err(config_error(format!("`mode` must be `fanout` or `queue`, got {other:?}"))),
                    }
                }
                "prefix" => {
                    if !value.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                        return Err(config_error(format!("`prefix` may hold letters, digits, '-' and '_' only, got {value:?}")));
                    }
                    config.prefix = value;
                }
                "visibility_timeout_s" => config.visibility_timeout = Duration::from_secs(seconds(&name, &value, 43_200)?.max(1)),
                "wait_time_s" => config.wait_time = Duration::from_secs(seconds(&name, &value, 20)?),
                "max_receive_count" => {
                    config.max_receive_count = u32::try_from(seconds(&name, &value, 1000)?.max(1)).unwrap_or(1000)
                }
                "publish_timeout_ms" => {
                    config.publish_timeout = value
                        .parse::<u64>()
                        .ok()
                        .filter(|ms| *ms > 0)
                        .map(Duration::from_millis)
                        .ok_or_else(|| config_error(format!("`publish_timeout_ms` must be a positive whole number of milliseconds, got {value:?}")))?
                }
                "connect_timeout_ms" => {
                    config.connect_timeout = value
                        .parse::<u64>()
                        .ok()
                        .filter(|ms| *ms > 0)
                        .map(Duration::from_millis)
                        .ok_or_else(|| config_error(format!("`connect_timeout_ms` must be a positive whole number of milliseconds, got {value:?}")))?
                }
                "fifo" => {
                    config.fifo = match value.as_str() {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        other => return Err(config_error(format!("`fifo` must be `true` or `false`, got {other:?}"))),
                    }
                }
                "access_key_id" => key = Some(value),
                "secret_access_key" => secret = Some(value),
                other => {
                    return Err(config_error(format!(
                        "unknown query parameter `{other}`; known: region, endpoint, mode, prefix, visibility_timeout_s, wait_time_s, max_receive_count, publish_timeout_ms, connect_timeout_ms, fifo, access_key_id, secret_access_key"
                    )))
                }
            }
        }
        config.credentials = match (key, secret) {
            (Some(k), Some(s)) => Some((k, s)),
            (None, None) => None,
            _ => {
                return Err(config_error(
                    "give both access_key_id and secret_access_key, or neither".into(),
                ))
            }
        };
        Ok(config)
    }

    /// The SQS/SNS base name of a busbar name: `.` (not allowed there) becomes `_`. Queue
    /// and topic names are made from it by [`SqsConfig::resource_name`].
    pub(crate) fn aws_name(&self, parts: &[&str]) -> Result<String> {
        let name = format!("{}{}", self.prefix, parts.join("__")).replace('.', "_");
        // Room for "-dlq", and ".fifo" on FIFO queues, within SQS's 80 characters.
        let max = if self.fifo { 71 } else { 76 };
        if name.len() > max {
            return Err(Error::new(
                ErrorKind::Config,
                "declare",
                format!("{name:?} is {} characters; SQS queue names allow 80 (with room for -dlq{}): use shorter topic and group names or prefix", name.len(), if self.fifo { " and .fifo" } else { "" }),
            ));
        }
        Ok(name)
    }

    /// The queue or topic name for a base name: FIFO ones must end in `.fifo`.
    pub(crate) fn resource_name(&self, base: &str) -> String {
        if self.fifo {
            format!("{base}.fifo")
        } else {
            base.to_string()
        }
    }

    /// What a transport with these settings guarantees.
    pub fn capabilities(&self) -> busbar_core::Capabilities {
        busbar_core::Capabilities {
            fan_out: self.mode == Mode::FanOut,
            competing_consumers: true,
            // FIFO: SQS hands out one message group (= key) at a time and busbar holds back
            // later messages of a group while an earlier one is out or waiting for a retry.
            ordered_by_key: self.fifo,
            ordered_across_retries: self.fifo,
            delayed_nack: true,
            may_duplicate: true,
            native_dead_letter: true,
            redrive: true,
            persistent: true,
            // 256 KiB less room for the packed attributes' names and types.
            max_message_bytes: Some(250_000),
        }
    }
}
