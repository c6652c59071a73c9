//! The built `busbar` binary, run as a subprocess against RabbitMQ, Kafka (Tansu) and SQS
//! (LocalStack), started by `scripts/local-brokers.sh`: declare, publish from standard input,
//! tail (`--json` parsed back), dead letters from a failing consumer listed with their reason,
//! one redriven by id and handled, the rest purged, and `check` failing clearly. A tail's
//! temporary group is gone after it stops, by `--count` or by a signal.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use busbar::{Bus, Context, Envelope, Event, HandlerError};
use busbar_testkit::conformance::{reachable, unique, wait_for, wait_limit};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

const RABBITMQ: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const KAFKA: &str = "kafka://127.0.0.1:9092?session_timeout_ms=6000";
const SQS: &str = "sqs://?endpoint=http://127.0.0.1:4566&region=us-east-1&access_key_id=test&secret_access_key=test&wait_time_s=1&visibility_timeout_s=10";

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    n: u64,
}

impl Event for Order {
    const TYPE: &'static str = "demo.order.v1";
}

/// What a finished run of the tool printed, and its exit code.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn busbar(url: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_busbar"));
    command
        .env("BUSBAR_URL", url)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

async fn finish(child: Child, what: &str) -> Run {
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("`busbar {what}` did not finish in 120 s"))
        .expect("run busbar");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn run(url: &str, args: &[&str], stdin: Option<&str>) -> Run {
    let mut command = busbar(url);
    command.args(args);
    if stdin.is_some() {
        command.stdin(Stdio::piped());
    }
    let mut child = command.spawn().expect("start busbar");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(input.as_bytes()).await.expect("write stdin");
        drop(pipe);
    }
    finish(child, &args.join(" ")).await
}

async fn ok(url: &str, args: &[&str], stdin: Option<&str>) -> Run {
    let run = run(url, args, stdin).await;
    assert_eq!(
        run.code,
        0,
        "`busbar {}` failed: {}{}",
        args.join(" "),
        run.stdout,
        run.stderr
    );
    run
}

/// Asserts the run failed with exit `code` and said `says` on standard error.
fn fails_with(run: &Run, code: i32, says: &str) {
    assert_eq!(run.code, code, "{}", run.stderr);
    assert!(
        run.stderr.contains(says),
        "{:?} not in: {}",
        says,
        run.stderr
    );
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Starts `busbar tail TOPIC --json --count N` and returns it once it follows the topic, with
/// the name of its temporary group.
async fn start_tail(url: &str, topic: &str, count: usize) -> (Child, String) {
    let mut child = busbar(url)
        .args(["tail", topic, "--json", "--count", &count.to_string()])
        .spawn()
        .expect("start busbar tail");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let line = tokio::time::timeout(wait_limit(), lines.next_line())
        .await
        .expect("the tail says it follows the topic in time")
        .expect("read stderr")
        .expect("a line on stderr");
    assert!(line.starts_with("following"), "unexpected: {line}");
    let group = line
        .split('"')
        .nth(3)
        .expect("the temporary group's name")
        .to_string();
    // Keep draining stderr so the tail never blocks on it.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, group)
}

async fn scenario(url: &str) {
    let Some(bus) = reachable(busbar::connect(url).await) else {
        return;
    };
    let (topic, group) = (unique("cli"), unique("orders"));

    // A group never declared has no dead letters, on every broker, and listing creates nothing.
    let never = unique("never");
    let listed = ok(url, &["dlq", "list", &topic, &never, "--json"], None).await;
    assert!(listed.stdout.trim().is_empty(), "{}", listed.stdout);
    assert!(
        listed.stderr.is_empty(),
        "nothing logged: {}",
        listed.stderr
    );

    let check = ok(url, &["check"], None).await;
    assert!(
        check.stdout.contains(bus.transport().name()),
        "{}",
        check.stdout
    );
    assert!(check.stdout.contains("round trip"), "{}", check.stdout);

    ok(url, &["declare", &topic, &group], None).await;

    // Publish three from standard input while a tail follows the topic.
    let (tail, temporary) = start_tail(url, &topic, 3).await;
    let input = "{\"n\":0}\n{\"n\":1}\n\n{\"n\":2}\n";
    let published = ok(
        url,
        &[
            "publish",
            &topic,
            "--type",
            Order::TYPE,
            "--key",
            "k1",
            "--header",
            "tenant=acme",
        ],
        Some(input),
    )
    .await;
    let ids: Vec<String> = published.stdout.lines().map(str::to_string).collect();
    assert_eq!(
        ids.len(),
        3,
        "one id per line of input: {}",
        published.stdout
    );

    let mut tail = tail;
    let mut stdout = tail.stdout.take().expect("tail stdout");
    let status = tokio::time::timeout(wait_limit(), tail.wait())
        .await
        .expect("the tail stops after --count events")
        .expect("wait for the tail");
    let mut tailed = String::new();
    stdout
        .read_to_string(&mut tailed)
        .await
        .expect("read the tail");
    assert!(status.success(), "tail failed: {tailed}");
    let events = json_lines(&tailed);
    let mut tailed_ids: Vec<&str> = events.iter().filter_map(|e| e["id"].as_str()).collect();
    if bus.capabilities().ordered_by_key {
        assert_eq!(
            tailed_ids, ids,
            "the tail shows the published events in order"
        );
    } else {
        // A standard SQS queue does not keep order, keyed or not: each event, once.
        let mut sorted_ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        sorted_ids.sort_unstable();
        tailed_ids.sort_unstable();
        assert_eq!(
            tailed_ids, sorted_ids,
            "the tail shows each published event once"
        );
    }
    for event in &events {
        // The n-th line published is the event with the n-th id.
        let n = ids
            .iter()
            .position(|id| event["id"] == id.as_str())
            .expect("a published id");
        assert_eq!(event["type"], Order::TYPE);
        assert_eq!(event["data"]["n"], n as u64);
        assert_eq!(event["partitionkey"], "k1");
        assert_eq!(event["headers"]["tenant"], "acme");
        assert_eq!(event["specversion"], "1.0");
    }
    assert_group_removed(&bus, &topic, &temporary).await;

    // Stopped by a signal (Ctrl-C, or SIGTERM from a supervisor), a tail removes its group too.
    let (mut stopped, temporary) = start_tail(url, &topic, 1000).await;
    let pid = stopped.id().expect("the tail's pid").to_string();
    let sent = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("run kill");
    assert!(sent.success());
    let status = tokio::time::timeout(wait_limit(), stopped.wait())
        .await
        .expect("the tail stops on SIGINT")
        .expect("wait for the tail");
    assert!(
        status.success(),
        "a tail stopped by Ctrl-C exits with 0: {status}"
    );
    assert_group_removed(&bus, &topic, &temporary).await;

    // A consumer that rejects every order dead-letters the three.
    let failing = bus
        .subscribe::<Order>(&topic, &group)
        .start(|_: Envelope<Order>, _: Context| async {
            Err(HandlerError::permanent("card declined by the test"))
        })
        .await
        .expect("subscribe");
    wait_for("three dead letters", || failing.stats().dead_lettered == 3).await;
    failing
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");

    let listed = ok(url, &["dlq", "list", &topic, &group, "--json"], None).await;
    let dead = json_lines(&listed.stdout);
    let mut dead_ids: Vec<&str> = dead.iter().filter_map(|d| d["id"].as_str()).collect();
    dead_ids.sort_unstable();
    let mut expected: Vec<&str> = ids.iter().map(String::as_str).collect();
    expected.sort_unstable();
    assert_eq!(dead_ids, expected, "{}", listed.stdout);
    for d in &dead {
        assert_eq!(d["reason"], "permanent_error", "{d}");
        assert_eq!(d["type"], Order::TYPE, "{d}");
        assert!(
            d["error"]
                .as_str()
                .unwrap_or_default()
                .contains("card declined by the test"),
            "{d}"
        );
    }
    let table = ok(url, &["dlq", "list", &topic, &group], None).await;
    assert!(
        table.stdout.contains("permanent_error") && table.stdout.contains("card declined"),
        "{}",
        table.stdout
    );

    // Redrive only the first; a healthy consumer handles it and nothing else.
    let missing = run(
        url,
        &["dlq", "redrive", &topic, &group, "--id", "no-such-id"],
        None,
    )
    .await;
    fails_with(&missing, 1, "no-such-id");
    let redriven = ok(
        url,
        &["dlq", "redrive", &topic, &group, "--id", &ids[0]],
        None,
    )
    .await;
    assert!(
        redriven.stdout.contains("redriven 1"),
        "{}",
        redriven.stdout
    );
    let handled = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = Arc::clone(&handled);
    let healthy = bus
        .subscribe::<Order>(&topic, &group)
        .start(move |order: Envelope<Order>, _: Context| {
            seen.lock().unwrap().push(order.id.to_string());
            async { Ok(()) }
        })
        .await
        .expect("subscribe");
    wait_for("the redriven order handled", || {
        handled.lock().unwrap().contains(&ids[0])
    })
    .await;
    let left = ok(url, &["dlq", "list", &topic, &group, "--json"], None).await;
    let mut left_ids: Vec<String> = json_lines(&left.stdout)
        .iter()
        .filter_map(|d| d["id"].as_str().map(str::to_string))
        .collect();
    left_ids.sort_unstable();
    let mut others = vec![ids[1].clone(), ids[2].clone()];
    others.sort_unstable();
    assert_eq!(left_ids, others, "only the chosen one left the DLQ");

    // Purge asks first; without a terminal or --yes it refuses and deletes nothing.
    let refused = run(url, &["dlq", "purge", &topic, &group], None).await;
    fails_with(&refused, 2, "--yes");
    let still = ok(url, &["dlq", "list", &topic, &group, "--json"], None).await;
    assert_eq!(
        json_lines(&still.stdout).len(),
        2,
        "a refused purge deletes nothing"
    );
    let purged = ok(url, &["dlq", "purge", &topic, &group, "--yes"], None).await;
    assert!(purged.stdout.contains("purged 2"), "{}", purged.stdout);
    let empty = ok(url, &["dlq", "list", &topic, &group, "--json"], None).await;
    assert!(empty.stdout.trim().is_empty(), "{}", empty.stdout);
    assert_eq!(
        handled.lock().unwrap().as_slice(),
        [ids[0].clone()],
        "purged dead letters are never handled"
    );
    healthy
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");

    // A line that is not JSON: what came before is published, the tool says which line.
    let bad = run(
        url,
        &["publish", &topic, "--type", Order::TYPE],
        Some("{\"n\":9}\n{oops\n"),
    )
    .await;
    fails_with(&bad, 65, "line 2 is not JSON");
    assert_eq!(
        bad.stdout.lines().count(),
        1,
        "the first line was published"
    );
    let _ = bus.close().await;
}

/// The tail's temporary group is gone once it exits.
async fn assert_group_removed(bus: &Bus, topic: &str, group: &str) {
    match bus.transport().name() {
        // The group's queues no longer exist.
        "rabbitmq" | "sqs" => {
            let depth = bus.depth(topic, group).await;
            assert!(
                depth.is_err(),
                "the temporary group {group:?} is still there: {depth:?}"
            );
        }
        // Kafka keeps no queue per group; its offsets were deleted with it (checked by the
        // conformance suite's temporary-group scenario).
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_rabbitmq() {
    scenario(RABBITMQ).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kafka() {
    scenario(KAFKA).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqs() {
    scenario(SQS).await;
}

#[tokio::test]
async fn check_fails_clearly_on_a_wrong_url() {
    let unreachable = run("amqp://guest:secret-pw@127.0.0.1:1/%2f", &["check"], None).await;
    fails_with(&unreachable, 69, "127.0.0.1:1");
    assert!(
        !unreachable.stderr.contains("secret-pw"),
        "the password is never printed"
    );
    assert!(unreachable.stdout.is_empty());

    let unknown = run("rabbit://127.0.0.1", &["check"], None).await;
    fails_with(&unknown, 2, "unknown URL scheme `rabbit`");

    let mut command = busbar("unused");
    command.env_remove("BUSBAR_URL").arg("check");
    let none = finish(command.spawn().expect("start"), "check").await;
    fails_with(&none, 2, "--url or set BUSBAR_URL");
}

#[tokio::test]
async fn check_round_trips_on_memory_and_help_names_every_command() {
    let check = run("memory://", &["check"], None).await;
    assert_eq!(check.code, 0, "{}", check.stderr);
    assert!(
        check.stdout.contains("transport     memory"),
        "{}",
        check.stdout
    );
    let help = run("memory://", &["--help"], None).await;
    for command in ["check", "declare", "publish", "tail", "dlq", "completions"] {
        assert!(
            help.stdout.contains(command),
            "{command} missing from --help"
        );
    }
    let completions = run("memory://", &["completions", "bash"], None).await;
    assert_eq!(completions.code, 0, "{}", completions.stderr);
    assert!(
        completions.stdout.contains("_busbar()"),
        "a bash completion function"
    );
    let bad = run(
        "memory://",
        &["publish", "t", "--type", "x", "--header", "novalue"],
        None,
    )
    .await;
    fails_with(&bad, 2, "expected NAME=VALUE");
}

/// A redrive of more dead letters than one chunk reports its progress: plain lines on
/// standard error when that is not a terminal (a bar when it is).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_redrive_reports_progress_without_a_terminal() {
    let Some(bus) = reachable(busbar::connect(RABBITMQ).await) else {
        return;
    };
    let (topic, group) = (unique("cli-progress"), unique("g"));
    let failing = bus
        .subscribe::<Order>(&topic, &group)
        .start(|_: Envelope<Order>, _: Context| async {
            Err(HandlerError::permanent("rejected by the test"))
        })
        .await
        .expect("subscribe");
    bus.publish_batch(&topic, (0..60).map(|n| Order { n }))
        .await
        .expect("publish");
    wait_for("sixty dead letters", || failing.stats().dead_lettered == 60).await;
    failing
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
    let redriven = ok(RABBITMQ, &["dlq", "redrive", &topic, &group], None).await;
    assert!(
        redriven.stdout.contains("redriven 60"),
        "{}",
        redriven.stdout
    );
    let progress: Vec<&str> = redriven.stderr.lines().collect();
    assert_eq!(
        progress,
        ["redriven 25/60", "redriven 50/60", "redriven 60/60"],
        "{}",
        redriven.stderr
    );
    let _ = bus.close().await;
}
