//! Outbound HTTP: `get`/`post` with JSON, headers and status, through
//! Warren's `http` interface (the same grants, pool and limits as
//! `wasi:http/outgoing-handler`, which a plugin may also use directly).
//!
//! ```ignore
//! let order: serde_json::Value = warren_sdk::http::get("https://api.example.com/orders/7")
//!     .header("accept", "application/json")
//!     .send()?          // a refused or failed call becomes a HandleError
//!     .retry_if_busy()? // 429 and 503 retry after their Retry-After
//!     .json()?;
//! ```
//!
//! A call is refused (naming the rule) unless the operator granted its
//! origin; see the manifest's [`crate::Manifest::outbound`]. Redirects are
//! returned, not followed.

use crate::HandleError;
use crate::bindings::warren::plugin::http as wit;

pub use wit::HttpError as Error;

/// Delay used for a 429 or 503 without a usable `Retry-After`.
const DEFAULT_RETRY_MS: u32 = 1000;

/// A request being built.
#[derive(Debug, Clone)]
pub struct Request(wit::HttpRequest);

/// A `GET` of `url`.
pub fn get(url: &str) -> Request {
    request("GET", url)
}

/// A `POST` to `url`.
pub fn post(url: &str) -> Request {
    request("POST", url)
}

/// A request with any method.
pub fn request(method: &str, url: &str) -> Request {
    Request(wit::HttpRequest {
        method: method.to_string(),
        url: url.to_string(),
        headers: Vec::new(),
        body: None,
        timeout_ms: None,
    })
}

impl Request {
    /// Add a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.0.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Set the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.0.body = Some(body.into());
        self
    }

    /// Set a JSON body and its content type.
    pub fn json<T: serde::Serialize + ?Sized>(self, value: &T) -> Self {
        let body = serde_json::to_vec(value).unwrap_or_default();
        self.header("content-type", "application/json").body(body)
    }

    /// This call's timeout (the delivery's wall budget still caps it).
    pub fn timeout_ms(mut self, ms: u32) -> Self {
        self.0.timeout_ms = Some(ms);
        self
    }

    /// Send it and wait for the whole response.
    pub fn send(self) -> Result<Response, Error> {
        wit::fetch(&self.0).map(|r| Response {
            status: r.status,
            headers: r.headers,
            body: r.body,
        })
    }
}

/// A whole response, whatever its status.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Names in lowercase.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// True for 2xx.
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON; a body that does not parse rejects.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, HandleError> {
        serde_json::from_slice(&self.body)
            .map_err(|e| HandleError::reject(format!("response is not the JSON expected: {e}")))
    }

    /// `Err(retry after the response's Retry-After)` for 429 and 503, the
    /// response itself otherwise.
    pub fn retry_if_busy(self) -> Result<Self, HandleError> {
        if self.status != 429 && self.status != 503 {
            return Ok(self);
        }
        let delay = self
            .header("retry-after")
            .and_then(|v| v.trim().parse::<u32>().ok())
            .map_or(DEFAULT_RETRY_MS, |s| s.saturating_mul(1000));
        Err(HandleError::retry_after(
            format!("downstream answered {}", self.status),
            delay,
        ))
    }
}

/// One line saying what went wrong, with the host's reason.
pub fn describe(e: &Error) -> String {
    match e {
        Error::Denied(t) => format!("outbound call {t}"),
        Error::Timeout(t) => format!("outbound call timed out: {t}"),
        Error::TooLarge(t) => format!("outbound response too large: {t}"),
        Error::Invalid(t) => format!("invalid outbound request: {t}"),
        Error::Failed(t) => format!("outbound call failed: {t}"),
    }
}

/// A refused, oversized or invalid call rejects the delivery (another
/// attempt would meet the same rule); a timeout or a failed exchange
/// retries it.
impl From<Error> for HandleError {
    fn from(e: Error) -> Self {
        let text = describe(&e);
        match e {
            Error::Timeout(_) | Error::Failed(_) => HandleError::retry(text),
            Error::Denied(_) | Error::TooLarge(_) | Error::Invalid(_) => HandleError::reject(text),
        }
    }
}
