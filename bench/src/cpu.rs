//! Where the CPU of an end-to-end run goes: the dataflow's own time (from /proc), Redis's
//! (from its `INFO cpu`) and the whole machine's (from /proc/stat), each over the dataflow's
//! run, per message. On a machine whose cores the dataflow, Redis and the broker share, this
//! says which of them a faster run would have to make cheaper.

use anyhow::Context;
use serde::Serialize;

/// Clock ticks per second of the times in /proc: Linux's `USER_HZ`, fixed at 100 by its ABI.
const USER_HZ: f64 = 100.0;

/// CPU seconds (user and system) process `pid` has used so far, all its threads included.
pub fn process_seconds(pid: u32) -> Option<f64> {
    parse_process_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// `utime` + `stime` of a /proc/<pid>/stat line, in seconds.
fn parse_process_stat(stat: &str) -> Option<f64> {
    // The command name, in parentheses, may hold spaces: the fields are counted after it.
    // utime and stime are fields 14 and 15 of the line, so 12 and 13 after the name.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

/// CPU seconds the whole machine has been busy so far (every core, anything but idle and
/// waiting for I/O).
pub fn machine_busy_seconds() -> Option<f64> {
    parse_machine_stat(&std::fs::read_to_string("/proc/stat").ok()?)
}

fn parse_machine_stat(stat: &str) -> Option<f64> {
    let line = stat.lines().find(|line| line.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|field| field.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice, already in user/nice]
    let busy: u64 = ticks.iter().take(8).sum::<u64>() - ticks.get(3)? - ticks.get(4)?;
    Some(busy as f64 / USER_HZ)
}

/// CPU seconds the Redis server at `url` has used so far (`used_cpu_sys` + `used_cpu_user`).
pub fn redis_seconds(url: &str) -> anyhow::Result<f64> {
    let mut connection = redis::Client::open(url)
        .context("parsing the Redis URL (--redis)")?
        .get_connection()
        .context("connecting to Redis")?;
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query(&mut connection)
        .context("INFO cpu")?;
    parse_redis_cpu(&info).context("INFO cpu has no used_cpu_sys and used_cpu_user")
}

fn parse_redis_cpu(info: &str) -> Option<f64> {
    let field = |name: &str| -> Option<f64> {
        info.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))?
            .trim()
            .parse()
            .ok()
    };
    Some(field("used_cpu_sys")? + field("used_cpu_user")?)
}

/// Redis's and the machine's CPU time, read before and after the dataflow's run (the
/// dataflow's own is read from its process just before it is stopped).
#[derive(Debug, Clone, Copy)]
pub struct Reading {
    redis: Option<f64>,
    machine: Option<f64>,
}

impl Reading {
    /// Reads Redis's and the machine's CPU time now (`None` for what cannot be read).
    pub fn now(redis_url: &str) -> Self {
        Reading {
            redis: redis_seconds(redis_url).ok(),
            machine: machine_busy_seconds(),
        }
    }
}

/// CPU per message over the dataflow's run, start-up included, in µs.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CpuPerMessage {
    /// The dataflow process, all its threads.
    pub dataflow_us: Option<f64>,
    /// The Redis server.
    pub redis_us: Option<f64>,
    /// Everything else that ran on the machine meanwhile: the broker (when it runs here), this
    /// tool and the system.
    pub rest_us: Option<f64>,
}

impl CpuPerMessage {
    /// Per message of `messages`, from the dataflow's CPU seconds and the readings around it.
    pub fn new(messages: u64, dataflow_s: Option<f64>, before: Reading, after: Reading) -> Self {
        let per = |seconds: f64| seconds * 1e6 / messages.max(1) as f64;
        let redis = before.redis.zip(after.redis).map(|(b, a)| a - b);
        let machine = before.machine.zip(after.machine).map(|(b, a)| a - b);
        let rest = machine
            .zip(dataflow_s)
            .zip(redis)
            .map(|((machine, dataflow), redis)| (machine - dataflow - redis).max(0.0));
        CpuPerMessage {
            dataflow_us: dataflow_s.map(per),
            redis_us: redis.map(per),
            rest_us: rest.map(per),
        }
    }

    /// One line for the summary.
    pub fn render(&self) -> String {
        let us = |value: Option<f64>| value.map_or("?".to_owned(), |v| format!("{v:.1}"));
        format!(
            "  CPU per message over the dataflow's run (start-up included): dataflow {} us, \
             Redis {} us, the rest of the machine {} us (the broker, this tool, the system)",
            us(self.dataflow_us),
            us(self.redis_us),
            us(self.rest_us)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_process_stat_line_whose_name_holds_spaces_and_parens() {
        let line = "4242 (timely work) 1) S 1 4242 4242 0 -1 4194304 100 0 0 0 \
                    350 42 0 0 20 0 6 0 123 456 789";
        assert_eq!(parse_process_stat(line), Some(3.92));
        assert_eq!(parse_process_stat("4242 (x) S 1 2"), None);
        assert!(process_seconds(std::process::id()).is_some());
    }

    #[test]
    fn machine_busy_time_leaves_out_idle_and_iowait() {
        let stat = "cpu  100 5 50 1000 30 2 3 10 0 0\ncpu0 50 2 25 500 15 1 1 5 0 0\n";
        assert_eq!(parse_machine_stat(stat), Some(1.7));
        assert!(machine_busy_seconds().is_some());
    }

    #[test]
    fn redis_cpu_is_system_plus_user() {
        let info = "# CPU\r\nused_cpu_sys:1.250000\r\nused_cpu_user:3.500000\r\n\
                    used_cpu_sys_children:0.000000\r\n";
        assert_eq!(parse_redis_cpu(info), Some(4.75));
        assert_eq!(parse_redis_cpu("# CPU\r\n"), None);
    }

    #[test]
    fn per_message_figures_and_the_rest() {
        let before = Reading {
            redis: Some(10.0),
            machine: Some(100.0),
        };
        let after = Reading {
            redis: Some(11.0),
            machine: Some(106.0),
        };
        let cpu = CpuPerMessage::new(200_000, Some(4.0), before, after);
        assert_eq!(cpu.dataflow_us, Some(20.0));
        assert_eq!(cpu.redis_us, Some(5.0));
        assert_eq!(cpu.rest_us, Some(5.0));
        let unknown = Reading {
            redis: None,
            machine: None,
        };
        let partial = CpuPerMessage::new(200_000, Some(4.0), unknown, after);
        assert_eq!((partial.redis_us, partial.rest_us), (None, None));
        assert!(partial.render().contains("dataflow 20.0 us, Redis ? us"));
    }
}
