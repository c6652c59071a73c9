//! The transactional outbox: an event is published if and only if the service's own
//! transaction commits.
//!
//! [`PostgresOutbox::publish`] writes the encoded message (exactly what
//! [`Transport::publish`](busbar_core::Transport::publish) takes: id, topic, key, headers,
//! payload) as a row in the caller's transaction. The [relay](crate::Relay) publishes committed
//! rows to the bus's transport and marks them sent; sent rows are deleted after a retention
//! window.
//!
//! **Order.** Rows are published in the order of their sequence number, and rows with the same
//! key get their numbers in commit order: writing a keyed row takes a transaction-scoped
//! advisory lock on the key, so a second transaction writing the same key waits until the first
//! commits or rolls back. One relay per table is active at a time (a session advisory lock;
//! the others wait to take over), so per-key order holds however many instances run a relay.
//! Two transactions that each write two keys in opposite orders can deadlock on those locks;
//! PostgreSQL then aborts one of them (SQLSTATE 40P01) and the caller retries it.
//!
//! **Duplicates.** A relay that dies after the broker confirmed a batch but before marking it
//! sent leaves the rows pending; the next relay publishes them again with the same ids, so
//! consumers with an idempotency store or inbox handle them once.

use std::sync::Arc;
use std::time::Duration;

use busbar_core::codec::Json;
use busbar_core::message::validate_name;
use busbar_core::{
    Bus, Envelope, Error, ErrorKind, Event, HeaderName, Headers, Message, Result, Text,
};
use bytes::Bytes;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Row};

use crate::relay::RelayBuilder;
use crate::{check_table, millis, sql, store_error};

/// The default outbox table.
pub const DEFAULT_OUTBOX_TABLE: &str = "busbar_outbox";

/// The statements of one outbox table, built once.
#[derive(Debug)]
pub(crate) struct OutboxStatements {
    pub(crate) table: String,
    schema: Vec<Arc<str>>,
    insert: Arc<str>,
    pub(crate) relay_lock: Arc<str>,
    pub(crate) fetch: Arc<str>,
    pub(crate) mark_sent: Arc<str>,
    pub(crate) delete_sent: Arc<str>,
    pub(crate) mark_failed: Arc<str>,
    pub(crate) purge: Arc<str>,
    stats: Arc<str>,
    failed: Arc<str>,
    retry_failed: Arc<str>,
    retry_all_failed: Arc<str>,
}

impl OutboxStatements {
    fn new(table: &str) -> Result<Self> {
        check_table(table, "configure outbox")?;
        let s = |sql: String| Arc::<str>::from(sql);
        let pending = "sent_at IS NULL AND failed_at IS NULL";
        Ok(OutboxStatements {
            table: table.to_string(),
            schema: vec![
                s(format!(
                    "CREATE TABLE IF NOT EXISTS {table} (\
                     seq bigserial PRIMARY KEY, \
                     id text NOT NULL, \
                     topic text NOT NULL, \
                     key text, \
                     headers json NOT NULL, \
                     payload bytea NOT NULL, \
                     created_at timestamptz NOT NULL DEFAULT now(), \
                     sent_at timestamptz, \
                     failed_at timestamptz, \
                     error text)"
                )),
                s(format!(
                    "CREATE INDEX IF NOT EXISTS {table}_pending ON {table} (seq) WHERE {pending}"
                )),
                s(format!(
                    "CREATE INDEX IF NOT EXISTS {table}_sent ON {table} (sent_at) WHERE sent_at IS NOT NULL"
                )),
                s(format!(
                    "CREATE INDEX IF NOT EXISTS {table}_failed ON {table} (seq) WHERE failed_at IS NOT NULL"
                )),
            ],
            // One statement: lock the batch's keys (sorted, so one batch never deadlocks
            // against itself), wake the relay at commit, then insert. The join with the lock
            // count makes every lock come before the first row takes its sequence number.
            insert: s(format!(
                "WITH locks AS (\
                   SELECT pg_advisory_xact_lock(hashtextextended($7 || k, 0)) \
                   FROM (SELECT DISTINCT k FROM unnest($3::text[]) AS k WHERE k IS NOT NULL ORDER BY k) AS keys), \
                 ready AS (SELECT count(*) AS n, pg_notify($6, '') IS NULL AS notified FROM locks) \
                 INSERT INTO {table} (id, topic, key, headers, payload) \
                 SELECT m.id, m.topic, m.key, m.headers::json, m.payload \
                 FROM ready, unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bytea[]) \
                   WITH ORDINALITY AS m(id, topic, key, headers, payload, n) \
                 ORDER BY m.n"
            )),
            relay_lock: s("SELECT pg_try_advisory_lock(hashtextextended($1, 0)) AS held".into()),
            fetch: s(format!(
                "SELECT seq, id, topic, key, headers::text AS headers, payload FROM {table} \
                 WHERE {pending} AND NOT (seq = ANY($2)) ORDER BY seq LIMIT $1"
            )),
            mark_sent: s(format!(
                "UPDATE {table} SET sent_at = now() WHERE seq = ANY($1)"
            )),
            delete_sent: s(format!("DELETE FROM {table} WHERE seq = ANY($1)")),
            mark_failed: s(format!(
                "UPDATE {table} SET failed_at = now(), error = $2 WHERE seq = $1"
            )),
            purge: s(format!(
                "DELETE FROM {table} WHERE seq IN (SELECT seq FROM {table} \
                 WHERE sent_at IS NOT NULL AND sent_at < now() - $1 * interval '1 millisecond' LIMIT $2)"
            )),
            stats: s(format!(
                "SELECT count(*) FILTER (WHERE {pending}) AS pending, \
                 count(*) FILTER (WHERE failed_at IS NOT NULL) AS failed, \
                 (EXTRACT(EPOCH FROM (now() - min(created_at) FILTER (WHERE {pending}))) * 1000)::bigint AS oldest_ms \
                 FROM {table} WHERE sent_at IS NULL"
            )),
            failed: s(format!(
                "SELECT seq, id, topic, key, headers::text AS headers, payload, failed_at::text AS failed_at, error \
                 FROM {table} WHERE failed_at IS NOT NULL ORDER BY seq LIMIT $1"
            )),
            retry_failed: s(format!(
                "WITH retried AS (UPDATE {table} SET failed_at = NULL, error = NULL \
                 WHERE failed_at IS NOT NULL AND id = ANY($1) RETURNING 1) \
                 SELECT count(*) AS n, pg_notify($2, '') IS NULL FROM retried"
            )),
            retry_all_failed: s(format!(
                "WITH retried AS (UPDATE {table} SET failed_at = NULL, error = NULL \
                 WHERE failed_at IS NOT NULL RETURNING 1) \
                 SELECT count(*) AS n, pg_notify($1, '') IS NULL FROM retried"
            )),
        })
    }

    /// The NOTIFY channel the writers signal and the relay listens on: the table's name.
    pub(crate) fn channel(&self) -> &str {
        &self.table
    }
}

/// A transactional outbox in a PostgreSQL table (default [`DEFAULT_OUTBOX_TABLE`]): events
/// written with [`publish`](Self::publish) in the caller's transaction reach the bus's
/// transport, through the [relay](Self::relay), if and only if the transaction commits.
///
/// Cheap to clone. The events get the bus's `source`; the relay publishes to the bus's
/// transport. See the [module docs](crate::outbox) for order and duplicates.
///
/// ```no_run
/// # async fn demo(bus: busbar_core::Bus, pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// # #[derive(serde::Serialize, serde::Deserialize)] struct OrderPlaced { id: i64 }
/// # impl busbar_core::Event for OrderPlaced { const TYPE: &'static str = "shop.order_placed.v1"; }
/// use std::time::Duration;
/// use busbar_postgres::PostgresOutbox;
///
/// let outbox = PostgresOutbox::new(&bus, pool.clone())?;
/// outbox.ensure_schema().await?;
/// let relay = outbox.relay().start().await?; // one per service instance; one is active
///
/// let mut tx = pool.begin().await?;
/// sqlx::query("INSERT INTO orders (id) VALUES ($1)").bind(7_i64).execute(&mut *tx).await?;
/// outbox.publish(&mut tx, "shop.orders", OrderPlaced { id: 7 }).await?;
/// tx.commit().await?; // now, and only now, the relay publishes the event
///
/// relay.shutdown(Duration::from_secs(10)).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PostgresOutbox {
    pub(crate) bus: Bus,
    pub(crate) pool: PgPool,
    pub(crate) statements: Arc<OutboxStatements>,
}

/// How many rows wait in an outbox; see [`PostgresOutbox::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxStats {
    /// Committed rows not yet published (and not failed).
    pub pending: u64,
    /// Rows whose publishing failed for good; see [`PostgresOutbox::failed`].
    pub failed: u64,
    /// How long the oldest pending row has waited, if any is pending.
    pub oldest_pending: Option<Duration>,
}

/// A row the relay could not publish because the broker refused it for good (e.g. too large
/// for the transport). It stays until [retried](PostgresOutbox::retry_failed).
#[derive(Debug, Clone)]
pub struct FailedMessage {
    /// The message as it was written.
    pub message: Message,
    /// When the relay gave up on it (as PostgreSQL prints a `timestamptz`).
    pub failed_at: String,
    /// The publish error.
    pub error: String,
}

impl PostgresOutbox {
    /// An outbox in the table [`DEFAULT_OUTBOX_TABLE`] of `pool`'s database, for `bus`.
    pub fn new(bus: &Bus, pool: PgPool) -> Result<Self> {
        PostgresOutbox::with_table(bus, pool, DEFAULT_OUTBOX_TABLE)
    }

    /// An outbox in `table` (a lowercase SQL identifier). The table's name is also the
    /// `LISTEN`/`NOTIFY` channel that wakes the relay.
    pub fn with_table(bus: &Bus, pool: PgPool, table: &str) -> Result<Self> {
        Ok(PostgresOutbox {
            bus: bus.clone(),
            pool,
            statements: Arc::new(OutboxStatements::new(table)?),
        })
    }

    /// The bus whose transport the relay publishes to.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.statements.table
    }

    /// The pool the relay and the queries of this outbox use.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Creates the table and its indexes if they do not exist. Idempotent, and safe when
    /// several instances start at once (see
    /// [`PostgresIdempotencyStore::ensure_schema`](crate::PostgresIdempotencyStore::ensure_schema)).
    pub async fn ensure_schema(&self) -> Result<()> {
        crate::ensure_schema(&self.pool, &self.statements.table, &self.statements.schema).await
    }

    /// Writes `event` to `topic` in the caller's transaction, as a new conversation; returns its
    /// id. Pass `&mut tx` of a `sqlx::Transaction`: the event is published once the transaction
    /// commits, and never if it rolls back.
    pub async fn publish<E: Event>(
        &self,
        tx: &mut PgConnection,
        topic: &str,
        event: E,
    ) -> Result<Text> {
        let envelope = self.bus.envelope(event);
        let id = envelope.id.clone();
        self.publish_messages(tx, vec![envelope.into_message(&Json, topic)?])
            .await?;
        Ok(id)
    }

    /// Writes a prepared envelope (its id, correlation and headers as they are) in the
    /// caller's transaction.
    pub async fn publish_envelope<E: Event>(
        &self,
        tx: &mut PgConnection,
        topic: &str,
        envelope: &Envelope<E>,
    ) -> Result<()> {
        self.publish_messages(tx, vec![envelope.to_message(&Json, topic)?])
            .await
    }

    /// Writes several events to `topic` in the caller's transaction, in order; returns their
    /// ids.
    pub async fn publish_batch<E: Event>(
        &self,
        tx: &mut PgConnection,
        topic: &str,
        events: impl IntoIterator<Item = E>,
    ) -> Result<Vec<Text>> {
        let messages = events
            .into_iter()
            .map(|event| self.bus.envelope(event).into_message(&Json, topic))
            .collect::<Result<Vec<_>>>()?;
        let ids = messages.iter().map(|message| message.id.clone()).collect();
        self.publish_messages(tx, messages).await?;
        Ok(ids)
    }

    /// Writes already-encoded messages in the caller's transaction, in order, in one
    /// statement. Each is checked first as the bus's transport would check it (topic name,
    /// headers, size), so a message that could never be published fails here, before your
    /// transaction commits.
    pub async fn publish_messages(
        &self,
        tx: &mut PgConnection,
        messages: Vec<Message>,
    ) -> Result<()> {
        if messages.is_empty() {
            return Ok(());
        }
        let capabilities = self.bus.capabilities();
        let max_bytes = capabilities.max_message_bytes.unwrap_or(usize::MAX);
        let transport = self.bus.transport().name();
        let mut ids = Vec::with_capacity(messages.len());
        let mut topics = Vec::with_capacity(messages.len());
        let mut keys = Vec::with_capacity(messages.len());
        let mut headers = Vec::with_capacity(messages.len());
        let mut payloads = Vec::with_capacity(messages.len());
        for message in &messages {
            validate_name("topic", &message.topic)?;
            message.check_publishable(max_bytes, transport)?;
            ids.push(message.id.as_str());
            topics.push(message.topic.as_str());
            keys.push(message.key.as_deref());
            headers.push(encode_headers(&message.headers)?);
            payloads.push(message.payload.as_ref());
        }
        sqlx::query(sql(&self.statements.insert))
            .bind(&ids)
            .bind(&topics)
            .bind(&keys)
            .bind(&headers)
            .bind(&payloads)
            .bind(self.statements.channel())
            .bind(format!("busbar-outbox-key:{}:", self.statements.table))
            .execute(&mut *tx)
            .await
            .map_err(|e| {
                store_error("write to the outbox", e)
                    .with_resource(format!("table {}", self.statements.table))
            })?;
        Ok(())
    }

    /// Starts building the relay that publishes this outbox's committed rows.
    pub fn relay(&self) -> RelayBuilder {
        RelayBuilder::new(self.clone())
    }

    /// Publishes every row pending now, in order, and returns how many were published: the
    /// relay's work done once, in the caller's task. For tests (write in a transaction,
    /// `flush`, then assert on a `TestBus`) and for tools. Fails with a [`ErrorKind::Store`]
    /// error when a relay is running on this table (it would publish them itself).
    pub async fn flush(&self) -> Result<u64> {
        crate::relay::flush(self).await
    }

    /// How many rows are pending and failed, and how long the oldest pending row has waited.
    pub async fn stats(&self) -> Result<OutboxStats> {
        let row = sqlx::query(sql(&self.statements.stats))
            .fetch_one(&self.pool)
            .await
            .map_err(|e| store_error("read outbox stats", e))?;
        let count = |name: &str| -> Result<u64> {
            row.try_get::<i64, _>(name)
                .map(|n| u64::try_from(n).unwrap_or(0))
                .map_err(|e| store_error("read outbox stats", e))
        };
        let oldest: Option<i64> = row
            .try_get("oldest_ms")
            .map_err(|e| store_error("read outbox stats", e))?;
        Ok(OutboxStats {
            pending: count("pending")?,
            failed: count("failed")?,
            oldest_pending: oldest.map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(0))),
        })
    }

    /// Up to `limit` rows that failed for good, oldest first.
    pub async fn failed(&self, limit: i64) -> Result<Vec<FailedMessage>> {
        let rows = sqlx::query(sql(&self.statements.failed))
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| store_error("list failed outbox rows", e))?;
        rows.iter()
            .map(|row| {
                let (_, message) = read_row(row)?;
                Ok(FailedMessage {
                    message,
                    failed_at: row
                        .try_get("failed_at")
                        .map_err(|e| store_error("list failed outbox rows", e))?,
                    error: row
                        .try_get::<Option<String>, _>("error")
                        .map_err(|e| store_error("list failed outbox rows", e))?
                        .unwrap_or_default(),
                })
            })
            .collect()
    }

    /// Puts failed rows back in line for the relay: those with the given message ids, or all
    /// of them when `ids` is `None`. They keep their place in the sequence, so the relay
    /// publishes them next. Returns how many were put back.
    pub async fn retry_failed(&self, ids: Option<&[String]>) -> Result<u64> {
        let query = match ids {
            Some(ids) => sqlx::query(sql(&self.statements.retry_failed)).bind(ids),
            None => sqlx::query(sql(&self.statements.retry_all_failed)),
        };
        let row = query
            .bind(self.statements.channel())
            .fetch_one(&self.pool)
            .await
            .map_err(|e| store_error("retry failed outbox rows", e))?;
        row.try_get::<i64, _>("n")
            .map(|n| u64::try_from(n).unwrap_or(0))
            .map_err(|e| store_error("retry failed outbox rows", e))
    }

    /// Deletes up to `limit` rows sent more than `retention` ago; returns how many. The relay
    /// does this by itself.
    pub async fn purge_sent(&self, retention: Duration, limit: i64) -> Result<u64> {
        sqlx::query(sql(&self.statements.purge))
            .bind(millis(retention))
            .bind(limit)
            .execute(&self.pool)
            .await
            .map(|r| r.rows_affected())
            .map_err(|e| store_error("purge sent outbox rows", e))
    }
}

/// Headers as a JSON object of strings (readable with `headers->>'ce_type'`).
fn encode_headers(headers: &Headers) -> Result<String> {
    let map: std::collections::BTreeMap<&str, &str> = headers
        .iter()
        .map(|(name, value)| (name.as_str(), value))
        .collect();
    serde_json::to_string(&map).map_err(|e| {
        Error::new(
            ErrorKind::Encode,
            "write to the outbox",
            "cannot encode the headers",
        )
        .with_source(e)
    })
}

/// A fetched row: its sequence number and the message it holds.
pub(crate) fn read_row(row: &PgRow) -> Result<(i64, Message)> {
    let read = |e| store_error("read an outbox row", e);
    let seq: i64 = row.try_get("seq").map_err(read)?;
    let headers: String = row.try_get("headers").map_err(read)?;
    let headers: std::collections::BTreeMap<String, String> = serde_json::from_str(&headers)
        .map_err(|e| {
            Error::new(
                ErrorKind::Decode,
                "read an outbox row",
                "its headers are not a JSON object of strings; was the row written by hand?",
            )
            .with_resource(format!("outbox row {seq}"))
            .with_source(e)
        })?;
    let payload: Vec<u8> = row.try_get("payload").map_err(read)?;
    Ok((
        seq,
        Message {
            id: Text::new(row.try_get("id").map_err(read)?),
            topic: Text::new(row.try_get("topic").map_err(read)?),
            key: row
                .try_get::<Option<&str>, _>("key")
                .map_err(read)?
                .map(Text::new),
            headers: headers
                .into_iter()
                .map(|(name, value)| (HeaderName::from(name), value))
                .collect(),
            payload: Bytes::from(payload),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_must_be_plain_identifiers() {
        assert!(OutboxStatements::new("busbar_outbox").is_ok());
        assert_eq!(
            OutboxStatements::new("bad name").unwrap_err().kind(),
            ErrorKind::Config
        );
    }

    #[test]
    fn headers_round_trip_through_json() {
        let mut message = Message::new("m-1", "t", "x");
        message.headers.insert("ce_type", "a.b");
        message.headers.insert("x-odd", "quote \" and \\ back");
        let json = encode_headers(&message.headers).unwrap();
        let back: std::collections::BTreeMap<String, String> = serde_json::from_str(&json).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back["x-odd"], "quote \" and \\ back");
    }
}
