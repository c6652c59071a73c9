//! The one error type of busbar.
//!
//! Every failure carries a portable [`ErrorKind`], the operation that failed, the resource it
//! failed on (topic, group, URL with its password redacted), whether retrying may help, and the
//! underlying error as its `source()`.

use std::borrow::Cow;
use std::fmt;

/// A `Result` whose error is busbar's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kind of failure an [`Error`] is, portable across transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The configuration or URL is invalid, or names something this build cannot do.
    Config,
    /// The broker could not be reached or the connection was lost.
    Connection,
    /// A value could not be encoded for the wire.
    Encode,
    /// A message could not be decoded into the expected envelope or event type.
    Decode,
    /// A message is larger than the transport accepts.
    PayloadTooLarge,
    /// A header name or value is not allowed.
    InvalidHeader,
    /// The transport does not support the requested operation.
    Unsupported,
    /// The bus, transport or subscription has been closed.
    Closed,
    /// An operation did not finish before its deadline.
    Timeout,
    /// The broker refused or failed the operation.
    Broker,
    /// An idempotency store failed or a claim was lost.
    Store,
}

impl ErrorKind {
    /// A short, stable, lowercase name for the kind.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Config => "config",
            ErrorKind::Connection => "connection",
            ErrorKind::Encode => "encode",
            ErrorKind::Decode => "decode",
            ErrorKind::PayloadTooLarge => "payload too large",
            ErrorKind::InvalidHeader => "invalid header",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Closed => "closed",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Broker => "broker",
            ErrorKind::Store => "store",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// busbar's error: a kind, the failed operation and resource, a message and a source.
///
/// ```
/// use busbar_core::{Error, ErrorKind};
///
/// let err = Error::new(ErrorKind::Config, "connect", "unknown URL scheme `ftp`")
///     .with_resource("ftp://host");
/// assert_eq!(err.kind(), ErrorKind::Config);
/// assert!(!err.is_retryable());
/// assert_eq!(err.to_string(), "connect ftp://host: unknown URL scheme `ftp` (config error)");
/// ```
pub struct Error {
    kind: ErrorKind,
    operation: &'static str,
    resource: Option<String>,
    message: Cow<'static, str>,
    retryable: bool,
    source: Option<Source>,
}

impl Error {
    /// A new error of `kind` while doing `operation` (e.g. `"publish"`), explained by `message`.
    ///
    /// Connection and timeout errors start out retryable; everything else starts permanent.
    pub fn new(
        kind: ErrorKind,
        operation: &'static str,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Error {
            kind,
            operation,
            resource: None,
            message: message.into(),
            retryable: matches!(kind, ErrorKind::Connection | ErrorKind::Timeout),
            source: None,
        }
    }

    /// Names the resource the operation failed on: a topic, a group, a redacted URL.
    pub fn with_resource(mut self, resource: impl Into<String>) -> Self {
        self.resource = Some(resource.into());
        self
    }

    /// Keeps the underlying error as this error's `source()`.
    pub fn with_source(mut self, source: impl Into<Source>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Marks whether retrying the operation may succeed.
    pub fn with_retryable(mut self, retryable: bool) -> Self {
        self.retryable = retryable;
        self
    }

    /// The portable kind of the failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The operation that failed, such as `"publish"` or `"consume"`.
    pub fn operation(&self) -> &'static str {
        self.operation
    }

    /// The resource the operation failed on, if known.
    pub fn resource(&self) -> Option<&str> {
        self.resource.as_deref()
    }

    /// What went wrong, in words.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether retrying the same operation may succeed.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// The error for using something after it was closed: a bus, a transport, a connection.
    /// Every transport returns it, so callers see one message.
    ///
    /// ```
    /// let err = busbar_core::Error::closed("publish", "Kafka transport");
    /// assert_eq!(err.kind(), busbar_core::ErrorKind::Closed);
    /// assert!(err.to_string().contains("the Kafka transport is closed"));
    /// ```
    pub fn closed(operation: &'static str, what: &str) -> Self {
        Error::new(
            ErrorKind::Closed,
            operation,
            format!("the {what} is closed; create a new one to continue"),
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.operation)?;
        if let Some(resource) = &self.resource {
            write!(f, " {resource}")?;
        }
        write!(f, ": {} ({} error", self.message, self.kind)?;
        if self.retryable {
            f.write_str(", retryable")?;
        }
        f.write_str(")")?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind)
            .field("operation", &self.operation)
            .field("resource", &self.resource)
            .field("message", &self.message)
            .field("retryable", &self.retryable);
        if let Some(source) = &self.source {
            d.field("source", &source.to_string());
        }
        d.finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|s| s.as_ref() as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_operation_resource_kind_and_source() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let err = Error::new(ErrorKind::Connection, "connect", "broker unreachable")
            .with_resource("amqp://guest:***@localhost")
            .with_source(io);
        assert_eq!(
            err.to_string(),
            "connect amqp://guest:***@localhost: broker unreachable (connection error, retryable): refused"
        );
        assert!(err.is_retryable());
        assert!(std::error::Error::source(&err).is_some());
    }
}
