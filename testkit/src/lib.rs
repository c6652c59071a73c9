//! busbar's testkit: unit-test event handlers with no broker, inject faults, and prove a
//! transport correct with the conformance suite.
//!
//! - [`TestBus`]: the memory transport plus a record of everything published, typed
//!   assertions, fault injection ([`Faults`]) and [`TestBus::run_until_idle`].
//! - [`FaultyTransport`]: the same faults around any transport.
//! - [`conformance`]: the scenarios every transport must pass, and
//!   [`conformance_suite!`] to run them all as named tests.
//! - [`idempotency`]: the scenarios every shared idempotency store must pass.
//! - [`hostile`]: foreign and malformed messages must dead-letter clearly.
//! - [`soak`]: the soak with faults every transport runs, and its accounting table.
//! - `interop` (feature `cloudevents`): read and write busbar's wire format with the
//!   official CloudEvents SDK.
//! - `arbitrary` (feature `proptest`): strategies for property tests of message mappings.

#[cfg(feature = "proptest")]
pub mod arbitrary;
pub mod conformance;
pub mod endpoints;
pub mod faults;
pub mod hostile;
pub mod idempotency;
#[cfg(feature = "cloudevents")]
pub mod interop;
#[cfg(feature = "metrics")]
pub mod metrics;
#[cfg(feature = "otel")]
pub mod otel;
pub mod restart;
pub mod soak;
mod test_bus;

pub use faults::{Faults, FaultyTransport, SettleCounts};
pub use test_bus::{TestBus, IDLE_TIMEOUT};
