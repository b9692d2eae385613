//! Running the project's binaries in tests: from a directory of the test's own, with none of
//! the settings the test's environment may carry, and their stderr read on a thread.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex, MutexGuard};

/// The environment variables of the settings both binaries share: a test that runs a binary
/// must not pick them from the developer's shell or from `scripts/test.sh`.
pub const SHARED_SETTINGS: &[&str] = &[
    "LOG_FORMAT",
    "KAFKA_CONFIG_FILE",
    "REDIS_URL",
    "KAFKA_BROKER",
    "KAFKA_TOPIC",
];

/// A command for `binary`, run from `dir` (where its `.env` lookup starts: give it an empty
/// one), without the [`SHARED_SETTINGS`] of the test's environment, `RUST_LOG=info`, no stdin
/// and stdout discarded. The caller says where stderr goes.
pub fn isolated(binary: &str, dir: &Path) -> Command {
    let mut command = Command::new(binary);
    for name in SHARED_SETTINGS {
        command.env_remove(name);
    }
    command
        .env("RUST_LOG", "info")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    command
}

/// How a run of a binary ended ([`run_to_exit`]).
#[derive(Debug)]
pub struct Exited {
    /// Whether it exited with status 0 (a run killed at the deadline did not).
    pub success: bool,
    /// Whether it was killed at the deadline instead of exiting.
    pub timed_out: bool,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

/// Runs `command` until it exits, or kills it after `timeout`: for a start-up check, whose
/// run ends at once with an error, while a run that got past the checks would go on
/// forever. Stderr is piped here and read on a thread, so that a chatty child never blocks.
pub fn run_to_exit(mut command: Command, timeout: std::time::Duration) -> Exited {
    let mut child = command
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let mut pipe = child.stderr.take().expect("stderr is piped");
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut pipe, &mut text);
        let _ = sender.send(text);
    });
    // Stderr closes when the child exits.
    let (stderr, timed_out) = match receiver.recv_timeout(timeout) {
        Ok(text) => (text, false),
        Err(_) => {
            let _ = child.kill();
            (receiver.recv().unwrap_or_default(), true)
        }
    };
    let status = child.wait().expect("the binary is waited for");
    Exited {
        success: status.success() && !timed_out,
        timed_out,
        stderr,
    }
}

/// Writes a timely hostfile at `path` for `processes` processes on this machine, each on a
/// port free when asked, for a multi-process dataflow (`-n`, `-p`, `-h`).
pub fn local_hostfile(path: &Path, processes: usize) {
    let hosts: String = (0..processes)
        .map(|_| format!("127.0.0.1:{}\n", crate::free_port()))
        .collect();
    std::fs::write(path, hosts).expect("the hostfile is written");
}

/// The lines of `child`'s piped stderr, as they come, read on a thread of their own so that
/// the child never blocks on a full pipe.
pub fn stderr_lines(child: &mut Child) -> Receiver<String> {
    let stderr = child.stderr.take().expect("stderr was not piped");
    let (sender, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    lines
}

/// The JSON values a binary printed on stdout (the dataflow's `--stats-json` lines), collected
/// on a thread of their own as they come; other lines are skipped.
#[derive(Debug, Clone, Default)]
pub struct JsonLines {
    values: Arc<Mutex<Vec<serde_json::Value>>>,
    /// Set once stdout is closed and every line of it collected.
    ended: Arc<AtomicBool>,
}

impl JsonLines {
    /// Collects the JSON lines of `child`'s piped stdout.
    pub fn from_stdout(child: &mut Child) -> Self {
        let stdout = child.stdout.take().expect("stdout was not piped");
        let lines = JsonLines::default();
        let sink = lines.values.clone();
        let ended = lines.ended.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(value) = serde_json::from_str(&line) {
                    sink.lock().unwrap_or_else(|e| e.into_inner()).push(value);
                }
            }
            ended.store(true, Ordering::Release);
        });
        lines
    }

    /// Waits until the binary's stdout is closed (it exited) and every line is collected, at
    /// most `timeout`; returns whether it is. After an exit, totals are then final.
    pub fn wait_for_end(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while !self.ended.load(Ordering::Acquire) {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        true
    }

    /// The values collected so far.
    pub fn values(&self) -> MutexGuard<'_, Vec<serde_json::Value>> {
        self.values.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The sum of `field` over the values collected so far (for the dataflow's stats lines: the
    /// epochs reported, each once its output is durable in Redis).
    pub fn total(&self, field: &str) -> u64 {
        self.values().iter().filter_map(|v| v[field].as_u64()).sum()
    }
}

/// What one dataflow run of a test reads and writes: its broker, topics, consumer group, Redis
/// and features file.
#[derive(Debug, Clone, Copy)]
pub struct DataflowRun<'a> {
    pub brokers: &'a str,
    pub topic: &'a str,
    pub item_topic: &'a str,
    pub dlq_topic: &'a str,
    pub group: &'a str,
    pub redis: &'a str,
    pub item_features: &'a Path,
}

impl DataflowRun<'_> {
    /// The dataflow's flags that name them, with epochs of `epoch_ms` and the per-epoch
    /// statistics as JSON lines on stdout; a test adds its own flags after these.
    pub fn args(&self, epoch_ms: u64) -> Vec<String> {
        [
            "--brokers",
            self.brokers,
            "--topic",
            self.topic,
            "--item-topic",
            self.item_topic,
            "--dlq-topic",
            self.dlq_topic,
            "--group",
            self.group,
            "--redis",
            self.redis,
            "--item-features",
            &self.item_features.display().to_string(),
            "--epoch-ms",
            &epoch_ms.to_string(),
            "--stats-json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}
