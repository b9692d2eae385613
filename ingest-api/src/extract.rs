//! Request extractors whose rejections are [`AppError`]s, so every client fault gets the API's
//! JSON error body and the right status.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::error::AppError;

/// The largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// A JSON request body.
///
/// Like the original FastAPI service it accepts a body without a content type as JSON; a body
/// declared as something else is refused with 415. Malformed JSON is 400, JSON of the wrong shape
/// or type is 422, a body over [`MAX_BODY_BYTES`] is 413.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = AppError;

    async fn from_request(request: Request, state: &S) -> Result<Self, AppError> {
        if let Some(content_type) = request.headers().get(CONTENT_TYPE) {
            let is_json = content_type.to_str().is_ok_and(|value| {
                let essence = value.split(';').next().unwrap_or("").trim();
                essence.eq_ignore_ascii_case("application/json")
                    || essence.to_ascii_lowercase().ends_with("+json")
            });
            if !is_json {
                return Err(AppError::UnsupportedMediaType);
            }
        }
        let body = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    AppError::PayloadTooLarge(MAX_BODY_BYTES)
                } else {
                    AppError::MalformedJson(rejection.body_text())
                }
            })?;
        serde_json::from_slice(&body).map(JsonBody).map_err(|e| {
            if e.is_data() {
                AppError::Unprocessable(e.to_string())
            } else {
                AppError::MalformedJson(e.to_string())
            }
        })
    }
}

/// A `{user_id}` path segment.
#[derive(Debug)]
pub struct UserIdPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for UserIdPath {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, AppError> {
        let axum::extract::Path(user_id) =
            axum::extract::Path::<String>::from_request_parts(parts, state)
                .await
                .map_err(|rejection| AppError::Unprocessable(rejection.body_text()))?;
        profile::validate_user_id(&user_id).map_err(|e| AppError::Unprocessable(e.to_string()))?;
        Ok(UserIdPath(user_id))
    }
}
