//! Configuration: every setting is a flag and an environment variable (semantics §7); a `.env`
//! file in the working directory is read too, and flags win. The settings the dataflow takes too
//! (brokers, topic, Redis, history, encoding, log format, `-X` and `KAFKA_CONFIG_FILE`) are the
//! `settings` crate's [`SharedArgs`], flattened in.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use settings::SharedArgs;

pub use settings::{LogFormat, SettingsError as ConfigError};

/// streamrec ingest API: turns a user's behaviour history into a profile message on Kafka.
///
/// A drop-in replacement for the original FastAPI service: same endpoints, same message format,
/// same Redis layout. Interactive API docs at /docs once it runs.
#[derive(Debug, Clone, Parser)]
#[command(name = "ingest-api", version, about, long_about = None)]
pub struct Config {
    #[command(flatten)]
    pub shared: SharedArgs,

    /// PEM file of the CA certificates a rediss:// Redis's certificate must chain to, trusted
    /// instead of the system's store (default: the system store). Needs a rediss:// URL.
    #[arg(long, env = "REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,

    /// File of API bearer tokens, one a line (blank lines and lines starting with # are
    /// ignored), read at start. When set, POST /push_interest/ and /send_kafka/ require
    /// `Authorization: Bearer <token>` with one of them.
    #[arg(long, env = "API_TOKENS_FILE")]
    pub api_tokens_file: Option<PathBuf>,

    /// Require a bearer token for GET /user_profile/{user_id} too (needs API_TOKENS_FILE).
    /// /healthz, /metrics and the docs stay open either way.
    #[arg(long, env = "API_TOKENS_FOR_READS")]
    pub api_tokens_for_reads: bool,

    /// Address to listen on (host:port).
    #[arg(long, env = "BIND", default_value = "127.0.0.1:8000")]
    pub bind: String,

    /// Behaviour CSV (user_id,item_id,timestamp) loaded at start.
    #[arg(
        long,
        env = "BEHAVIOR_CSV_PATH",
        default_value = "data/behavior_sample.csv"
    )]
    pub behavior_csv: PathBuf,

    /// Fewest other users a /send_kafka/ request samples.
    #[arg(long, env = "RANDOM_USER_MIN", default_value_t = 30)]
    pub random_user_min: usize,

    /// Most other users a /send_kafka/ request samples.
    #[arg(long, env = "RANDOM_USER_MAX", default_value_t = 60)]
    pub random_user_max: usize,

    /// Longest a request waits for the broker to acknowledge its messages before it answers 503.
    #[arg(long, env = "PUBLISH_TIMEOUT_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub publish_timeout_ms: u64,

    /// How long the producer waits to batch messages before sending (librdkafka linger.ms;
    /// fractions allowed). Lower is lower latency, higher is fewer, larger requests.
    #[arg(long, env = "KAFKA_LINGER_MS", default_value_t = 1.0)]
    pub linger_ms: f64,
}

impl Config {
    /// Reads `.env` (if present) into the environment, then parses flags and environment and
    /// checks every setting (clap exits with its own message on a value it refuses).
    pub fn from_env_and_args() -> Result<Self, ConfigError> {
        settings::load_dotenv()?;
        let mut config = Config::parse();
        config.shared.resolve()?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the settings against each other.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.random_user_min > self.random_user_max {
            return Err(ConfigError::invalid(
                "RANDOM_USER_MIN",
                format!(
                    "{} is greater than RANDOM_USER_MAX ({})",
                    self.random_user_min, self.random_user_max
                ),
            ));
        }
        if self.api_tokens_for_reads && self.api_tokens_file.is_none() {
            return Err(ConfigError::invalid(
                "API_TOKENS_FOR_READS",
                "needs API_TOKENS_FILE (the tokens to require)",
            ));
        }
        if !(0.0..=60_000.0).contains(&self.linger_ms) {
            return Err(ConfigError::invalid(
                "KAFKA_LINGER_MS",
                "must be in 0..=60000",
            ));
        }
        Ok(())
    }

    /// [`Config::publish_timeout_ms`] as a duration.
    pub fn publish_timeout(&self) -> Duration {
        Duration::from_millis(self.publish_timeout_ms)
    }

    /// The defaults, as if started with no flags and an empty environment (for tests and
    /// embedding).
    pub fn defaults() -> Self {
        Config::parse_from(["ingest-api"])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_and_cross_checks_hold() {
        let config = Config::try_parse_from([
            "ingest-api",
            "--brokers",
            "h:1",
            "--random-user-min",
            "5",
            "--random-user-max",
            "4",
        ])
        .unwrap();
        assert_eq!(config.shared.brokers, "h:1");
        assert!(config.validate().is_err());
        assert!(Config::try_parse_from(["ingest-api", "--encoding", "xml"]).is_err());
        let json = Config::try_parse_from(["ingest-api", "--log-format", "json"]).unwrap();
        assert_eq!(json.shared.log_format, LogFormat::Json);
        assert!(Config::try_parse_from(["ingest-api", "--log-format", "xml"]).is_err());
        // The dataflow's bound, so that the API never publishes a history §2 makes invalid.
        for bad in ["0", "10001"] {
            assert!(Config::try_parse_from(["ingest-api", "--max-history", bad]).is_err());
        }
    }

    #[test]
    fn token_settings_parse_and_reads_need_a_tokens_file() {
        let config = Config::try_parse_from([
            "ingest-api",
            "--api-tokens-file",
            "tokens.txt",
            "--api-tokens-for-reads",
        ])
        .unwrap();
        assert_eq!(
            config.api_tokens_file.as_deref(),
            Some(std::path::Path::new("tokens.txt"))
        );
        assert!(config.api_tokens_for_reads);
        config.validate().unwrap();
        let reads_alone = Config::try_parse_from(["ingest-api", "--api-tokens-for-reads"]).unwrap();
        assert!(reads_alone.validate().is_err());
        assert!(!Config::defaults().api_tokens_for_reads);
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
            "BIND",
            "BEHAVIOR_CSV_PATH",
            "RANDOM_USER_MIN",
            "RANDOM_USER_MAX",
            "MAX_HISTORY",
            "LOG_FORMAT",
            "MESSAGE_ENCODING",
            "KAFKA_CONFIG_FILE",
            "-X, --kafka-property",
            "REDIS_CA_FILE",
            "API_TOKENS_FILE",
            "API_TOKENS_FOR_READS",
        ] {
            assert!(help.contains(name), "{name} missing from --help");
        }
    }
}
