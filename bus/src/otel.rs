//! The OpenTelemetry bridge (feature `otel`): a trace continues across the broker.
//!
//! busbar makes its consume spans itself, through the OpenTelemetry API and the tracer
//! provider installed with `opentelemetry::global::set_tracer_provider` (install it before
//! subscribing, as the metrics recorder: a subscription takes its tracer when it starts):
//! - every delivery is handled inside a span `process <topic>` (kind consumer, the messaging
//!   semantic conventions' attributes), the child of the message's W3C `traceparent` (and
//!   `tracestate`), so the handler's work joins the producer's trace; a failed attempt marks
//!   it as an error;
//! - the provider's sampler decides when the span starts: a message it leaves out costs the
//!   decision and nothing more (no attributes copied, nothing exported);
//! - an envelope made inside an OpenTelemetry context (a publish from a handler, or from a
//!   traced request) carries that context's span as its `traceparent`. A `tracing` span
//!   bridged by `tracing-opentelemetry` (0.32 or later) makes its context current while
//!   entered, so publishing inside it works the same.
//!
//! With no tracer provider installed (the API's no-op), a subscription notices on its first
//! delivery and starts no more spans, and envelopes keep busbar's own `traceparent`: the
//! incoming trace id with a new span id, or a new trace.
//!
//! busbar's `tracing` span `busbar.process` (for logs) stays; a service that bridges `tracing`
//! to OpenTelemetry as well gets it as a child of the consume span, or leaves it out of the
//! bridge with a filter on its name.
//!
//! The W3C format is written and read here, not through the global propagator: CloudEvents'
//! distributed-tracing extension is W3C Trace Context whatever else a service propagates.

use std::borrow::Cow;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use opentelemetry::global::BoxedTracer;
use opentelemetry::trace::{
    Span as _, SpanBuilder, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags,
    TraceId, TraceState, Tracer as _,
};
use opentelemetry::{Context, KeyValue, StringValue};

use crate::envelope::attr;
use crate::Message;

/// Whether the installed tracer makes spans: not known before the first delivery.
const UNKNOWN: u8 = 0;
const TRACING: u8 = 1;
const NO_OP: u8 = 2;

/// The consume spans of one subscription.
pub(crate) struct ConsumeSpans {
    tracer: BoxedTracer,
    /// `process <topic>`, the conventions' span name.
    name: Cow<'static, str>,
    system: &'static str,
    topic: StringValue,
    group: StringValue,
    state: AtomicU8,
}

impl ConsumeSpans {
    /// The spans of a subscription to `topic` in `group`, from the global tracer provider.
    pub(crate) fn new(system: &'static str, topic: &str, group: &str) -> Self {
        Self {
            tracer: opentelemetry::global::tracer("busbar"),
            name: Cow::Owned(format!("process {topic}")),
            system,
            topic: StringValue::from(Arc::<str>::from(topic)),
            group: StringValue::from(Arc::<str>::from(group)),
            state: AtomicU8::new(UNKNOWN),
        }
    }

    /// The context to handle `message` in: its consume span, the child of its `traceparent`;
    /// `None` when no tracer provider is installed.
    pub(crate) fn start(&self, message: &Message, attempt: u32) -> Option<Context> {
        let state = self.state.load(Ordering::Relaxed);
        if state == NO_OP {
            return None;
        }
        let parent = match remote_context(message) {
            Some(remote) => Context::new().with_remote_span_context(remote),
            None => Context::new(),
        };
        // The sampler decides on the span's kind and parent alone: the name and attributes are
        // copied only into a span it keeps (a message left out costs no allocation for them).
        let builder = SpanBuilder::from_name("process").with_kind(SpanKind::Consumer);
        let span = self.tracer.build_with_context(builder, &parent);
        if state == UNKNOWN {
            // The API's no-op tracer hands back the parent's context (or none); a real one
            // always makes a new span id, sampled or not.
            let made = span.span_context();
            let no_op =
                !made.is_valid() || made.span_id() == parent.span().span_context().span_id();
            self.state
                .store(if no_op { NO_OP } else { TRACING }, Ordering::Relaxed);
            if no_op {
                return None;
            }
        }
        if !span.is_recording() {
            // A span the sampler left out records nothing: what the handler's spans and
            // publishes need of it is its context (trace, id, not sampled), not the SDK's span
            // object, which would be held in a lock until handling ends and then ended for
            // nothing (a clock read and two dynamic calls).
            return Some(Context::new().with_remote_span_context(span.span_context().clone()));
        }
        let mut span = span;
        span.update_name(self.name.clone());
        let id = message.id.as_str();
        let conversation = message
            .header(attr::CORRELATION_ID)
            .or_else(|| message.header(attr::ID))
            .unwrap_or(id);
        span.set_attributes([
            KeyValue::new("messaging.system", self.system),
            KeyValue::new("messaging.operation.type", "process"),
            KeyValue::new("messaging.destination.name", self.topic.clone()),
            KeyValue::new("messaging.consumer.group.name", self.group.clone()),
            KeyValue::new("messaging.message.id", id.to_owned()),
            KeyValue::new("messaging.message.conversation_id", conversation.to_owned()),
            KeyValue::new(
                "busbar.event_type",
                message.header(attr::TYPE).unwrap_or_default().to_owned(),
            ),
            KeyValue::new("busbar.attempt", i64::from(attempt)),
        ]);
        Some(parent.with_span(span))
    }
}

/// Marks the current consume span as failed, saying why.
pub(crate) fn failed(error: &str) {
    Context::map_current(|context| {
        let span = context.span();
        if span.is_recording() {
            span.set_status(Status::error(error.to_owned()));
        }
    });
}

/// The trace id, span id and flags of the current OpenTelemetry context's span, when it has a
/// valid one.
pub(crate) fn current_span() -> Option<(u128, u64, u8)> {
    Context::map_current(|context| {
        let span = context.span();
        let current = span.span_context();
        current.is_valid().then(|| {
            (
                u128::from_be_bytes(current.trace_id().to_bytes()),
                u64::from_be_bytes(current.span_id().to_bytes()),
                current.trace_flags().to_u8(),
            )
        })
    })
}

/// The remote span that `message`'s W3C `traceparent` (version `00`: `00-<32 hex>-<16 hex>-<2
/// hex>`) names, with its `tracestate`, which is looked up only for a valid `traceparent`.
/// Read at fixed offsets: `TraceId::from_hex` and splitting on `-` cost about 1,300
/// instructions for every traced delivery, this about 300.
fn remote_context(message: &Message) -> Option<SpanContext> {
    let tp = message.header(attr::TRACEPARENT)?.trim().as_bytes();
    if tp.len() != 55 || !tp.starts_with(b"00-") || tp[35] != b'-' || tp[52] != b'-' {
        return None;
    }
    let trace = TraceId::from(hex(&tp[3..35])?);
    let span = SpanId::from(hex_u64(&tp[36..52])?);
    let flags = u8::try_from(hex_u64(&tp[53..55])?).ok()?;
    let state = message
        .header(attr::TRACESTATE)
        .and_then(|state| TraceState::from_str(state).ok())
        .unwrap_or_default();
    let context = SpanContext::new(trace, span, TraceFlags::new(flags), true, state);
    context.is_valid().then_some(context)
}

/// The value of up to 32 hex digits (two halves of up to 16: a `u128` shift costs more).
fn hex(digits: &[u8]) -> Option<u128> {
    let (high, low) = digits.split_at(digits.len().saturating_sub(16));
    Some(u128::from(hex_u64(high)?) << 64 | u128::from(hex_u64(low)?))
}

/// The value of up to 16 hex digits, a table look-up each.
fn hex_u64(digits: &[u8]) -> Option<u64> {
    /// Each byte's value as a hex digit; `INVALID` for a byte that is none.
    const VALUES: [u8; 256] = {
        let mut values = [INVALID; 256];
        let mut i = 0;
        while i < 10 {
            values[b'0' as usize + i] = i as u8;
            i += 1;
        }
        let mut i = 0;
        while i < 6 {
            values[b'a' as usize + i] = 10 + i as u8;
            values[b'A' as usize + i] = 10 + i as u8;
            i += 1;
        }
        values
    };
    const INVALID: u8 = 0x80;
    let (mut value, mut seen) = (0u64, 0u8);
    for &digit in digits {
        let nibble = VALUES[usize::from(digit)];
        seen |= nibble;
        value = value << 4 | u64::from(nibble & 0xf);
    }
    (seen & INVALID == 0).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn carrying(traceparent: &str, tracestate: Option<&str>) -> Message {
        let mut message = Message::new("m-1", "t", "");
        message.headers.insert(attr::TRACEPARENT, traceparent);
        if let Some(state) = tracestate {
            message.headers.insert(attr::TRACESTATE, state);
        }
        message
    }

    #[test]
    fn reads_a_w3c_traceparent_and_refuses_malformed_ones() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = remote_context(&carrying(tp, Some("congo=t61rcWkgMzE"))).expect("valid");
        assert_eq!(
            context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(context.span_id().to_string(), "00f067aa0ba902b7");
        assert!(context.is_sampled() && context.is_remote());
        assert_eq!(context.trace_state().get("congo"), Some("t61rcWkgMzE"));
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-zzf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-ff",
        ] {
            assert!(remote_context(&carrying(bad, None)).is_none(), "{bad:?}");
        }
    }
}
