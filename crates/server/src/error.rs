//! Errors as OpenAI returns them: a status code and `{"error": {"message", "type", "param", "code"}}`.

use std::borrow::Cow;

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, `server_error`, ...
    pub kind: &'static str,
    /// The request field at fault: a name kiln knows, or one the client sent (an unknown field).
    pub param: Option<Cow<'static, str>>,
    pub code: Option<&'static str>,
    /// Seconds the client should wait before trying again, sent as `Retry-After`. A 503 without
    /// one says 1 (overload clears as soon as a request finishes).
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// A 400 about one request field.
    pub fn bad_param(param: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { param: Some(Cow::Borrowed(param)), ..ApiError::bad_request(message) }
    }

    pub fn not_found(message: impl Into<String>, code: &'static str) -> ApiError {
        ApiError { status: StatusCode::NOT_FOUND, code: Some(code), ..ApiError::bad_request(message) }
    }

    pub fn unauthorized() -> ApiError {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "missing or incorrect API key: send `Authorization: Bearer KEY`".into(),
            kind: "authentication_error",
            param: None,
            code: Some("invalid_api_key"),
            retry_after: None,
        }
    }

    pub fn too_large(limit: usize) -> ApiError {
        ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: Some("request_too_large"),
            ..ApiError::bad_request(format!("the request body is larger than the limit of {limit} bytes"))
        }
    }

    /// The queue is full or the server is shutting down: the client may retry later.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: Some("overloaded"),
            retry_after: Some(1),
        }
    }

    /// The client took longer than `limit` to send its request body (`--body-timeout`).
    pub fn body_timeout(limit: Duration) -> ApiError {
        ApiError {
            status: StatusCode::REQUEST_TIMEOUT,
            code: Some("request_timeout"),
            ..ApiError::bad_request(format!(
                "the request body did not arrive within {} s (--body-timeout)",
                limit.as_secs_f64()
            ))
        }
    }

    /// The request ran longer than the server allows (`--request-timeout`). 504, not 408: the
    /// client was not slow, the work was.
    pub fn request_timeout(limit: Duration) -> ApiError {
        ApiError {
            status: StatusCode::GATEWAY_TIMEOUT,
            message: format!("the request ran past the time limit of {} s (--request-timeout)", limit.as_secs_f64()),
            kind: "server_error",
            param: None,
            code: Some("timeout"),
            retry_after: None,
        }
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
            retry_after: None,
        }
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(self.body())).into_response();
        let h = resp.headers_mut();
        let retry = self.retry_after.or((self.status == StatusCode::SERVICE_UNAVAILABLE).then_some(1));
        if let Some(s) = retry {
            h.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        // RFC 7235: a 401 names the scheme that would be accepted.
        if self.status == StatusCode::UNAUTHORIZED {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}
