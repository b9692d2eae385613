//! Configuration: the settings of semantics §7 as flags and environment variables (a `.env` file
//! is read too; flags win), plus timely's own `-w/-n/-p/-h` for workers, processes and hosts.
//! The settings the ingest API takes too (brokers, topic, Redis, history, encoding, log format,
//! `-X` and `KAFKA_CONFIG_FILE`) are the `settings` crate's [`SharedArgs`], flattened in.

use std::io::BufRead;
use std::path::PathBuf;

use clap::Parser;
use settings::SharedArgs;

pub use settings::{LogFormat, SettingsError as ConfigError};

/// streamrec dataflow: keeps every user's interest vector up to date from the profile topic and
/// writes the changed profiles to Redis, epoch by epoch.
///
/// Runs as one timely computation over `-w` worker threads in each of `-n` processes; every
/// process of a computation is started with the same flags and its own `-p`.
#[derive(Debug, Clone, Parser)]
#[command(name = "dataflow", version, about, long_about = None, disable_help_flag = true)]
pub struct Config {
    #[command(flatten)]
    pub shared: SharedArgs,

    /// PEM file of the CA certificates a rediss:// Redis's certificate must chain to, trusted
    /// instead of the system's store (default: the system store). Needs a rediss:// URL.
    #[arg(long, env = "REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,

    /// Consumer group whose committed offsets say how far to replay on start (to rebuild the
    /// state) and where to read on.
    #[arg(long, env = "KAFKA_GROUP", default_value = "streamrec-dataflow")]
    pub group: String,

    /// Item features CSV (item_id,f0,...,f{D-1}) loaded at start; D is taken from it.
    #[arg(
        long,
        env = "ITEM_FEATURES_PATH",
        default_value = "data/item_features.csv"
    )]
    pub item_features: PathBuf,

    /// Topic of live item-feature updates ({"item_id": .., "features": [..] or null}); read if
    /// it exists.
    #[arg(long, env = "ITEM_TOPIC", default_value = "item_features")]
    pub item_topic: String,

    /// Topic invalid messages are copied to, with the reason in headers.
    #[arg(long, env = "DLQ_TOPIC", default_value = "user_behavior.dlq")]
    pub dlq_topic: String,

    /// Length of an epoch of processing time, in milliseconds.
    #[arg(long, env = "EPOCH_MS", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub epoch_ms: u64,

    /// Recency decay of the interest vector, in (0, 1].
    #[arg(long, env = "DECAY", default_value_t = profile::DEFAULT_DECAY, value_parser = parse_decay)]
    pub decay: f64,

    /// Recommendations (semantics §8): on, each user whose profile changes gets a fresh list in
    /// user_recs:{user_id}, and popular_items is kept up to date; off, nothing of it is built.
    /// Off by default: it cuts the rate to 0.21-0.41x on the bench workload, where every
    /// message replaces a user's whole window, and to 0.38-0.54x (median 0.44x) when
    /// histories slide by one item a message (README, Recommendations).
    #[arg(long, env = "RECOMMENDATIONS", value_enum, default_value_t = Switch::Off)]
    pub recommendations: Switch,

    /// Co-visitation window W: a user's newest history positions whose items count together
    /// (1..=10000).
    #[arg(long, env = "COVISIT_WINDOW", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub covisit_window: u64,

    /// Neighbours K kept per item, the strongest by co-visitation (1..=1000).
    #[arg(long, env = "NEIGHBOURS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub neighbours: u64,

    /// Checkpoints (README, Restarts and checkpoints): on, every worker writes its state every
    /// --checkpoint-interval and on a clean shutdown, and a restart loads the newest complete
    /// checkpoint and replays only the messages after it; off, a restart replays every
    /// partition up to the committed offsets.
    #[arg(long, env = "CHECKPOINTS", value_enum, default_value_t = Switch::On)]
    pub checkpoints: Switch,

    /// Directory of the checkpoints, one subdirectory per consumer group and topic. Every
    /// process of a computation must see the same directory (on several hosts, a shared file
    /// system).
    #[arg(long, env = "CHECKPOINT_DIR", default_value = "checkpoints")]
    pub checkpoint_dir: PathBuf,

    /// Time between checkpoints: seconds, or a number with ms, s or m (500ms, 30s, 5m); at
    /// least 100ms.
    #[arg(long, env = "CHECKPOINT_INTERVAL", default_value = "60s", value_parser = parse_interval)]
    pub checkpoint_interval: std::time::Duration,

    /// Print per-epoch statistics as JSON lines instead of human lines (both on stdout; logs go
    /// to stderr).
    #[arg(long)]
    pub stats_json: bool,

    /// Most messages a worker reads before it lets the dataflow run, so frontiers keep moving
    /// under any backlog.
    #[arg(long, env = "MAX_POLL_RECORDS", default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_poll_records: u64,

    /// Most messages a worker holds read and not yet stored in Redis. Past it the worker reads
    /// nothing until older epochs are stored, so that a backlog waits in Kafka rather than in
    /// memory (~2 KB a message while in flight; more with --recommendations on, whose pair
    /// updates and neighbour changes are held with it: README, Recommendations).
    #[arg(long, env = "MAX_IN_FLIGHT", default_value_t = 32768, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_in_flight: u64,

    /// Profiles per Redis pipeline batch.
    #[arg(long, env = "REDIS_BATCH", default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..))]
    pub redis_batch: u64,

    /// When values go through Redis's no-regression script (semantics §6). `until-caught-up`
    /// (the default): until every worker has read past the read marks that earlier runs left in
    /// Redis (`streamrec:read_marks:{topic}`), so that no value older than Redis's can follow;
    /// from then on values are written with plain MSETs, which cost Redis a third as much, and
    /// a batch resent after a failure still goes through the script. `always`: every value.
    /// Either way a run takes over the topic at start: an older run still writing it stops.
    #[arg(long, env = "CHECKED_WRITES", value_enum, default_value_t = CheckedWrites::UntilCaughtUp)]
    pub checked_writes: CheckedWrites,

    /// Serve Prometheus metrics at GET /metrics on this address, e.g. 127.0.0.1:9101 (port 0
    /// picks a free one, logged as `metrics_addr`). Off by default.
    #[arg(long, env = "METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// Worker threads per process (timely).
    #[arg(short = 'w', long = "workers", visible_alias = "threads", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub workers: u64,

    /// Number of processes in the computation (timely).
    #[arg(short = 'n', long = "processes", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub processes: u64,

    /// Index of this process, 0..processes (timely).
    #[arg(short = 'p', long = "process", default_value_t = 0)]
    pub process: u64,

    /// File with one host:port per line, one per process (timely); without it processes use
    /// localhost:2101, localhost:2102, ...
    #[arg(short = 'h', long = "hostfile")]
    pub hostfile: Option<PathBuf>,

    /// Print help.
    #[arg(long, action = clap::ArgAction::Help)]
    help: Option<bool>,
}

/// See [`Config::checked_writes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CheckedWrites {
    /// Every value goes through the no-regression script.
    Always,
    /// Until every worker caught up with the read marks; plain MSETs afterwards.
    UntilCaughtUp,
}

fn parse_decay(text: &str) -> Result<f64, String> {
    let decay: f64 = text.parse().map_err(|e| format!("{e}"))?;
    if decay > 0.0 && decay <= 1.0 {
        Ok(decay)
    } else {
        Err("must be in (0, 1]".into())
    }
}

/// A duration: a number of seconds, or a number with the unit ms, s or m; at least 100 ms.
fn parse_interval(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a number with an optional unit (ms, s, m)"))?;
    let millis = match unit.trim() {
        "ms" => Some(number),
        "" | "s" => number.checked_mul(1_000),
        "m" => number.checked_mul(60_000),
        other => return Err(format!("unknown unit {other:?}: use ms, s or m")),
    }
    .ok_or_else(|| format!("{text:?} is too long"))?;
    if millis < 100 {
        return Err("must be at least 100ms".into());
    }
    Ok(std::time::Duration::from_millis(millis))
}

/// A feature switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    On,
    Off,
}

impl Config {
    /// The recommendations' settings, when they are on.
    pub fn recommend_setup(&self) -> Option<crate::graph::RecommendSetup> {
        (self.recommendations == Switch::On).then_some(crate::graph::RecommendSetup {
            covisit: crate::recommend::covisit::CovisitParams {
                window: self.covisit_window as usize,
                neighbours: self.neighbours as usize,
            },
            scores: crate::recommend::scores::ScoreParams {
                recommendations_n: self.shared.recommendations_n,
                decay: self.decay,
                max_history: self.shared.max_history,
                first_scored_time: crate::epoch::FIRST_LIVE_TIME,
            },
        })
    }

    /// The checkpoints' settings when they are on, for a features file of dimension `dim`.
    pub fn checkpoint_settings(
        &self,
        dim: usize,
    ) -> std::io::Result<Option<crate::checkpoint::take::Settings>> {
        if self.checkpoints == Switch::Off {
            return Ok(None);
        }
        let compatibility = crate::checkpoint::payload::Compatibility {
            profile_topic: self.shared.topic.clone(),
            item_topic: self.item_topic.clone(),
            max_history: self.shared.max_history as u64,
            dim: dim as u32,
            features_file: crate::checkpoint::payload::Fingerprint::of(&self.item_features)?,
        };
        Ok(Some(crate::checkpoint::take::Settings {
            dir: crate::checkpoint::scoped_dir(
                &self.checkpoint_dir,
                &self.group,
                &self.shared.topic,
            ),
            interval_ms: self.checkpoint_interval.as_millis() as u64,
            compatibility,
            gate: crate::checkpoint::take::BodyGate::default(),
        }))
    }

    /// The Redis the profiles go to, as the sink takes it: URL (or cluster seeds), CA file,
    /// cluster flag, batch size; sink defaults otherwise.
    pub fn sink_config(&self) -> sink::SinkConfig {
        sink::SinkConfig {
            redis_ca_file: self.redis_ca_file.clone(),
            redis_cluster: self.shared.redis_cluster,
            max_batch_records: self.redis_batch as usize,
            ..sink::SinkConfig::new(self.shared.redis.clone())
        }
    }

    /// Reads `.env` (if present) into the environment, then parses flags and environment and
    /// checks every setting (clap exits with its own message on a value it refuses).
    pub fn from_env_and_args() -> Result<Self, ConfigError> {
        settings::load_dotenv()?;
        let mut config = Config::parse();
        config.shared.resolve()?;
        config.timely()?;
        Ok(config)
    }

    /// The timely configuration for workers, processes and hosts.
    pub fn timely(&self) -> Result<timely::Config, ConfigError> {
        let threads = self.workers as usize;
        let processes = self.processes as usize;
        let process = self.process as usize;
        if process >= processes {
            return Err(ConfigError::invalid(
                "-p/--process",
                format!("{process} is not below -n/--processes {processes}"),
            ));
        }
        let communication = if processes > 1 {
            let addresses = match &self.hostfile {
                Some(path) => read_hostfile(path, processes)?,
                None => (0..processes)
                    .map(|i| format!("localhost:{}", 2101 + i))
                    .collect(),
            };
            timely::CommunicationConfig::Cluster {
                threads,
                process,
                addresses,
                report: false,
                zerocopy: false,
            }
        } else if threads > 1 {
            timely::CommunicationConfig::Process(threads)
        } else {
            timely::CommunicationConfig::Thread
        };
        Ok(timely::Config {
            communication,
            worker: timely::WorkerConfig::default(),
        })
    }
}

fn read_hostfile(path: &std::path::Path, processes: usize) -> Result<Vec<String>, ConfigError> {
    let file = std::fs::File::open(path)
        .map_err(|e| ConfigError::invalid("-h/--hostfile", format!("{}: {e}", path.display())))?;
    let hosts: Vec<String> = std::io::BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .map(|line| line.trim().to_owned())
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .take(processes)
        .collect();
    if hosts.len() < processes {
        return Err(ConfigError::invalid(
            "-h/--hostfile",
            format!(
                "{} names {} hosts, -n asks for {processes}",
                path.display(),
                hosts.len()
            ),
        ));
    }
    Ok(hosts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_flags_and_timelys_share_one_command_line() {
        let config = Config::try_parse_from([
            "dataflow",
            "-w",
            "4",
            "--epoch-ms",
            "250",
            "-n",
            "2",
            "-p",
            "1",
            "--decay",
            "0.5",
        ])
        .unwrap();
        assert_eq!(
            (config.workers, config.processes, config.process),
            (4, 2, 1)
        );
        assert_eq!((config.epoch_ms, config.decay), (250, 0.5));
        match config.timely().unwrap().communication {
            timely::CommunicationConfig::Cluster {
                threads,
                process,
                addresses,
                ..
            } => {
                assert_eq!((threads, process), (4, 1));
                assert_eq!(addresses, vec!["localhost:2101", "localhost:2102"]);
            }
            other => panic!("expected a cluster, got {other:?}"),
        }
    }

    #[test]
    fn bad_values_are_refused() {
        for args in [
            &["dataflow", "--decay", "0"][..],
            &["dataflow", "--decay", "1.5"],
            &["dataflow", "--max-history", "0"],
            &["dataflow", "--max-history", "10001"],
            &["dataflow", "--epoch-ms", "0"],
            &["dataflow", "-w", "0"],
        ] {
            assert!(Config::try_parse_from(args).is_err(), "{args:?}");
        }
        let config = Config::try_parse_from(["dataflow", "-n", "2", "-p", "2"]).unwrap();
        assert!(config.timely().is_err());
        let json = Config::try_parse_from(["dataflow", "--log-format", "json"]).unwrap();
        assert_eq!(json.shared.log_format, LogFormat::Json);
        let error = Config::try_parse_from(["dataflow", "--log-format", "xml"]).unwrap_err();
        assert!(error.to_string().contains("--log-format"), "{error}");
    }

    #[test]
    fn checkpoint_intervals_take_a_unit() {
        use std::time::Duration;
        assert_eq!(parse_interval("60"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_interval("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_interval("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_interval("5m"), Ok(Duration::from_secs(300)));
        for bad in ["", "s", "10h", "50ms", "-1", "1.5s"] {
            assert!(parse_interval(bad).is_err(), "{bad}");
        }
        let config = Config::try_parse_from(["dataflow"]).unwrap();
        assert_eq!(config.checkpoints, Switch::On);
        assert_eq!(config.checkpoint_interval, Duration::from_secs(60));
    }

    #[test]
    fn hostfile_lines_name_the_processes() {
        let path = std::env::temp_dir().join(format!("streamrec-hosts-{}", std::process::id()));
        std::fs::write(&path, "# two hosts\n127.0.0.1:3001\n\n127.0.0.1:3002\n").unwrap();
        let hosts = read_hostfile(&path, 2).unwrap();
        assert_eq!(hosts, vec!["127.0.0.1:3001", "127.0.0.1:3002"]);
        assert!(read_hostfile(&path, 3).is_err());
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn help_names_every_setting() {
        let help = <Config as clap::CommandFactory>::command()
            .render_long_help()
            .to_string();
        for name in [
            "KAFKA_BROKER",
            "KAFKA_TOPIC",
            "REDIS_URL",
            "REDIS_CA_FILE",
            "KAFKA_GROUP",
            "ITEM_FEATURES_PATH",
            "ITEM_TOPIC",
            "DLQ_TOPIC",
            "EPOCH_MS",
            "MAX_HISTORY",
            "DECAY",
            "--stats-json",
            "--workers",
            "--processes",
            "--process",
            "--hostfile",
            "LOG_FORMAT",
            "MESSAGE_ENCODING",
            "KAFKA_CONFIG_FILE",
            "-X, --kafka-property",
            "CHECKPOINTS",
            "CHECKPOINT_DIR",
            "CHECKPOINT_INTERVAL",
        ] {
            assert!(help.contains(name), "{name} missing from --help");
        }
    }
}
