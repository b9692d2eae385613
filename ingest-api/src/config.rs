//! Configuration: every setting is a flag and an environment variable (semantics §7); a `.env`
//! file in the working directory is read too, and flags win.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use profile::Encoding;

/// streamrec ingest API: turns a user's behaviour history into a profile message on Kafka.
///
/// A drop-in replacement for the original FastAPI service: same endpoints, same message format,
/// same Redis layout. Interactive API docs at /docs once it runs.
#[derive(Debug, Clone, Parser)]
#[command(name = "ingest-api", version, about, long_about = None)]
pub struct Config {
    /// Kafka bootstrap servers, comma separated.
    #[arg(long, env = "KAFKA_BROKER", default_value = "localhost:9092")]
    pub brokers: String,

    /// Topic the profile messages are published to, keyed by user_id.
    #[arg(long, env = "KAFKA_TOPIC", default_value = "user_behavior")]
    pub topic: String,

    /// Redis that GET /user_profile/{user_id} reads.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379/0")]
    pub redis: String,

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

    /// History items kept per message (the newest ones).
    #[arg(long, env = "MAX_HISTORY", default_value_t = profile::DEFAULT_MAX_HISTORY)]
    pub max_history: usize,

    /// Encoding of published values: json (the contract's default, any client reads it) or
    /// bincode (compact; the dataflow must be told the same).
    #[arg(long, env = "MESSAGE_ENCODING", default_value = "json")]
    pub encoding: Encoding,

    /// Longest a request waits for the broker to acknowledge its messages before it answers 503.
    #[arg(long, env = "PUBLISH_TIMEOUT_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub publish_timeout_ms: u64,

    /// How long the producer waits to batch messages before sending (librdkafka linger.ms;
    /// fractions allowed). Lower is lower latency, higher is fewer, larger requests.
    #[arg(long, env = "KAFKA_LINGER_MS", default_value_t = 1.0)]
    pub linger_ms: f64,

    /// Log line format on stderr: text (for people; coloured only when stderr is a terminal) or
    /// json (one object a line, for a log collector).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// A setting whose value is allowed alone but not with the others.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Reads `.env` (if present) into the environment, then parses flags and environment.
    pub fn from_env_and_args() -> Result<Self, ConfigError> {
        // A missing .env is the normal case; a malformed one is worth knowing about.
        if let Err(e) = dotenvy::dotenv() {
            if !e.not_found() {
                return Err(ConfigError(format!(".env: {e}")));
            }
        }
        let config = Config::parse();
        config.validate()?;
        Ok(config)
    }

    /// Checks the settings against each other.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.random_user_min > self.random_user_max {
            return Err(ConfigError(format!(
                "RANDOM_USER_MIN ({}) is greater than RANDOM_USER_MAX ({})",
                self.random_user_min, self.random_user_max
            )));
        }
        if self.max_history == 0 {
            return Err(ConfigError("MAX_HISTORY must be at least 1".into()));
        }
        if self.api_tokens_for_reads && self.api_tokens_file.is_none() {
            return Err(ConfigError(
                "API_TOKENS_FOR_READS needs API_TOKENS_FILE (the tokens to require)".into(),
            ));
        }
        if !(0.0..=60_000.0).contains(&self.linger_ms) {
            return Err(ConfigError("KAFKA_LINGER_MS must be in 0..=60000".into()));
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
        assert_eq!(config.brokers, "h:1");
        assert!(config.validate().is_err());
        assert!(Config::try_parse_from(["ingest-api", "--encoding", "xml"]).is_err());
        let json = Config::try_parse_from(["ingest-api", "--log-format", "json"]).unwrap();
        assert_eq!(json.log_format, LogFormat::Json);
        assert!(Config::try_parse_from(["ingest-api", "--log-format", "xml"]).is_err());
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
            "REDIS_CA_FILE",
            "API_TOKENS_FILE",
            "API_TOKENS_FOR_READS",
        ] {
            assert!(help.contains(name), "{name} missing from --help");
        }
    }
}
