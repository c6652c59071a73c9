//! busbar's idempotency store on Redis.
//!
//! Each key is one Redis string `<prefix><scope>:<key>` holding either `claimed:<token>` with a
//! TTL of the lease, or `done` with a TTL of the retention window. Claim, complete and release
//! are Lua scripts, so each runs atomically on the server; expiry is Redis's own TTL, so a
//! crashed holder's claim frees itself and done marks clean themselves up.
//!
//! ```no_run
//! # async fn demo(bus: busbar_core::Bus) -> busbar_core::Result<()> {
//! use std::sync::Arc;
//! let store = busbar_redis::RedisIdempotencyStore::connect("redis://127.0.0.1:6379").await?;
//! # #[derive(serde::Serialize, serde::Deserialize)] struct Paid;
//! # impl busbar_core::Event for Paid { const TYPE: &'static str = "paid.v1"; }
//! let _sub = bus
//!     .subscribe::<Paid>("payments", "ledger")
//!     .idempotent(Arc::new(store))
//!     .start(|_e, _ctx| async { Ok(()) })
//!     .await?;
//! # Ok(()) }
//! ```

// Library code never unwraps or panics on what a user or a broker can send; tests may.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

use std::time::Duration;

use async_trait::async_trait;
use busbar_core::idempotency::{Claim, IdempotencyStore, Lease};
use busbar_core::{Error, ErrorKind, Result};
use redis::aio::ConnectionManager;
use redis::Script;

const CLAIM: &str = r"
local current = redis.call('GET', KEYS[1])
if current == false then
  redis.call('SET', KEYS[1], 'claimed:' .. ARGV[1], 'PX', ARGV[2])
  return {'acquired', 0}
end
local left = redis.call('PTTL', KEYS[1])
if current == 'done' then
  return {'done', left}
end
return {'busy', left}
";

const COMPLETE: &str = r"
if redis.call('GET', KEYS[1]) == 'claimed:' .. ARGV[1] then
  redis.call('SET', KEYS[1], 'done', 'PX', ARGV[2])
  return 1
end
return 0
";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == 'claimed:' .. ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// An [`IdempotencyStore`] on Redis. Cheap to clone; clones share one reconnecting connection.
#[derive(Clone)]
pub struct RedisIdempotencyStore {
    connection: ConnectionManager,
    prefix: String,
    claim: Script,
    complete: Script,
    release: Script,
}

impl std::fmt::Debug for RedisIdempotencyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisIdempotencyStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn store_error(operation: &'static str, e: redis::RedisError) -> Error {
    let retryable =
        e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal();
    Error::new(ErrorKind::Store, operation, "the Redis request failed")
        .with_retryable(retryable)
        .with_source(e)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl RedisIdempotencyStore {
    /// Connects to `url` (`redis://host:port/db`), with keys prefixed `busbar:idem:`.
    pub async fn connect(url: &str) -> Result<Self> {
        let client = redis::Client::open(url).map_err(|e| {
            Error::new(
                ErrorKind::Config,
                "connect",
                format!("invalid Redis URL: {e}"),
            )
            .with_source(e)
        })?;
        let connection = client.get_connection_manager().await.map_err(|e| {
            Error::new(
                ErrorKind::Connection,
                "connect",
                format!("cannot connect to Redis: {e}"),
            )
            .with_source(e)
        })?;
        Ok(RedisIdempotencyStore::new(connection, "busbar:idem:"))
    }

    /// A store on an existing connection manager, with keys prefixed `prefix`.
    pub fn new(connection: ConnectionManager, prefix: &str) -> Self {
        RedisIdempotencyStore {
            connection,
            prefix: prefix.to_string(),
            claim: Script::new(CLAIM),
            complete: Script::new(COMPLETE),
            release: Script::new(RELEASE),
        }
    }

    fn key(&self, scope: &str, key: &str) -> String {
        // The scope (a group name) cannot contain ':', so scope and key never run together.
        format!("{}{scope}:{key}", self.prefix)
    }
}

#[async_trait]
impl IdempotencyStore for RedisIdempotencyStore {
    async fn claim(&self, scope: &str, key: &str, lease: Duration) -> Result<Claim> {
        let granted = Lease::generate();
        let mut connection = self.connection.clone();
        let (status, left): (String, i64) = self
            .claim
            .key(self.key(scope, key))
            .arg(&granted.token)
            .arg(millis(lease))
            .invoke_async(&mut connection)
            .await
            .map_err(|e| store_error("claim", e))?;
        let left = Duration::from_millis(u64::try_from(left).unwrap_or(0));
        match status.as_str() {
            "acquired" => Ok(Claim::Acquired(granted)),
            "done" => Ok(Claim::Done),
            _ => Ok(Claim::Busy { retry_after: left }),
        }
    }

    async fn complete(
        &self,
        scope: &str,
        key: &str,
        lease: &Lease,
        retention: Duration,
    ) -> Result<()> {
        let mut connection = self.connection.clone();
        let done: i64 = self
            .complete
            .key(self.key(scope, key))
            .arg(&lease.token)
            .arg(millis(retention))
            .invoke_async(&mut connection)
            .await
            .map_err(|e| store_error("complete claim", e))?;
        if done == 1 {
            Ok(())
        } else {
            Err(busbar_core::idempotency::lease_lost(scope, key))
        }
    }

    async fn release(&self, scope: &str, key: &str, lease: &Lease) -> Result<()> {
        let mut connection = self.connection.clone();
        let _: i64 = self
            .release
            .key(self.key(scope, key))
            .arg(&lease.token)
            .invoke_async(&mut connection)
            .await
            .map_err(|e| store_error("release claim", e))?;
        Ok(())
    }
}
