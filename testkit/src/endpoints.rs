//! Local endpoints that are not a broker, for tests of what `connect` does with them.

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
