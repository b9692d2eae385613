//! The binary's log output: plain text without colour codes when stderr is not a terminal, and
//! one JSON object a line with `--log-format json` (or `LOG_FORMAT=json`).

#![allow(clippy::unwrap_used)] // a panic in a test helper is a test failure

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Starts the binary with `args` and `envs`, stderr piped (so not a terminal), and returns its
/// log lines up to and including the "listening" one; the process is killed after.
fn log_lines_until_listening(args: &[&str], envs: &[(&str, &str)]) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("behavior.csv");
    std::fs::write(&csv, "user_id,item_id,timestamp\nalice,a,1\n").unwrap();
    // From an empty directory, where its .env lookup starts.
    let mut child = testkit::process::isolated(env!("CARGO_BIN_EXE_ingest-api"), dir.path())
        .args(["--bind", "127.0.0.1:0", "--brokers", "127.0.0.1:1"])
        .arg("--behavior-csv")
        .arg(&csv)
        .args(args)
        .envs(envs.iter().copied())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = testkit::process::stderr_lines(&mut child);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    let result = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                let done = line.contains("listening");
                seen.push(line);
                if done {
                    break Ok(());
                }
            }
            Err(error) => break Err(error),
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    result.unwrap_or_else(|e| panic!("no \"listening\" line within 30 s ({e}): {seen:#?}"));
    seen
}

#[test]
fn text_logs_have_no_colour_codes_when_stderr_is_not_a_terminal() {
    let lines = log_lines_until_listening(&[], &[]);
    assert!(lines.len() >= 2, "{lines:#?}");
    for line in &lines {
        assert!(!line.contains('\x1b'), "escape code in {line:?}");
        assert!(
            serde_json::from_str::<Value>(line).is_err(),
            "JSON by default: {line}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("INFO") && l.contains("loaded behaviour data")),
        "{lines:#?}"
    );
}

#[test]
fn json_logs_are_one_object_a_line() {
    for (args, envs) in [
        (&["--log-format", "json"][..], &[][..]),
        (&[][..], &[("LOG_FORMAT", "json")][..]),
    ] {
        let lines = log_lines_until_listening(args, envs);
        for line in &lines {
            let object: Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            assert!(object["timestamp"].is_string(), "{line}");
            assert!(object["level"].is_string(), "{line}");
            assert!(object["message"].is_string(), "{line}");
        }
        let loaded = lines
            .iter()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .find(|o| o["message"] == "loaded behaviour data")
            .unwrap_or_else(|| panic!("{lines:#?}"));
        // Fields sit next to the message, not in a nested object.
        assert_eq!(loaded["level"], "INFO");
        assert_eq!(loaded["users"], 1);
        assert_eq!(loaded["rows"], 1);
    }
}
