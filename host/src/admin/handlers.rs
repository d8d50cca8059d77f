//! The endpoints. Each reads what it needs from [`AdminState`] and answers
//! JSON (or Prometheus text); errors are `{"error": "..."}`.

use std::collections::BTreeMap;
use std::path::{Path as FsPath, PathBuf};

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{AdminState, Mutations};
use crate::dispatch::reload::{Candidate, ReloadError, ReloadReport, digest};
use crate::dispatch::{OutboxError, Placement};
use crate::message::{HeaderValue, MessageProperties, OutboundMessage};
use crate::plugins::manifest::is_valid_name;

/// An error answer.
pub(crate) struct ApiError(StatusCode, String);

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self(status, message.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

pub(crate) async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such endpoint")
}

pub(crate) async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this endpoint",
    )
}

/// Refuse a declared body over the limit before reading any of it (so a
/// client that sent `Expect: 100-continue` never sends it).
pub(crate) async fn check_length(
    State(state): State<AdminState>,
    request: Request,
    next: Next,
) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > state.max_body_bytes as u64) {
        return too_large(state.max_body_bytes).into_response();
    }
    next.run(request).await
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body is larger than admin.max-body-bytes ({limit} bytes)"),
    )
}

/// Constant-time comparison of the bearer token (length leaks, content
/// does not).
fn token_matches(given: &[u8], expected: &[u8]) -> bool {
    if given.len() != expected.len() {
        return false;
    }
    given
        .iter()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

/// Middleware of the mutating endpoints: 401 unless the request carries
/// the configured token (if any), 403 when they are disabled. Runs before
/// the body is read.
pub(crate) async fn require_token(
    State(state): State<AdminState>,
    request: Request,
    next: Next,
) -> Response {
    match authorize(&state, request.headers()) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

fn authorize(state: &AdminState, headers: &HeaderMap) -> ApiResult<()> {
    let token = match &state.mutations {
        Mutations::Open => return Ok(()),
        Mutations::Token(token) => token,
        Mutations::Disabled => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "mutating endpoints are disabled: the admin API is not bound to a loopback address and admin.token (WARREN_ADMIN_TOKEN) is unset",
            ));
        }
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .unwrap_or_default();
    if token_matches(given, token.expose().as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token",
        ))
    }
}

fn body_error(e: BytesRejection, limit: usize) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        too_large(limit)
    } else {
        ApiError::new(StatusCode::BAD_REQUEST, e.body_text())
    }
}

fn plugin_name(name: Result<Path<String>, PathRejection>) -> ApiResult<String> {
    let Path(name) = name.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    if is_valid_name(&name) {
        Ok(name)
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "{name:?} is not a valid plugin name (lowercase letters, digits, '-' and '_', starting with a letter or digit)"
            ),
        ))
    }
}

pub(crate) async fn live() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "live": true }))
}

pub(crate) async fn ready(State(state): State<AdminState>) -> Response {
    let r = state.view.readiness();
    let code = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(r)).into_response()
}

pub(crate) async fn status(State(state): State<AdminState>) -> Json<super::status::Status> {
    Json(super::status::Status::collect(&state.view).await)
}

/// The configuration this process runs with, read back from its
/// subsystems, as commented TOML (secrets redacted).
pub(crate) async fn config(State(state): State<AdminState>) -> Response {
    let text = state.view.wiring.config_text();
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response()
}

pub(crate) async fn metrics(State(state): State<AdminState>) -> Response {
    let Some(handle) = &state.view.metrics else {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no Prometheus recorder is installed in this process",
        )
        .into_response();
    };
    super::metric::sample(&state.view);
    handle.run_upkeep();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
        .into_response()
}

/// One plugin, as `/plugins` lists it.
#[derive(Serialize)]
pub(crate) struct PluginView {
    pub name: String,
    pub version: String,
    pub file: PathBuf,
    pub queues: Vec<String>,
    pub counters: crate::plugins::PluginCountersSnapshot,
    /// Pool slots one instance takes (admitted before each delivery).
    pub footprint: crate::plugins::footprint::Footprint,
    /// Memory one instance takes before it handles anything.
    pub memory_floor_bytes: u64,
    /// `fresh` or `reuse` (with its `max_deliveries`).
    pub instance: crate::plugins::InstancePolicy,
    /// What it may call: manifest origins granted, operator grants.
    pub outbound: crate::plugins::outbound::Grants,
    /// Whether it uses key-value state (its manifest's `state`).
    pub state: bool,
}

pub(crate) fn plugin_views(app: &super::AdminView) -> Vec<PluginView> {
    let routes = app.dispatcher.route_info();
    app.reloader
        .plugins()
        .into_iter()
        .map(|(name, p)| PluginView {
            queues: routes
                .iter()
                .filter(|r| r.plugin == name)
                .map(|r| r.queue.clone())
                .collect(),
            version: p.version().to_string(),
            file: p.path().to_path_buf(),
            counters: p.counters(),
            footprint: p.footprint(),
            memory_floor_bytes: p.memory_floor(),
            instance: p.instance_policy(),
            outbound: p.grants().clone(),
            state: p.manifest().state,
            name,
        })
        .collect()
}

pub(crate) async fn plugins(State(state): State<AdminState>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "plugins": plugin_views(&state.view),
        "failed": state.view.failed_plugins(),
    }))
}

fn reload_error(e: ReloadError) -> ApiError {
    match e {
        ReloadError::ShuttingDown => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        ReloadError::Directory(_) => {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
    }
}

pub(crate) async fn reload(State(state): State<AdminState>) -> ApiResult<Json<ReloadReport>> {
    let report = state
        .view
        .reloader
        .reload(None)
        .await
        .map_err(reload_error)?;
    Ok(Json(report))
}

pub(crate) async fn put_plugin(
    State(state): State<AdminState>,
    name: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<ReloadReport>> {
    let name = plugin_name(name)?;
    let body = body.map_err(|e| body_error(e, state.max_body_bytes))?;
    let reloader = &state.view.reloader;
    let path = reloader.dir().join(format!("{name}.wasm"));
    // Check before writing: a bad upload never reaches the directory. A
    // component compiled from these bytes before (a rollback) is reused.
    let digest = digest(&body);
    let unprocessable = |e: crate::plugins::LoadError| {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
    };
    let plugin = match reloader.compiled(&path, digest) {
        Some(c) => c.plugin,
        None => reloader
            .runtime()
            .load_bytes_with(&path, body.to_vec(), |declared| reloader.settings(declared))
            .await
            .map_err(unprocessable)?,
    };
    if plugin.name() != name {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "the component declares plugin name {:?}; upload it as /plugins/{}",
                plugin.name(),
                plugin.name()
            ),
        ));
    }
    write_atomically(reloader.dir(), &path, &body)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot write {}: {e}", path.display()),
            )
        })?;
    info!(plugin = %name, version = plugin.version(), file = %path.display(), "Plugin uploaded.");
    let report = reloader
        .reload(Some(Candidate { plugin, digest }))
        .await
        .map_err(reload_error)?;
    Ok(Json(report))
}

/// Write `bytes` to `path` through a temporary file in `dir` and a rename,
/// so a scan never sees half a file.
async fn write_atomically(dir: &FsPath, path: &FsPath, bytes: &Bytes) -> std::io::Result<()> {
    let tmp = dir.join(format!(".upload-{}.tmp", uuid::Uuid::new_v4().simple()));
    let result = async {
        let mut f = tokio::fs::File::create(&tmp).await?;
        tokio::io::AsyncWriteExt::write_all(&mut f, bytes).await?;
        f.sync_all().await?;
        drop(f);
        tokio::fs::rename(&tmp, path).await
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    result
}

pub(crate) async fn delete_plugin(
    State(state): State<AdminState>,
    name: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<ReloadReport>> {
    let name = plugin_name(name)?;
    let reloader = &state.view.reloader;
    let mut files: Vec<PathBuf> = reloader
        .plugins()
        .get(&name)
        .map(|p| p.path().to_path_buf())
        .into_iter()
        .collect();
    let own = reloader.dir().join(format!("{name}.wasm"));
    if !files.contains(&own) && own.is_file() {
        files.push(own);
    }
    if files.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no plugin named {name:?} is loaded or in the plugins directory"),
        ));
    }
    for f in &files {
        match tokio::fs::remove_file(f).await {
            Ok(()) => info!(plugin = %name, file = %f.display(), "Plugin file removed."),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(file = %f.display(), error = %e, "Cannot remove plugin file.");
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot remove {}: {e}", f.display()),
                ));
            }
        }
    }
    let report = reloader.reload(None).await.map_err(reload_error)?;
    Ok(Json(report))
}

/// `POST /publish`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PublishRequest {
    #[serde(default)]
    exchange: String,
    routing_key: String,
    /// Text, or base64 when `body_encoding` is `base64`.
    #[serde(default)]
    body: String,
    #[serde(default)]
    body_encoding: BodyEncoding,
    /// Header values: strings, integers, floats or booleans.
    #[serde(default)]
    headers: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    content_type: Option<String>,
    #[serde(default)]
    message_id: Option<String>,
    #[serde(default)]
    correlation_id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
enum BodyEncoding {
    #[default]
    Text,
    Base64,
}

#[derive(Serialize)]
pub(crate) struct Published {
    placement: &'static str,
}

fn header_value(key: &str, v: serde_json::Value) -> ApiResult<HeaderValue> {
    Ok(match v {
        serde_json::Value::String(s) => HeaderValue::String(s),
        serde_json::Value::Bool(b) => HeaderValue::Bool(b),
        serde_json::Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => HeaderValue::I64(i),
            (None, Some(f)) if f.is_finite() => HeaderValue::F64(f),
            _ => {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("header {key:?}: number out of range"),
                ));
            }
        },
        _ => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("header {key:?} must be a string, number or boolean"),
            ));
        }
    })
}

pub(crate) async fn publish(
    State(state): State<AdminState>,
    body: Result<Json<PublishRequest>, JsonRejection>,
) -> ApiResult<Json<Published>> {
    let Json(req) = body.map_err(|e| {
        let status = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return too_large(state.max_body_bytes);
        } else {
            e.status()
        };
        ApiError::new(status, e.body_text())
    })?;
    if req.exchange.len() > 255 || req.routing_key.len() > 255 {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "exchange and routing_key must be at most 255 bytes",
        ));
    }
    let body = match req.body_encoding {
        BodyEncoding::Text => Bytes::from(req.body),
        BodyEncoding::Base64 => base64::engine::general_purpose::STANDARD
            .decode(req.body.as_bytes())
            .map(Bytes::from)
            .map_err(|e| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("body is not valid base64: {e}"),
                )
            })?,
    };
    let mut properties = MessageProperties::persistent();
    properties.content_type = req.content_type;
    properties.message_id = req.message_id;
    properties.correlation_id = req.correlation_id;
    for (k, v) in req.headers {
        let value = header_value(&k, v)?;
        properties.set_header(k, value);
    }
    let msg = OutboundMessage {
        exchange: req.exchange,
        routing_key: req.routing_key,
        properties,
        body,
    };
    match state.view.dispatcher.outbox().publish(&msg).await {
        Ok(p) => Ok(Json(Published {
            placement: match p {
                Placement::Broker => "broker",
                Placement::Spool => "spool",
                Placement::DeadLettered => "dead-lettered",
            },
        })),
        Err(OutboxError { broker, spool }) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("message refused: broker: {broker}; spool: {spool}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(token_matches(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!token_matches(b"0123456789abcdeF", b"0123456789abcdef"));
        assert!(!token_matches(b"0123456789abcde", b"0123456789abcdef"));
        assert!(!token_matches(b"", b"0123456789abcdef"));
    }
}
