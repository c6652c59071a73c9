//! Handlers and their errors.

use std::fmt;
use std::future::Future;

/// The boxed future a [`Handler`] returns (re-exported from `futures`, so a handler struct
/// needs no dependency of its own to name it).
pub use futures::future::BoxFuture;

use crate::consumer::Context;
use crate::envelope::Envelope;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a handler failed, and whether retrying can help.
///
/// `?` turns any error into a *transient* failure (retried by the policy). Mark failures that
/// will never succeed as [`permanent`](HandlerError::permanent): they go to the dead-letter queue
/// after one attempt.
///
/// ```
/// use busbar_core::HandlerError;
/// let retry_me: HandlerError = std::io::Error::other("timeout").into();
/// assert!(!retry_me.is_permanent());
/// let give_up = HandlerError::permanent("card declined");
/// assert!(give_up.is_permanent());
/// assert_eq!(give_up.to_string(), "card declined");
/// ```
pub struct HandlerError {
    permanent: bool,
    error: BoxError,
}

impl HandlerError {
    /// A failure that may succeed on a later attempt.
    pub fn transient(error: impl Into<BoxError>) -> Self {
        HandlerError {
            permanent: false,
            error: error.into(),
        }
    }

    /// A failure that will never succeed: dead-letter at once.
    pub fn permanent(error: impl Into<BoxError>) -> Self {
        HandlerError {
            permanent: true,
            error: error.into(),
        }
    }

    /// Whether this failure is permanent.
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }

    /// The underlying error.
    pub fn error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self.error.as_ref()
    }
}

impl<E: Into<BoxError>> From<E> for HandlerError {
    fn from(error: E) -> Self {
        HandlerError::transient(error)
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.error, f)?;
        let mut source = self.error.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("permanent", &self.permanent)
            .field("error", &self.error)
            .finish()
    }
}

/// Handles events of type `E`. Implemented for every
/// `Fn(Envelope<E>, Context) -> impl Future<Output = Result<(), HandlerError>>`.
///
/// Implement it on a struct for a handler with state of its own (a repository, a client, a
/// cache), instead of cloning that state into a closure. One struct may handle several event
/// types, one impl each, for [`Bus::route`](crate::Bus::route):
///
/// ```
/// use std::sync::{atomic::{AtomicU64, Ordering}, Arc};
/// use serde::{Deserialize, Serialize};
/// use busbar_core::{BoxFuture, Context, Envelope, Event, Handler, HandlerError};
///
/// #[derive(Serialize, Deserialize)]
/// struct Deposited { cents: u64 }
/// impl Event for Deposited { const TYPE: &'static str = "bank.deposited.v1"; }
///
/// #[derive(Clone, Default)]
/// struct Balance { cents: Arc<AtomicU64> }
///
/// impl Handler<Deposited> for Balance {
///     fn handle(&self, event: Envelope<Deposited>, _ctx: Context)
///         -> BoxFuture<'static, Result<(), HandlerError>> {
///         self.cents.fetch_add(event.payload.cents, Ordering::Relaxed);
///         Box::pin(async { Ok(()) })
///     }
/// }
/// ```
pub trait Handler<E>: Send + Sync + 'static {
    /// Handles one event.
    fn handle(
        &self,
        envelope: Envelope<E>,
        context: Context,
    ) -> BoxFuture<'static, Result<(), HandlerError>>;
}

impl<E, F, Fut> Handler<E> for F
where
    F: Fn(Envelope<E>, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    fn handle(
        &self,
        envelope: Envelope<E>,
        context: Context,
    ) -> BoxFuture<'static, Result<(), HandlerError>> {
        Box::pin(self(envelope, context))
    }
}

/// Looks at every handler attempt before it runs and may fail it instead, as if the handler had
/// returned the error. The failure then takes the normal path (retry, dead-letter).
///
/// The testkit uses it to inject handler failures into unmodified services; it also serves as
/// a kill switch ("fail everything of this group for now").
pub trait Interceptor: Send + Sync + 'static {
    /// `Some(error)` fails this attempt without calling the handler.
    fn before_handle(
        &self,
        topic: &str,
        group: &str,
        message: &crate::Message,
        attempt: u32,
    ) -> Option<HandlerError>;
}
