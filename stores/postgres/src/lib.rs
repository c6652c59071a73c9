//! busbar on PostgreSQL: the idempotency store, the transactional inbox, and the transactional
//! outbox with its relay.
//!
//! [`PostgresIdempotencyStore`] implements busbar's [`IdempotencyStore`] so several service
//! instances consuming one group share their dedup records: a claim is one atomic
//! `INSERT … ON CONFLICT DO UPDATE … WHERE expired` statement (a lease with an expiry), done
//! marks are kept for a retention window, releases delete the claim.
//!
//! [`PostgresInbox`] goes further when the handler's effect is itself in PostgreSQL: the handler
//! receives a transaction, and its writes and the "done" mark commit together or not at all.
//!
//! [`PostgresOutbox`] makes the publishing side atomic: an event written in the service's
//! transaction is published by the [`Relay`] if and only if that transaction commits; with
//! [`PostgresInbox::with_outbox`], a handler's follow-up events commit with its handling.
//!
//! ```no_run
//! # async fn demo(bus: busbar_core::Bus) -> busbar_core::Result<()> {
//! use std::sync::Arc;
//! use busbar_postgres::PostgresIdempotencyStore;
//!
//! let store = PostgresIdempotencyStore::connect("postgres://app@db/orders").await?;
//! store.ensure_schema().await?;
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

mod inbox;
pub mod outbox;
mod relay;
mod saga;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use busbar_core::idempotency::{Claim, IdempotencyStore, Lease};
use busbar_core::{Error, ErrorKind, Result};
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, PgPool, Row};

pub use inbox::{InboxHandler, PostgresInbox};
pub use outbox::{FailedMessage, OutboxStats, PostgresOutbox, DEFAULT_OUTBOX_TABLE};
pub use relay::{Relay, RelayBuilder, RelayStats, DEFAULT_BATCH_SIZE, DEFAULT_RETENTION};
pub use saga::{PostgresSagaStore, DEFAULT_SAGA_TABLE};
pub use sqlx;

/// The statements of one table, built once.
#[derive(Debug)]
pub(crate) struct Statements {
    pub(crate) table: String,
    schema: Vec<Arc<str>>,
    claim: Arc<str>,
    status: Arc<str>,
    complete: Arc<str>,
    release: Arc<str>,
    purge: Arc<str>,
    pub(crate) inbox_insert: Arc<str>,
    pub(crate) inbox_lock: Arc<str>,
    pub(crate) mark_done: Arc<str>,
}

impl Statements {
    fn new(table: &str) -> Result<Self> {
        check_table(table, "configure idempotency store")?;
        let s = |sql: String| Arc::<str>::from(sql);
        Ok(Statements {
            table: table.to_string(),
            schema: vec![
                s(format!(
                    "CREATE TABLE IF NOT EXISTS {table} (\
                     scope text NOT NULL, \
                     key text NOT NULL, \
                     done boolean NOT NULL DEFAULT false, \
                     token text, \
                     expires_at timestamptz NOT NULL, \
                     PRIMARY KEY (scope, key))"
                )),
                s(format!("CREATE INDEX IF NOT EXISTS {table}_expires_at ON {table} (expires_at)")),
            ],
            // One statement: take the key if it is free or its record (claim or done mark)
            // has expired. A row comes back only when this call got the claim.
            claim: s(format!(
                "INSERT INTO {table} AS t (scope, key, done, token, expires_at) \
                 VALUES ($1, $2, false, $3, now() + $4 * interval '1 millisecond') \
                 ON CONFLICT (scope, key) DO UPDATE \
                 SET done = false, token = EXCLUDED.token, expires_at = EXCLUDED.expires_at \
                 WHERE t.expires_at <= now() \
                 RETURNING token"
            )),
            status: s(format!(
                "SELECT done, GREATEST(0, EXTRACT(EPOCH FROM (expires_at - now())) * 1000)::bigint AS left_ms \
                 FROM {table} WHERE scope = $1 AND key = $2"
            )),
            complete: s(format!(
                "UPDATE {table} SET done = true, token = NULL, expires_at = now() + $4 * interval '1 millisecond' \
                 WHERE scope = $1 AND key = $2 AND NOT done AND token = $3"
            )),
            release: s(format!(
                "DELETE FROM {table} WHERE scope = $1 AND key = $2 AND NOT done AND token = $3"
            )),
            purge: s(format!(
                "DELETE FROM {table} WHERE ctid IN (SELECT ctid FROM {table} WHERE expires_at <= now() LIMIT $1)"
            )),
            // The inbox: make sure a row exists (this waits for a concurrent transaction that
            // inserted the same key), then lock it until commit or rollback.
            inbox_insert: s(format!(
                "INSERT INTO {table} (scope, key, done, expires_at) VALUES ($1, $2, false, now()) \
                 ON CONFLICT (scope, key) DO NOTHING"
            )),
            inbox_lock: s(format!(
                "SELECT (done AND expires_at > now()) AS handled FROM {table} \
                 WHERE scope = $1 AND key = $2 FOR UPDATE"
            )),
            mark_done: s(format!(
                "UPDATE {table} SET done = true, token = NULL, expires_at = now() + $3 * interval '1 millisecond' \
                 WHERE scope = $1 AND key = $2"
            )),
        })
    }
}

/// Refuses a table name that is not a plain lowercase SQL identifier (it is put into SQL text).
pub(crate) fn check_table(table: &str, operation: &'static str) -> Result<()> {
    let valid = !table.is_empty()
        && table.len() <= 63
        && table.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && table
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::Config,
            operation,
            format!("table name {table:?} must be a lowercase SQL identifier (a-z, 0-9, _), at most 63 bytes"),
        ))
    }
}

/// Runs `statements` under a transaction-scoped advisory lock named after `table`:
/// `CREATE … IF NOT EXISTS` alone races in PostgreSQL when several instances start at once.
pub(crate) async fn ensure_schema(
    pool: &PgPool,
    table: &str,
    statements: &[Arc<str>],
) -> Result<()> {
    let mut tx = pool
        .begin()
        .await
        .map_err(|e| store_error("ensure schema", e))?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(format!("busbar-schema:{table}"))
        .execute(&mut *tx)
        .await
        .map_err(|e| store_error("ensure schema", e))?;
    for statement in statements {
        sqlx::query(sql(statement))
            .execute(&mut *tx)
            .await
            .map_err(|e| store_error("ensure schema", e))?;
    }
    tx.commit()
        .await
        .map_err(|e| store_error("ensure schema", e))
}

pub(crate) fn sql(text: &Arc<str>) -> AssertSqlSafe<Arc<str>> {
    AssertSqlSafe(Arc::clone(text))
}

pub(crate) fn store_error(operation: &'static str, e: sqlx::Error) -> Error {
    let retryable = matches!(
        e,
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed
    );
    Error::new(ErrorKind::Store, operation, "the PostgreSQL request failed")
        .with_retryable(retryable)
        .with_source(e)
}

pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// An [`IdempotencyStore`] in a PostgreSQL table (default `busbar_idempotency`).
///
/// Records expire: a claim after its lease (a crashed holder does not block the key), a done
/// mark after its retention. Expired rows are reclaimed in place by the next claim of the same
/// key and removed in bulk by [`purge_expired`](Self::purge_expired).
#[derive(Debug, Clone)]
pub struct PostgresIdempotencyStore {
    pool: PgPool,
    statements: Arc<Statements>,
}

impl PostgresIdempotencyStore {
    /// Connects a pool (5 connections) to `url` and uses the table `busbar_idempotency`.
    /// A server that cannot be reached fails the connect after 10 s, as does waiting that long
    /// for a free connection later.
    pub async fn connect(url: &str) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(5)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect(url)
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::Connection,
                    "connect",
                    format!("cannot connect to PostgreSQL: {e}"),
                )
                .with_source(e)
            })?;
        PostgresIdempotencyStore::new(pool, "busbar_idempotency")
    }

    /// A store on an existing pool, in `table`.
    pub fn new(pool: PgPool, table: &str) -> Result<Self> {
        Ok(PostgresIdempotencyStore {
            pool,
            statements: Arc::new(Statements::new(table)?),
        })
    }

    /// Creates the table and its index if they do not exist. Idempotent, and safe when several
    /// instances start at once: `CREATE … IF NOT EXISTS` alone races in PostgreSQL, so the
    /// statements run under a transaction-scoped advisory lock named after the table.
    pub async fn ensure_schema(&self) -> Result<()> {
        ensure_schema(&self.pool, &self.statements.table, &self.statements.schema).await
    }

    /// Deletes up to `limit` expired records; returns how many. Run it now and then (expired
    /// records are harmless, only space).
    pub async fn purge_expired(&self, limit: i64) -> Result<u64> {
        sqlx::query(sql(&self.statements.purge))
            .bind(limit)
            .execute(&self.pool)
            .await
            .map(|r| r.rows_affected())
            .map_err(|e| store_error("purge", e))
    }

    /// The pool, for the handler's own queries.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A transactional inbox on this store's pool and table.
    pub fn inbox(&self, retention: Duration) -> PostgresInbox {
        PostgresInbox::new(self.pool.clone(), Arc::clone(&self.statements), retention)
    }
}

#[async_trait]
impl IdempotencyStore for PostgresIdempotencyStore {
    async fn claim(&self, scope: &str, key: &str, lease: Duration) -> Result<Claim> {
        let granted = Lease::generate();
        let row = sqlx::query(sql(&self.statements.claim))
            .bind(scope)
            .bind(key)
            .bind(&granted.token)
            .bind(millis(lease))
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| store_error("claim", e))?;
        if row.is_some() {
            return Ok(Claim::Acquired(granted));
        }
        // Someone holds it or it is done; which one is only informative, so a race with an
        // expiry between the two statements at worst says Busy with a short wait.
        let status = sqlx::query(sql(&self.statements.status))
            .bind(scope)
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| store_error("claim", e))?;
        Ok(match status {
            Some(row) if row.try_get::<bool, _>("done").unwrap_or(false) => Claim::Done,
            Some(row) => Claim::Busy {
                retry_after: Duration::from_millis(
                    u64::try_from(row.try_get::<i64, _>("left_ms").unwrap_or(0)).unwrap_or(0),
                ),
            },
            None => Claim::Busy {
                retry_after: Duration::from_millis(1),
            },
        })
    }

    async fn complete(
        &self,
        scope: &str,
        key: &str,
        lease: &Lease,
        retention: Duration,
    ) -> Result<()> {
        let done = sqlx::query(sql(&self.statements.complete))
            .bind(scope)
            .bind(key)
            .bind(&lease.token)
            .bind(millis(retention))
            .execute(&self.pool)
            .await
            .map_err(|e| store_error("complete claim", e))?;
        if done.rows_affected() == 1 {
            Ok(())
        } else {
            Err(busbar_core::idempotency::lease_lost(scope, key))
        }
    }

    async fn release(&self, scope: &str, key: &str, lease: &Lease) -> Result<()> {
        sqlx::query(sql(&self.statements.release))
            .bind(scope)
            .bind(key)
            .bind(&lease.token)
            .execute(&self.pool)
            .await
            .map(drop)
            .map_err(|e| store_error("release claim", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_must_be_plain_identifiers() {
        assert!(Statements::new("busbar_idempotency").is_ok());
        for bad in [
            "",
            "Upper",
            "1abc",
            "a;drop table x",
            "a b",
            &"x".repeat(64),
        ] {
            assert_eq!(
                Statements::new(bad).unwrap_err().kind(),
                ErrorKind::Config,
                "{bad}"
            );
        }
    }
}
