//! Secrets shown as `***`: values of Kafka properties whose names say they are secret, and the
//! password of a Redis URL. Used by every `Debug` impl and error that could show one.

/// What a secret is replaced with.
pub const REDACTED: &str = "***";

/// Whether the librdkafka property `key` holds a secret: its name mentions a password, a secret
/// or credentials (`sasl.password`, `ssl.key.password`, `ssl.keystore.password`,
/// `sasl.oauthbearer.client.secret`, ...), or it is one of the few whose value is a key or may
/// embed one (`ssl.key.pem`, `sasl.oauthbearer.config`).
pub fn is_secret_key(key: &str) -> bool {
    let key = key.trim().to_ascii_lowercase();
    ["password", "secret", "credentials"]
        .iter()
        .any(|word| key.contains(word))
        || matches!(
            key.as_str(),
            "ssl.key.pem" | "ssl_key" | "sasl.oauthbearer.config"
        )
}

/// `key=value` with the value shown as `***` if the key is secret. An argument without `=` is
/// shown whole as `***`: which part is the key is unknown, and it may be a mistyped secret.
pub fn redact_property_argument(argument: &str) -> String {
    match argument.split_once('=') {
        Some((key, _)) if is_secret_key(key) => format!("{key}={REDACTED}"),
        Some(_) => argument.to_owned(),
        None => REDACTED.to_owned(),
    }
}

/// `url` with the password of its user info, and any `password`/`pass` query parameter, shown as
/// `***`: `redis://user:pw@host:6379/0` → `redis://user:***@host:6379/0`,
/// `redis://:pw@host` → `redis://:***@host`. A URL without a password is returned as it is.
///
/// A Redis Cluster seed list (`redis://:pw@h1:7000,h2:7000,redis://:pw@h3:7000`) has each seed
/// redacted, when every entry after the first is a URL or a bare `host:port`; otherwise (a comma
/// inside a password, say) it is redacted as one URL, which hides everything up to its last '@'.
pub fn redact_url(url: &str) -> String {
    let mut seeds = url.split(',');
    let first = seeds.next().unwrap_or_default();
    if seeds
        .clone()
        .all(|seed| seed.contains("://") || !seed.contains('@'))
        && url.contains(',')
    {
        return std::iter::once(first)
            .chain(seeds)
            .map(redact_one_url)
            .collect::<Vec<_>>()
            .join(",");
    }
    redact_one_url(url)
}

fn redact_one_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some(parts) => parts,
        None => return url.to_owned(),
    };
    // The user info ends at the last '@' of the authority. The authority ends at the first '/',
    // '?' or '#' after that '@' (an unencoded '/' in a password would otherwise cut it short, so
    // the '@' is searched first).
    let (authority_end, rest_of_url) = match rest.rfind('@') {
        Some(at) => {
            let end = rest[at..]
                .find(['/', '?', '#'])
                .map_or(rest.len(), |i| at + i);
            (end, &rest[end..])
        }
        None => {
            let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            (end, &rest[end..])
        }
    };
    let authority = &rest[..authority_end];
    let authority = match authority.rsplit_once('@') {
        Some((user_info, host)) => match user_info.split_once(':') {
            Some((user, _password)) => format!("{user}:{REDACTED}@{host}"),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    format!(
        "{scheme}://{authority}{}",
        redact_query_passwords(rest_of_url)
    )
}

/// `password=` and `pass=` query parameters (redis+unix URLs take the password so) as `***`.
fn redact_query_passwords(path_and_query: &str) -> String {
    let Some((path, query)) = path_and_query.split_once('?') else {
        return path_and_query.to_owned();
    };
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if is_secret_query_name(name) => format!("{name}={REDACTED}"),
            _ => pair.to_owned(),
        })
        .collect();
    format!("{path}?{}", query.join("&"))
}

fn is_secret_query_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name == "pass" || name.contains("password") || name.contains("secret")
}

/// `text` with every occurrence of each of `secrets` (non-empty ones) replaced by `***`: for
/// messages from librdkafka or Redis that may quote a value.
pub fn redact_values<'a>(text: &str, secrets: impl IntoIterator<Item = &'a str>) -> String {
    let mut text = text.to_owned();
    for secret in secrets {
        if !secret.is_empty() {
            text = text.replace(secret, REDACTED);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_keys_are_recognised() {
        for key in [
            "sasl.password",
            "ssl.key.password",
            "ssl.keystore.password",
            "ssl.truststore.password",
            "sasl.oauthbearer.client.secret",
            "SASL.PASSWORD",
            "some.credentials.file",
            "ssl.key.pem",
            "sasl.oauthbearer.config",
        ] {
            assert!(is_secret_key(key), "{key}");
        }
        for key in ["sasl.username", "security.protocol", "ssl.ca.location"] {
            assert!(!is_secret_key(key), "{key}");
        }
    }

    #[test]
    fn property_arguments_keep_their_key() {
        assert_eq!(
            redact_property_argument("sasl.password=pw"),
            "sasl.password=***"
        );
        assert_eq!(redact_property_argument("client.id=me"), "client.id=me");
        assert_eq!(redact_property_argument("sasl.passwordpw"), "***");
    }

    #[test]
    fn url_passwords_are_hidden() {
        for (url, shown) in [
            ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
            ("redis://user@host:1/0", "redis://user@host:1/0"),
            ("redis://user:pw@host:1/0", "redis://user:***@host:1/0"),
            ("rediss://:pw@host", "rediss://:***@host"),
            ("redis://u:p@ss/w@rd@host:1/2", "redis://u:***@host:1/2"),
            ("redis://u:a:b@host", "redis://u:***@host"),
            (
                "redis+unix:///run/redis.sock?db=1&pass=pw",
                "redis+unix:///run/redis.sock?db=1&pass=***",
            ),
            ("not a url", "not a url"),
            (
                "redis://:pw@h1:7000,h2:7000,redis://u:pw@h3:7000",
                "redis://:***@h1:7000,h2:7000,redis://u:***@h3:7000",
            ),
            // A comma in the password: one URL, hidden up to its last '@'.
            ("redis://:pa,ss@h1:7000", "redis://:***@h1:7000"),
            ("redis://:a,b@c,d@h1:7000", "redis://:***@h1:7000"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn values_are_hidden_in_text() {
        assert_eq!(
            redact_values("bad value \"pw\" for x", ["pw", ""]),
            "bad value \"***\" for x"
        );
    }
}
