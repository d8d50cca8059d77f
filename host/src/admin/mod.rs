//! The admin HTTP API (axum): health, readiness, status, metrics, plugin
//! management and publishing.
//!
//! Reads handles (an [`AdminView`] the wiring fills) and never owns state: plugin changes go
//! through the [`crate::dispatch::reload::Reloader`], publishes through the
//! outbox. Files in the plugins directory are the one thing it writes
//! (uploads, atomically) and removes.
//!
//! | Endpoint | Answers |
//! |---|---|
//! | `GET /live` | 200 while the process runs |
//! | `GET /ready` | 200, or 503 with the reasons |
//! | `GET /status` | 200, JSON |
//! | `GET /config` | 200, the effective configuration as `warren config` prints it |
//! | `GET /metrics` | 200, Prometheus text (503 without a recorder) |
//! | `GET /plugins` | 200, JSON |
//! | `POST /plugins/reload` | 200 with the report; 503 while shutting down |
//! | `PUT /plugins/{name}` | 200 with the report; 400 bad name; 413 too large; 422 not a valid plugin |
//! | `DELETE /plugins/{name}` | 200 with the report; 400 bad name; 404 no such plugin |
//! | `POST /publish` | 200 with the placement; 400/415/422 bad request; 503 refused |
//!
//! Probes, status, config, metrics and the plugin list never need a token.
//! Mutating endpoints answer 401 (and change nothing) without the
//! configured bearer token; with no token configured they are open on a
//! loopback address and answer 403 (naming `admin.token`) on any other,
//! so a pod can expose its probes and metrics without minting a secret. Every error body is `{"error": "..."}`. A 500
//! means the plugins directory itself failed (a read or write error).
//!
//! - `handlers`: the endpoints,
//! - `status`: the `/status` document,
//! - [`metric`]: gauges sampled when `/metrics` is scraped,
//! - `view`: what it reads ([`AdminView`], [`Wiring`]).

mod handlers;
pub mod metric;
mod status;
mod view;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post, put};
use documented::{DocumentedFieldsOpt, DocumentedOpt};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::secret::Secret;
pub use view::{AdminView, Readiness, Wiring};

/// `[admin]`: the admin HTTP API.
#[derive(Debug, Clone, Deserialize, Serialize, DocumentedOpt, DocumentedFieldsOpt)]
#[serde(rename_all = "kebab-case", default)]
pub struct AdminConfig {
    /// Listen address.
    pub bind: String,
    /// Bearer token required by the mutating endpoints (reload, upload,
    /// delete, publish). Without one they are open on a loopback `bind`
    /// and answer 403 on any other; probes, status and metrics never need
    /// it.
    pub token: Option<Secret>,
    /// File holding the token (a mounted secret); instead of `token`.
    pub token_file: Option<std::path::PathBuf>,
    /// Largest request body (plugin uploads), bytes.
    pub max_body_bytes: usize,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:9090".into(),
            token: None,
            token_file: None,
            max_body_bytes: 32 << 20,
        }
    }
}

impl AdminConfig {
    /// Every problem with this section.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.bind.parse::<std::net::SocketAddr>().is_err() {
            out.push(format!(
                "admin.bind {:?} is not an address like 127.0.0.1:9090",
                self.bind
            ));
        }
        match self.resolved_token() {
            Ok(Some(t)) if t.expose().len() < 16 => {
                out.push("admin.token must be at least 16 characters".into());
            }
            Ok(_) => {}
            Err(e) => out.push(e),
        }
        out
    }

    /// The token: `token`, or the contents of `token-file`.
    pub fn resolved_token(&self) -> Result<Option<Secret>, String> {
        match (&self.token, &self.token_file) {
            (Some(_), Some(_)) => Err("admin: set token or token-file, not both".into()),
            (Some(t), None) => Ok(Some(t.clone())),
            (None, Some(path)) => {
                crate::secret::read_secret_file("admin.token-file", path).map(Some)
            }
            (None, None) => Ok(None),
        }
    }
}

/// Why the admin server could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("failed to bind the admin API to {0}: {1}")]
    Bind(String, std::io::Error),
}

/// What the handlers share.
#[derive(Clone)]
pub(crate) struct AdminState {
    pub(crate) view: AdminView,
    pub(crate) mutations: Mutations,
    pub(crate) max_body_bytes: usize,
}

/// Who may call the mutating endpoints.
#[derive(Clone)]
pub(crate) enum Mutations {
    /// Anyone: no token, bound to loopback.
    Open,
    /// Requests with this bearer token.
    Token(Arc<Secret>),
    /// Nobody: no token, bound off loopback.
    Disabled,
}

impl Mutations {
    fn new(config: &AdminConfig) -> Self {
        // Validation refuses a token file that cannot be read; should it
        // go missing since, mutations are refused rather than opened.
        let token = match config.resolved_token() {
            Ok(t) => t,
            Err(_) => return Self::Disabled,
        };
        match token {
            Some(t) => Self::Token(Arc::new(t)),
            None if is_loopback(&config.bind) => Self::Open,
            None => Self::Disabled,
        }
    }
}

/// Whether `bind` listens on loopback only (an unparseable address, which
/// validation refuses, counts as not loopback).
fn is_loopback(bind: &str) -> bool {
    bind.parse::<std::net::SocketAddr>()
        .is_ok_and(|a| a.ip().is_loopback())
}

/// Bind the admin listener (before anything else starts, so a taken port
/// fails the start).
pub async fn bind(addr: &str) -> Result<TcpListener, AdminError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| AdminError::Bind(addr.to_string(), e))
}

/// The admin API over `view`.
pub fn router(view: AdminView, config: &AdminConfig) -> Router {
    let mutations = Mutations::new(config);
    if matches!(mutations, Mutations::Disabled) {
        warn!(
            bind = %config.bind,
            "The admin API is not on loopback and admin.token is unset; reload, upload, delete and publish are disabled."
        );
    }
    let state = AdminState {
        view,
        mutations,
        max_body_bytes: config.max_body_bytes,
    };
    // The token is checked before any body is read.
    let mutating = Router::new()
        .route("/plugins/reload", post(handlers::reload))
        .route(
            "/plugins/{name}",
            put(handlers::put_plugin).delete(handlers::delete_plugin),
        )
        .route("/publish", post(handlers::publish))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            handlers::require_token,
        ));
    Router::new()
        .route("/live", get(handlers::live))
        .route("/ready", get(handlers::ready))
        .route("/status", get(handlers::status))
        .route("/config", get(handlers::config))
        .route("/metrics", get(handlers::metrics))
        .route("/plugins", get(handlers::plugins))
        .merge(mutating)
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            handlers::check_length,
        ))
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .with_state(state)
}

/// Serve until `cancel`, then finish the requests in progress.
pub async fn serve(listener: TcpListener, router: Router, cancel: CancellationToken) {
    let shutdown = async move { cancel.cancelled().await };
    if let Err(e) = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
    {
        warn!(error = %e, "The admin server stopped with an error.");
    }
}
