//! The one error type of the HTTP API. Every failure a client can see becomes a JSON body
//! `{"status":"error","message":...}` with the right status; internal details go to the log,
//! never to the client.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

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
    /// The Kafka broker did not acknowledge in time or refused the message.
    #[error("Kafka broker unavailable, try again later")]
    BrokerUnavailable,
    /// Redis did not answer in time.
    #[error("Redis unavailable, try again later")]
    RedisUnavailable,
}

impl AppError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            AppError::MalformedJson(_) => StatusCode::BAD_REQUEST,
            AppError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            AppError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            AppError::NotFound(_) => StatusCode::NOT_FOUND,
            AppError::BrokerUnavailable | AppError::RedisUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
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
        (self.status(), Json(body)).into_response()
    }
}
