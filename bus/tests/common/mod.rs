//! Shared helpers for the core's behaviour tests.
#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use busbar_core::Event;
use busbar_core::Text;
use serde::{Deserialize, Serialize};

/// A keyed test event with a sequence number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Numbered {
    pub key: String,
    pub seq: u64,
}

impl Event for Numbered {
    const TYPE: &'static str = "test.numbered.v1";
    fn key(&self) -> Option<Text> {
        (!self.key.is_empty()).then(|| self.key.as_str().into())
    }
}

pub fn numbered(key: &str, seq: u64) -> Numbered {
    Numbered {
        key: key.to_string(),
        seq,
    }
}

/// A random name, so tests never share topics or groups.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:016x}", fastrand::u64(..))
}

/// Waits until `condition` holds, checking every millisecond, failing after `within`.
/// Works with tokio's paused clock (time then advances by itself while the test waits).
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if condition().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
