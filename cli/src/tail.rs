//! `busbar tail`: follow a topic through a group of the tool's own.

use std::io::Write;
use std::time::Duration;

use busbar::{Bus, ConsumeOptions, StartFrom};
use futures::StreamExt;

use crate::event::Shown;
use crate::{Failure, Outcome, UNAVAILABLE};

/// How long the tail waits for its consumer to join, and for it to let go on exit.
const JOIN_LIMIT: Duration = Duration::from_secs(60);

/// `busbar tail`.
#[derive(clap::Args)]
pub struct TailArgs {
    /// The topic.
    topic: String,
    /// Follow through this group, kept afterwards so a later tail resumes where this one
    /// stopped (default: a temporary group, removed on exit).
    #[arg(long)]
    group: Option<String>,
    /// Start with the oldest message the broker keeps (Kafka); brokers without history refuse.
    #[arg(long)]
    from_start: bool,
    /// One CloudEvents JSON object per line, for `jq`.
    #[arg(long)]
    json: bool,
    /// Stop after this many events.
    #[arg(long, value_name = "N")]
    count: Option<u64>,
}

/// Follows the topic until Ctrl-C (or SIGTERM), or `--count` events.
pub async fn tail(bus: &Bus, args: TailArgs) -> Outcome {
    let caps = bus.capabilities();
    let transport = bus.transport();
    if !caps.fan_out {
        return Err(Failure::new(
            1,
            format!(
                "the {} transport, as configured, has no fan-out: every group shares the topic's \
                 messages, so a tail would take them from the topic's consumers",
                transport.name()
            ),
        ));
    }
    let temporary = args.group.is_none();
    let group = args
        .group
        .clone()
        .unwrap_or_else(|| format!("busbar-tail-{}", crate::random_suffix()));
    let mut options = ConsumeOptions::new(16);
    options.start = if args.from_start {
        StartFrom::Earliest
    } else {
        StartFrom::Latest
    };
    let status = options.status.clone();
    let mut stream = transport.consume(&args.topic, &group, options).await?;
    let result = async {
        if !status.wait_consuming(JOIN_LIMIT).await {
            return Err(Failure::new(
                UNAVAILABLE,
                format!("the tail's group {group:?} did not start consuming within 60 s"),
            ));
        }
        let kept = if temporary {
            "temporary group, removed on exit"
        } else {
            "group kept"
        };
        eprintln!(
            "following {:?} as {group:?} ({kept}); Ctrl-C to stop",
            args.topic
        );
        let mut seen = 0u64;
        let mut stop = std::pin::pin!(stop_signal());
        while args.count.is_none_or(|count| seen < count) {
            let delivery = tokio::select! {
                next = stream.next() => next,
                () = &mut stop => break,
            };
            let delivery = match delivery {
                Some(Ok(delivery)) => delivery,
                Some(Err(e)) if e.is_retryable() => {
                    tracing::warn!(error = %e, "the tail's consumer is recovering");
                    continue;
                }
                Some(Err(e)) => return Err(e.into()),
                None => return Err(Failure::new(1, "the broker ended the tail's stream")),
            };
            let shown = Shown::new(delivery.message());
            let line = if args.json {
                shown.json().to_string()
            } else {
                shown.line()
            };
            {
                let mut out = std::io::stdout().lock();
                writeln!(out, "{line}")?;
                out.flush()?;
            }
            delivery.ack().await?;
            seen += 1;
        }
        Ok(())
    }
    .await;
    drop(stream);
    if temporary {
        status.wait_released(JOIN_LIMIT).await;
        if let Err(e) = bus.delete_group(&args.topic, &group).await {
            eprintln!("busbar: could not remove the temporary group {group:?}: {e}");
        }
    }
    result
}

/// Resolves on Ctrl-C or SIGTERM: the tail then stops, removes its group and exits with 0.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
