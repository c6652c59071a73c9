//! The saga store on PostgreSQL: instances, the events applied to them and their timeouts in
//! three tables, and the messages of each change in the outbox, all in one transaction.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use busbar_core::saga::{
    timeout_message, Committed, DueTimeout, Fired, Loaded, SagaCommit, SagaFilter, SagaRecord,
    SagaStore,
};
use busbar_core::{Bus, Error, ErrorKind, Result};
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Postgres, Row, Transaction};

use crate::{check_table, millis, sql, store_error, PostgresOutbox};

/// The default table of saga instances (`…_applied` and `…_timeouts` are beside it).
pub const DEFAULT_SAGA_TABLE: &str = "busbar_saga";

#[derive(Debug)]
struct SagaStatements {
    table: String,
    schema: Vec<Arc<str>>,
    load: Arc<str>,
    by_correlation: Arc<str>,
    applied: Arc<str>,
    insert: Arc<str>,
    update: Arc<str>,
    cancel: Arc<str>,
    schedule: Arc<str>,
    due: Arc<str>,
    next_due: Arc<str>,
    list: Arc<str>,
    purge: Arc<str>,
}

impl SagaStatements {
    fn new(table: &str) -> Result<Self> {
        check_table(table, "configure saga store")?;
        if table.len() > 63 - "_timeouts".len() {
            return Err(Error::new(
                ErrorKind::Config,
                "configure saga store",
                format!("table name {table:?} leaves no room for its `_timeouts` table; at most 54 bytes"),
            ));
        }
        let s = |sql: String| Arc::<str>::from(sql);
        let record = "record::text AS record";
        Ok(SagaStatements {
            table: table.to_string(),
            schema: vec![
                s(format!(
                    "CREATE TABLE IF NOT EXISTS {table} (\
                     saga text NOT NULL, instance_id text NOT NULL, correlation_id text NOT NULL, \
                     state text NOT NULL, status text NOT NULL, version bigint NOT NULL, \
                     record jsonb NOT NULL, \
                     created_at timestamptz NOT NULL DEFAULT now(), \
                     updated_at timestamptz NOT NULL DEFAULT now(), \
                     PRIMARY KEY (saga, instance_id))"
                )),
                s(format!(
                    "CREATE INDEX IF NOT EXISTS {table}_correlation ON {table} (saga, correlation_id)"
                )),
                s(format!(
                    "CREATE INDEX IF NOT EXISTS {table}_status ON {table} (saga, status, updated_at)"
                )),
                s(format!(
                    "CREATE TABLE IF NOT EXISTS {table}_applied (\
                     saga text NOT NULL, instance_id text NOT NULL, event_id text NOT NULL, \
                     PRIMARY KEY (saga, instance_id, event_id))"
                )),
                s(format!(
                    "CREATE TABLE IF NOT EXISTS {table}_timeouts (\
                     id text PRIMARY KEY, saga text NOT NULL, instance_id text NOT NULL, \
                     correlation_id text NOT NULL, name text NOT NULL, due_at timestamptz NOT NULL)"
                )),
                s(format!(
                    "CREATE INDEX IF NOT EXISTS {table}_timeouts_due ON {table}_timeouts (saga, due_at)"
                )),
            ],
            load: s(format!(
                "SELECT {record}, EXISTS (SELECT 1 FROM {table}_applied a \
                   WHERE a.saga = $1 AND a.instance_id = $2 AND a.event_id = $3) AS applied \
                 FROM {table} WHERE saga = $1 AND instance_id = $2"
            )),
            by_correlation: s(format!(
                "SELECT {record} FROM {table} WHERE saga = $1 AND correlation_id = $2 \
                 ORDER BY created_at LIMIT 1"
            )),
            applied: s(format!(
                "INSERT INTO {table}_applied (saga, instance_id, event_id) VALUES ($1, $2, $3) \
                 ON CONFLICT DO NOTHING"
            )),
            insert: s(format!(
                "INSERT INTO {table} (saga, instance_id, correlation_id, state, status, version, record) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb) ON CONFLICT DO NOTHING"
            )),
            // A concurrent change holds the row until it commits; the version test is then
            // made again on the committed row, so exactly one of two racing changes wins.
            update: s(format!(
                "UPDATE {table} SET state = $4, status = $5, version = $6, record = $7::jsonb, \
                 updated_at = now() \
                 WHERE saga = $1 AND instance_id = $2 AND version = $3"
            )),
            cancel: s(format!("DELETE FROM {table}_timeouts WHERE id = ANY($1)")),
            schedule: s(format!(
                "INSERT INTO {table}_timeouts (id, saga, instance_id, correlation_id, name, due_at) \
                 SELECT t.id, $1, $2, $3, t.name, now() + t.after_ms * interval '1 millisecond' \
                 FROM unnest($4::text[], $5::text[], $6::bigint[]) AS t(id, name, after_ms)"
            )),
            // Several pollers: each takes the due rows the others have not locked.
            due: s(format!(
                "DELETE FROM {table}_timeouts WHERE id IN (\
                   SELECT id FROM {table}_timeouts WHERE saga = $1 AND due_at <= now() \
                   ORDER BY due_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
                 RETURNING id, instance_id, correlation_id, name"
            )),
            next_due: s(format!(
                "SELECT GREATEST(0, EXTRACT(EPOCH FROM (min(due_at) - now())) * 1000)::bigint AS ms \
                 FROM {table}_timeouts WHERE saga = $1"
            )),
            list: s(format!(
                "SELECT {record} FROM {table} WHERE saga = $1 \
                 AND ($2::text IS NULL OR status = $2) AND ($3::text IS NULL OR state = $3) \
                 AND ($4::bigint IS NULL OR updated_at <= now() - $4 * interval '1 millisecond') \
                 ORDER BY updated_at LIMIT $5"
            )),
            purge: s(format!(
                "WITH gone AS (DELETE FROM {table} WHERE ctid IN (\
                   SELECT ctid FROM {table} WHERE saga = $1 \
                   AND status IN ('completed', 'compensated') \
                   AND updated_at <= now() - $2 * interval '1 millisecond' LIMIT $3) \
                   RETURNING saga, instance_id), \
                 applied AS (DELETE FROM {table}_applied a USING gone \
                   WHERE a.saga = gone.saga AND a.instance_id = gone.instance_id) \
                 SELECT count(*) AS n FROM gone"
            )),
        })
    }
}

/// A [`SagaStore`] in PostgreSQL (tables `busbar_saga`, `busbar_saga_applied`,
/// `busbar_saga_timeouts` by default), writing each change's messages to a
/// [`PostgresOutbox`] in the same transaction.
///
/// A change commits as one transaction: the applied event's id (a second application of the
/// same event finds it and is skipped), the instance row if its version is still the one the
/// transition started from (otherwise nothing is written and the transition runs again), the
/// timeouts, and the messages in the outbox. The outbox's [relay](crate::Relay) publishes the
/// messages; **run one** (in this service or another one on the same database), or nothing the
/// saga sends leaves the database. Due timeouts are taken with `FOR UPDATE SKIP LOCKED` and
/// written to the outbox in the same transaction, so each fires once however many instances
/// poll.
///
/// ```no_run
/// # async fn demo(bus: busbar_core::Bus, pool: sqlx::PgPool) -> busbar_core::Result<()> {
/// use std::sync::Arc;
/// use busbar_postgres::{PostgresOutbox, PostgresSagaStore};
///
/// let outbox = PostgresOutbox::new(&bus, pool)?;
/// outbox.ensure_schema().await?;
/// let store = PostgresSagaStore::new(&outbox)?;
/// store.ensure_schema().await?;
/// let _relay = outbox.relay().start().await?;
/// // saga.start(&bus, Arc::new(store)).await?
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PostgresSagaStore {
    outbox: PostgresOutbox,
    statements: Arc<SagaStatements>,
}

impl PostgresSagaStore {
    /// A store in the tables [`DEFAULT_SAGA_TABLE`]… of the outbox's database.
    pub fn new(outbox: &PostgresOutbox) -> Result<Self> {
        PostgresSagaStore::with_table(outbox, DEFAULT_SAGA_TABLE)
    }

    /// A store in `table` (a lowercase SQL identifier of at most 54 bytes), `{table}_applied`
    /// and `{table}_timeouts`.
    pub fn with_table(outbox: &PostgresOutbox, table: &str) -> Result<Self> {
        Ok(PostgresSagaStore {
            outbox: outbox.clone(),
            statements: Arc::new(SagaStatements::new(table)?),
        })
    }

    /// The instances table's name.
    pub fn table(&self) -> &str {
        &self.statements.table
    }

    fn pool(&self) -> &PgPool {
        self.outbox.pool()
    }

    /// Creates the tables and indexes if they do not exist (idempotent, safe to race).
    pub async fn ensure_schema(&self) -> Result<()> {
        crate::ensure_schema(self.pool(), &self.statements.table, &self.statements.schema).await
    }

    /// Deletes up to `limit` instances of `saga` that completed or were compensated at least
    /// `retention` ago, with their applied-event records; returns how many. Failed and running
    /// instances are kept. An event delivered again after its instance was purged is not
    /// recognised as applied: keep finished instances longer than redeliveries can come.
    pub async fn purge_finished(&self, saga: &str, retention: Duration, limit: i64) -> Result<u64> {
        let row = sqlx::query(sql(&self.statements.purge))
            .bind(saga)
            .bind(millis(retention))
            .bind(limit)
            .fetch_one(self.pool())
            .await
            .map_err(|e| self.error("purge finished sagas", e))?;
        Ok(u64::try_from(row.try_get::<i64, _>("n").unwrap_or(0)).unwrap_or(0))
    }

    fn error(&self, operation: &'static str, e: sqlx::Error) -> Error {
        store_error(operation, e).with_resource(format!("table {}", self.statements.table))
    }

    async fn begin(&self, operation: &'static str) -> Result<Transaction<'static, Postgres>> {
        self.pool()
            .begin()
            .await
            .map_err(|e| self.error(operation, e))
    }
}

fn record(row: &PgRow) -> Result<SagaRecord> {
    let text: String = row
        .try_get("record")
        .map_err(|e| store_error("read saga instance", e))?;
    serde_json::from_str(&text).map_err(|e| {
        Error::new(
            ErrorKind::Store,
            "read saga instance",
            "the stored instance is not a saga record (written by another version?)",
        )
        .with_source(e)
    })
}

#[async_trait]
impl SagaStore for PostgresSagaStore {
    async fn load(&self, saga: &str, instance_id: &str, event_id: &str) -> Result<Loaded> {
        let row = sqlx::query(sql(&self.statements.load))
            .bind(saga)
            .bind(instance_id)
            .bind(event_id)
            .fetch_optional(self.pool())
            .await
            .map_err(|e| self.error("load saga instance", e))?;
        Ok(match row {
            Some(row) => Loaded {
                applied: row
                    .try_get("applied")
                    .map_err(|e| self.error("load saga instance", e))?,
                record: Some(record(&row)?),
            },
            None => Loaded {
                record: None,
                applied: false,
            },
        })
    }

    async fn find_by_correlation(
        &self,
        saga: &str,
        correlation_id: &str,
    ) -> Result<Option<SagaRecord>> {
        sqlx::query(sql(&self.statements.by_correlation))
            .bind(saga)
            .bind(correlation_id)
            .fetch_optional(self.pool())
            .await
            .map_err(|e| self.error("find saga instance", e))?
            .as_ref()
            .map(record)
            .transpose()
    }

    async fn commit(&self, _bus: &Bus, commit: SagaCommit) -> Result<Committed> {
        const OP: &str = "commit saga change";
        let r = &commit.record;
        let body = serde_json::to_string(r).map_err(|e| {
            Error::new(ErrorKind::Encode, OP, "the saga record does not encode").with_source(e)
        })?;
        let version = i64::try_from(r.version).unwrap_or(i64::MAX);
        let mut tx = self.begin(OP).await?;
        let fresh = sqlx::query(sql(&self.statements.applied))
            .bind(&r.saga)
            .bind(&r.instance_id)
            .bind(&commit.event_id)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.error(OP, e))?;
        if fresh.rows_affected() == 0 {
            let _ = tx.rollback().await;
            return Ok(Committed::Duplicate);
        }
        let written = match commit.expected_version {
            None => sqlx::query(sql(&self.statements.insert))
                .bind(&r.saga)
                .bind(&r.instance_id)
                .bind(&r.correlation_id)
                .bind(&r.state)
                .bind(r.status.as_str())
                .bind(version)
                .bind(&body),
            Some(expected) => sqlx::query(sql(&self.statements.update))
                .bind(&r.saga)
                .bind(&r.instance_id)
                .bind(i64::try_from(expected).unwrap_or(i64::MAX))
                .bind(&r.state)
                .bind(r.status.as_str())
                .bind(version)
                .bind(&body),
        }
        .execute(&mut *tx)
        .await
        .map_err(|e| self.error(OP, e))?;
        if written.rows_affected() == 0 {
            let _ = tx.rollback().await;
            return Ok(Committed::Conflict);
        }
        if !commit.cancel.is_empty() {
            sqlx::query(sql(&self.statements.cancel))
                .bind(&commit.cancel)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.error(OP, e))?;
        }
        if !commit.schedule.is_empty() {
            let ids: Vec<&str> = commit.schedule.iter().map(|t| t.id.as_str()).collect();
            let names: Vec<&str> = commit.schedule.iter().map(|t| t.name.as_str()).collect();
            let after: Vec<i64> = commit.schedule.iter().map(|t| millis(t.after)).collect();
            sqlx::query(sql(&self.statements.schedule))
                .bind(&r.saga)
                .bind(&r.instance_id)
                .bind(&r.correlation_id)
                .bind(&ids)
                .bind(&names)
                .bind(&after)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.error(OP, e))?;
        }
        self.outbox
            .publish_messages(&mut tx, commit.messages)
            .await?;
        tx.commit().await.map_err(|e| self.error(OP, e))?;
        Ok(Committed::Done)
    }

    async fn fire_due_timeouts(
        &self,
        _bus: &Bus,
        saga: &str,
        topic: &str,
        limit: usize,
    ) -> Result<Fired> {
        const OP: &str = "fire saga timeouts";
        let mut tx = self.begin(OP).await?;
        let rows = sqlx::query(sql(&self.statements.due))
            .bind(saga)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| self.error(OP, e))?;
        let mut messages = Vec::with_capacity(rows.len());
        for row in &rows {
            let get = |column: &str| -> Result<String> {
                row.try_get(column).map_err(|e| self.error(OP, e))
            };
            let due = DueTimeout {
                id: get("id")?,
                saga: saga.to_string(),
                instance_id: get("instance_id")?,
                correlation_id: get("correlation_id")?,
                name: get("name")?,
            };
            messages.push(timeout_message(self.outbox.bus(), topic, &due)?);
        }
        let fired = messages.len();
        self.outbox.publish_messages(&mut tx, messages).await?;
        let next: Option<i64> = sqlx::query(sql(&self.statements.next_due))
            .bind(saga)
            .fetch_one(&mut *tx)
            .await
            .and_then(|row| row.try_get("ms"))
            .map_err(|e| self.error(OP, e))?;
        tx.commit().await.map_err(|e| self.error(OP, e))?;
        Ok(Fired {
            fired,
            next_due: next.map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(0))),
        })
    }

    async fn list(&self, saga: &str, filter: &SagaFilter) -> Result<Vec<SagaRecord>> {
        sqlx::query(sql(&self.statements.list))
            .bind(saga)
            .bind(filter.status.map(|s| s.as_str()))
            .bind(filter.state.as_deref())
            .bind(filter.idle_for.map(millis))
            .bind(i64::try_from(filter.effective_limit()).unwrap_or(i64::MAX))
            .fetch_all(self.pool())
            .await
            .map_err(|e| self.error("list saga instances", e))?
            .iter()
            .map(record)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_leave_room_for_the_timeouts_table() {
        assert!(SagaStatements::new("busbar_saga").is_ok());
        let error = SagaStatements::new(&"s".repeat(60)).unwrap_err();
        assert!(error.to_string().contains("no room"), "{error}");
        assert_eq!(
            SagaStatements::new("Saga").unwrap_err().kind(),
            ErrorKind::Config
        );
    }
}
