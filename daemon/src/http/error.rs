//! Errors of the native API: a status and a JSON body that names the problem.
use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid value {value:?} for `{param}`: {reason}")]
    BadParam { param: &'static str, value: String, reason: String },
    #[error("missing required parameter `{0}`")]
    MissingParam(&'static str),
    #[error("unknown parameter `{name}` (accepted: {accepted})")]
    UnknownParam { name: String, accepted: String },
    #[error("parameter `{0}` given more than once")]
    DuplicateParam(String),
    #[error("no such endpoint: {0}")]
    NotFound(String),
    #[error("{0}")]
    Unavailable(String),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.to_string() });
        if let Self::BadParam { param, .. } | Self::MissingParam(param) = &self {
            body["parameter"] = json!(param);
        }
        (self.status(), Json(body)).into_response()
    }
}
