//! The binary's log output: plain text without colour codes when stderr is not a terminal, and
//! one JSON object a line with `--log-format json` (or `LOG_FORMAT=json`). Needs neither Kafka
//! nor Redis: the run loads an item-features file with a bad row (a WARN and an INFO line), then
//! fails at once on a Redis that refuses connections, before it touches Kafka.

#![allow(clippy::unwrap_used)] // a panic in a test helper is a test failure

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

/// Runs the binary with `args` and `envs`, stderr piped (so not a terminal), until it exits, and
/// returns its stderr as lines. Stdout must stay empty: no epoch ran, and logs are not stats.
fn stderr_lines(args: &[&str], envs: &[(&str, &str)]) -> Vec<String> {
    let dir = TempDir::new();
    let features = dir.0.join("item_features.csv");
    std::fs::write(&features, "item_id,f0,f1\na,1,2\nb,x,2\n").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_dataflow"))
        // Port 1: nothing listens, so the connection is refused at once.
        .args([
            "--redis",
            "redis://127.0.0.1:1/0",
            "--brokers",
            "127.0.0.1:1",
        ])
        .arg("--item-features")
        .arg(&features)
        .args(args)
        // The test's own environment must not pick the format or the filter.
        .env_remove("LOG_FORMAT")
        .env("RUST_LOG", "info")
        .envs(envs.iter().copied())
        // Its .env lookup starts here: an empty directory but for the features file.
        .current_dir(&dir.0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = read_all(child.stdout.take().unwrap());
    let stderr = read_all(child.stderr.take().unwrap());
    let outcome = stderr.recv_timeout(Duration::from_secs(60));
    if outcome.is_err() {
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    let err = outcome.unwrap_or_else(|e| panic!("the dataflow did not exit within 60 s ({e})"));
    let out = stdout.recv().unwrap();
    assert!(!status.success(), "a refused Redis is a failure: {err}");
    assert_eq!(out, "", "stdout holds statistics only");
    err.lines().map(str::to_owned).collect()
}

/// Reads `pipe` to its end on a thread of its own, so that neither pipe can fill and block the
/// process while the other is read.
fn read_all(mut pipe: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        pipe.read_to_string(&mut text).unwrap();
        let _ = sender.send(text);
    });
    receiver
}

/// A fresh directory under the system's temporary one, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "streamrec-dataflow-logs-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The lines before the process's final error report (`Error: ...` from `main`'s result, which
/// is printed by the runtime, not logged). There must be one: the run failed.
fn log_lines(lines: &[String]) -> &[String] {
    let end = lines
        .iter()
        .position(|l| l.starts_with("Error: "))
        .unwrap_or_else(|| panic!("no final error: {lines:#?}"));
    &lines[..end]
}

#[test]
fn text_logs_have_no_colour_codes_when_stderr_is_not_a_terminal() {
    let lines = stderr_lines(&[], &[]);
    for line in &lines {
        assert!(!line.contains('\x1b'), "escape code in {line:?}");
    }
    let logs = log_lines(&lines);
    for line in logs {
        assert!(
            serde_json::from_str::<Value>(line).is_err(),
            "JSON by default: {line}"
        );
    }
    assert!(
        logs.iter()
            .any(|l| l.contains("WARN") && l.contains("skipping item features row")),
        "{lines:#?}"
    );
    assert!(
        logs.iter()
            .any(|l| l.contains("INFO") && l.contains("loaded item features")),
        "{lines:#?}"
    );
}

#[test]
fn json_logs_are_one_object_a_line() {
    for (args, envs) in [
        (&["--log-format", "json"][..], &[][..]),
        (&[][..], &[("LOG_FORMAT", "json")][..]),
    ] {
        let lines = stderr_lines(args, envs);
        let logs = log_lines(&lines);
        let objects: Vec<Value> = logs
            .iter()
            .map(|line| {
                let object: Value =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                assert!(object.is_object(), "{line}");
                assert!(object["timestamp"].is_string(), "{line}");
                assert!(object["level"].is_string(), "{line}");
                assert!(object["message"].is_string(), "{line}");
                object
            })
            .collect();
        let skipped = objects
            .iter()
            .find(|o| o["message"] == "skipping item features row that does not parse")
            .unwrap_or_else(|| panic!("{lines:#?}"));
        assert_eq!(skipped["level"], "WARN");
        assert_eq!(skipped["row"], 3);
        let loaded = objects
            .iter()
            .find(|o| o["message"] == "loaded item features")
            .unwrap_or_else(|| panic!("{lines:#?}"));
        // Fields sit next to the message, not in a nested object.
        assert_eq!(loaded["level"], "INFO");
        assert_eq!(loaded["items"], 1);
        assert_eq!(loaded["bad_rows"], 1);
    }
}

#[test]
fn a_bad_log_format_is_refused_by_name() {
    let output = Command::new(env!("CARGO_BIN_EXE_dataflow"))
        .args(["--log-format", "xml"])
        .env_remove("LOG_FORMAT")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--log-format") && stderr.contains("xml"),
        "{stderr}"
    );
}
