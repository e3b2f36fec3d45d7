//! The inventory API's errors: every one a JSON body `{"error": code, "field": …, "message": …}`
//! with a 4xx or 5xx status, never a stack trace.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

/// An error answer of the API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: a path parameter, query parameter or body field is malformed.
    #[error("{field}: {message}")]
    BadField { field: &'static str, message: String },
    /// 401: an admin route without a bearer token.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: an admin route with a wrong token.
    #[error("{0}")]
    Forbidden(String),
    /// 413: the body is over the limit.
    #[error("{0}")]
    TooLarge(String),
    /// 409: the request conflicts with what the reserver decided (not enough stock, closed).
    #[error("{0}")]
    Conflict(String),
    /// 504: no answer in time; the request may still complete and is safe to retry.
    #[error("{0}")]
    Timeout(String),
    /// 404: the store (or reservation) is not known to the stock reserver.
    #[error("{0}")]
    NotFound(String),
    /// 503: the replica has not caught up with the reserver's state yet.
    #[error("{0}")]
    Unavailable(String),
    /// 500: the state holds something this build cannot read (logged, body without details).
    #[error("{0}")]
    Internal(String),
}

/// The JSON body of an error answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// `bad_request`, `unauthorized`, `forbidden`, `not_found`, `conflict`, `timeout`,
    /// `unavailable` or `internal`.
    pub error: &'static str,
    /// The offending field or parameter, when one is to blame.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<&'static str>,
    pub message: String,
}

impl ApiError {
    /// The status and body of this error.
    pub fn parts(&self) -> (StatusCode, ErrorBody) {
        match self {
            ApiError::BadField { field, message } => {
                (StatusCode::BAD_REQUEST, ErrorBody { error: "bad_request", field: Some(field), message: message.clone() })
            }
            ApiError::Unauthorized(m) => (StatusCode::UNAUTHORIZED, ErrorBody { error: "unauthorized", field: None, message: m.clone() }),
            ApiError::Forbidden(m) => (StatusCode::FORBIDDEN, ErrorBody { error: "forbidden", field: None, message: m.clone() }),
            ApiError::TooLarge(m) => {
                (StatusCode::PAYLOAD_TOO_LARGE, ErrorBody { error: "too_large", field: Some("body"), message: m.clone() })
            }
            ApiError::Conflict(m) => (StatusCode::CONFLICT, ErrorBody { error: "conflict", field: None, message: m.clone() }),
            ApiError::Timeout(m) => (
                StatusCode::GATEWAY_TIMEOUT,
                ErrorBody {
                    error: "timeout",
                    field: None,
                    message: format!("{m}; the request may still complete; retrying it unchanged is safe"),
                },
            ),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, ErrorBody { error: "not_found", field: None, message: m.clone() }),
            ApiError::Unavailable(m) => {
                (StatusCode::SERVICE_UNAVAILABLE, ErrorBody { error: "unavailable", field: None, message: m.clone() })
            }
            ApiError::Internal(m) => {
                tracing::error!(error = %m, "inventory API: internal error");
                (StatusCode::INTERNAL_SERVER_ERROR, ErrorBody { error: "internal", field: None, message: "internal error (logged)".into() })
            }
        }
    }
}

impl ApiError {
    /// A body the JSON extractor refused (malformed JSON, an unknown or missing field, a wrong
    /// type, a wrong content type) as a 400 naming `body`; a body over the limit is 413.
    pub fn from_json(e: axum::extract::rejection::JsonRejection) -> ApiError {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return ApiError::TooLarge(e.body_text());
        }
        ApiError::BadField { field: "body", message: e.body_text() }
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> ApiError {
        ApiError::Internal(format!("{e:#}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = self.parts();
        (status, Json(body)).into_response()
    }
}
