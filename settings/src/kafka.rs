//! Extra librdkafka properties, for what the binaries have no flag of their own (security
//! protocol, SASL, SSL, client id, timeouts, ...), given as with kcat: `-X key=value`, and in a
//! file of `key=value` lines (`KAFKA_CONFIG_FILE`). They are applied to every Kafka client a
//! binary creates, after the properties the code sets, so that they can also retune those that
//! are only tuning (`fetch.wait.max.ms`, `queued.max.messages.kbytes`, ...).
//!
//! The properties the binaries' correctness rests on cannot be set this way: see [`REFUSED`].

use std::path::Path;

use rdkafka::error::KafkaError;
use rdkafka::ClientConfig;

use crate::redact::{self, is_secret_key, REDACTED};
use crate::SettingsError;

/// Properties refused, each with why: the code sets them (or relies on librdkafka's default)
/// and something the binaries promise depends on the value. Aliases librdkafka accepts for the
/// same property are listed too.
pub const REFUSED: &[(&str, &str)] = &[
    ("bootstrap.servers", "set it with --brokers / KAFKA_BROKER"),
    ("metadata.broker.list", "set it with --brokers / KAFKA_BROKER"),
    (
        "group.id",
        "the dataflow's consumer group is --group / KAFKA_GROUP: its committed offsets say how far \
         the replay goes",
    ),
    (
        "enable.auto.commit",
        "the dataflow commits an offset only once its epoch is stored in Redis",
    ),
    (
        "auto.commit.enable",
        "the dataflow commits an offset only once its epoch is stored in Redis",
    ),
    (
        "enable.auto.offset.store",
        "the dataflow commits an offset only once its epoch is stored in Redis",
    ),
    (
        "auto.offset.reset",
        "a partition with no committed offset is read from its start, so that nothing is skipped",
    ),
    (
        "enable.partition.eof",
        "the dataflow's replay needs to hear where each partition ends",
    ),
    (
        "isolation.level",
        "read_committed (librdkafka's default) keeps messages of aborted transactions out of \
         the profiles",
    ),
    (
        "statistics.interval.ms",
        "the dataflow's catch-up reads each partition's end from the statistics",
    ),
    (
        "enable.idempotence",
        "a retried send must be stored once (idempotent producers)",
    ),
    (
        "acks",
        "a message counts as sent only once every in-sync replica holds it (acks=all)",
    ),
    (
        "request.required.acks",
        "a message counts as sent only once every in-sync replica holds it (acks=all)",
    ),
    (
        "message.timeout.ms",
        "set by --publish-timeout-ms in the ingest API; dead-letter copies wait for the broker \
         as long as it takes",
    ),
    (
        "delivery.timeout.ms",
        "set by --publish-timeout-ms in the ingest API; dead-letter copies wait for the broker \
         as long as it takes",
    ),
    (
        "linger.ms",
        "set it with the ingest API's --linger-ms / KAFKA_LINGER_MS",
    ),
    (
        "queue.buffering.max.ms",
        "set it with the ingest API's --linger-ms / KAFKA_LINGER_MS",
    ),
    (
        "partitioner",
        "murmur2_random puts a user's messages on the partition the original producer used",
    ),
    (
        "allow.auto.create.topics",
        "a missing topic is an error, never created with the broker's defaults",
    ),
    (
        "transactional.id",
        "the producers are not transactional; a transactional one would refuse every send",
    ),
];

/// Where a property came from, for errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The n-th `-X` (from 1).
    Flag(usize),
    /// A line (from 1) of `KAFKA_CONFIG_FILE`.
    File { line: usize },
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Flag(n) => write!(f, "-X #{n}"),
            Origin::File { line } => write!(f, "KAFKA_CONFIG_FILE line {line}"),
        }
    }
}

/// The extra properties, in the order given (file, then `-X`): a later value of a key wins.
#[derive(Clone, Default)]
pub struct KafkaProperties {
    properties: Vec<Property>,
}

#[derive(Clone)]
struct Property {
    key: String,
    value: String,
    origin: Origin,
}

impl std::fmt::Debug for KafkaProperties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.properties.iter().map(|p| {
                let value = if is_secret_key(&p.key) {
                    REDACTED
                } else {
                    p.value.as_str()
                };
                (p.key.as_str(), value)
            }))
            .finish()
    }
}

impl KafkaProperties {
    /// Reads `key=value` lines of a properties file; `#` comments and blank lines are skipped,
    /// and spaces around keys and values are trimmed.
    pub fn read_file(&mut self, path: &Path) -> Result<(), SettingsError> {
        let text =
            std::fs::read_to_string(path).map_err(|error| SettingsError::KafkaConfigFile {
                path: path.to_owned(),
                error,
            })?;
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let origin = Origin::File { line: index + 1 };
            let (key, value) = split(line, &origin)?;
            self.push(key, value.trim(), origin)?;
        }
        Ok(())
    }

    /// Adds one `-X key=value` argument (the value is taken as it is).
    pub fn push_argument(&mut self, argument: &str, origin: Origin) -> Result<(), SettingsError> {
        let (key, value) = split(argument, &origin)?;
        self.push(key, value, origin)
    }

    fn push(&mut self, key: &str, value: &str, origin: Origin) -> Result<(), SettingsError> {
        if let Some((_, reason)) = REFUSED.iter().find(|(refused, _)| *refused == key) {
            return Err(SettingsError::KafkaPropertyRefused {
                origin,
                key: key.to_owned(),
                reason,
            });
        }
        self.properties.push(Property {
            key: key.to_owned(),
            value: value.to_owned(),
            origin,
        });
        Ok(())
    }

    /// Whether no property was given.
    pub fn is_empty(&self) -> bool {
        self.properties.is_empty()
    }

    /// Has librdkafka check every property's name and value, as a client's creation would,
    /// without creating one (no thread, no connection).
    pub fn check(&self) -> Result<(), SettingsError> {
        let mut config = ClientConfig::new();
        self.apply(&mut config);
        match config.create_native_config() {
            Ok(_) => Ok(()),
            Err(KafkaError::ClientConfig(_, description, key, value)) => {
                Err(self.rejected(&key, &description, &value))
            }
            Err(other) => Err(SettingsError::invalid(
                "-X / KAFKA_CONFIG_FILE",
                self.redact_text(&other.to_string()),
            )),
        }
    }

    fn rejected(&self, key: &str, description: &str, value: &str) -> SettingsError {
        let origin = self
            .properties
            .iter()
            .rev()
            .find(|p| p.key == key)
            .map_or(Origin::Flag(0), |p| p.origin.clone());
        let mut reason = self.redact_text(description);
        if is_secret_key(key) {
            reason = redact::redact_values(&reason, [value]);
        }
        // librdkafka says "OpenSSL not available at build time" (or "... libcurl ...", "...
        // libsasl2 ..."): this build lacks a feature of the rdkafka crate.
        if reason.contains("not available at build time") || reason.contains("built without") {
            reason.push_str(
                " (this build has the rdkafka crate's features tokio and libz only: SSL, \
                 SASL_SSL and SCRAM need its `ssl` feature, Kerberos `gssapi`, OIDC `curl` and \
                 `ssl`; see README, Configuration)",
            );
        }
        SettingsError::KafkaPropertyRejected {
            origin,
            key: key.to_owned(),
            reason,
        }
    }

    /// Sets every property on `config`, in order, so that a later value of a key wins. Call it
    /// after the properties the code sets, so that these win over tuning defaults.
    pub fn apply(&self, config: &mut ClientConfig) {
        for property in &self.properties {
            config.set(&property.key, &property.value);
        }
    }

    /// `text` with every secret property's value shown as `***`: for librdkafka's messages
    /// (client creation errors) that may quote one.
    pub fn redact_text(&self, text: &str) -> String {
        redact::redact_values(
            text,
            self.properties
                .iter()
                .filter(|p| is_secret_key(&p.key))
                .map(|p| p.value.as_str()),
        )
    }
}

/// `key=value` → (key, value), the key trimmed and non-empty. The error never quotes the
/// argument: it may be a secret mistyped.
fn split<'a>(text: &'a str, origin: &Origin) -> Result<(&'a str, &'a str), SettingsError> {
    let syntax = |got: &str| SettingsError::KafkaPropertySyntax {
        origin: origin.clone(),
        got: got.to_owned(),
    };
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| syntax("no '=' (argument not shown: it may hold a secret)"))?;
    let key = key.trim();
    if key.is_empty() || key.contains(char::is_whitespace) {
        return Err(syntax("an empty key or one with spaces"));
    }
    Ok((key, value))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn every_refused_property_is_a_librdkafka_property() {
        // A refused name librdkafka does not know would protect nothing.
        for (key, _) in REFUSED {
            let value = match *key {
                "bootstrap.servers" | "metadata.broker.list" => "h:1",
                "group.id" | "transactional.id" => "g",
                "isolation.level" => "read_uncommitted",
                "auto.offset.reset" => "latest",
                "acks" | "request.required.acks" => "1",
                "partitioner" => "random",
                _ => "1",
            };
            let mut config = ClientConfig::new();
            config.set(*key, value);
            assert!(config.create_native_config().is_ok(), "{key}={value}");
            let mut properties = KafkaProperties::default();
            let error = properties
                .push_argument(&format!("{key}={value}"), Origin::Flag(1))
                .unwrap_err();
            assert!(
                matches!(&error, SettingsError::KafkaPropertyRefused { key: k, .. } if k == key),
                "{error}"
            );
        }
    }

    #[test]
    fn file_lines_are_parsed_and_errors_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.properties");
        std::fs::write(&path, "# c\n client.id = x \n\nbad line\n").unwrap();
        let error = KafkaProperties::default().read_file(&path).unwrap_err();
        assert!(error.to_string().contains("line 4"), "{error}");
        std::fs::write(&path, "# c\n client.id = x \n").unwrap();
        let mut properties = KafkaProperties::default();
        properties.read_file(&path).unwrap();
        let mut config = ClientConfig::new();
        properties.apply(&mut config);
        assert_eq!(config.get("client.id"), Some("x"));
    }

    #[test]
    fn syntax_errors_do_not_quote_the_argument() {
        let error = KafkaProperties::default()
            .push_argument("sasl.password:hunter2", Origin::Flag(3))
            .unwrap_err()
            .to_string();
        assert!(error.contains("-X #3"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
    }

    #[test]
    fn librdkafka_errors_name_the_property_without_its_secret() {
        let mut properties = KafkaProperties::default();
        properties
            .push_argument("ssl.key.password=hunter2", Origin::Flag(1))
            .unwrap();
        properties
            .push_argument("security.protocol=hunter2", Origin::Flag(2))
            .unwrap();
        let error = properties.check().unwrap_err().to_string();
        assert!(!error.contains("hunter2"), "{error}");
        assert!(
            error.contains("ssl.key.password") || error.contains("security.protocol"),
            "{error}"
        );
    }
}
