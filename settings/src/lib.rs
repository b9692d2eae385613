//! The settings both streamrec binaries share, declared once: the Kafka brokers and profile
//! topic, the Redis URL, the history length, the message encoding, the log format, and extra
//! librdkafka properties (`-X key=value` and `KAFKA_CONFIG_FILE`). Each binary flattens
//! [`SharedArgs`] into its own clap configuration, so that the two take the same flags and
//! environment variables with the same bounds, and calls [`SharedArgs::resolve`] once at start,
//! which checks what clap cannot (the Kafka properties, against the refused list and librdkafka
//! itself). Every error is a [`SettingsError`] naming the setting at fault.
//!
//! Also here, because both binaries start the same way: reading `.env` ([`load_dotenv`]) and
//! installing the log subscriber ([`logging::init`]). Secrets (Kafka properties whose names say
//! they are, the password of the Redis URL) are shown as `***` by every `Debug` impl and error
//! of this crate ([`redact`]).
//!
//! The message crate `profile` stays free of clap: it is the data contract, this is the command
//! line.

pub mod kafka;
pub mod logging;
pub mod redact;

use std::path::PathBuf;

use profile::Encoding;

pub use kafka::{KafkaProperties, Origin};
pub use logging::LogFormat;

/// The settings of semantics §7 that both binaries take, with the same flags, environment
/// variables, defaults and bounds.
#[derive(Clone, clap::Args)]
pub struct SharedArgs {
    /// Kafka bootstrap servers, comma separated.
    #[arg(long, env = "KAFKA_BROKER", default_value = "localhost:9092")]
    pub brokers: String,

    /// Topic of profile messages, keyed by user_id: the ingest API publishes to it, the
    /// dataflow reads it.
    #[arg(long, env = "KAFKA_TOPIC", default_value = "user_behavior")]
    pub topic: String,

    /// Redis of the profiles: the dataflow writes them, the ingest API's GET
    /// /user_profile/{user_id} reads them. A password in it (redis://user:password@host:port/db)
    /// is shown as *** in logs and errors.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379/0")]
    pub redis: String,

    /// --redis names a Redis Cluster (7.0 or later): a comma-separated list of seed nodes,
    /// redis:// URLs or host:port entries that take the first URL's scheme and credentials,
    /// e.g. redis://:pw@10.0.0.1:7000,10.0.0.2:7000,10.0.0.3:7000. REDIS_CLUSTER=1 (or true)
    /// in the environment.
    #[arg(long, env = "REDIS_CLUSTER", value_parser = clap::builder::BoolishValueParser::new(), default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub redis_cluster: bool,

    /// History items kept per user, the newest ones (1..=10000): per message published by the
    /// ingest API, per profile in the dataflow.
    #[arg(long, env = "MAX_HISTORY", default_value_t = profile::DEFAULT_MAX_HISTORY, value_parser = parse_max_history)]
    pub max_history: usize,

    /// Recommendations per user (1..=100): how many the dataflow keeps in user_recs:{user_id},
    /// and the largest k of the ingest API's GET /recommendation/{user_id}.
    #[arg(long, env = "RECOMMENDATIONS_N", default_value_t = profile::DEFAULT_RECOMMENDATIONS_N, value_parser = parse_recommendations_n)]
    pub recommendations_n: usize,

    /// Encoding of profile message values: json (the contract's default, any client reads it)
    /// or bincode (compact; both binaries must be told the same).
    #[arg(long, env = "MESSAGE_ENCODING", default_value = "json")]
    pub encoding: Encoding,

    /// Log line format on stderr: text (for people; coloured only when stderr is a terminal) or
    /// json (one object a line, for a log collector).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// A librdkafka property for every Kafka client (repeatable, as with kcat), e.g.
    /// -X security.protocol=SASL_SSL -X sasl.mechanism=PLAIN -X sasl.username=u -X
    /// sasl.password=p. Applied after KAFKA_CONFIG_FILE (a later value wins). Properties the
    /// binaries rely on (enable.auto.commit, enable.idempotence, acks, group.id, ...) are
    /// refused; values of keys naming a password, secret or credentials are shown as ***.
    #[arg(short = 'X', long = "kafka-property", value_name = "KEY=VALUE")]
    kafka_property: Vec<String>,

    /// File of librdkafka properties for every Kafka client: key=value lines, # comments and
    /// blank lines allowed. Applied before -X.
    #[arg(long, env = "KAFKA_CONFIG_FILE", value_name = "PATH")]
    pub kafka_config_file: Option<PathBuf>,

    /// The Kafka properties of the file and of -X, checked; filled by [`SharedArgs::resolve`].
    #[arg(skip)]
    kafka: KafkaProperties,
}

impl std::fmt::Debug for SharedArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let raw: Vec<String> = self
            .kafka_property
            .iter()
            .map(|p| redact::redact_property_argument(p))
            .collect();
        f.debug_struct("SharedArgs")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("redis", &redact::redact_url(&self.redis))
            .field("redis_cluster", &self.redis_cluster)
            .field("max_history", &self.max_history)
            .field("recommendations_n", &self.recommendations_n)
            .field("encoding", &self.encoding)
            .field("log_format", &self.log_format)
            .field("kafka_property", &raw)
            .field("kafka_config_file", &self.kafka_config_file)
            .field("kafka", &self.kafka)
            .finish()
    }
}

impl SharedArgs {
    /// Checks what clap could not and reads `KAFKA_CONFIG_FILE`: the Kafka properties of the
    /// file, then of `-X`, must each be `key=value`, none may be refused, and librdkafka must
    /// accept every one (name and value). Called once at start, before anything connects.
    pub fn resolve(&mut self) -> Result<(), SettingsError> {
        let mut kafka = KafkaProperties::default();
        if let Some(path) = &self.kafka_config_file {
            kafka.read_file(path)?;
        }
        for (index, argument) in self.kafka_property.iter().enumerate() {
            kafka.push_argument(argument, Origin::Flag(index + 1))?;
        }
        kafka.check()?;
        self.kafka = kafka;
        Ok(())
    }

    /// The checked Kafka properties, to apply to every client with
    /// [`KafkaProperties::apply`]. Empty until [`SharedArgs::resolve`] ran.
    pub fn kafka(&self) -> &KafkaProperties {
        &self.kafka
    }

    /// The Redis URL with its password shown as `***`, for logs and errors.
    pub fn redis_redacted(&self) -> String {
        redact::redact_url(&self.redis)
    }
}

/// `RECOMMENDATIONS_N`: 1..=[`profile::POPULAR_ITEMS`], so that the popular items alone can
/// fill any list.
pub fn parse_recommendations_n(text: &str) -> Result<usize, String> {
    let n: usize = text.parse().map_err(|e| format!("{e}"))?;
    if (1..=profile::POPULAR_ITEMS).contains(&n) {
        Ok(n)
    } else {
        Err(format!("must be in 1..={}", profile::POPULAR_ITEMS))
    }
}

/// `MAX_HISTORY`: 1..=[`profile::MAX_HISTORY_ITEMS`], the longest history a valid message may
/// carry (semantics §2), so that the ingest API never publishes what the dataflow refuses.
pub fn parse_max_history(text: &str) -> Result<usize, String> {
    let n: usize = text.parse().map_err(|e| format!("{e}"))?;
    if (1..=profile::MAX_HISTORY_ITEMS).contains(&n) {
        Ok(n)
    } else {
        Err(format!("must be in 1..={}", profile::MAX_HISTORY_ITEMS))
    }
}

/// A configuration that cannot work, naming the setting at fault. Never holds a secret: values
/// of secret Kafka properties and Redis passwords are left out or shown as `***`.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("invalid configuration: .env: {0}")]
    DotEnv(String),
    /// A setting whose value is refused alone or together with others.
    #[error("invalid configuration: {setting}: {reason}")]
    Invalid {
        /// The flag or environment variable, as the user knows it.
        setting: String,
        reason: String,
    },
    #[error("invalid configuration: KAFKA_CONFIG_FILE {}: {error}", path.display())]
    KafkaConfigFile {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("invalid configuration: {origin}: expected key=value, got {got}")]
    KafkaPropertySyntax { origin: Origin, got: String },
    #[error(
        "invalid configuration: {origin}: Kafka property {key} cannot be set: {reason} \
         (see README, Configuration)"
    )]
    KafkaPropertyRefused {
        origin: Origin,
        key: String,
        reason: &'static str,
    },
    #[error("invalid configuration: {origin}: librdkafka refuses Kafka property {key}: {reason}")]
    KafkaPropertyRejected {
        origin: Origin,
        key: String,
        reason: String,
    },
}

impl SettingsError {
    /// A setting refused with `reason`.
    pub fn invalid(setting: impl Into<String>, reason: impl Into<String>) -> Self {
        SettingsError::Invalid {
            setting: setting.into(),
            reason: reason.into(),
        }
    }
}

/// Reads `.env` from the working directory or a parent into the environment, without
/// overriding variables already set. A missing file is the normal case; a malformed one is an
/// error.
pub fn load_dotenv() -> Result<(), SettingsError> {
    match dotenvy::dotenv() {
        Ok(_) => Ok(()),
        Err(e) if e.not_found() => Ok(()),
        Err(e) => Err(SettingsError::DotEnv(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        shared: SharedArgs,
    }

    fn parse(args: &[&str]) -> Result<SharedArgs, String> {
        let mut cli = Cli::try_parse_from(std::iter::once("cli").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        cli.shared.resolve().map_err(|e| e.to_string())?;
        Ok(cli.shared)
    }

    #[test]
    fn max_history_is_bounded_by_the_contract() {
        assert_eq!(parse(&["--max-history", "1"]).unwrap().max_history, 1);
        assert_eq!(
            parse(&["--max-history", "10000"]).unwrap().max_history,
            10_000
        );
        for bad in ["0", "10001", "x"] {
            let error = parse(&["--max-history", bad]).unwrap_err();
            assert!(error.contains("--max-history"), "{error}");
        }
    }

    #[test]
    fn recommendations_n_is_bounded_by_the_popular_list() {
        assert_eq!(parse(&[]).unwrap().recommendations_n, 10);
        assert_eq!(
            parse(&["--recommendations-n", "100"])
                .unwrap()
                .recommendations_n,
            100
        );
        for bad in ["0", "101", "ten"] {
            let error = parse(&["--recommendations-n", bad]).unwrap_err();
            assert!(error.contains("--recommendations-n"), "{error}");
        }
    }

    #[test]
    fn redis_cluster_is_a_switch_that_also_takes_a_value() {
        assert!(!parse(&[]).unwrap().redis_cluster);
        assert!(parse(&["--redis-cluster"]).unwrap().redis_cluster);
        // The forms REDIS_CLUSTER takes in the environment.
        for (value, on) in [("1", true), ("true", true), ("0", false), ("false", false)] {
            let arg = format!("--redis-cluster={value}");
            assert_eq!(parse(&[&arg]).unwrap().redis_cluster, on, "{value}");
        }
        let error = parse(&["--redis-cluster=maybe"]).unwrap_err();
        assert!(error.contains("--redis-cluster"), "{error}");
    }

    #[test]
    fn x_flags_follow_the_file_and_win() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kafka.properties");
        std::fs::write(
            &file,
            "# comment\n\nclient.id = from-file\nsocket.timeout.ms=1000\n",
        )
        .unwrap();
        let shared = parse(&[
            "--kafka-config-file",
            file.to_str().unwrap(),
            "-X",
            "client.id=from-flag",
            "--kafka-property",
            "socket.keepalive.enable=true",
        ])
        .unwrap();
        let mut config = rdkafka::ClientConfig::new();
        shared.kafka().apply(&mut config);
        assert_eq!(config.get("client.id"), Some("from-flag"));
        assert_eq!(config.get("socket.timeout.ms"), Some("1000"));
        assert_eq!(config.get("socket.keepalive.enable"), Some("true"));
    }

    #[test]
    fn bad_properties_are_refused_by_name() {
        let error = parse(&["-X", "client.id"]).unwrap_err();
        assert!(
            error.contains("-X #1") && error.contains("key=value"),
            "{error}"
        );
        let error = parse(&["-X", "client.id=a", "-X", "enable.auto.commit=true"]).unwrap_err();
        assert!(
            error.contains("-X #2") && error.contains("enable.auto.commit"),
            "{error}"
        );
        let error = parse(&["-X", "no.such.property=1"]).unwrap_err();
        assert!(error.contains("no.such.property"), "{error}");
        let error = parse(&["--kafka-config-file", "/nonexistent/kafka.properties"]).unwrap_err();
        assert!(
            error.contains("KAFKA_CONFIG_FILE") && error.contains("/nonexistent/kafka.properties"),
            "{error}"
        );
    }

    #[test]
    fn debug_shows_no_secret() {
        let shared = parse(&[
            "--redis",
            "redis://app:hunter2@redis.internal:6379/0",
            "-X",
            "sasl.username=app",
            "-X",
            "sasl.password=hunter3",
        ])
        .unwrap();
        let debug = format!("{shared:?}");
        for secret in ["hunter2", "hunter3"] {
            assert!(!debug.contains(secret), "{debug}");
        }
        assert!(
            debug.contains("redis://app:***@redis.internal:6379/0"),
            "{debug}"
        );
        assert!(debug.contains("sasl.username=app"), "{debug}");
        // Keys this build of librdkafka refuses (they need SSL) are secret all the same.
        let mut properties = KafkaProperties::default();
        for (n, argument) in [
            "ssl.key.password=hunter4",
            "ssl.keystore.password=hunter5",
            "sasl.oauthbearer.client.secret=hunter6",
            "client.id=visible",
        ]
        .iter()
        .enumerate()
        {
            properties.push_argument(argument, Origin::Flag(n)).unwrap();
        }
        let debug = format!("{properties:?}");
        for secret in ["hunter4", "hunter5", "hunter6"] {
            assert!(!debug.contains(secret), "{debug}");
        }
        assert!(debug.contains("visible"), "{debug}");
    }
}
