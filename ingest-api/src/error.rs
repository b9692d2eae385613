//! The one error type of the HTTP API. Every failure a client can see becomes a JSON body
//! `{"status":"error","message":...}` with the right status; internal details go to the log,
//! never to the client.

use axum::extract::Request;
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::AuthFailure;

/// An error a handler returns.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The request body is not JSON.
    #[error("request body is not valid JSON: {0}")]
    MalformedJson(String),
    /// The request is JSON but not of the expected shape or range.
    #[error("{0}")]
    Unprocessable(String),
    /// The request body is larger than the limit.
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// The request declares a content type that is not JSON.
    #[error("request body must be application/json")]
    UnsupportedMediaType,
    /// The thing asked for does not exist.
    #[error("{0}")]
    NotFound(&'static str),
    /// No endpoint has this path.
    #[error("no endpoint at this path; see /docs")]
    NoRoute,
    /// The path exists but not with this method; the router adds the `Allow` header.
    #[error("method not allowed on this path")]
    MethodNotAllowed,
    /// An error response that a layer or a library (not one of our handlers) made, rewritten so
    /// that its body is JSON like every other error. The message is the status's reason phrase.
    #[error("{}", .0.canonical_reason().unwrap_or("error"))]
    Status(StatusCode),
    /// The Kafka broker did not acknowledge in time or refused the message.
    #[error("Kafka broker unavailable, try again later")]
    BrokerUnavailable,
    /// Redis did not answer in time.
    #[error("Redis unavailable, try again later")]
    RedisUnavailable,
    /// Redis refused the read for a reason waiting does not fix (no permission, bad
    /// credentials): the service's configuration is wrong. The log says what Redis said.
    #[error("Redis refused the read; the service's Redis configuration needs fixing")]
    RedisRefused,
    /// A value Redis holds is not what the dataflow writes (another program wrote the key):
    /// the client cannot fix it; the log says which key.
    #[error("the stored {0} are not valid; see the service's log")]
    CorruptValue(&'static str),
    /// The route needs a bearer token and the request has no accepted one.
    #[error("{0}")]
    Unauthorized(AuthFailure),
}

impl AppError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            AppError::MalformedJson(_) => StatusCode::BAD_REQUEST,
            AppError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            AppError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            AppError::NotFound(_) | AppError::NoRoute => StatusCode::NOT_FOUND,
            AppError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            AppError::Status(status) => *status,
            AppError::BrokerUnavailable | AppError::RedisUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            AppError::RedisRefused | AppError::CorruptValue(_) => StatusCode::INTERNAL_SERVER_ERROR,
            AppError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
        }
    }
}

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// Always `"error"`.
    #[schema(example = "error")]
    pub status: &'static str,
    /// What went wrong, for a person.
    #[schema(example = "No history found")]
    pub message: String,
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            status: "error",
            message: self.to_string(),
        };
        let mut response = (self.status(), Json(body)).into_response();
        if let AppError::Unauthorized(failure) = self {
            // RFC 6750 §3: the challenge, with error="invalid_token" when a token was sent
            // and is not accepted.
            let challenge = match failure {
                AuthFailure::InvalidToken => {
                    r#"Bearer realm="streamrec-ingest-api", error="invalid_token""#
                }
                AuthFailure::Missing | AuthFailure::WrongScheme => {
                    r#"Bearer realm="streamrec-ingest-api""#
                }
            };
            response
                .headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
        }
        response
    }
}

/// Middleware that gives an error response made outside our handlers (by a layer, by axum
/// itself, or by the docs service) the JSON body of [`AppError`], keeping its status and headers
/// (`Allow`, for instance). Responses that are already JSON pass through untouched.
pub async fn json_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) || is_json(response.headers()) {
        return response;
    }
    let (mut parts, _body) = response.into_parts();
    let rewritten = AppError::Status(status).into_response();
    let (json_parts, body) = rewritten.into_parts();
    // The new body has its own type and length; every other header of the original stays.
    parts.headers.remove(CONTENT_LENGTH);
    parts.headers.extend(json_parts.headers);
    Response::from_parts(parts, body)
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"))
}
