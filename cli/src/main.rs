//! `busbar`: check a broker, declare groups, publish, follow a topic and handle dead letters on
//! RabbitMQ, Kafka, SQS (or the in-process memory transport) through one URL.
//!
//! Exit codes: 0 success, 1 the broker refused or failed, 2 bad usage (from `clap`, or a bad
//! URL), 65 bad input data (a line that is not JSON, a bad header), 69 the broker cannot be
//! reached.

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod dlq;
mod event;
mod tail;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use busbar::{Bus, BusConfig, ConsumeOptions, ErrorKind, StartFrom};
use clap::{CommandFactory, Parser, Subcommand};
use futures::StreamExt;

/// Failures the tool reports: the message printed, and the exit code.
#[derive(Debug)]
pub struct Failure {
    message: String,
    code: u8,
}

/// Exit code: the input data was not valid (sysexits' `EX_DATAERR`).
pub const DATA_ERROR: u8 = 65;
/// Exit code: the broker could not be reached (sysexits' `EX_UNAVAILABLE`).
pub const UNAVAILABLE: u8 = 69;
/// Exit code: bad usage, as `clap` reports it.
pub const USAGE: u8 = 2;

impl Failure {
    /// A failure with `message` and exit `code`.
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Failure {
            message: message.into(),
            code,
        }
    }
}

impl From<busbar::Error> for Failure {
    fn from(error: busbar::Error) -> Self {
        let code = match error.kind() {
            ErrorKind::Connection | ErrorKind::Timeout => UNAVAILABLE,
            ErrorKind::Config => USAGE,
            ErrorKind::InvalidHeader | ErrorKind::Encode => DATA_ERROR,
            _ => 1,
        };
        Failure::new(code, error.to_string())
    }
}

impl From<std::io::Error> for Failure {
    fn from(error: std::io::Error) -> Self {
        Failure::new(1, format!("cannot write the output: {error}"))
    }
}

/// What every command returns.
pub type Outcome = Result<(), Failure>;

#[derive(Parser)]
#[command(
    name = "busbar",
    version,
    about = "Check, publish, tail and redrive dead letters on any broker busbar speaks",
    long_about = "Check, publish, tail and redrive dead letters on RabbitMQ (amqp://), Kafka \
                  (kafka://) and SQS (sqs://) the same way, through the URL a busbar service uses.",
    after_help = "Exit codes: 0 success, 1 the broker refused or failed, 2 bad usage or URL, 65 \
                  bad input data, 69 broker unreachable.\nLogs: RUST_LOG=busbar=debug."
)]
struct Cli {
    /// The broker's URL, as for the library (passwords are never printed).
    #[arg(long, env = "BUSBAR_URL", global = true, hide_env_values = true)]
    url: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Connect, print the transport and its capabilities, and time a publish → receive round
    /// trip on the topic `busbar-check`.
    Check,
    /// Create GROUP's durable subscription to TOPIC (for deploy pipelines).
    Declare {
        /// The topic.
        topic: String,
        /// The consumer group.
        group: String,
    },
    /// Publish one event (`--data JSON`), or one per line of standard input (`--data -`, or
    /// no `--data`). Prints each published id.
    Publish(event::PublishArgs),
    /// Follow a topic, one line per event, through a temporary group removed on exit (the
    /// topic's groups are not disturbed).
    Tail(tail::TailArgs),
    /// List, show, redrive or purge a group's dead letters.
    Dlq {
        #[command(subcommand)]
        command: dlq::DlqCommand,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    // busbar's own warnings by default. The broker clients' logs (lapin logs an error for a
    // queue that does not exist, librdkafka for a missing topic) only with RUST_LOG: what
    // fails reaches the user as busbar's error, which says what to do.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new(
                    "off,busbar=warn,busbar_core=warn,busbar_rabbitmq=warn,busbar_kafka=warn,\
                     busbar_sqs=warn",
                )
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("busbar: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

async fn run(cli: Cli) -> Outcome {
    if let Command::Completions { shell } = cli.command {
        let mut command = Cli::command();
        clap_complete::generate(shell, &mut command, "busbar", &mut std::io::stdout());
        return Ok(());
    }
    let Some(url) = cli.url else {
        return Err(Failure::new(
            USAGE,
            "no broker: pass --url or set BUSBAR_URL (e.g. amqp://guest:guest@127.0.0.1:5672/%2f)",
        ));
    };
    let mut config = BusConfig::from_url(&url)?;
    config.source = "/busbar-cli".to_string();
    let bus = busbar::connect_with(&config).await?;
    let result = match cli.command {
        Command::Check => check(&bus).await,
        Command::Declare { topic, group } => {
            bus.declare(&topic, &group).await?;
            println!("declared group {group:?} on topic {topic:?}");
            Ok(())
        }
        Command::Publish(args) => event::publish(&bus, args).await,
        Command::Tail(args) => tail::tail(&bus, args).await,
        Command::Dlq { command } => dlq::run(&bus, command).await,
        Command::Completions { .. } => Ok(()),
    };
    let _ = bus.close().await;
    result
}

/// The topic `check` publishes to and reads back from.
const CHECK_TOPIC: &str = "busbar-check";

async fn check(bus: &Bus) -> Outcome {
    let transport = bus.transport();
    let caps = bus.capabilities();
    let mut out = std::io::stdout().lock();
    writeln!(out, "transport     {}", transport.name())?;
    let yes: Vec<&str> = caps
        .entries()
        .iter()
        .filter(|(_, on)| *on)
        .map(|(n, _)| *n)
        .collect();
    writeln!(out, "capabilities  {}", yes.join(", "))?;
    if let Some(max) = caps.max_message_bytes {
        writeln!(out, "max message   {max} bytes")?;
    }
    drop(out);
    let group = format!("busbar-check-{}", random_suffix());
    let mut options = ConsumeOptions::new(1);
    options.start = StartFrom::Latest;
    let status = options.status.clone();
    let mut stream = transport.consume(CHECK_TOPIC, &group, options).await?;
    let limit = Duration::from_secs(30);
    let outcome = async {
        if !status.wait_consuming(limit).await {
            return Err(Failure::new(
                UNAVAILABLE,
                "the check consumer did not start in 30 s",
            ));
        }
        let started = Instant::now();
        let message = event::check_message()?;
        let id = message.id.clone();
        bus.publish_messages(vec![message]).await?;
        loop {
            let next = tokio::time::timeout_at((started + limit).into(), stream.next()).await;
            match next {
                Ok(Some(Ok(delivery))) => {
                    let mine = delivery.message().id == id;
                    delivery.ack().await?;
                    if mine {
                        break;
                    }
                }
                Ok(Some(Err(e))) if e.is_retryable() => continue,
                Ok(Some(Err(e))) => return Err(e.into()),
                Ok(None) => return Err(Failure::new(1, "the check consumer stopped")),
                Err(_) => {
                    return Err(Failure::new(
                        UNAVAILABLE,
                        "the check message did not come back within 30 s",
                    ))
                }
            }
        }
        println!(
            "round trip    {:.1} ms (publish → receive on topic {CHECK_TOPIC:?})",
            started.elapsed().as_secs_f64() * 1000.0
        );
        Ok(())
    }
    .await;
    drop(stream);
    status.wait_released(limit).await;
    if caps.fan_out {
        if let Err(e) = bus.delete_group(CHECK_TOPIC, &group).await {
            eprintln!("busbar: could not remove the check group {group:?}: {e}");
        }
    }
    outcome
}

/// 12 random hex digits, for the names of the tool's own groups.
pub fn random_suffix() -> String {
    let id = uuid::Uuid::now_v7().simple().to_string();
    id[id.len() - 12..].to_string()
}

/// Whether standard error is a terminal (progress bars and prompts go there).
pub fn interactive() -> bool {
    std::io::stderr().is_terminal()
}
