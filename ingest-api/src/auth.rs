//! Bearer tokens for the write endpoints (and, when configured, the profile reads).
//!
//! The tokens come from a file read once at start (`API_TOKENS_FILE`). Only their SHA-256
//! digests are kept, and a presented token is hashed and compared with every digest in constant
//! time, so neither the comparison's timing nor a memory dump gives a token away. Tokens are
//! never logged: failures log the reason only.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::AppError;

/// Why the tokens file cannot be used; the service does not start.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("cannot read the API tokens file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the API tokens file {path} holds no token (one a line; # starts a comment line)")]
    Empty { path: PathBuf },
    /// The line number only: the line may be a token, which must not reach a log.
    #[error(
        "the API tokens file {path}, line {line}: a token must be printable ASCII without \
         spaces (put comments on lines of their own)"
    )]
    BadToken { path: PathBuf, line: usize },
}

/// Why a request was refused; each is a 401 with `WWW-Authenticate: Bearer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    #[error("missing bearer token: send Authorization: Bearer <token>")]
    Missing,
    #[error("the Authorization header must use the Bearer scheme")]
    WrongScheme,
    #[error("invalid bearer token")]
    InvalidToken,
}

/// The accepted tokens, as digests.
pub struct ApiTokens {
    digests: Vec<[u8; 32]>,
    protect_reads: bool,
}

// Not derived: even digests stay out of debug output.
impl std::fmt::Debug for ApiTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiTokens")
            .field("tokens", &self.digests.len())
            .field("protect_reads", &self.protect_reads)
            .finish()
    }
}

impl ApiTokens {
    /// Reads the tokens file: one token a line, blank lines and lines starting with `#`
    /// ignored, surrounding whitespace trimmed. A file without any token is an error, so that
    /// a mistake cannot leave every request refused (or, worse, look configured and not be).
    pub fn load(path: &Path, protect_reads: bool) -> Result<Self, TokenFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, protect_reads).map_err(|error| match error {
            ParseError::Empty => TokenFileError::Empty {
                path: path.to_owned(),
            },
            ParseError::BadToken { line } => TokenFileError::BadToken {
                path: path.to_owned(),
                line,
            },
        })
    }

    fn parse(text: &str, protect_reads: bool) -> Result<Self, ParseError> {
        let mut digests = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let token = line.trim();
            if token.is_empty() || token.starts_with('#') {
                continue;
            }
            // What an HTTP client can send after "Bearer " as one token.
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ParseError::BadToken { line: index + 1 });
            }
            digests.push(digest(token.as_bytes()));
        }
        if digests.is_empty() {
            return Err(ParseError::Empty);
        }
        Ok(ApiTokens {
            digests,
            protect_reads,
        })
    }

    /// How many tokens are accepted.
    pub fn len(&self) -> usize {
        self.digests.len()
    }

    /// Always false: a loaded set holds at least one token.
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Whether GET /user_profile/{user_id} needs a token too.
    pub fn protects_reads(&self) -> bool {
        self.protect_reads
    }

    /// Whether `token` is one of the accepted tokens. Every digest is compared, in constant
    /// time, whatever matches.
    pub fn accepts(&self, token: &[u8]) -> bool {
        let presented = digest(token);
        let mut found = subtle::Choice::from(0);
        for accepted in &self.digests {
            found |= accepted.ct_eq(&presented);
        }
        found.into()
    }

    /// Checks a request's `Authorization` header value.
    pub fn check(&self, header: Option<&[u8]>) -> Result<(), AuthFailure> {
        let header = header.ok_or(AuthFailure::Missing)?;
        // The scheme is case-insensitive (RFC 9110 §11.1); one space separates it from the
        // token here, as every client sends it.
        let token = match header.split_at_checked(7) {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case(b"Bearer ") => token,
            _ => return Err(AuthFailure::WrongScheme),
        };
        if self.accepts(token) {
            Ok(())
        } else {
            Err(AuthFailure::InvalidToken)
        }
    }
}

enum ParseError {
    Empty,
    BadToken { line: usize },
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// Middleware of the protected routes: passes a request with an accepted bearer token on, and
/// answers anything else 401 before the body is read.
pub async fn require_token(
    State(tokens): State<Arc<ApiTokens>>,
    request: Request,
    next: Next,
) -> Response {
    let header = request.headers().get(AUTHORIZATION).map(|v| v.as_bytes());
    match tokens.check(header) {
        Ok(()) => next.run(request).await,
        Err(failure) => {
            // The reason only: the header may hold a real token with a typo.
            tracing::debug!(reason = %failure, path = %request.uri().path(), "request refused");
            AppError::Unauthorized(failure).into_response()
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn tokens(text: &str) -> ApiTokens {
        ApiTokens::parse(text, false).ok().unwrap()
    }

    #[test]
    fn comments_blank_lines_and_whitespace_are_skipped() {
        let t = tokens("# ops team\n\n  alpha-1  \n#beta\nbeta-2\r\n");
        assert_eq!(t.len(), 2);
        assert!(t.accepts(b"alpha-1"));
        assert!(t.accepts(b"beta-2"));
        assert!(!t.accepts(b"#beta"));
        assert!(!t.accepts(b"beta"));
        assert!(!t.accepts(b""));
    }

    #[test]
    fn a_file_without_tokens_or_with_a_spaced_token_is_refused() {
        assert!(matches!(
            ApiTokens::parse("# nothing\n\n", false),
            Err(ParseError::Empty)
        ));
        assert!(matches!(
            ApiTokens::parse("", false),
            Err(ParseError::Empty)
        ));
        assert!(matches!(
            ApiTokens::parse("ok\nsecret # a comment\n", false),
            Err(ParseError::BadToken { line: 2 })
        ));
    }

    #[test]
    fn the_header_needs_the_bearer_scheme_and_an_accepted_token() {
        let t = tokens("s3cret");
        assert_eq!(t.check(None), Err(AuthFailure::Missing));
        assert_eq!(
            t.check(Some(b"Basic czNjcmV0")),
            Err(AuthFailure::WrongScheme)
        );
        assert_eq!(t.check(Some(b"s3cret")), Err(AuthFailure::WrongScheme));
        assert_eq!(t.check(Some(b"Bearer")), Err(AuthFailure::WrongScheme));
        assert_eq!(
            t.check(Some(b"Bearer wrong")),
            Err(AuthFailure::InvalidToken)
        );
        assert_eq!(
            t.check(Some(b"Bearer s3cret ")),
            Err(AuthFailure::InvalidToken)
        );
        assert_eq!(t.check(Some(b"Bearer s3cret")), Ok(()));
        assert_eq!(t.check(Some(b"bearer s3cret")), Ok(()));
    }

    #[test]
    fn debug_output_shows_no_token() {
        let t = tokens("s3cret");
        let shown = format!("{t:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("tokens: 1"), "{shown}");
    }
}
