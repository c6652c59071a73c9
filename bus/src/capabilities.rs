//! What a transport guarantees, as data.
//!
//! The conformance suite runs each scenario only where the transport claims the capability,
//! and the README's matrix is printed from these values, so docs and tests cannot drift apart.

/// The guarantees and limits of one transport.
///
/// Adapters build it with struct update syntax:
///
/// ```
/// use busbar_core::Capabilities;
/// let caps = Capabilities { fan_out: true, ordered_by_key: true, ..Capabilities::default() };
/// assert!(!caps.delayed_nack);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// Every declared group receives every message published to the topic.
    pub fan_out: bool,
    /// Several consumers of one group share its messages, each message going to one of them.
    pub competing_consumers: bool,
    /// Messages with the same key (and the same group) are delivered in publish order.
    pub ordered_by_key: bool,
    /// Per-key order holds across retries too: while a message waits for its retry, the later
    /// messages of its key wait for it.
    pub ordered_across_retries: bool,
    /// `nack(delay)` holds the message back for about `delay` before redelivering it.
    pub delayed_nack: bool,
    /// The broker may deliver a message more than once even when nothing failed, so
    /// exactly-once effects need an idempotency store.
    pub may_duplicate: bool,
    /// The broker dead-letters a message that keeps crashing its consumer, without busbar.
    pub native_dead_letter: bool,
    /// Dead letters can be listed and redriven.
    pub redrive: bool,
    /// Messages survive a restart of the broker (and of the process, for memory: false).
    pub persistent: bool,
    /// The largest message (payload, key and headers) the transport accepts, in bytes.
    pub max_message_bytes: Option<usize>,
}

impl Capabilities {
    /// This transport's row of the README's capability matrix, in the matrix's column order:
    /// `| name | fan-out | competing consumers | per-key order | order across retries |
    /// delayed nack | may duplicate | native DLQ | redrive | persistent | max message |`.
    ///
    /// ```
    /// let caps = busbar_core::MemoryTransport::new();
    /// # use busbar_core::Transport;
    /// let row = caps.capabilities().matrix_row("memory");
    /// assert!(row.starts_with("| memory | yes | yes | yes |"));
    /// ```
    pub fn matrix_row(&self, name: &str) -> String {
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        let max = match self.max_message_bytes {
            Some(bytes) if bytes % (1024 * 1024) == 0 => format!("{} MiB", bytes / (1024 * 1024)),
            Some(bytes) if bytes % 1024 == 0 => format!("{} KiB", bytes / 1024),
            Some(bytes) => format!("{bytes} bytes"),
            None => "unlimited".to_string(),
        };
        let cells: Vec<&str> = self.entries().iter().map(|(_, b)| yes_no(*b)).collect();
        format!("| {name} | {} | {max} |", cells.join(" | "))
    }

    /// The capability names and values, in a fixed order, for matrices and test reports.
    pub fn entries(&self) -> [(&'static str, bool); 9] {
        [
            ("fan-out", self.fan_out),
            ("competing consumers", self.competing_consumers),
            ("per-key order", self.ordered_by_key),
            ("order across retries", self.ordered_across_retries),
            ("delayed nack", self.delayed_nack),
            ("may duplicate", self.may_duplicate),
            ("native dead letter", self.native_dead_letter),
            ("redrive", self.redrive),
            ("persistent", self.persistent),
        ]
    }
}
