//! The transactional inbox: the handler's writes and the "done" mark commit in one
//! PostgreSQL transaction.
//!
//! For each message the inbox opens a transaction, inserts and locks the message's row (a
//! duplicate being handled concurrently waits on that lock), skips the message if it is marked
//! done, and otherwise hands the transaction to the handler. When the handler returns it, the
//! inbox marks the message done and commits; when the handler fails, the transaction is rolled
//! back, so neither its writes nor the mark remain, and the message is retried. A crashed
//! holder's transaction dies with its connection, releasing the lock: no lease is needed.
//!
//! With an outbox ([`PostgresInbox::with_outbox`]), the handler's context captures what it
//! publishes, and the inbox writes those messages to the outbox in the same transaction: the
//! handler's writes, its follow-up events and the done mark commit together or not at all.

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use busbar_core::{Context, Envelope, Event, Handler, HandlerError};
use futures::future::BoxFuture;
use sqlx::{PgPool, Postgres, Row, Transaction};

use crate::{millis, sql, store_error, PostgresOutbox, Statements};

/// Runs handlers inside a transaction together with their dedup record. Made by
/// [`crate::PostgresIdempotencyStore::inbox`].
///
/// ```no_run
/// # async fn demo(bus: busbar_core::Bus, store: busbar_postgres::PostgresIdempotencyStore) -> busbar_core::Result<()> {
/// # #[derive(serde::Serialize, serde::Deserialize)] struct Paid { order: String, cents: i64 }
/// # impl busbar_core::Event for Paid { const TYPE: &'static str = "paid.v1"; }
/// use std::time::Duration;
///
/// let inbox = store.inbox(Duration::from_secs(7 * 24 * 3600));
/// let _sub = bus
///     .subscribe::<Paid>("payments", "ledger")
///     .start(inbox.handler(|paid: busbar_core::Envelope<Paid>, _ctx, mut tx| async move {
///         sqlx::query("INSERT INTO ledger (order_id, cents) VALUES ($1, $2)")
///             .bind(&paid.payload.order)
///             .bind(paid.payload.cents)
///             .execute(&mut *tx)
///             .await?;
///         Ok(tx) // committed together with the message's done mark
///     }))
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PostgresInbox {
    pool: PgPool,
    statements: Arc<Statements>,
    retention: Duration,
    outbox: Option<PostgresOutbox>,
}

impl PostgresInbox {
    pub(crate) fn new(pool: PgPool, statements: Arc<Statements>, retention: Duration) -> Self {
        PostgresInbox {
            pool,
            statements,
            retention,
            outbox: None,
        }
    }

    /// The consumer outbox: events the handler publishes through its [`Context`] are written
    /// to `outbox` in the handler's transaction instead of going to the broker at once, so they
    /// are published (by the outbox's relay) if and only if the handling commits. A handler
    /// that fails publishes nothing, however often it is retried. The outbox's table must be
    /// in the inbox's database. Publishing through `ctx.bus()` still goes straight to the
    /// broker.
    ///
    /// ```no_run
    /// # async fn demo(bus: busbar_core::Bus, store: busbar_postgres::PostgresIdempotencyStore) -> busbar_core::Result<()> {
    /// # #[derive(serde::Serialize, serde::Deserialize)] struct Paid { order: String }
    /// # impl busbar_core::Event for Paid { const TYPE: &'static str = "paid.v1"; }
    /// # #[derive(serde::Serialize, serde::Deserialize)] struct Booked { order: String }
    /// # impl busbar_core::Event for Booked { const TYPE: &'static str = "booked.v1"; }
    /// use std::time::Duration;
    /// use busbar_postgres::PostgresOutbox;
    ///
    /// let outbox = PostgresOutbox::new(&bus, store.pool().clone())?;
    /// let inbox = store.inbox(Duration::from_secs(7 * 24 * 3600)).with_outbox(&outbox);
    /// let _relay = outbox.relay().start().await?;
    /// let _sub = bus
    ///     .subscribe::<Paid>("payments", "ledger")
    ///     .start(inbox.handler(|paid: busbar_core::Envelope<Paid>, ctx, mut tx| async move {
    ///         sqlx::query("INSERT INTO ledger (order_id) VALUES ($1)")
    ///             .bind(&paid.payload.order)
    ///             .execute(&mut *tx)
    ///             .await?;
    ///         // Written to the outbox in `tx`: sent only if this handling commits.
    ///         ctx.publish("bookings", Booked { order: paid.payload.order }).await?;
    ///         Ok(tx)
    ///     }))
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn with_outbox(mut self, outbox: &PostgresOutbox) -> Self {
        self.outbox = Some(outbox.clone());
        self
    }

    /// Wraps `handler`, which gets the transaction and returns it to have it committed.
    pub fn handler<E, F, Fut>(&self, handler: F) -> InboxHandler<E, F>
    where
        E: Event,
        F: Fn(Envelope<E>, Context, Transaction<'static, Postgres>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Transaction<'static, Postgres>, HandlerError>> + Send + 'static,
    {
        InboxHandler {
            inbox: self.clone(),
            handler: Arc::new(handler),
            _event: PhantomData,
        }
    }
}

/// A handler run inside the inbox's transaction; see [`PostgresInbox::handler`].
pub struct InboxHandler<E, F> {
    inbox: PostgresInbox,
    handler: Arc<F>,
    _event: PhantomData<fn() -> E>,
}

impl<E, F, Fut> Handler<E> for InboxHandler<E, F>
where
    E: Event,
    F: Fn(Envelope<E>, Context, Transaction<'static, Postgres>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Transaction<'static, Postgres>, HandlerError>> + Send + 'static,
{
    fn handle(
        &self,
        envelope: Envelope<E>,
        context: Context,
    ) -> BoxFuture<'static, Result<(), HandlerError>> {
        let inbox = self.inbox.clone();
        let handler = Arc::clone(&self.handler);
        Box::pin(async move {
            let statements = &inbox.statements;
            let (scope, key) = (context.group().to_string(), envelope.id.clone());
            let mut tx =
                inbox.pool.begin().await.map_err(|e| {
                    HandlerError::transient(store_error("begin inbox transaction", e))
                })?;
            sqlx::query(sql(&statements.inbox_insert))
                .bind(&scope)
                .bind(key.as_str())
                .execute(&mut *tx)
                .await
                .map_err(|e| HandlerError::transient(store_error("inbox", e)))?;
            let handled: bool = sqlx::query(sql(&statements.inbox_lock))
                .bind(&scope)
                .bind(key.as_str())
                .fetch_one(&mut *tx)
                .await
                .and_then(|row| row.try_get("handled"))
                .map_err(|e| HandlerError::transient(store_error("inbox", e)))?;
            if handled {
                tracing::debug!(message_id = %key, group = %scope, "inbox: already handled; skipping duplicate");
                let _ = tx.rollback().await;
                return Ok(());
            }
            let (context, captured) = match &inbox.outbox {
                Some(_) => {
                    let (context, captured) = context.capturing();
                    (context, Some(captured))
                }
                None => (context, None),
            };
            let mut tx = handler(envelope, context, tx).await?;
            if let (Some(outbox), Some(captured)) = (&inbox.outbox, captured) {
                // Taking closes the capture: a publish through a context kept past the
                // handler fails instead of being lost.
                let messages = captured.take().map_err(HandlerError::transient)?;
                outbox
                    .publish_messages(&mut tx, messages)
                    .await
                    .map_err(|e| {
                        // A message that can never be published: retrying cannot help.
                        if crate::relay::about_the_message(&e) {
                            HandlerError::permanent(e)
                        } else {
                            HandlerError::transient(e)
                        }
                    })?;
            }
            sqlx::query(sql(&statements.mark_done))
                .bind(&scope)
                .bind(key.as_str())
                .bind(millis(inbox.retention))
                .execute(&mut *tx)
                .await
                .map_err(|e| HandlerError::transient(store_error("inbox", e)))?;
            tx.commit()
                .await
                .map_err(|e| HandlerError::transient(store_error("commit inbox transaction", e)))
        })
    }
}
