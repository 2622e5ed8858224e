//! The HTTP API for backends: `POST /api/{publish,broadcast,history,
//! presence,presence_stats,disconnect}` with a JSON body and
//! `Authorization: apikey KEY`. Answers are JSON: the result, or
//! `{"error":{"code":N,"message":"..."}}` with the protocol's error codes.
//! Every answer under `/api` is JSON, axum's own refusals included (a body
//! over the limit, another HTTP method, an unknown path): a backend parses
//! one format.

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use walkie_hub::HubConfig;
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

/// The API's routes. Other HTTP methods on `/api/METHOD` and every other
/// path under `/api` get JSON errors here, not the server's plain-text
/// fallback.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/{method}", post(call).fallback(not_post))
        .route("/api", any(unknown_path))
        .route("/api/", any(unknown_path))
        .route("/api/{method}/{*rest}", any(unknown_path))
}

/// What the API knows; the error for any other names them.
const METHODS: &str = "publish, broadcast, history, presence, presence_stats, disconnect";

/// Room in a request body besides `data`: a broadcast's 1000 channel
/// names of up to 255 bytes, the other fields, and JSON's own spacing.
const ENVELOPE_ROOM: usize = 1024 * 1024;

/// The largest request body: the largest message any namespace takes,
/// plus the envelope. Bigger bodies could only fail with 112 once parsed,
/// so they are refused before being read whole.
fn body_limit(config: &HubConfig) -> usize {
    config
        .default
        .iter()
        .chain(config.namespaces.values())
        .map(|ns| ns.max_message_size)
        .max()
        .unwrap_or(0)
        .saturating_add(ENVELOPE_ROOM)
}

fn too_large(limit: usize) -> ApiError {
    ApiError::from(ReplyError::new(
        ErrorCode::MessageTooLarge,
        format!("the request body is over {limit} bytes"),
    ))
}

/// Reads the body, refusing it (413, code 112) once it passes `limit`:
/// at once where its Content-Length says so, else when it gets there.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let announced = HttpBody::size_hint(&body).lower();
    if announced > u64::try_from(limit).unwrap_or(u64::MAX) {
        return Err(too_large(limit));
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large(limit)),
        Err(e) => Err(ApiError::from(ReplyError::new(
            ErrorCode::BadRequest,
            format!("cannot read the request body: {e}"),
        ))),
    }
}

/// SHA-256 of a key: keys of any length compare as 32 bytes, so the time a
/// comparison takes says nothing about the expected key's length.
fn key_digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Whether two digests are equal, looking at every byte whatever differs
/// (`black_box` keeps the compiler from stopping at the first difference).
fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a
        .iter()
        .zip(b)
        .fold(0u8, |acc, (x, y)| std::hint::black_box(acc | (x ^ y)));
    diff == 0
}

/// Checks the API key in constant time: digests of the given and the
/// expected key, compared in full.
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
    if same_digest(&key_digest(given), &key_digest(expected)) {
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
    // serde would read a struct from an array of its fields.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::from(ReplyError::new(
            ErrorCode::BadRequest,
            format!("{method}: the request body must be a JSON object"),
        )));
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::from(ReplyError::new(
            ErrorCode::BadRequest,
            format!("{method}: {e}"),
        ))
    })
}

fn unknown_method(what: &str) -> ApiError {
    ApiError::from(ReplyError::new(
        ErrorCode::MethodNotFound,
        format!("no API method `{what}` ({METHODS})"),
    ))
}

async fn call(
    State(state): State<Arc<AppState>>,
    method: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    authorized(&state, &headers)?;
    // A name that is not UTF-8 after percent-decoding names no method.
    let Ok(Path(method)) = method else {
        return Err(unknown_method("(not UTF-8)"));
    };
    let body = read_body(body, body_limit(&state.node.config)).await?;
    let node = &state.node;
    let result: Value = match method.as_str() {
        "publish" => backend::publish(node, parse(&method, &body)?).await?,
        "broadcast" => backend::broadcast(node, parse(&method, &body)?).await?,
        "history" => backend::history(node, parse(&method, &body)?).await?,
        "presence" => backend::presence(node, parse(&method, &body)?, false).await?,
        "presence_stats" => backend::presence(node, parse(&method, &body)?, true).await?,
        "disconnect" => backend::disconnect(node, parse(&method, &body)?).await?,
        other => return Err(unknown_method(other)),
    };
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        format!("{result}\n"),
    )
        .into_response())
}

/// Another HTTP method on `/api/METHOD`: 405 (axum adds `Allow: POST`).
async fn not_post() -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        ReplyError::new(ErrorCode::BadRequest, "the API takes POST requests"),
    )
}

/// A path under `/api` that names no method: 404, as an unknown method.
async fn unknown_path() -> ApiError {
    ApiError::from(ReplyError::new(
        ErrorCode::MethodNotFound,
        format!("no such API path: use POST /api/METHOD ({METHODS})"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use walkie_hub::NamespaceConfig;

    #[test]
    fn keys_compare_as_digests_of_one_size() {
        let expected = key_digest("backend-key");
        assert!(same_digest(&key_digest("backend-key"), &expected));
        // Shorter, longer, and same-length keys all take the same path.
        for wrong in ["", "b", "backend-ke", "backend-key2", "backend-kez"] {
            assert!(!same_digest(&key_digest(wrong), &expected), "{wrong:?}");
        }
    }

    #[test]
    fn the_body_limit_follows_the_largest_namespace() {
        let mut config = HubConfig {
            auth: Default::default(),
            default: Some(NamespaceConfig::default()),
            namespaces: Default::default(),
        };
        assert_eq!(body_limit(&config), 64 * 1024 + ENVELOPE_ROOM);
        let big = NamespaceConfig {
            max_message_size: 4 << 20,
            ..NamespaceConfig::default()
        };
        config.namespaces.insert("big".into(), big);
        assert_eq!(body_limit(&config), (4 << 20) + ENVELOPE_ROOM);
    }
}
