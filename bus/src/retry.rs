//! The retry policy: how many attempts a message gets and how long to wait between them.

use std::time::Duration;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::{duration, known_keys};

/// How often and how patiently a failing handler is retried before the message is dead-lettered.
///
/// Attempt `n` (1-based) that fails is retried after
/// `min(initial_backoff × multiplierⁿ⁻¹, max_backoff)`, reduced by up to `jitter` (a fraction)
/// at random so that many failing consumers do not retry in lockstep. After `max_attempts`
/// failed attempts the message goes to the dead-letter queue; `max_attempts` is a hard cap.
///
/// ```
/// use std::time::Duration;
/// use busbar_core::RetryPolicy;
///
/// let policy = RetryPolicy::exponential(4)
///     .with_initial_backoff(Duration::from_millis(100))
///     .with_jitter(0.0);
/// assert_eq!(policy.backoff(1), Duration::from_millis(100));
/// assert_eq!(policy.backoff(3), Duration::from_millis(400));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawRetry")]
pub struct RetryPolicy {
    /// Attempts in total, the first included; at least 1.
    pub max_attempts: u32,
    /// The wait after the first failed attempt.
    #[serde(serialize_with = "duration::serialize")]
    pub initial_backoff: Duration,
    /// The longest wait between attempts.
    #[serde(serialize_with = "duration::serialize")]
    pub max_backoff: Duration,
    /// Growth factor of the wait per attempt.
    pub multiplier: f64,
    /// Fraction (0 to 1) of each wait that is randomly taken off.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// The default policy with `max_attempts` attempts (at least 1).
    pub fn exponential(max_attempts: u32) -> Self {
        RetryPolicy {
            max_attempts: max_attempts.max(1),
            ..RetryPolicy::default()
        }
    }

    /// One attempt: a failure dead-letters at once.
    pub fn no_retry() -> Self {
        RetryPolicy::exponential(1)
    }

    /// Sets the first wait.
    pub fn with_initial_backoff(mut self, wait: Duration) -> Self {
        self.initial_backoff = wait;
        self
    }

    /// Sets the longest wait.
    pub fn with_max_backoff(mut self, wait: Duration) -> Self {
        self.max_backoff = wait;
        self
    }

    /// Sets the growth factor (values below 1 are taken as 1).
    pub fn with_multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = multiplier;
        self
    }

    /// Sets the jitter fraction (clamped to 0..=1).
    pub fn with_jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// Whether a message that just failed its `attempt`-th attempt gets another one.
    pub fn should_retry(&self, attempt: u32) -> bool {
        attempt < self.max_attempts.max(1)
    }

    /// How long to wait after failed attempt `attempt` (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(64) as i32;
        let multiplier = if self.multiplier.is_finite() {
            self.multiplier.max(1.0)
        } else {
            1.0
        };
        let max = self.max_backoff.as_secs_f64();
        let base = (self.initial_backoff.as_secs_f64() * multiplier.powi(exponent)).min(max);
        let jitter = if self.jitter.is_finite() {
            self.jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let wait = base * (1.0 - jitter * fastrand::f64());
        Duration::try_from_secs_f64(wait.max(0.0)).unwrap_or(self.max_backoff)
    }
}

/// [`RetryPolicy`] as read from configuration, before it is checked: missing keys take the
/// default's values, durations are milliseconds or text with a unit.
#[derive(Deserialize)]
#[serde(default)]
struct RawRetry {
    max_attempts: u32,
    #[serde(deserialize_with = "duration::deserialize")]
    initial_backoff: Duration,
    #[serde(deserialize_with = "duration::deserialize")]
    max_backoff: Duration,
    multiplier: f64,
    jitter: f64,
    #[serde(flatten)]
    unknown: BTreeMap<String, serde::de::IgnoredAny>,
}

impl Default for RawRetry {
    fn default() -> Self {
        let RetryPolicy {
            max_attempts,
            initial_backoff,
            max_backoff,
            multiplier,
            jitter,
        } = RetryPolicy::default();
        RawRetry {
            max_attempts,
            initial_backoff,
            max_backoff,
            multiplier,
            jitter,
            unknown: BTreeMap::new(),
        }
    }
}

impl TryFrom<RawRetry> for RetryPolicy {
    type Error = String;

    fn try_from(raw: RawRetry) -> Result<Self, String> {
        known_keys(
            "the retry policy",
            &raw.unknown,
            &[
                "max_attempts",
                "initial_backoff",
                "max_backoff",
                "multiplier",
                "jitter",
            ],
        )?;
        if raw.max_attempts == 0 {
            return Err(
                "`max_attempts = 0` would never run a handler; use 1 for no retries".into(),
            );
        }
        if !(raw.multiplier.is_finite() && raw.multiplier >= 1.0) {
            return Err(format!(
                "`multiplier = {}`: the wait must not shrink; use 1 or more (2 doubles it)",
                raw.multiplier
            ));
        }
        if !(0.0..=1.0).contains(&raw.jitter) {
            return Err(format!(
                "`jitter = {}`: it is the fraction of each wait taken off at random, from 0 to 1",
                raw.jitter
            ));
        }
        if raw.initial_backoff > raw.max_backoff {
            return Err(format!(
                "`initial_backoff` ({:?}) is longer than `max_backoff` ({:?})",
                raw.initial_backoff, raw.max_backoff
            ));
        }
        Ok(RetryPolicy {
            max_attempts: raw.max_attempts,
            initial_backoff: raw.initial_backoff,
            max_backoff: raw.max_backoff,
            multiplier: raw.multiplier,
            jitter: raw.jitter,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_exponentially_and_is_capped() {
        let p = RetryPolicy::exponential(10)
            .with_initial_backoff(Duration::from_millis(100))
            .with_max_backoff(Duration::from_secs(1))
            .with_jitter(0.0);
        let waits: Vec<u128> = (1..=6).map(|a| p.backoff(a).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(p.backoff(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn jitter_only_shortens_the_wait_within_its_fraction() {
        let p = RetryPolicy::exponential(3)
            .with_initial_backoff(Duration::from_millis(1000))
            .with_jitter(0.5);
        for _ in 0..200 {
            let w = p.backoff(1).as_millis();
            assert!((500..=1000).contains(&w), "{w}");
        }
    }

    #[test]
    fn attempts_are_capped_and_at_least_one() {
        let p = RetryPolicy::exponential(3);
        assert!(p.should_retry(1) && p.should_retry(2));
        assert!(!p.should_retry(3));
        assert!(!RetryPolicy::exponential(0).should_retry(1));
        assert!(!RetryPolicy::no_retry().should_retry(1));
    }

    #[test]
    fn policy_reads_from_config_with_millisecond_durations() {
        let p: RetryPolicy =
            serde_json::from_str(r#"{"max_attempts": 7, "initial_backoff": 50}"#).unwrap();
        assert_eq!(p.max_attempts, 7);
        assert_eq!(p.initial_backoff, Duration::from_millis(50));
        assert_eq!(p.max_backoff, RetryPolicy::default().max_backoff);
    }
}
