//! The OpenTelemetry bridge (feature `otel`): a trace continues across the broker.
//!
//! busbar's spans are `tracing` spans; with the service's `tracing-opentelemetry` layer
//! installed they become OpenTelemetry spans, and with this feature:
//! - a consume span (`busbar.process`) is the child of the message's W3C `traceparent`
//!   (and `tracestate`), so the handler's work joins the producer's trace;
//! - an envelope made inside a span (a fresh publish from a traced request, or a publish from
//!   a handler, inside `busbar.process`) carries that span's context as its `traceparent`.
//!
//! Without the layer (or outside any span), envelopes keep busbar's own `traceparent`: the
//! incoming trace id with a new span id, or a new trace.
//!
//! The W3C format is written and read here, not through the global propagator: CloudEvents'
//! distributed-tracing extension is W3C Trace Context whatever else a service propagates.

use std::str::FromStr;

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Makes the remote span `traceparent` names (with `tracestate`) the current OpenTelemetry
/// context until the guard drops, so that a span created meanwhile is its child (the
/// `tracing-opentelemetry` layer takes a new span's parent from the current context when no
/// enclosing `tracing` span gives one); nothing for a missing or malformed `traceparent`.
pub(crate) fn enter_remote_parent(
    traceparent: Option<&str>,
    tracestate: Option<&str>,
) -> Option<opentelemetry::ContextGuard> {
    let parent = traceparent.and_then(|tp| remote_context(tp, tracestate))?;
    Some(
        opentelemetry::Context::new()
            .with_remote_span_context(parent)
            .attach(),
    )
}

/// The W3C `traceparent` of the current span, when it has a valid OpenTelemetry context.
pub(crate) fn current_traceparent() -> Option<String> {
    let context = tracing::Span::current().context();
    let span = context.span();
    let current = span.span_context();
    current.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            current.trace_id(),
            current.span_id(),
            current.trace_flags().to_u8()
        )
    })
}

/// The remote span a W3C `traceparent` (version `00`: `00-<32 hex>-<16 hex>-<2 hex>`) names.
/// Read at fixed offsets: `TraceId::from_hex` and splitting on `-` cost about 1,300
/// instructions for every traced delivery, this about 300.
fn remote_context(traceparent: &str, tracestate: Option<&str>) -> Option<SpanContext> {
    let tp = traceparent.trim().as_bytes();
    if tp.len() != 55 || !tp.starts_with(b"00-") || tp[35] != b'-' || tp[52] != b'-' {
        return None;
    }
    let trace = TraceId::from(hex(&tp[3..35])?);
    let span = SpanId::from(u64::try_from(hex(&tp[36..52])?).ok()?);
    let flags = u8::try_from(hex(&tp[53..55])?).ok()?;
    let state = tracestate
        .and_then(|state| TraceState::from_str(state).ok())
        .unwrap_or_default();
    let context = SpanContext::new(trace, span, TraceFlags::new(flags), true, state);
    context.is_valid().then_some(context)
}

/// The value of up to 32 hex digits.
fn hex(digits: &[u8]) -> Option<u128> {
    digits.iter().try_fold(0u128, |value, &digit| {
        let nibble = match digit {
            b'0'..=b'9' => digit - b'0',
            b'a'..=b'f' => digit - b'a' + 10,
            b'A'..=b'F' => digit - b'A' + 10,
            _ => return None,
        };
        Some(value << 4 | u128::from(nibble))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_w3c_traceparent_and_refuses_malformed_ones() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = remote_context(tp, Some("congo=t61rcWkgMzE")).expect("valid");
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
            assert!(remote_context(bad, None).is_none(), "{bad:?}");
        }
    }
}
