//! Key-value state: `get`, `set`, `delete`, `increment` and JSON values on
//! the plugin's own bucket, through Warren's resource-free `kv` interface
//! (the same store and rules as `wasi:keyvalue`, which a plugin may also
//! use directly). The manifest says it uses state: [`crate::Manifest::state`].
//!
//! ```ignore
//! let seen = warren_sdk::kv::increment(&format!("count:{customer}"), 1)?;
//! let prefs: Option<Prefs> = warren_sdk::kv::get_json("prefs")?;
//! ```
//!
//! Writes are collected like `publish`: they reach the store only when
//! `handle` returns `Ok` (after the outputs are confirmed, before the ack),
//! and a retry, reject or panic discards them. Reads see the delivery's own
//! pending writes, not other deliveries' (see `wit/plugin.wit`).

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::HandleError;
use crate::bindings::warren::plugin::kv as wit;

/// Why an operation failed: `LimitExceeded` (a key, a value or the
/// delivery's writes over a limit), `Invalid` (an empty key, `increment`
/// of a value that is not an integer, a value that is not the JSON
/// expected) or `Unavailable` (the store cannot be reached).
pub use wit::KvError as Error;

/// The value of `key`: this delivery's pending write if there is one, else
/// the committed value; `None` when there is neither.
pub fn get(key: &str) -> Result<Option<Vec<u8>>, Error> {
    wit::get(key)
}

/// Set `key` to `value` when the delivery commits.
pub fn set(key: &str, value: impl AsRef<[u8]>) -> Result<(), Error> {
    wit::set(key, value.as_ref())
}

/// Delete `key` when the delivery commits.
pub fn delete(key: &str) -> Result<(), Error> {
    wit::delete(key)
}

/// Add `delta` to the integer in `key` (absent counts as 0) when the
/// delivery commits; returns the value this delivery now sees. The value is
/// kept as decimal text (`get` returns `b"42"`).
pub fn increment(key: &str, delta: i64) -> Result<i64, Error> {
    wit::increment(key, delta)
}

/// Add `delta` to the integer in `key` when the delivery commits, without
/// reading it: [`increment`] without the answer, and without its round
/// trip to Redis. The cheap way to count.
pub fn add(key: &str, delta: i64) -> Result<(), Error> {
    wit::add(key, delta)
}

/// The value of `key` parsed as JSON; a value that does not parse as `T`
/// is `Error::Invalid`.
pub fn get_json<T: DeserializeOwned>(key: &str) -> Result<Option<T>, Error> {
    match get(key)? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::Invalid(format!("value of {key} is not the JSON expected: {e}"))),
    }
}

/// Set `key` to `value` as JSON when the delivery commits.
pub fn set_json<T: Serialize + ?Sized>(key: &str, value: &T) -> Result<(), Error> {
    let bytes = serde_json::to_vec(value)
        .map_err(|e| Error::Invalid(format!("value for {key} does not serialize: {e}")))?;
    set(key, bytes)
}

impl Error {
    /// The case as the contract names it: `limit-exceeded`, `invalid` or
    /// `unavailable`.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::LimitExceeded(_) => "limit-exceeded",
            Error::Invalid(_) => "invalid",
            Error::Unavailable(_) => "unavailable",
        }
    }

    /// The host's reason.
    pub fn text(&self) -> &str {
        match self {
            Error::LimitExceeded(t) | Error::Invalid(t) | Error::Unavailable(t) => t,
        }
    }
}

/// One line saying what went wrong, with the host's reason.
pub fn describe(e: &Error) -> String {
    match e {
        Error::LimitExceeded(t) => format!("state limit exceeded: {t}"),
        Error::Invalid(t) => format!("invalid state operation: {t}"),
        Error::Unavailable(t) => format!("state unavailable: {t}"),
    }
}

/// A store that cannot be reached retries the delivery; a limit or an
/// invalid operation rejects it (another attempt would meet the same rule).
impl From<Error> for HandleError {
    fn from(e: Error) -> Self {
        let text = describe(&e);
        match e {
            Error::Unavailable(_) => HandleError::retry(text),
            Error::LimitExceeded(_) | Error::Invalid(_) => HandleError::reject(text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_retry_or_reject() {
        let retry = HandleError::from(Error::Unavailable("redis down".into()));
        assert_eq!(
            retry,
            HandleError::Retry("state unavailable: redis down".into())
        );
        let reject = HandleError::from(Error::LimitExceeded("value over 1 MiB".into()));
        assert!(matches!(reject, HandleError::Reject(ref t) if t.contains("value over 1 MiB")));
        let reject = HandleError::from(Error::Invalid("empty key".into()));
        assert!(matches!(reject, HandleError::Reject(_)));
    }

    #[test]
    fn kind_and_text_name_the_case() {
        let e = Error::LimitExceeded("key over 1024 bytes".into());
        assert_eq!(
            (e.kind(), e.text()),
            ("limit-exceeded", "key over 1024 bytes")
        );
        assert_eq!(Error::Invalid(String::new()).kind(), "invalid");
        assert_eq!(Error::Unavailable(String::new()).kind(), "unavailable");
    }
}
