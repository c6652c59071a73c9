//! Local endpoints that are not a broker, for tests of what `connect` does with them, and the
//! connect classification table every adapter is checked against.

use std::future::Future;
use std::time::{Duration, Instant};

use busbar_core::{ErrorKind, TransportUrl};

/// A loopback listener that accepts TCP connections (the kernel completes the handshake for
/// its backlog) and never sends a byte: a broker port that hangs. It listens until dropped.
#[derive(Debug)]
pub struct SilentListener {
    _listener: std::net::TcpListener,
    address: String,
}

impl SilentListener {
    /// A new silent listener on a free loopback port.
    ///
    /// Panics (fails the test) when no loopback port can be bound.
    pub fn new() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("cannot bind a loopback port: {e}"));
        let address = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("a bound listener has no address: {e}"))
            .to_string();
        SilentListener {
            _listener: listener,
            address,
        }
    }

    /// `127.0.0.1:port`.
    pub fn address(&self) -> &str {
        &self.address
    }
}

impl Default for SilentListener {
    fn default() -> Self {
        SilentListener::new()
    }
}

/// A loopback `127.0.0.1:port` nobody listens on (bound, then released): a broker that is
/// down, whose connections are refused.
pub fn unused_address() -> String {
    SilentListener::new().address
}

/// A way connecting fails. Every adapter classifies each alike: the same [`ErrorKind`], the
/// same answer to [`Error::is_retryable`](busbar_core::Error::is_retryable), within the same
/// bound ([`connect_failures_classify_alike`] checks them as one table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnectFailure {
    /// A listener that accepts TCP and never answers ([`SilentListener`]): `Timeout`,
    /// retryable, naming the host.
    Silent,
    /// A port nobody listens on ([`unused_address`]): `Connection`, retryable (a broker that
    /// is down may come up).
    Refused,
    /// A URL without a host: `Config`, not retryable.
    NoHost,
    /// Credentials the broker refuses: `Connection`, not retryable, the password never shown.
    BadCredentials,
    /// A namespace the broker does not have or allow the user (RabbitMQ's vhost):
    /// `Connection`, not retryable.
    UnknownNamespace,
    /// TLS that cannot work: spoken to a plain port, or a certificate not trusted:
    /// `Connection`, not retryable.
    TlsMismatch,
}

impl ConnectFailure {
    /// Every failure of the table.
    pub const ALL: [ConnectFailure; 6] = [
        ConnectFailure::Silent,
        ConnectFailure::Refused,
        ConnectFailure::NoHost,
        ConnectFailure::BadCredentials,
        ConnectFailure::UnknownNamespace,
        ConnectFailure::TlsMismatch,
    ];

    /// The kind and retryability every adapter gives this failure.
    pub fn expected(self) -> (ErrorKind, bool) {
        match self {
            ConnectFailure::Silent => (ErrorKind::Timeout, true),
            ConnectFailure::Refused => (ErrorKind::Connection, true),
            ConnectFailure::NoHost => (ErrorKind::Config, false),
            ConnectFailure::BadCredentials
            | ConnectFailure::UnknownNamespace
            | ConnectFailure::TlsMismatch => (ErrorKind::Connection, false),
        }
    }
}

/// One row of an adapter's connect table: a URL that fails as `failure`, with what its error
/// text must say, and a secret in the URL that must never appear in the error.
#[derive(Debug, Clone)]
pub struct ConnectCase {
    /// How it fails.
    pub failure: ConnectFailure,
    /// The URL to connect to.
    pub url: String,
    /// Text the error must contain (what to fix).
    pub says: String,
    /// A secret in the URL that must not appear in the error's text or `Debug`.
    pub secret: Option<&'static str>,
}

impl ConnectCase {
    /// A row: `url` fails as `failure`, its error saying `says`.
    pub fn new(failure: ConnectFailure, url: impl Into<String>, says: impl Into<String>) -> Self {
        ConnectCase {
            failure,
            url: url.into(),
            says: says.into(),
            secret: None,
        }
    }

    /// The secret the URL holds, which the error must not show.
    pub fn secret(mut self, secret: &'static str) -> Self {
        self.secret = Some(secret);
        self
    }
}

/// How long one connect of the table may take: the silent case's `connect_timeout_ms` (keep it
/// at 1.5 s) and a margin.
pub const CONNECT_BOUND: Duration = Duration::from_secs(15);

/// Connects to every case's URL with `connect` and checks the shared classification table:
/// each fails within [`CONNECT_BOUND`] with the kind and retryability of
/// [`ConnectFailure::expected`], says what to fix, and shows no secret. Every failure of
/// [`ConnectFailure::ALL`] must be a case or be named in `not_applicable` with the reason.
///
/// # Panics
///
/// On the first row that does not hold, naming it (or on a failure left out without a reason).
pub async fn connect_failures_classify_alike<C, Fut, T>(
    connect: C,
    cases: Vec<ConnectCase>,
    not_applicable: &[(ConnectFailure, &str)],
) where
    C: Fn(TransportUrl) -> Fut,
    Fut: Future<Output = busbar_core::Result<T>>,
{
    for failure in ConnectFailure::ALL {
        let covered = cases.iter().any(|case| case.failure == failure);
        let excused = not_applicable
            .iter()
            .any(|(f, why)| *f == failure && !why.is_empty());
        assert!(
            covered || excused,
            "{failure:?} is neither a case of the table nor named as not applicable (with why)"
        );
    }
    for case in cases {
        let url: TransportUrl = case
            .url
            .parse()
            .unwrap_or_else(|e| panic!("{:?}: the URL does not parse: {e}", case.failure));
        let started = Instant::now();
        let connected = tokio::time::timeout(CONNECT_BOUND, connect(url))
            .await
            .unwrap_or_else(|_| panic!("{:?}: connect hung for {CONNECT_BOUND:?}", case.failure));
        let Err(error) = connected else {
            panic!("{:?}: connecting to {} succeeded", case.failure, case.url);
        };
        let text = error.to_string();
        let (kind, retryable) = case.failure.expected();
        assert_eq!(error.kind(), kind, "{:?}: {text}", case.failure);
        assert_eq!(
            error.is_retryable(),
            retryable,
            "{:?}: retryable? {text}",
            case.failure
        );
        assert!(
            text.contains(&case.says),
            "{:?}: the error says {:?}: {text}",
            case.failure,
            case.says
        );
        if let Some(secret) = case.secret {
            let shown = format!("{text} {error:?}");
            assert!(
                !shown.contains(secret),
                "{:?}: the secret leaked: {shown}",
                case.failure
            );
        }
        eprintln!("{:?} after {:?}: {text}", case.failure, started.elapsed());
    }
}

/// Whether something listens on `address` (`host:port`), for a test that needs the broker
/// `what` there. When nothing does: under `CI=true` (or `BUSBAR_REQUIRE_BROKERS=1`) the test
/// fails; elsewhere it says `SKIPPED` on stderr and the caller returns.
///
/// # Panics
///
/// When nothing listens and brokers are required.
pub fn listening(address: &str, what: &str) -> bool {
    let up = std::net::TcpStream::connect(address).is_ok();
    assert!(
        up || !crate::conformance::brokers_required(),
        "{what} is not running on {address}"
    );
    if !up {
        eprintln!("SKIPPED: {what} is not running on {address}");
    }
    up
}
