//! `busbar dlq`: a group's dead letters.

use std::io::{BufRead, IsTerminal, Write};

use busbar::{Bus, DeadLetter, RedriveSelection};
use comfy_table::{presets::NOTHING, Table};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::event::Shown;
use crate::{interactive, Failure, Outcome, USAGE};

/// The most dead letters listed unless `--limit` says otherwise.
const DEFAULT_LIMIT: usize = 100;
/// Characters of the error text a table row shows.
const ERROR_SHOWN: usize = 60;

/// What to do with the dead letters of TOPIC's GROUP.
#[derive(clap::Subcommand)]
pub enum DlqCommand {
    /// A table of the dead letters, oldest first: id, type, reason, attempts, failed at, error.
    List {
        #[command(flatten)]
        target: Target,
        /// One JSON object per dead letter instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Dead letters in full (`--id` chooses them; default: all, up to `--limit`).
    Show {
        #[command(flatten)]
        target: Target,
    },
    /// Send dead letters back to the group, with fresh attempts (`--id` chooses them).
    Redrive {
        #[command(flatten)]
        target: Target,
    },
    /// Delete dead letters for good (`--id` chooses them); asks first unless `--yes`.
    Purge {
        #[command(flatten)]
        target: Target,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
    },
}

/// The group, and which of its dead letters.
#[derive(clap::Args)]
pub struct Target {
    /// The topic.
    topic: String,
    /// The consumer group whose dead letters these are.
    group: String,
    /// Only the dead letter with this message id; repeat for more.
    #[arg(long = "id", value_name = "ID")]
    ids: Vec<String>,
    /// At most this many dead letters (default 100; redrive and purge: all).
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
}

impl Target {
    async fn listed(&self, bus: &Bus, default_limit: usize) -> Result<Vec<DeadLetter>, Failure> {
        let limit = self.limit.unwrap_or(default_limit);
        let scan = if self.ids.is_empty() {
            limit
        } else {
            usize::MAX
        };
        let mut dead = bus.dead_letters(&self.topic, &self.group, scan).await?;
        if !self.ids.is_empty() {
            dead.retain(|d| self.ids.iter().any(|id| *id == d.message.id));
            let missing: Vec<&String> = self
                .ids
                .iter()
                .filter(|id| !dead.iter().any(|d| &d.message.id == *id))
                .collect();
            if !missing.is_empty() {
                return Err(Failure::new(
                    1,
                    format!(
                        "no dead letter of group {:?} on topic {:?} has the id {}",
                        self.group,
                        self.topic,
                        missing
                            .iter()
                            .map(|id| format!("{id:?}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
            dead.truncate(limit);
        }
        Ok(dead)
    }
}

/// Runs one `dlq` command.
pub async fn run(bus: &Bus, command: DlqCommand) -> Outcome {
    match command {
        DlqCommand::List { target, json } => list(bus, &target, json).await,
        DlqCommand::Show { target } => show(bus, &target).await,
        DlqCommand::Redrive { target } => settle(bus, &target, Action::Redrive, true).await,
        DlqCommand::Purge { target, yes } => settle(bus, &target, Action::Purge, yes).await,
    }
}

fn shortened(text: &str) -> String {
    let one_line = text.replace(['\n', '\r'], " ");
    if one_line.chars().count() <= ERROR_SHOWN {
        return one_line;
    }
    let mut short: String = one_line.chars().take(ERROR_SHOWN - 1).collect();
    short.push('…');
    short
}

fn summary(dead: &DeadLetter) -> Value {
    let info = &dead.info;
    json!({
        "id": dead.message.id,
        "type": dead.message.header("ce_type"),
        "reason": info.reason.as_str(),
        "attempts": info.attempts,
        "failed_at": info.failed_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "error": info.error,
    })
}

async fn list(bus: &Bus, target: &Target, json: bool) -> Outcome {
    let dead = target.listed(bus, DEFAULT_LIMIT).await?;
    let mut out = std::io::stdout().lock();
    if json {
        for d in &dead {
            writeln!(out, "{}", summary(d))?;
        }
        return Ok(());
    }
    if dead.is_empty() {
        writeln!(
            out,
            "no dead letters for group {:?} on topic {:?}",
            target.group, target.topic
        )?;
        return Ok(());
    }
    let mut table = Table::new();
    table.load_preset(NOTHING).set_header([
        "ID",
        "TYPE",
        "REASON",
        "ATTEMPTS",
        "FAILED AT",
        "ERROR",
    ]);
    for d in &dead {
        table.add_row([
            d.message.id.to_string(),
            d.message.header("ce_type").unwrap_or("-").to_string(),
            d.info.reason.as_str().to_string(),
            d.info.attempts.to_string(),
            d.info
                .failed_at
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            shortened(&d.info.error),
        ]);
    }
    writeln!(out, "{table}")?;
    let limit = target.limit.unwrap_or(DEFAULT_LIMIT);
    if dead.len() == limit {
        writeln!(out, "the first {limit} dead letters; --limit N shows more")?;
    } else {
        writeln!(out, "{} dead letter(s)", dead.len())?;
    }
    Ok(())
}

async fn show(bus: &Bus, target: &Target) -> Outcome {
    let dead = target.listed(bus, DEFAULT_LIMIT).await?;
    let mut out = std::io::stdout().lock();
    for d in &dead {
        let mut full = summary(d);
        if let Value::Object(fields) = &mut full {
            fields.insert("event".into(), Shown::new(&d.message).json().clone());
        }
        let text = serde_json::to_string_pretty(&full)
            .map_err(|e| Failure::new(1, format!("cannot print dead letter: {e}")))?;
        writeln!(out, "{text}")?;
    }
    if dead.is_empty() {
        writeln!(out, "no dead letters")?;
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Action {
    Redrive,
    Purge,
}

impl Action {
    fn verb(self) -> &'static str {
        match self {
            Action::Redrive => "redrive",
            Action::Purge => "purge",
        }
    }

    fn done(self) -> &'static str {
        match self {
            Action::Redrive => "redriven",
            Action::Purge => "purged",
        }
    }
}

fn confirm(target: &Target, count: usize) -> Result<bool, Failure> {
    if !std::io::stdin().is_terminal() {
        return Err(Failure::new(
            USAGE,
            "purge deletes dead letters for good: confirm with --yes (standard input is not a \
             terminal to ask on)",
        ));
    }
    eprint!(
        "Delete {count} dead letter(s) of group {:?} on topic {:?} for good? [y/N] ",
        target.group, target.topic
    );
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}

/// Redrives or purges the chosen dead letters; `confirmed` false asks first.
async fn settle(bus: &Bus, target: &Target, action: Action, confirmed: bool) -> Outcome {
    let dead = target.listed(bus, usize::MAX).await?;
    if dead.is_empty() {
        println!("no dead letters to {}", action.verb());
        return Ok(());
    }
    if !confirmed && !confirm(target, dead.len())? {
        return Err(Failure::new(
            1,
            format!("{} cancelled: nothing was changed", action.verb()),
        ));
    }
    settle_listed(bus, target, dead, action).await
}

/// Redrives or purges `dead` in chunks, showing progress: a bar on a terminal, a line per
/// chunk otherwise. Each chunk names its ids, so dead letters that arrive meanwhile stay.
async fn settle_listed(
    bus: &Bus,
    target: &Target,
    dead: Vec<DeadLetter>,
    action: Action,
) -> Outcome {
    let total = dead.len();
    let chunk = (total / 20).max(25);
    let bar = interactive().then(|| {
        let bar = ProgressBar::new(total as u64);
        if let Ok(style) = ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}") {
            bar.set_style(style);
        }
        bar.set_message(action.done());
        bar
    });
    let mut done = 0usize;
    for ids in dead.chunks(chunk) {
        let selection =
            RedriveSelection::Ids(ids.iter().map(|d| d.message.id.to_string()).collect());
        let moved = match action {
            Action::Redrive => {
                bus.redrive_selected(&target.topic, &target.group, selection)
                    .await
            }
            Action::Purge => {
                bus.purge_dead_letters(&target.topic, &target.group, selection)
                    .await
            }
        };
        let moved = match moved {
            Ok(moved) => moved,
            Err(e) => {
                if let Some(bar) = &bar {
                    bar.abandon();
                }
                let failure = Failure::from(e);
                return Err(Failure::new(
                    failure.code,
                    format!(
                        "{} (after {done} of {total} {})",
                        failure.message,
                        action.done()
                    ),
                ));
            }
        };
        done += moved;
        match &bar {
            Some(bar) => bar.set_position(done as u64),
            None if total > chunk => eprintln!("{} {done}/{total}", action.done()),
            None => {}
        }
    }
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    println!(
        "{} {done} dead letter(s) of group {:?} on topic {:?}",
        action.done(),
        target.group,
        target.topic
    );
    Ok(())
}
