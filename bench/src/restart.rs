//! The restart measurement (`bench-restart`): how long a restart takes before a new message is
//! in Redis, with checkpoints and without, as the topic retains more history for the same
//! users.
//!
//! For each retention (the workload once, then `factor` times over with later timestamps, so
//! the same users with the same state size) and each mode: a fresh topic is preloaded, a first
//! dataflow run reads it all and stops with SIGTERM (with checkpoints, its shutdown writes
//! one), then a second run of the same group is launched and a message for a user no run has
//! seen is sent at once; the restart time is from that launch until Redis holds the user's
//! profile. Both runs log JSON, from which the checkpoint's size and write time are read.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

/// One dataflow process of the measurement, with its stats and its log collected on threads.
#[derive(Debug)]
pub struct Run {
    child: Child,
    messages: Arc<Mutex<u64>>,
    log: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Run {
    /// Launches `binary` with `args`, `--stats-json` and JSON logs at info level.
    pub fn launch(binary: &Path, args: &[String]) -> anyhow::Result<Self> {
        let mut child = Command::new(binary)
            .args(args)
            .arg("--stats-json")
            .env("RUST_LOG", "info")
            .env("LOG_FORMAT", "json")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("launching {}", binary.display()))?;
        let messages = Arc::new(Mutex::new(0));
        let log = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().context("no stdout")?;
        let stderr = child.stderr.take().context("no stderr")?;
        let counted = messages.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(stat) = serde_json::from_str::<serde_json::Value>(&line) {
                    let read = stat["messages"].as_u64().unwrap_or(0);
                    *counted.lock().unwrap_or_else(|e| e.into_inner()) += read;
                }
            }
        });
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(value) = serde_json::from_str(&line) {
                    lines.lock().unwrap_or_else(|e| e.into_inner()).push(value);
                }
            }
        });
        Ok(Run {
            child,
            messages,
            log,
        })
    }

    /// Messages read so far, as the stats lines report them (each once its epoch is durable).
    pub fn messages(&self) -> u64 {
        *self.messages.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until the run has reported `expected` messages, at most `timeout`.
    pub fn wait_for_messages(&mut self, expected: u64, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while self.messages() < expected {
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!("the dataflow exited early ({status}): {}", self.errors());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the dataflow reported {} of {expected} messages in {timeout:?}",
                self.messages()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Every log line (its fields are flattened beside `message`) whose message starts with
    /// `message`.
    pub fn logged(&self, message: &str) -> Vec<serde_json::Value> {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|line| {
                line["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(message))
            })
            .cloned()
            .collect()
    }

    /// The messages of the error and warning lines, for a failure's report.
    fn errors(&self) -> String {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|line| matches!(line["level"].as_str(), Some("ERROR" | "WARN")))
            .map(|line| line.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// SIGTERM, and waits for the exit (after the shutdown's checkpoint).
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        let status = self.child.wait()?;
        anyhow::ensure!(
            status.success(),
            "the dataflow exited with {status}: {}",
            self.errors()
        );
        // The log's last lines (the shutdown's checkpoint) come as the pipe closes.
        std::thread::sleep(Duration::from_millis(100));
        Ok(())
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one restart measured.
#[derive(Debug, Clone, Serialize)]
pub struct Restart {
    /// Messages the topic held for the users.
    pub retained: u64,
    pub checkpoints: bool,
    /// From the launch of the second run until Redis held the new user's profile.
    pub restart_seconds: f64,
    /// Messages the second run replayed, over all workers.
    pub replayed: u64,
    /// The first run's shutdown checkpoint: its bytes over all workers' files, and the
    /// slowest worker's times to read the state (on its thread) and to write the file.
    pub checkpoint_bytes: Option<u64>,
    pub checkpoint_users: Option<u64>,
    pub checkpoint_read_ms: Option<f64>,
    pub checkpoint_write_ms: Option<f64>,
}

/// The greatest value of a numeric field over `lines`, and the sum of another.
fn max_of(lines: &[serde_json::Value], field: &str) -> Option<f64> {
    lines
        .iter()
        .filter_map(|line| line[field].as_f64())
        .reduce(f64::max)
}

fn sum_of(lines: &[serde_json::Value], field: &str) -> Option<u64> {
    let values: Vec<u64> = lines
        .iter()
        .filter_map(|line| line[field].as_u64())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// How to run the dataflow for one measurement.
#[derive(Debug, Clone)]
pub struct Setup {
    pub binary: PathBuf,
    /// The dataflow's flags, less the topic, group and checkpoint settings.
    pub args: Vec<String>,
    pub redis: String,
    pub brokers: String,
    pub timeout: Duration,
}

impl Setup {
    fn args(&self, topic: &str, checkpoints: bool, dir: &Path) -> Vec<String> {
        let mut args = self.args.clone();
        args.extend(
            [
                "--topic",
                topic,
                "--group",
                &format!("{topic}-group"),
                "--checkpoints",
                if checkpoints { "on" } else { "off" },
                "--checkpoint-dir",
                &dir.display().to_string(),
            ]
            .map(str::to_owned),
        );
        args
    }

    /// Preloaded `topic` with `messages` messages: one run reads it all and stops, then the
    /// restart is measured.
    pub fn measure(
        &self,
        topic: &str,
        messages: u64,
        checkpoints: bool,
        dir: &Path,
    ) -> anyhow::Result<Restart> {
        let args = self.args(topic, checkpoints, dir);
        let mut first = Run::launch(&self.binary, &args)?;
        first
            .wait_for_messages(messages, self.timeout)
            .context("the first run")?;
        first.stop().context("stopping the first run")?;
        // The shutdown's checkpoint is the newest: the one with the greatest time.
        let written = first.logged("checkpoint written");
        let newest = written
            .iter()
            .filter_map(|line| line["time"].as_u64())
            .max();
        let shutdown: Vec<serde_json::Value> = written
            .into_iter()
            .filter(|line| line["time"].as_u64() == newest)
            .collect();
        drop(first);

        let user = format!("{topic}-restart-user");
        let value = profile::ProfileMessageRef {
            user_id: &user,
            history_items: &["restart-a", "restart-b"],
            timestamp: u64::from(u32::MAX),
        }
        .encode(profile::Encoding::Json);
        let mut redis = redis::Client::open(self.redis.as_str())?.get_connection()?;
        let launched = Instant::now();
        let mut second = Run::launch(&self.binary, &args)?;
        crate::broker::preload(&self.brokers, topic, &[(user.clone(), value)])?;
        let key = profile::redis_key(&user);
        loop {
            let stored: Option<String> = redis::cmd("GET").arg(&key).query(&mut redis)?;
            if stored.is_some() {
                break;
            }
            if let Some(status) = second.child.try_wait()? {
                anyhow::bail!(
                    "the restarted dataflow exited ({status}): {}",
                    second.errors()
                );
            }
            anyhow::ensure!(
                launched.elapsed() < self.timeout,
                "the restarted dataflow did not store the new user within {:?}",
                self.timeout
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let restart_seconds = launched.elapsed().as_secs_f64();
        let replayed = sum_of(&second.logged("state rebuilt"), "messages").unwrap_or(0);
        second.stop().context("stopping the restarted run")?;
        Ok(Restart {
            retained: messages,
            checkpoints,
            restart_seconds,
            replayed,
            checkpoint_bytes: sum_of(&shutdown, "bytes"),
            checkpoint_users: sum_of(&shutdown, "users"),
            checkpoint_read_ms: max_of(&shutdown, "read_ms"),
            checkpoint_write_ms: max_of(&shutdown, "write_ms"),
        })
    }
}
