//! The summary of a run: the rate of every phase, in the units that make them comparable, and
//! how the end-to-end rate compares with each.
//!
//! Redis phases are measured in profile writes per second. To set them against rates in
//! messages per second they are converted at the end-to-end run's own ratio of messages to
//! profile writes (a message whose user changed twice in one epoch costs one write, not two):
//! "Redis alone would keep up with this many messages per second of this workload".

use serde::{Deserialize, Serialize};

use crate::e2e::EndToEnd;
use crate::redis_write::RedisPhase;

/// Every rate of a run and the ratios between them. A ratio whose denominator is zero is NaN
/// (`null` in the JSON report).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Messages in the workload.
    pub messages: u64,
    /// Profile values the end-to-end run handed to Redis.
    pub e2e_profile_writes: u64,
    pub e2e_msgs_per_s: f64,
    pub e2e_profile_writes_per_s: f64,
    pub raw_consume_msgs_per_s: f64,
    pub redis_set_profile_writes_per_s: f64,
    /// The plain SET rate in messages of this workload per second.
    pub redis_set_msgs_per_s: f64,
    pub sink_lua_profile_writes_per_s: f64,
    /// The sink's rate in messages of this workload per second.
    pub sink_lua_msgs_per_s: f64,
    pub e2e_over_raw_consume: f64,
    /// End-to-end over plain SET, both in profile writes per second.
    pub e2e_over_redis_set_writes: f64,
    /// End-to-end over plain SET, both in messages per second. Equal to the ratio in writes
    /// per second by construction; both are kept because both are quoted.
    pub e2e_over_redis_set_msgs: f64,
    /// End-to-end over the sink's path, in profile writes per second.
    pub e2e_over_sink_lua_writes: f64,
    /// The sink's rate over the plain SET rate: what is left of Redis' write rate with the
    /// no-regression check (and the sink's own encoding).
    pub sink_lua_over_redis_set: f64,
    /// Wall-clock microseconds per profile write the sink's path takes on top of a plain SET,
    /// with all connections writing at once.
    pub sink_lua_extra_us_per_write: f64,
}

/// [`crate::ratio`] as an `f64`: NaN when `b` is not positive, which the JSON report writes as
/// `null`.
pub fn ratio_or_nan(a: f64, b: f64) -> f64 {
    crate::ratio(a, b).unwrap_or(f64::NAN)
}

impl Summary {
    /// The summary of a run of `messages` messages.
    pub fn new(
        messages: u64,
        raw_consume_msgs_per_s: f64,
        e2e: &EndToEnd,
        set: &RedisPhase,
        lua: &RedisPhase,
    ) -> Self {
        let e2e_writes = e2e.profile_writes();
        let msgs_per_write = ratio_or_nan(e2e.messages as f64, e2e_writes as f64);
        let e2e_msgs_per_s = ratio_or_nan(e2e.messages as f64, e2e.seconds);
        let e2e_writes_per_s = ratio_or_nan(e2e_writes as f64, e2e.seconds);
        let set_writes = ratio_or_nan(set.writes as f64, set.seconds);
        let lua_writes = ratio_or_nan(lua.writes as f64, lua.seconds);
        let set_msgs = set_writes * msgs_per_write;
        let lua_msgs = lua_writes * msgs_per_write;
        Summary {
            messages,
            e2e_profile_writes: e2e_writes,
            e2e_msgs_per_s,
            e2e_profile_writes_per_s: e2e_writes_per_s,
            raw_consume_msgs_per_s,
            redis_set_profile_writes_per_s: set_writes,
            redis_set_msgs_per_s: set_msgs,
            sink_lua_profile_writes_per_s: lua_writes,
            sink_lua_msgs_per_s: lua_msgs,
            e2e_over_raw_consume: ratio_or_nan(e2e_msgs_per_s, raw_consume_msgs_per_s),
            e2e_over_redis_set_writes: ratio_or_nan(e2e_writes_per_s, set_writes),
            e2e_over_redis_set_msgs: ratio_or_nan(e2e_msgs_per_s, set_msgs),
            e2e_over_sink_lua_writes: ratio_or_nan(e2e_writes_per_s, lua_writes),
            sink_lua_over_redis_set: ratio_or_nan(lua_writes, set_writes),
            sink_lua_extra_us_per_write: ratio_or_nan(1e6, lua_writes)
                - ratio_or_nan(1e6, set_writes),
        }
    }

    /// The summary as printed under the per-epoch table.
    pub fn render(&self, workers: usize, e2e_seconds: f64, set: &RedisPhase) -> String {
        let per_message = ratio_or_nan(self.e2e_profile_writes as f64, self.messages as f64);
        [
            format!(
                "summary: {} messages, {} profile writes ({per_message:.2} per message), -w {workers}",
                self.messages, self.e2e_profile_writes
            ),
            format!(
                "  raw consume ({workers} consumers)  {:>9.0} msg/s",
                self.raw_consume_msgs_per_s
            ),
            format!(
                "  raw Redis SET ({} conns)      {:>9.0} profile writes/s = {:>9.0} msg/s",
                set.connections, self.redis_set_profile_writes_per_s, self.redis_set_msgs_per_s
            ),
            format!(
                "  sink, Lua script ({} conns)   {:>9.0} profile writes/s = {:>9.0} msg/s \
                 ({:.2} x SET, +{:.1} us per write)",
                set.connections,
                self.sink_lua_profile_writes_per_s,
                self.sink_lua_msgs_per_s,
                self.sink_lua_over_redis_set,
                self.sink_lua_extra_us_per_write
            ),
            format!(
                "  end to end ({e2e_seconds:.2} s)          {:>9.0} profile writes/s = {:>9.0} msg/s",
                self.e2e_profile_writes_per_s, self.e2e_msgs_per_s
            ),
            format!(
                "  e2e / raw consume = {:.2} (msg/s)",
                self.e2e_over_raw_consume
            ),
            format!(
                "  e2e / raw Redis SET = {:.2} (profile writes/s), {:.2} (msg/s)",
                self.e2e_over_redis_set_writes, self.e2e_over_redis_set_msgs
            ),
            format!(
                "  e2e / sink Lua = {:.2} (profile writes/s)",
                self.e2e_over_sink_lua_writes
            ),
        ]
        .join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phase(writes: u64, seconds: f64) -> RedisPhase {
        RedisPhase {
            writes,
            skipped_stale: 0,
            seconds,
            command_bytes: writes * 1100,
            connections: 2,
            batch: 512,
            depth: 2,
        }
    }

    fn e2e(messages: u64, changed: &[u64], seconds: f64) -> EndToEnd {
        EndToEnd {
            peak_rss_kb: None,
            resident: None,
            cpu: crate::cpu::CpuPerMessage::over_window(messages, &[], 0, 0),
            epochs: changed
                .iter()
                .enumerate()
                .map(|(i, &written)| crate::e2e::EpochStat {
                    epoch: 100 * i as u64,
                    counters: dataflow::stats::EpochCounters {
                        messages: messages / changed.len() as u64,
                        changed: written,
                        redis_writes: written,
                        latency_ms: 5,
                        ..Default::default()
                    },
                })
                .collect(),
            messages,
            seconds,
            launch_seconds: seconds + 1.0,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9 * b.abs().max(1.0)
    }

    #[test]
    fn rates_and_ratios() {
        // 1000 messages, 800 writes in 2 s; SET wrote the same 800 in 0.1 s, the script in 0.4 s.
        let run = e2e(1000, &[300, 500], 2.0);
        let s = Summary::new(1000, 10_000.0, &run, &phase(800, 0.1), &phase(800, 0.4));
        assert_eq!(s.e2e_profile_writes, 800);
        assert!(close(s.e2e_msgs_per_s, 500.0));
        assert!(close(s.e2e_profile_writes_per_s, 400.0));
        assert!(close(s.redis_set_profile_writes_per_s, 8000.0));
        // 1.25 messages per write in this run.
        assert!(close(s.redis_set_msgs_per_s, 10_000.0));
        assert!(close(s.sink_lua_profile_writes_per_s, 2000.0));
        assert!(close(s.sink_lua_msgs_per_s, 2500.0));
        assert!(close(s.e2e_over_raw_consume, 0.05));
        assert!(close(s.e2e_over_redis_set_writes, 0.05));
        assert!(close(s.e2e_over_redis_set_msgs, 0.05));
        assert!(close(s.e2e_over_sink_lua_writes, 0.2));
        assert!(close(s.sink_lua_over_redis_set, 0.25));
        // 500 us per write against 125.
        assert!(close(s.sink_lua_extra_us_per_write, 375.0));
    }

    #[test]
    fn a_redis_phase_of_another_size_is_compared_by_rate() {
        // SET wrote one value per message (1000) in 0.1 s: 10k writes/s, i.e. 12.5k msg/s at
        // this run's 1.25 messages per write.
        let run = e2e(1000, &[800], 2.0);
        let s = Summary::new(1000, 10_000.0, &run, &phase(1000, 0.1), &phase(1000, 0.4));
        assert!(close(s.redis_set_msgs_per_s, 12_500.0));
        assert!(close(s.e2e_over_redis_set_writes, 0.04));
        assert!(close(s.e2e_over_redis_set_msgs, 0.04));
    }

    #[test]
    fn empty_denominators_give_nan_which_the_report_writes_as_null() {
        let run = e2e(0, &[], 0.0);
        let s = Summary::new(0, 0.0, &run, &phase(0, 0.0), &phase(0, 0.0));
        assert!(s.e2e_over_raw_consume.is_nan());
        assert!(s.redis_set_msgs_per_s.is_nan());
        let json = serde_json::to_value(s).unwrap();
        assert!(json["e2e_over_raw_consume"].is_null());
        assert!(ratio_or_nan(1.0, 0.0).is_nan());
        assert_eq!(ratio_or_nan(3.0, 2.0), 1.5);
    }

    #[test]
    fn render_names_every_ratio() {
        let run = e2e(1000, &[800], 2.0);
        let set = phase(800, 0.1);
        let text = Summary::new(1000, 10_000.0, &run, &set, &phase(800, 0.4)).render(2, 2.0, &set);
        for needle in [
            "e2e / raw consume = 0.05",
            "e2e / raw Redis SET = 0.05 (profile writes/s), 0.05 (msg/s)",
            "e2e / sink Lua = 0.20",
            "0.25 x SET",
            "0.80 per message",
        ] {
            assert!(text.contains(needle), "{needle:?} missing in\n{text}");
        }
    }
}
