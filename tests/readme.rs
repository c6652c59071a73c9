//! The README's first screen is what a new user copies and what a new contributor runs: keep it
//! true. The quick start must be `examples/quick_start.rs` (which CI compiles), its dependency
//! lines must name what that example needs, and the two repository commands must follow it.

const README: &str = include_str!("../README.md");
const QUICK_START_FILE: &str = include_str!("../examples/quick_start.rs");

/// The example without its doc comment, which the README leaves out.
fn quick_start() -> String {
    QUICK_START_FILE
        .lines()
        .skip_while(|line| line.starts_with("//!"))
        .map(|line| format!("{line}\n"))
        .collect()
}

/// The body of the first fenced block of `language`, and the line it starts on.
fn first_block(language: &str) -> Option<(usize, String)> {
    let fence = format!("```{language}");
    let mut lines = README.lines().enumerate();
    let (start, _) = lines.find(|(_, line)| line.trim_end() == fence)?;
    let body: Vec<&str> = lines
        .take_while(|(_, line)| line.trim_end() != "```")
        .map(|(_, line)| line)
        .collect();
    Some((start + 1, body.join("\n") + "\n"))
}

#[test]
fn the_quick_start_is_the_example_that_ci_compiles() {
    let (_, rust) = first_block("rust").expect("a rust block in the README");
    assert_eq!(
        rust,
        quick_start(),
        "the README's quick start and examples/quick_start.rs differ: copy one onto the other"
    );
}

#[test]
fn the_dependency_lines_name_what_the_quick_start_uses() {
    let (_, toml) = first_block("toml").expect("a toml block in the README");
    assert!(toml.starts_with("[dependencies]\n"), "{toml}");
    assert!(toml.contains("busbar = { path = "), "{toml}");
    assert!(
        toml.contains(
            "tokio = { version = \"1\", features = [\"macros\", \"rt-multi-thread\", \"signal\"] }"
        ),
        "{toml}"
    );
    assert!(
        toml.contains("serde = { version = \"1\", features = [\"derive\"] }"),
        "{toml}"
    );
    for used in [
        "tokio::main",
        "tokio::signal::ctrl_c",
        "serde::{Deserialize, Serialize}",
    ] {
        assert!(quick_start().contains(used), "{used}");
    }
}

#[test]
fn the_two_repository_commands_follow_on_the_first_screen() {
    let (rust_at, _) = first_block("rust").expect("a rust block");
    let line_of = |text: &str| README.lines().position(|line| line.starts_with(text));
    let example = line_of("cargo run --example order_flow").expect("the example command");
    let tests = line_of("scripts/test.sh").expect("the test command");
    assert!(
        rust_at < example && example < tests,
        "quick start, then the two commands"
    );
    assert!(
        tests < 60,
        "the test command is on line {}, past the first screen",
        tests + 1
    );
    let ci = include_str!("../.ci/run");
    assert!(
        ci.contains("bash scripts/test.sh"),
        ".ci/run runs the README's test command"
    );
}
