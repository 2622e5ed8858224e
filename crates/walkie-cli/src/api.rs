//! The HTTP API for backends: `POST /api/{publish,broadcast,history,
//! presence,presence_stats,disconnect}` with a JSON body and
//! `Authorization: apikey KEY`. Answers are JSON: the result, or
//! `{"error":{"code":N,"message":"..."}}` with the protocol's error codes.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use walkie_hub::backend;
use walkie_hub::protocol::{ErrorCode, ReplyError};

use crate::serve::AppState;

/// An API error: a status, and the JSON body that explains it.
struct ApiError(StatusCode, ReplyError);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.1.code as u16, "message": self.1.message}});
        (
            self.0,
            [(header::CONTENT_TYPE, "application/json")],
            format!("{body}\n"),
        )
            .into_response()
    }
}

impl From<ReplyError> for ApiError {
    fn from(e: ReplyError) -> Self {
        let status = match e.code {
            ErrorCode::Internal => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::PermissionDenied => StatusCode::FORBIDDEN,
            ErrorCode::MethodNotFound | ErrorCode::UnknownChannel => StatusCode::NOT_FOUND,
            ErrorCode::MessageTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::NotAvailable => StatusCode::CONFLICT,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError(status, e)
    }
}

pub fn routes() -> Router<Arc<AppState>> {
    Router::new().route("/api/{method}", post(call))
}

/// Checks the API key in constant time per byte of the expected key.
fn authorized(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = state.api_key.as_deref() else {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            ReplyError::new(
                ErrorCode::Unauthorized,
                "the HTTP API is off: start walkie with --api-key (or auth.api_key in --config)",
            ),
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("apikey "))
        .unwrap_or("");
    let same = given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::UNAUTHORIZED,
            ReplyError::new(
                ErrorCode::Unauthorized,
                "missing or wrong API key (Authorization: apikey KEY)",
            ),
        ))
    }
}

fn parse<T: DeserializeOwned>(method: &str, body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::from(ReplyError::new(
            ErrorCode::BadRequest,
            format!("{method}: {e}"),
        ))
    })
}

async fn call(
    State(state): State<Arc<AppState>>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorized(&state, &headers)?;
    let node = &state.node;
    let result: Value = match method.as_str() {
        "publish" => backend::publish(node, parse(&method, &body)?).await?,
        "broadcast" => backend::broadcast(node, parse(&method, &body)?).await?,
        "history" => backend::history(node, parse(&method, &body)?).await?,
        "presence" => backend::presence(node, parse(&method, &body)?, false).await?,
        "presence_stats" => backend::presence(node, parse(&method, &body)?, true).await?,
        "disconnect" => backend::disconnect(node, parse(&method, &body)?).await?,
        other => {
            return Err(ReplyError::new(
                ErrorCode::MethodNotFound,
                format!("no API method `{other}` (publish, broadcast, history, presence, presence_stats, disconnect)"),
            )
            .into());
        }
    };
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        format!("{result}\n"),
    )
        .into_response())
}
