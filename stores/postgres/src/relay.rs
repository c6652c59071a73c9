//! The outbox relay: publishes committed outbox rows to the bus's transport, in order.
//!
//! One relay per table is active at a time: it holds a session advisory lock on a connection
//! of its own, and fetches, publishes and marks through that connection. The others try to
//! take the lock every `takeover_interval`; when the active relay stops, or its process dies
//! and PostgreSQL closes its connection, one of them takes over where it left off.
//!
//! The active relay wakes on the `NOTIFY` every outbox write sends at commit, and polls every
//! `poll_interval` in case a notification was missed (it never spins). It publishes a batch,
//! waits for the broker's confirmation, then marks the batch sent.
//!
//! What happens when publishing fails:
//! - the broker is down or busy (or anything else not about the message itself): the batch
//!   stays pending and the relay retries it after a backoff with jitter (up to 30 s), for as
//!   long as it takes; nothing is dropped;
//! - the broker refuses a message for a reason about the message (too large, an invalid
//!   header), or refuses it for good while accepting the rows around it: that row is marked
//!   failed with the error ([`PostgresOutbox::failed`], [`PostgresOutbox::retry_failed`]) and
//!   the rows after it go on, including later rows of the same key.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use busbar_core::{Error, ErrorKind, Message, Result, RetryPolicy};
use sqlx::postgres::{PgConnection, PgListener};
use sqlx::{Connection, Row};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::outbox::{read_row, PostgresOutbox};
use crate::{millis, sql, store_error};

/// Rows published per batch when none is configured.
pub const DEFAULT_BATCH_SIZE: usize = 500;
/// How long sent rows are kept when no retention is configured.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(3600);

const PURGE_EVERY: Duration = Duration::from_secs(10);
const PURGE_LIMIT: i64 = 10_000;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds a [`Relay`]; made by [`PostgresOutbox::relay`].
#[derive(Debug)]
pub struct RelayBuilder {
    outbox: PostgresOutbox,
    settings: Settings,
}

#[derive(Debug, Clone)]
struct Settings {
    batch_size: usize,
    poll_interval: Duration,
    takeover_interval: Duration,
    retention: Duration,
    backoff: RetryPolicy,
    listen: bool,
}

impl RelayBuilder {
    pub(crate) fn new(outbox: PostgresOutbox) -> Self {
        RelayBuilder {
            outbox,
            settings: Settings {
                batch_size: DEFAULT_BATCH_SIZE,
                poll_interval: Duration::from_secs(1),
                takeover_interval: Duration::from_secs(1),
                retention: DEFAULT_RETENTION,
                backoff: RetryPolicy::exponential(u32::MAX)
                    .with_initial_backoff(Duration::from_millis(100))
                    .with_max_backoff(Duration::from_secs(30))
                    .with_jitter(0.5),
                listen: true,
            },
        }
    }

    /// Rows published per batch (default [`DEFAULT_BATCH_SIZE`], at least 1).
    pub fn batch_size(mut self, rows: usize) -> Self {
        self.settings.batch_size = rows.max(1);
        self
    }

    /// How often the active relay looks for rows when no notification woke it (default 1 s).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.settings.poll_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Whether the active relay wakes on the `NOTIFY` each outbox write sends at commit
    /// (default on). Turn it off where `LISTEN` cannot work, e.g. behind PgBouncer in
    /// transaction mode: the relay then finds new rows by polling only, up to one
    /// `poll_interval` late.
    pub fn listen(mut self, listen: bool) -> Self {
        self.settings.listen = listen;
        self
    }

    /// How often a standby relay tries to become the active one (default 1 s).
    pub fn takeover_interval(mut self, interval: Duration) -> Self {
        self.settings.takeover_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// How long sent rows are kept before the relay deletes them (default
    /// [`DEFAULT_RETENTION`]); zero deletes each batch as soon as the broker confirmed it.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.settings.retention = retention;
        self
    }

    /// The backoff between retries of a batch the broker did not take (default: 100 ms
    /// doubling to 30 s, with 50 % jitter). Its attempt limit is ignored: the relay never
    /// gives a batch up.
    pub fn backoff(mut self, backoff: RetryPolicy) -> Self {
        self.settings.backoff = backoff;
        self
    }

    /// Connects (so a wrong database fails here, not in the background), then runs the relay
    /// in a task of its own until [`Relay::shutdown`].
    pub async fn start(self) -> Result<Relay> {
        let connection = connect(&self.outbox).await?;
        let (stop, stopped) = watch::channel(false);
        let counters = Arc::new(Counters::default());
        let task = tokio::spawn(run(
            self.outbox.clone(),
            self.settings,
            Arc::clone(&counters),
            stopped,
            connection,
        ));
        Ok(Relay {
            table: self.outbox.statements.table.clone(),
            stop,
            task: Some(task),
            counters,
        })
    }
}

#[derive(Debug, Default)]
struct Counters {
    active: AtomicBool,
    published: AtomicU64,
    failed: AtomicU64,
    batches: AtomicU64,
    retries: AtomicU64,
}

/// What a relay did so far; see [`Relay::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayStats {
    /// Whether this relay is the table's active one (the others wait to take over).
    pub active: bool,
    /// Rows published and marked sent.
    pub published: u64,
    /// Rows marked failed (see [`PostgresOutbox::failed`]).
    pub failed: u64,
    /// Batches published.
    pub batches: u64,
    /// Batches the broker did not take and that were retried after a backoff.
    pub retries: u64,
}

/// A running outbox relay; made by [`RelayBuilder::start`]. Dropping it stops it after the
/// batch in hand, like [`shutdown`](Self::shutdown) without waiting.
#[derive(Debug)]
pub struct Relay {
    table: String,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
}

impl Relay {
    /// What this relay did so far.
    pub fn stats(&self) -> RelayStats {
        let c = &self.counters;
        RelayStats {
            active: c.active.load(Ordering::Relaxed),
            published: c.published.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
        }
    }

    /// Stops the relay: it finishes the batch in hand (publish and mark), gives up its place
    /// as the active relay, and returns what it did in all. When that takes longer than `deadline` the task is
    /// aborted and this returns a [`ErrorKind::Timeout`] error; rows it had published but not
    /// marked are published again, with the same ids, by the next relay.
    pub async fn shutdown(mut self, deadline: Duration) -> Result<RelayStats> {
        let _ = self.stop.send(true);
        let Some(mut task) = self.task.take() else {
            return Ok(self.stats());
        };
        match tokio::time::timeout(deadline, &mut task).await {
            Ok(_) => Ok(self.stats()),
            Err(_) => {
                task.abort();
                Err(Error::new(
                    ErrorKind::Timeout,
                    "shut the outbox relay down",
                    format!(
                        "the batch in hand did not finish within {deadline:?}; rows published \
                         but not marked sent will be published again (same ids) by the next relay"
                    ),
                )
                .with_resource(format!("table {}", self.table)))
            }
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// A connection of the relay's own: the advisory lock lives as long as it does.
///
/// Its commits do not wait for the WAL flush (`synchronous_commit = off`): all it writes are
/// sent marks, and a mark lost in a PostgreSQL crash only makes the next relay publish those
/// rows again with the same ids, the duplicate the outbox already allows for. Waiting for the
/// flush made every batch pay a disk sync.
async fn connect(outbox: &PostgresOutbox) -> Result<PgConnection> {
    let options = outbox.pool.connect_options();
    let connect = async {
        let mut connection = PgConnection::connect_with(&options).await?;
        sqlx::query("SET synchronous_commit = off")
            .execute(&mut connection)
            .await?;
        Ok::<_, sqlx::Error>(connection)
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(e)) => Err(store_error("connect the outbox relay", e)
            .with_resource(format!("table {}", outbox.statements.table))),
        Err(_) => Err(Error::new(
            ErrorKind::Timeout,
            "connect the outbox relay",
            format!("PostgreSQL did not answer within {CONNECT_TIMEOUT:?}"),
        )
        .with_retryable(true)
        .with_resource(format!("table {}", outbox.statements.table))),
    }
}

/// Tries to become the table's active relay on `connection`.
async fn try_lead(outbox: &PostgresOutbox, connection: &mut PgConnection) -> Result<bool> {
    sqlx::query(sql(&outbox.statements.relay_lock))
        .bind(format!("busbar-outbox-relay:{}", outbox.statements.table))
        .fetch_one(&mut *connection)
        .await
        .and_then(|row| row.try_get::<bool, _>("held"))
        .map_err(|e| store_error("take the outbox relay lock", e))
}

/// Waits `wait`, or less when the relay is stopped; says whether it was.
async fn pause(stop: &mut watch::Receiver<bool>, wait: Duration) -> bool {
    if *stop.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(wait) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

async fn run(
    outbox: PostgresOutbox,
    settings: Settings,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
    first: PgConnection,
) {
    let table = outbox.statements.table.clone();
    let mut connection = Some(first);
    let mut failures = 0_u32;
    while !*stop.borrow() {
        let mut conn = match connection.take() {
            Some(conn) => conn,
            None => match connect(&outbox).await {
                Ok(conn) => conn,
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(table = %table, error = %e, "outbox relay: cannot connect; retrying");
                    pause(&mut stop, settings.backoff.backoff(failures)).await;
                    continue;
                }
            },
        };
        match try_lead(&outbox, &mut conn).await {
            Ok(true) => {}
            Ok(false) => {
                connection = Some(conn);
                pause(&mut stop, settings.takeover_interval).await;
                continue;
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::warn!(table = %table, error = %e, "outbox relay: lost its connection; reconnecting");
                pause(&mut stop, settings.backoff.backoff(failures)).await;
                continue;
            }
        }
        failures = 0;
        tracing::info!(table = %table, "outbox relay: active");
        counters.active.store(true, Ordering::Relaxed);
        let outcome = lead(&outbox, &settings, &counters, &mut conn, &mut stop).await;
        counters.active.store(false, Ordering::Relaxed);
        match outcome {
            Ok(()) => {
                // Closing the connection gives the lock up at once.
                let _ = conn.close().await;
                break;
            }
            Err(e) => {
                // Dropping the connection gives the lock up; another relay may take over.
                failures = failures.saturating_add(1);
                tracing::warn!(table = %table, error = %e, "outbox relay: stepped down after a database error; retrying");
                drop(conn);
                pause(&mut stop, settings.backoff.backoff(failures)).await;
            }
        }
    }
    if let Some(conn) = connection {
        let _ = conn.close().await;
    }
    tracing::info!(table = %table, "outbox relay: stopped");
}

/// Works as the active relay until stopped (`Ok`) or the database fails (`Err`).
async fn lead(
    outbox: &PostgresOutbox,
    settings: &Settings,
    counters: &Counters,
    conn: &mut PgConnection,
    stop: &mut watch::Receiver<bool>,
) -> Result<()> {
    let mut listener = if settings.listen {
        let mut listener = PgListener::connect_with(&outbox.pool)
            .await
            .map_err(|e| store_error("listen for outbox writes", e))?;
        listener
            .listen(outbox.statements.channel())
            .await
            .map_err(|e| store_error("listen for outbox writes", e))?;
        Some(listener)
    } else {
        None
    };
    let mut last_purge: Option<Instant> = None;
    let mut failures = 0_u32;
    let mut pipeline = Pipeline::default();
    loop {
        if *stop.borrow() {
            pipeline.settle(outbox, settings, counters, conn).await?;
            return Ok(());
        }
        if last_purge.is_none_or(|at| at.elapsed() >= PURGE_EVERY) {
            purge(outbox, settings, conn).await?;
            last_purge = Some(Instant::now());
        }
        match pipeline.step(outbox, settings, counters, conn).await? {
            Batch::Sent(0) => {
                // Nothing pending: wait for a commit's notification, the poll, or the stop.
                tokio::select! {
                    received = notified(listener.as_mut()) => {
                        received.map_err(|e| store_error("listen for outbox writes", e))?;
                    }
                    _ = tokio::time::sleep(settings.poll_interval) => {}
                    _ = stop.changed() => return Ok(()),
                }
            }
            Batch::Sent(_) => failures = 0,
            Batch::Retry(e) => {
                failures = failures.saturating_add(1);
                counters.retries.fetch_add(1, Ordering::Relaxed);
                let wait = settings.backoff.backoff(failures);
                tracing::warn!(table = %outbox.statements.table, error = %e, attempt = failures, ?wait,
                    "outbox relay: the broker did not take a batch; it stays pending and is retried");
                if pause(stop, wait).await {
                    return Ok(());
                }
            }
            Batch::Closed(e) => {
                tracing::error!(table = %outbox.statements.table, error = %e,
                    "outbox relay: the bus is closed; stopping (pending rows stay for the next relay)");
                return Ok(());
            }
        }
    }
}

/// The next notification (`Ok(None)` after a reconnect that may have lost some); never
/// without a listener.
async fn notified(
    listener: Option<&mut PgListener>,
) -> std::result::Result<Option<sqlx::postgres::PgNotification>, sqlx::Error> {
    match listener {
        Some(listener) => listener.try_recv().await,
        None => std::future::pending().await,
    }
}

async fn purge(
    outbox: &PostgresOutbox,
    settings: &Settings,
    conn: &mut PgConnection,
) -> Result<()> {
    let purged = sqlx::query(sql(&outbox.statements.purge))
        .bind(millis(settings.retention))
        .bind(PURGE_LIMIT)
        .execute(&mut *conn)
        .await
        .map_err(|e| store_error("purge sent outbox rows", e))?
        .rows_affected();
    if purged > 0 {
        tracing::debug!(table = %outbox.statements.table, purged, "outbox relay: deleted sent rows past retention");
    }
    Ok(())
}

/// What one batch came to.
enum Batch {
    /// This many rows were published and marked (failed rows included); 0 = nothing pending.
    Sent(usize),
    /// The broker did not take the batch; try again after a backoff.
    Retry(Error),
    /// The bus is closed.
    Closed(Error),
}

/// Whether an error is about the message itself, so retrying it can never succeed.
pub(crate) fn about_the_message(error: &Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::PayloadTooLarge | ErrorKind::InvalidHeader | ErrorKind::Encode
    )
}

/// The next pending rows in sequence order, leaving out `in_flight` (published, not yet
/// marked).
async fn fetch(
    outbox: &PostgresOutbox,
    settings: &Settings,
    conn: &mut PgConnection,
    in_flight: &[i64],
) -> Result<(Vec<i64>, Vec<Message>)> {
    let rows = sqlx::query(sql(&outbox.statements.fetch))
        .bind(i64::try_from(settings.batch_size).unwrap_or(i64::MAX))
        .bind(in_flight)
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| store_error("read the outbox", e))?;
    let mut seqs = Vec::with_capacity(rows.len());
    let mut messages = Vec::with_capacity(rows.len());
    for row in &rows {
        let (seq, message) = read_row(row)?;
        seqs.push(seq);
        messages.push(message);
    }
    Ok((seqs, messages))
}

/// Batches in a pipeline: while the broker takes one batch, the connection marks the batch
/// before it (already confirmed) and fetches the next, so the database's time hides behind
/// the broker's. A batch is marked only after the broker confirmed it.
#[derive(Default)]
struct Pipeline {
    /// Confirmed by the broker, not yet marked sent.
    unmarked: Vec<i64>,
    /// Fetched while the previous batch was being published.
    next: Option<(Vec<i64>, Vec<Message>)>,
}

impl Pipeline {
    /// Publishes the next batch. Database errors are `Err`.
    async fn step(
        &mut self,
        outbox: &PostgresOutbox,
        settings: &Settings,
        counters: &Counters,
        conn: &mut PgConnection,
    ) -> Result<Batch> {
        let (seqs, messages) = match self.next.take() {
            Some(batch) => batch,
            None => fetch(outbox, settings, conn, &[]).await?,
        };
        if seqs.is_empty() {
            self.settle(outbox, settings, counters, conn).await?;
            return Ok(Batch::Sent(0));
        }
        let unmarked = std::mem::take(&mut self.unmarked);
        let (published, prefetched) = tokio::join!(outbox.bus.publish_messages(messages), async {
            mark_sent(outbox, settings, conn, &unmarked).await?;
            fetch(outbox, settings, conn, &seqs).await
        });
        let prefetched = prefetched?;
        counters
            .published
            .fetch_add(unmarked.len() as u64, Ordering::Relaxed);
        let error = match published {
            Ok(()) => {
                counters.batches.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(table = %outbox.statements.table, rows = seqs.len(), "outbox relay: published a batch");
                let n = seqs.len();
                self.unmarked = seqs;
                self.next = Some(prefetched);
                return Ok(Batch::Sent(n));
            }
            Err(e) => e,
        };
        if error.kind() == ErrorKind::Closed {
            return Ok(Batch::Closed(error));
        }
        if error.is_retryable() && !about_the_message(&error) {
            return Ok(Batch::Retry(error));
        }
        // Refused for good: find out which rows, one at a time (the batch was moved into
        // the transport; fetching again is cheaper than copying every batch for this rare
        // case).
        isolate(outbox, settings, counters, conn).await
    }

    /// Marks what the broker confirmed.
    async fn settle(
        &mut self,
        outbox: &PostgresOutbox,
        settings: &Settings,
        counters: &Counters,
        conn: &mut PgConnection,
    ) -> Result<()> {
        let unmarked = std::mem::take(&mut self.unmarked);
        mark_sent(outbox, settings, conn, &unmarked).await?;
        counters
            .published
            .fetch_add(unmarked.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// Publishes the pending rows one by one, marking the refused ones failed (see the module
/// docs for when), and the others sent.
async fn isolate(
    outbox: &PostgresOutbox,
    settings: &Settings,
    counters: &Counters,
    conn: &mut PgConnection,
) -> Result<Batch> {
    let (seqs, messages) = fetch(outbox, settings, conn, &[]).await?;
    let mut sent = Vec::new();
    let mut failed: Vec<(i64, Error)> = Vec::new();
    let mut undecided: Vec<(i64, Error)> = Vec::new();
    let mut stopped: Option<Batch> = None;
    for (seq, message) in seqs.into_iter().zip(messages) {
        match outbox.bus.publish_messages(vec![message]).await {
            Ok(()) => sent.push(seq),
            Err(e) if about_the_message(&e) => failed.push((seq, e)),
            Err(e) if e.kind() == ErrorKind::Closed => {
                stopped = Some(Batch::Closed(e));
                break;
            }
            Err(e) if e.is_retryable() => {
                stopped = Some(Batch::Retry(e));
                break;
            }
            Err(e) => undecided.push((seq, e)),
        }
    }
    // Refused for good while the broker took the others: about the message after all.
    if !sent.is_empty() {
        failed.append(&mut undecided);
    }
    mark_sent(outbox, settings, conn, &sent).await?;
    for (seq, error) in &failed {
        tracing::error!(table = %outbox.statements.table, seq, error = %error,
            "outbox relay: the broker refused a row for good; marked failed (retry it with retry_failed)");
        sqlx::query(sql(&outbox.statements.mark_failed))
            .bind(seq)
            .bind(error.to_string())
            .execute(&mut *conn)
            .await
            .map_err(|e| store_error("mark an outbox row failed", e))?;
    }
    counters
        .published
        .fetch_add(sent.len() as u64, Ordering::Relaxed);
    counters
        .failed
        .fetch_add(failed.len() as u64, Ordering::Relaxed);
    if let Some(outcome) = stopped {
        return Ok(outcome);
    }
    if let Some((_, error)) = undecided.into_iter().next() {
        return Ok(Batch::Retry(error));
    }
    Ok(Batch::Sent(sent.len() + failed.len()))
}

async fn mark_sent(
    outbox: &PostgresOutbox,
    settings: &Settings,
    conn: &mut PgConnection,
    seqs: &[i64],
) -> Result<()> {
    if seqs.is_empty() {
        return Ok(());
    }
    let statement = if settings.retention.is_zero() {
        &outbox.statements.delete_sent
    } else {
        &outbox.statements.mark_sent
    };
    sqlx::query(sql(statement))
        .bind(seqs)
        .execute(&mut *conn)
        .await
        .map(drop)
        .map_err(|e| store_error("mark outbox rows sent", e))
}

/// [`PostgresOutbox::flush`]: the relay's work once, as the active relay.
pub(crate) async fn flush(outbox: &PostgresOutbox) -> Result<u64> {
    let settings = RelayBuilder::new(outbox.clone()).settings;
    let mut conn = connect(outbox).await?;
    if !try_lead(outbox, &mut conn).await? {
        return Err(Error::new(
            ErrorKind::Store,
            "flush the outbox",
            "a relay is running on this table (it holds the relay lock) and publishes the pending rows itself",
        )
        .with_resource(format!("table {}", outbox.statements.table)));
    }
    let counters = Counters::default();
    let mut pipeline = Pipeline::default();
    let outcome = loop {
        match pipeline.step(outbox, &settings, &counters, &mut conn).await {
            Ok(Batch::Sent(0)) => break Ok(counters.published.load(Ordering::Relaxed)),
            Ok(Batch::Sent(_)) => {}
            Ok(Batch::Retry(e) | Batch::Closed(e)) | Err(e) => break Err(e),
        }
    };
    let _ = conn.close().await;
    outcome
}
