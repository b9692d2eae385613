//! Where the CPU of an end-to-end run goes: the dataflow's own time and Redis's (from /proc,
//! Redis's process found through its `INFO server`) and the whole machine's (from /proc/stat),
//! per message over the end-to-end window, from the first epoch that read to the last
//! acknowledgement. On a machine whose cores the dataflow, Redis and the broker share, this
//! says which of them a faster run would have to make cheaper. A [`CpuSampler`] reads them all
//! every few ms during the run, so that the window leaves out the dataflow's start-up (loading
//! the features file), which it reports apart. It reads the dataflow's resident size with its
//! CPU time ([`ResidentOverWindow`]): the peak (`VmHWM`) is one instant, and what an epoch
//! holds for a moment cannot be told from what stays without the samples around it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use procfs::process::{Process, Stat};
use procfs::{CpuTime, CurrentSI, KernelStats};
use serde::{Deserialize, Serialize};

/// CPU seconds (user and system) process `pid` has used so far, all its threads included.
pub fn process_seconds(pid: u32) -> Option<f64> {
    let stat = Process::new(i32::try_from(pid).ok()?).ok()?.stat().ok()?;
    Some(process_busy_ticks(&stat) as f64 / procfs::ticks_per_second() as f64)
}

/// `utime` + `stime` of a process, in clock ticks.
fn process_busy_ticks(stat: &Stat) -> u64 {
    stat.utime + stat.stime
}

/// CPU seconds the whole machine has been busy so far (every core, anything but idle and
/// waiting for I/O).
pub fn machine_busy_seconds() -> Option<f64> {
    let stats = KernelStats::current().ok()?;
    Some(machine_busy_ticks(&stats.total) as f64 / procfs::ticks_per_second() as f64)
}

/// The busy ticks of the machine's total line: guest time is already counted in user and nice.
fn machine_busy_ticks(total: &CpuTime) -> u64 {
    let optional = [total.irq, total.softirq, total.steal];
    total.user + total.nice + total.system + optional.iter().flatten().sum::<u64>()
}

/// The process of the Redis server at `url`, if it runs on this machine: the `process_id` of
/// its `INFO server`, if this machine's process of that id is a Redis server.
pub fn local_redis_pid(url: &str) -> Option<u32> {
    let pid = redis_pid(url).ok()?;
    let stat = Process::new(i32::try_from(pid).ok()?).ok()?.stat().ok()?;
    stat.comm.starts_with("redis").then_some(pid)
}

/// The process id of the Redis server at `url` (`process_id` in its `INFO server`).
fn redis_pid(url: &str) -> anyhow::Result<u32> {
    let mut connection = redis::Client::open(url)
        .context("parsing the Redis URL (--redis)")?
        .get_connection()
        .context("connecting to Redis")?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query(&mut connection)
        .context("INFO server")?;
    info.lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
        .context("INFO server has no process_id")
}

/// CPU seconds used so far, and the dataflow's resident size, read at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuSample {
    /// When, in Unix milliseconds (the clock of the dataflow's epochs).
    pub at_ms: u64,
    pub dataflow: Option<f64>,
    /// The dataflow's resident memory, in kB.
    pub dataflow_rss_kb: Option<u64>,
    /// `None` also when Redis runs on another machine, whose /proc this one cannot read.
    pub redis: Option<f64>,
    pub machine: Option<f64>,
}

impl CpuSample {
    fn now(dataflow_pid: u32, redis_pid: Option<u32>) -> Self {
        let stat = i32::try_from(dataflow_pid)
            .ok()
            .and_then(|pid| Process::new(pid).ok()?.stat().ok());
        CpuSample {
            at_ms: dataflow::output::unix_millis(),
            dataflow: stat
                .as_ref()
                .map(|stat| process_busy_ticks(stat) as f64 / procfs::ticks_per_second() as f64),
            dataflow_rss_kb: stat.map(|stat| stat.rss * procfs::page_size() / 1024),
            redis: redis_pid.and_then(process_seconds),
            machine: machine_busy_seconds(),
        }
    }
}

/// How often a [`CpuSampler`] reads: a window's ends are off by at most this much.
const SAMPLE_EVERY: Duration = Duration::from_millis(10);

/// Reads a [`CpuSample`] every `SAMPLE_EVERY` (10 ms) on a thread of its own.
#[derive(Debug)]
pub struct CpuSampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<CpuSample>>,
}

impl CpuSampler {
    pub fn start(dataflow_pid: u32, redis_pid: Option<u32>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !stopped.load(Ordering::Relaxed) {
                samples.push(CpuSample::now(dataflow_pid, redis_pid));
                std::thread::sleep(SAMPLE_EVERY);
            }
            samples.push(CpuSample::now(dataflow_pid, redis_pid));
            samples
        });
        CpuSampler { stop, thread }
    }

    /// Stops sampling (while the processes still run) and returns the samples, oldest first.
    pub fn finish(self) -> Vec<CpuSample> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// The dataflow's resident size over the end-to-end window, from the samples in it: how much
/// of the peak stays and how much is a moment's.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct ResidentOverWindow {
    pub samples: usize,
    pub median_kb: u64,
    /// Exceeded by 1% of the samples.
    pub p99_kb: u64,
    pub highest_kb: u64,
}

impl ResidentOverWindow {
    /// From the samples (oldest first) taken from `start_ms` to `end_ms`; `None` without any.
    pub fn over_window(samples: &[CpuSample], start_ms: u64, end_ms: u64) -> Option<Self> {
        let mut sizes: Vec<u64> = samples
            .iter()
            .filter(|s| (start_ms..=end_ms).contains(&s.at_ms))
            .filter_map(|s| s.dataflow_rss_kb)
            .collect();
        sizes.sort_unstable();
        let at = |fraction: f64| sizes[((sizes.len() - 1) as f64 * fraction).round() as usize];
        (!sizes.is_empty()).then(|| ResidentOverWindow {
            samples: sizes.len(),
            median_kb: at(0.5),
            p99_kb: at(0.99),
            highest_kb: at(1.0),
        })
    }

    /// One line for the summary.
    pub fn render(&self) -> String {
        let gb = |kb: u64| kb as f64 / 1_000_000.0;
        format!(
            "  dataflow resident over the end-to-end window ({} samples, {} ms apart): median \
             {:.2} GB, 99th percentile {:.2} GB, highest {:.2} GB",
            self.samples,
            SAMPLE_EVERY.as_millis(),
            gb(self.median_kb),
            gb(self.p99_kb),
            gb(self.highest_kb)
        )
    }
}

/// `value` formatted, or `?` where it could not be measured.
fn known(value: Option<f64>, format: impl Fn(f64) -> String) -> String {
    value.map_or_else(|| "?".to_owned(), format)
}

/// A figure in µs, to 0.1, or `?`.
fn us(value: Option<f64>) -> String {
    known(value, |v| format!("{v:.1}"))
}

/// CPU per message over the end-to-end window, in µs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CpuPerMessage {
    /// The dataflow process, all its threads.
    pub dataflow_us: Option<f64>,
    /// The Redis server.
    pub redis_us: Option<f64>,
    /// Everything else that ran on the machine meanwhile: the broker (when it runs here), this
    /// tool and the system.
    pub rest_us: Option<f64>,
    /// The dataflow's CPU seconds before the window: its start-up, mostly loading the features
    /// file, which the window leaves out.
    pub dataflow_startup_s: Option<f64>,
}

impl CpuPerMessage {
    /// Per message of `messages`, over the window from `start_ms` to `end_ms`, from `samples`
    /// (oldest first): from the last sample at or before the start to the first at or after
    /// the end, so that the window, if anything, holds a little more CPU than it should.
    pub fn over_window(messages: u64, samples: &[CpuSample], start_ms: u64, end_ms: u64) -> Self {
        let first = samples
            .iter()
            .rev()
            .find(|s| s.at_ms <= start_ms)
            .or(samples.first());
        let last = samples
            .iter()
            .find(|s| s.at_ms >= end_ms)
            .or(samples.last());
        let (Some(first), Some(last)) = (first, last) else {
            return CpuPerMessage {
                dataflow_us: None,
                redis_us: None,
                rest_us: None,
                dataflow_startup_s: None,
            };
        };
        let per = |seconds: f64| seconds * 1e6 / messages.max(1) as f64;
        let spent = |of: fn(&CpuSample) -> Option<f64>| Some(of(last)? - of(first)?);
        let dataflow = spent(|s| s.dataflow);
        let redis = spent(|s| s.redis);
        let rest = spent(|s| s.machine)
            .zip(dataflow)
            .zip(redis)
            .map(|((machine, dataflow), redis)| (machine - dataflow - redis).max(0.0));
        CpuPerMessage {
            dataflow_us: dataflow.map(per),
            redis_us: redis.map(per),
            rest_us: rest.map(per),
            dataflow_startup_s: first.dataflow,
        }
    }

    /// The share of the machine's CPU that was busy over a window of `seconds` in which
    /// `messages` went through, on `cores` cores: near 1, everything queues for the CPU.
    pub fn machine_busy_share(&self, messages: u64, seconds: f64, cores: usize) -> Option<f64> {
        let per_message = self.dataflow_us? + self.redis_us? + self.rest_us?;
        Some(per_message * messages as f64 / 1e6 / (seconds * cores.max(1) as f64))
    }

    /// One line for the latency phase: where the CPU went fed live, and how busy the machine
    /// was, which is what an epoch's latency waits on.
    pub fn render_live(&self, busy_share: Option<f64>) -> String {
        format!(
            "  CPU per message fed live: dataflow {} us, Redis {} us, the rest of the machine {} \
             us (the broker, this tool's producer, the system); the machine {} busy",
            us(self.dataflow_us),
            us(self.redis_us),
            us(self.rest_us),
            known(busy_share, |share| format!("{:.0}%", share * 100.0))
        )
    }

    /// One line for the summary.
    pub fn render(&self) -> String {
        format!(
            "  CPU per message over the end-to-end window: dataflow {} us, Redis {} us, the rest \
             of the machine {} us (the broker, this tool, the system); the dataflow's start-up \
             before it (loading the features file) took {} s of CPU",
            us(self.dataflow_us),
            us(self.redis_us),
            us(self.rest_us),
            known(self.dataflow_startup_s, |v| format!("{v:.2}"))
        )
    }
}

#[cfg(test)]
mod tests {
    use procfs::{FromRead, FromReadSI};

    use super::*;

    #[test]
    fn reads_a_process_stat_line_whose_name_holds_spaces_and_parens() {
        let line = "4242 (timely work) 1) S 1 4242 4242 0 -1 4194304 100 0 0 0 \
                    350 42 0 0 20 0 6 0 123 456 789 18446744073709551615 1 1 0 0 0 0 0 \
                    0 0 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0";
        let stat = Stat::from_read(line.as_bytes()).unwrap();
        assert_eq!(stat.comm, "timely work) 1");
        assert_eq!(process_busy_ticks(&stat), 392);
        assert!(Stat::from_read("4242 (x) S 1 2".as_bytes()).is_err());
        assert!(process_seconds(std::process::id()).is_some());
    }

    #[test]
    fn machine_busy_time_leaves_out_idle_and_iowait() {
        let stat = "cpu  100 5 50 1000 30 2 3 10 0 0\ncpu0 50 2 25 500 15 1 1 5 0 0\n\
                    ctxt 1\nbtime 1\nprocesses 1\n";
        let stats = KernelStats::from_read(stat.as_bytes(), procfs::current_system_info()).unwrap();
        assert_eq!(machine_busy_ticks(&stats.total), 170);
        assert!(machine_busy_seconds().is_some());
    }

    #[test]
    fn the_window_runs_from_the_last_sample_before_to_the_first_after() {
        let sample = |at_ms, dataflow, redis, machine| CpuSample {
            at_ms,
            dataflow: Some(dataflow),
            dataflow_rss_kb: None,
            redis: Some(redis),
            machine: Some(machine),
        };
        let samples = [
            sample(1_000, 1.0, 10.0, 100.0),
            sample(1_010, 1.5, 10.0, 100.5),
            sample(1_020, 2.0, 10.5, 101.5),
            sample(3_000, 6.0, 11.5, 108.0),
            sample(3_010, 6.1, 11.6, 108.3),
        ];
        let cpu = CpuPerMessage::over_window(200_000, &samples, 1_015, 2_995);
        assert_eq!(cpu.dataflow_startup_s, Some(1.5));
        assert_eq!(cpu.dataflow_us, Some(22.5));
        assert_eq!(cpu.redis_us, Some(7.5));
        assert_eq!(cpu.rest_us, Some(7.5));
        let remote_redis = [
            CpuSample {
                redis: None,
                ..samples[0]
            },
            samples[3],
        ];
        let partial = CpuPerMessage::over_window(200_000, &remote_redis, 1_000, 3_000);
        assert_eq!((partial.redis_us, partial.rest_us), (None, None));
        assert!(partial.render().contains("dataflow 25.0 us, Redis ? us"));
        // 37.5 us a message, 200,000 messages in 2 s on 2 cores: 7.5 of 4 core-seconds.
        let busy = cpu.machine_busy_share(200_000, 2.0, 2).unwrap();
        assert!((busy - 1.875).abs() < 1e-9, "{busy}");
        assert!(cpu
            .render_live(Some(0.875))
            .ends_with("the machine 88% busy"));
        assert_eq!(partial.machine_busy_share(200_000, 2.0, 2), None);
        assert_eq!(CpuPerMessage::over_window(1, &[], 0, 1).dataflow_us, None);
    }

    #[test]
    fn the_resident_size_over_the_window_is_read_from_its_samples() {
        let sample = |at_ms, rss_kb| CpuSample {
            at_ms,
            dataflow: None,
            dataflow_rss_kb: rss_kb,
            redis: None,
            machine: None,
        };
        // Before the window (the start-up's 2 GB), 100 samples in it, one unreadable.
        let mut samples = vec![sample(0, Some(2_000_000))];
        samples.extend((1..=100).map(|n| sample(1_000 + n, Some(n * 1_000))));
        samples.push(sample(1_050, None));
        let resident = ResidentOverWindow::over_window(&samples, 1_000, 2_000).unwrap();
        assert_eq!(resident.samples, 100);
        assert_eq!(resident.highest_kb, 100_000);
        assert_eq!(resident.median_kb, 51_000);
        assert_eq!(resident.p99_kb, 99_000);
        assert!(resident
            .render()
            .contains("median 0.05 GB, 99th percentile 0.10 GB"));
        assert_eq!(
            ResidentOverWindow::over_window(&samples, 3_000, 4_000),
            None
        );
    }

    #[test]
    fn samples_this_process() {
        let sampler = CpuSampler::start(std::process::id(), None);
        std::thread::sleep(SAMPLE_EVERY * 3);
        let samples = sampler.finish();
        assert!(samples.len() >= 2);
        assert!(samples
            .iter()
            .all(|s| s.dataflow.is_some() && s.redis.is_none()));
        assert!(samples
            .iter()
            .all(|s| s.dataflow_rss_kb.is_some_and(|kb| kb > 0)));
        assert!(samples.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
    }
}
