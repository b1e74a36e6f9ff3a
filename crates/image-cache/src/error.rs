//! The registry error JSON (`{"errors":[{"code","message","detail"}]}`) every failure answers with.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

/// A failure as the client sees it: an HTTP status plus a distribution error code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl RegistryError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn name_invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "NAME_INVALID", message)
    }
    pub fn name_unknown(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "NAME_UNKNOWN", message)
    }
    pub fn manifest_unknown(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN", message)
    }
    pub fn blob_unknown(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", message)
    }
    pub fn digest_invalid(status: StatusCode, message: impl Into<String>) -> Self {
        Self::new(status, "DIGEST_INVALID", message)
    }
    pub fn manifest_invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, "MANIFEST_INVALID", message)
    }
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED", message)
    }
    pub fn unavailable(status: StatusCode, message: impl Into<String>) -> Self {
        Self::new(status, "UNAVAILABLE", message)
    }
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "authentication required: log in to the cache with the credentials of its users file",
        )
    }

    pub fn to_json(&self) -> String {
        serde_json::json!({
            "errors": [{ "code": self.code, "message": self.message, "detail": null }]
        })
        .to_string()
    }
}

impl std::fmt::Display for RegistryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for RegistryError {}

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        let mut response = (self.status, self.to_json()).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"podfleet image cache\""),
            );
        }
        response
    }
}
