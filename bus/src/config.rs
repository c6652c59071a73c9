//! Configuration: the transport URL (with its secrets kept out of every printout) and the serde
//! config struct that carries the same for TOML or environment-based configuration.

use std::fmt;
use std::str::FromStr;

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, ErrorKind, Result};
use crate::retry::RetryPolicy;

/// The URL schemes busbar knows, and the facade feature that provides each.
pub const SCHEMES: [(&str, &str); 5] = [
    ("memory", "(built in)"),
    ("amqp", "rabbitmq"),
    ("amqps", "rabbitmq"),
    ("kafka", "kafka"),
    ("sqs", "sqs"),
];

/// The placeholder printed instead of a password or secret query value.
pub const REDACTED: &str = "***";

/// A transport URL such as `amqp://user:pass@host:5672/%2f` or `kafka://h1:9092,h2:9092`.
///
/// Unlike a generic URL parser it accepts several `host:port` pairs (Kafka bootstrap lists).
/// `Display` and `Debug` replace the password and any secret-looking query value (`password`,
/// `secret`, `token`, `credential` in its name) with `***`; only
/// [`TransportUrl::expose`] returns the original text, for adapters that must connect.
///
/// ```
/// use busbar_core::TransportUrl;
/// let url: TransportUrl = "amqp://app:s3cret@rabbit:5672/%2f?heartbeat=10".parse().unwrap();
/// assert_eq!(url.scheme(), "amqp");
/// assert_eq!(url.to_string(), "amqp://app:***@rabbit:5672/%2f?heartbeat=10");
/// assert!(!format!("{url:?}").contains("s3cret"));
/// assert_eq!(url.hosts(), ["rabbit:5672"]);
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct TransportUrl {
    raw: String,
    scheme: String,
    user: Option<String>,
    password: Option<String>,
    hosts: Vec<String>,
    path: String,
    query: String,
}

impl TransportUrl {
    /// Parses `text` as `scheme://[user[:password]@]host[:port][,host[:port]…][/path][?query]`.
    pub fn parse(text: &str) -> Result<Self> {
        let invalid = |why: &str| {
            Error::new(
                ErrorKind::Config,
                "parse URL",
                format!("invalid transport URL: {why}"),
            )
            .with_resource(redact_raw(text))
        };
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| invalid("expected `scheme://…`, e.g. `memory://` or `amqp://host`"))?;
        if scheme.is_empty()
            || !scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        {
            return Err(invalid(
                "the scheme must be letters, digits, '+', '-' or '.'",
            ));
        }
        let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = match before_query.find('/') {
            Some(i) => before_query.split_at(i),
            None => (before_query, ""),
        };
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (Some(userinfo), hosts),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            None => (None, None),
            Some(info) => match info.split_once(':') {
                Some((u, p)) => (Some(u.to_string()), Some(p.to_string())),
                None => (Some(info.to_string()), None),
            },
        };
        let hosts: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(str::to_string)
            .collect();
        if let Some(bad) = hosts.iter().find(|h| h.chars().any(|c| c.is_whitespace())) {
            return Err(invalid(&format!("host {bad:?} contains white space")));
        }
        Ok(TransportUrl {
            raw: text.to_string(),
            scheme: scheme.to_ascii_lowercase(),
            user,
            password,
            hosts,
            path: path.to_string(),
            query: query.to_string(),
        })
    }

    /// The scheme, lowercased (`memory`, `amqp`, `kafka`, …).
    pub fn scheme(&self) -> &str {
        &self.scheme
    }

    /// The user name, still percent-encoded, if any.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// Whether the URL carries a password.
    pub fn has_password(&self) -> bool {
        self.password.is_some()
    }

    /// The `host[:port]` entries, in order.
    pub fn hosts(&self) -> &[String] {
        &self.hosts
    }

    /// The path, including its leading `/` (empty when absent).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The decoded query parameters, in order.
    pub fn query_pairs(&self) -> Vec<(String, String)> {
        url::form_urlencoded::parse(self.query.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }

    /// The first value of query parameter `name`.
    pub fn query(&self, name: &str) -> Option<String> {
        self.query_pairs()
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }

    /// The original URL, secrets included. Only for handing to a broker client; never log it.
    pub fn expose(&self) -> &str {
        &self.raw
    }
}

/// Whether a query parameter's value should be hidden: names with `password`, `passphrase`,
/// `secret`, `token`, `credential`, `private`, `api_key`/`apikey`, `jaas`, or a key or
/// keystore given inline (`ssl.key.pem`, `ssl.keystore…`).
///
/// ```
/// use busbar_core::config::is_secret_name;
/// assert!(is_secret_name("sasl.password"));
/// assert!(is_secret_name("ssl.key.pem"));
/// assert!(!is_secret_name("access_key_id"));
/// ```
pub fn is_secret_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "password",
        "passphrase",
        "secret",
        "token",
        "credential",
        "private",
        "api_key",
        "apikey",
        "jaas",
        "key.pem",
        "keystore",
    ]
    .iter()
    .any(|word| name.contains(word))
}

fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if is_secret_name(name) => format!("{name}={REDACTED}"),
            _ => pair.to_string(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Redacts a URL that may not even parse: the userinfo's password and secret query values.
fn redact_raw(text: &str) -> String {
    let (main, query) = match text.split_once('?') {
        Some((m, q)) => (m, Some(q)),
        None => (text, None),
    };
    let main = match main.rfind('@') {
        Some(at) => {
            // The userinfo starts after the last '/' before the '@' (or at the start).
            let start = main[..at].rfind('/').map_or(0, |slash| slash + 1);
            match main[start..at].split_once(':') {
                Some((user, _)) => format!("{}{user}:{REDACTED}{}", &main[..start], &main[at..]),
                None => main.to_string(),
            }
        }
        None => main.to_string(),
    };
    match query {
        Some(q) => format!("{main}?{}", redact_query(q)),
        None => main,
    }
}

impl fmt::Display for TransportUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://", self.scheme)?;
        if let Some(user) = &self.user {
            f.write_str(user)?;
            if self.password.is_some() {
                write!(f, ":{REDACTED}")?;
            }
            f.write_str("@")?;
        }
        write!(f, "{}{}", self.hosts.join(","), self.path)?;
        if !self.query.is_empty() {
            write!(f, "?{}", redact_query(&self.query))?;
        }
        Ok(())
    }
}

impl fmt::Debug for TransportUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TransportUrl({self})")
    }
}

impl FromStr for TransportUrl {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        TransportUrl::parse(s)
    }
}

impl Serialize for TransportUrl {
    /// Serializes the original URL: config files must round-trip. Use `Display` for printing.
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.raw)
    }
}

impl<'de> Deserialize<'de> for TransportUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        TransportUrl::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl Default for TransportUrl {
    fn default() -> Self {
        TransportUrl {
            raw: "memory://".into(),
            scheme: "memory".into(),
            user: None,
            password: None,
            hosts: Vec::new(),
            path: String::new(),
            query: String::new(),
        }
    }
}

/// Everything needed to build a bus, as one serde struct (TOML, JSON, environment).
///
/// ```
/// use busbar_core::BusConfig;
/// let config: BusConfig = serde_json::from_str(r#"{
///     "url": "amqp://app:pw@rabbit/%2f",
///     "source": "/orders-service",
///     "retry": { "max_attempts": 3 }
/// }"#).unwrap();
/// assert_eq!(config.url.scheme(), "amqp");
/// assert_eq!(config.retry.max_attempts, 3);
/// assert!(!format!("{config:?}").contains("pw@"));
/// ```
///
/// Reading it is strict: an unknown key is an error that names it and the closest known key
/// (a misspelled `retyr` would otherwise run with the default retry policy), and so are
/// values that cannot work (`concurrency = 0`, `max_attempts = 0`, an empty `source`).
/// Durations are milliseconds or text with a unit:
///
/// ```
/// use std::time::Duration;
/// use busbar_core::BusConfig;
/// let config: BusConfig =
///     serde_json::from_str(r#"{ "retry": { "initial_backoff": "250ms", "max_backoff": "5s" } }"#)
///         .unwrap();
/// assert_eq!(config.retry.max_backoff, Duration::from_secs(5));
///
/// let typo = serde_json::from_str::<BusConfig>(r#"{ "retyr": { "max_attempts": 3 } }"#);
/// let error = typo.unwrap_err().to_string();
/// assert!(error.contains("unknown key `retyr` in the bus config; did you mean `retry`?"));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawBusConfig")]
pub struct BusConfig {
    /// Which broker, where, and its tuning (query parameters). Default `memory://`.
    pub url: TransportUrl,
    /// The CloudEvents `source` of events this service publishes.
    pub source: String,
    /// The retry policy subscriptions use unless they set their own.
    pub retry: RetryPolicy,
    /// Handlers running at once per subscription, unless set per subscription.
    pub concurrency: usize,
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            url: TransportUrl::default(),
            source: crate::bus::DEFAULT_SOURCE.to_string(),
            retry: RetryPolicy::default(),
            concurrency: crate::bus::DEFAULT_CONCURRENCY,
        }
    }
}

/// [`BusConfig`] as read, before it is checked.
#[derive(Deserialize)]
#[serde(default)]
struct RawBusConfig {
    url: TransportUrl,
    source: String,
    retry: RetryPolicy,
    concurrency: usize,
    #[serde(flatten)]
    unknown: BTreeMap<String, serde::de::IgnoredAny>,
}

impl Default for RawBusConfig {
    fn default() -> Self {
        let BusConfig {
            url,
            source,
            retry,
            concurrency,
        } = BusConfig::default();
        RawBusConfig {
            url,
            source,
            retry,
            concurrency,
            unknown: BTreeMap::new(),
        }
    }
}

impl TryFrom<RawBusConfig> for BusConfig {
    type Error = String;

    fn try_from(raw: RawBusConfig) -> std::result::Result<Self, String> {
        known_keys(
            "the bus config",
            &raw.unknown,
            &["url", "source", "retry", "concurrency"],
        )?;
        if raw.concurrency == 0 {
            return Err("`concurrency = 0` would run no handler; use 1 or more".into());
        }
        if raw.source.trim().is_empty() {
            return Err(
                "`source` is empty; CloudEvents needs one, e.g. \"/orders-service\"".into(),
            );
        }
        Ok(BusConfig {
            url: raw.url,
            source: raw.source,
            retry: raw.retry,
            concurrency: raw.concurrency,
        })
    }
}

/// Fails on the first of `unknown` (keys no field took), naming the closest of `known`.
pub(crate) fn known_keys(
    section: &str,
    unknown: &BTreeMap<String, serde::de::IgnoredAny>,
    known: &[&str],
) -> std::result::Result<(), String> {
    let Some(key) = unknown.keys().next() else {
        return Ok(());
    };
    let closest = known
        .iter()
        .map(|k| (strsim::damerau_levenshtein(key, k), *k))
        .filter(|(distance, k)| *distance <= k.len().div_ceil(3).max(1))
        .min();
    let hint = closest.map_or(String::new(), |(_, k)| format!("; did you mean `{k}`?"));
    Err(format!(
        "unknown key `{key}` in {section}{hint} (known keys: {})",
        known.join(", ")
    ))
}

/// Durations in configuration: a number of milliseconds, or text with a unit (`"250ms"`,
/// `"5s"`, `"1m 30s"`, parsed by `humantime`). Written back as milliseconds.
pub(crate) mod duration {
    use std::fmt;
    use std::time::Duration;

    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(Millis)
    }

    struct Millis;

    impl Visitor<'_> for Millis {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("milliseconds (250) or a duration with a unit (\"250ms\", \"5s\", \"2m\")")
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
            Ok(Duration::from_millis(v))
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
            u64::try_from(v)
                .map(Duration::from_millis)
                .map_err(|_| E::custom(format!("a duration cannot be negative ({v})")))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            let text = v.trim();
            if let Ok(millis) = text.parse::<u64>() {
                return Ok(Duration::from_millis(millis));
            }
            humantime::parse_duration(text).map_err(|e| {
                E::custom(format!(
                    "`{v}` is not a duration ({e}); write milliseconds (250) or a number with a \
                     unit (\"250ms\", \"5s\", \"2m\")"
                ))
            })
        }
    }
}

impl BusConfig {
    /// The default config with `url`.
    pub fn from_url(url: &str) -> Result<Self> {
        Ok(BusConfig {
            url: url.parse()?,
            ..BusConfig::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn kafka_bootstrap_lists_parse_into_hosts() {
        let url = TransportUrl::parse("kafka://h1:9092,h2:9093?acks=all").unwrap();
        assert_eq!(url.scheme(), "kafka");
        assert_eq!(url.hosts(), ["h1:9092", "h2:9093"]);
        assert_eq!(url.query("acks").as_deref(), Some("all"));
    }

    #[test]
    fn passwords_and_secret_parameters_never_print() {
        let text = "sqs://AKIA:wJalrXUtn@localhost:4566?region=eu-west-1&aws_secret_access_key=TOPSECRET&session_token=TKN";
        let url = TransportUrl::parse(text).unwrap();
        for shown in [
            url.to_string(),
            format!("{url:?}"),
            format!(
                "{:?}",
                BusConfig {
                    url: url.clone(),
                    ..BusConfig::default()
                }
            ),
        ] {
            for secret in ["wJalrXUtn", "TOPSECRET", "TKN"] {
                assert!(!shown.contains(secret), "{secret} leaked in {shown}");
            }
            assert!(shown.contains("region=eu-west-1"), "{shown}");
        }
        assert_eq!(url.expose(), text);
    }

    #[test]
    fn unparsable_url_error_does_not_leak_the_password() {
        let err = TransportUrl::parse("amqp//user:hunter2@host").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let err = TransportUrl::parse("amqp://user:hunter2@ho st/?password=x").unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    fn read(json: &str) -> std::result::Result<BusConfig, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn an_unknown_key_is_an_error_naming_it_and_the_closest_known_one() {
        let error = read(r#"{"retyr": {"max_attempts": 3}}"#).unwrap_err();
        assert!(
            error.contains("unknown key `retyr` in the bus config; did you mean `retry`?"),
            "{error}"
        );
        let error = read(r#"{"retry": {"max_atempts": 3}}"#).unwrap_err();
        assert!(
            error.contains(
                "unknown key `max_atempts` in the retry policy; did you mean `max_attempts`?"
            ),
            "{error}"
        );
        let error = read(r#"{"brokers": "amqp://h"}"#).unwrap_err();
        assert!(
            error.contains("unknown key `brokers` in the bus config (known keys: url, source, retry, concurrency)"),
            "nothing close: no guess, the known keys: {error}"
        );
    }

    #[test]
    fn values_that_cannot_work_are_refused() {
        for (json, says) in [
            (r#"{"concurrency": 0}"#, "`concurrency = 0`"),
            (r#"{"source": " "}"#, "`source` is empty"),
            (r#"{"retry": {"max_attempts": 0}}"#, "`max_attempts = 0`"),
            (r#"{"retry": {"multiplier": 0.5}}"#, "`multiplier = 0.5`"),
            (r#"{"retry": {"jitter": 1.5}}"#, "`jitter = 1.5`"),
            (
                r#"{"retry": {"initial_backoff": "1m", "max_backoff": "5s"}}"#,
                "longer than `max_backoff`",
            ),
            (
                r#"{"retry": {"initial_backoff": -5}}"#,
                "cannot be negative",
            ),
            (
                r#"{"retry": {"max_backoff": "5 parsecs"}}"#,
                "`5 parsecs` is not a duration",
            ),
        ] {
            let error = read(json).expect_err(json);
            assert!(error.contains(says), "{json}: {error}");
        }
    }

    #[test]
    fn durations_are_milliseconds_or_text_with_a_unit() {
        let config = read(
            r#"{"concurrency": 4, "retry": {"initial_backoff": 250, "max_backoff": "1m 30s"}}"#,
        )
        .unwrap();
        assert_eq!(config.concurrency, 4);
        assert_eq!(config.retry.initial_backoff, Duration::from_millis(250));
        assert_eq!(config.retry.max_backoff, Duration::from_secs(90));
        let config =
            read(r#"{"retry": {"initial_backoff": "100ms", "max_backoff": "2000"}}"#).unwrap();
        assert_eq!(config.retry.initial_backoff, Duration::from_millis(100));
        assert_eq!(config.retry.max_backoff, Duration::from_secs(2));
        // Written back as milliseconds, and read again the same.
        let written = serde_json::to_string(&config).unwrap();
        assert!(written.contains(r#""max_backoff":2000"#), "{written}");
        assert_eq!(read(&written).unwrap(), config);
        assert_eq!(read("{}").unwrap(), BusConfig::default());
    }

    #[test]
    fn memory_url_without_host_is_valid() {
        let url = TransportUrl::parse("memory://").unwrap();
        assert_eq!(url.scheme(), "memory");
        assert!(url.hosts().is_empty());
        assert_eq!(url.to_string(), "memory://");
    }
}
