//! Request extractors whose every refusal is a problem+json naming what was
//! wrong: a body that is not JSON, has an unknown field or a wrong type, is
//! too large, or comes with another content type; a bad query; a path that
//! is not UTF-8.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::ApiError;

/// A JSON body; an empty one reads as `{}` (for bodies whose every field
/// may be left out).
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let content_type = request
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_ascii_lowercase);
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(body_rejection)?;
        let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            let json = content_type.as_deref().is_some_and(|ct| {
                let essence = ct.split(';').next().unwrap_or("").trim();
                essence == "application/json" || essence.ends_with("+json")
            });
            if !json {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported-media-type",
                    format!(
                        "the body must be JSON with Content-Type: application/json (got {})",
                        content_type.as_deref().unwrap_or("no content type")
                    ),
                ));
            }
            &bytes
        };
        serde_json::from_slice(text).map(JsonBody).map_err(|e| {
            let (status, kind) = match e.classify() {
                serde_json::error::Category::Data => {
                    (StatusCode::UNPROCESSABLE_ENTITY, "invalid-body")
                }
                _ => (StatusCode::BAD_REQUEST, "malformed-json"),
            };
            ApiError::new(status, kind, format!("the request body: {e}"))
        })
    }
}

fn body_rejection(rejection: BytesRejection) -> ApiError {
    let status = rejection.status();
    let kind = if status == StatusCode::PAYLOAD_TOO_LARGE {
        "body-too-large"
    } else {
        "bad-body"
    };
    ApiError::new(
        status,
        kind,
        format!("the request body: {}", rejection.body_text()),
    )
}

/// Query parameters; unknown ones and bad values are refused.
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        Query::<T>::try_from_uri(&parts.uri)
            .map(|q| QueryParams(q.0))
            .map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid-query",
                    format!("the query string: {}", e.body_text()),
                )
            })
    }
}

/// The `{gid}` path segment (percent-decoded).
pub struct GidPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for GidPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|p| GidPath(p.0))
            .map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid-path",
                    format!("the gid in the path: {}", e.body_text()),
                )
            })
    }
}
