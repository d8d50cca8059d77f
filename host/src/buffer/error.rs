//! The buffer module's one error type, with the classifiers the spool's
//! retry policy and its callers (the outbox, admin) use.

use std::time::Duration;

use redis::{ErrorKind, RedisError, ServerErrorKind};

/// How long the resolver keeps answering with an authentication failure
/// before it dials again: a wrong password is an operator's mistake, and
/// redialling on every append would only flood the nodes' logs.
pub const AUTH_RETRY: Duration = Duration::from_secs(2);

/// What went wrong in the spool. Every error [`crate::buffer::SpoolHandle::append`]
/// returns means the message was **not** accepted as durable: the caller
/// must publish it some other way or refuse it upstream.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SpoolError {
    /// The configuration is unusable; every problem is listed.
    #[error("invalid spool config: {}", .0.join("; "))]
    InvalidConfig(Vec<String>),

    /// No sentinel named a reachable primary for the master name.
    #[error("no primary found for {master}: {detail}")]
    NoPrimary { master: String, detail: String },

    /// Connecting to a Redis node (primary or sentinel) failed.
    #[error("failed to connect to {addr}: {source}")]
    ConnectFailed {
        addr: String,
        #[source]
        source: RedisError,
    },

    /// The node refused Warren's credentials: a wrong password, an unknown
    /// or disabled ACL user, or a command the ACL user may not run. Not
    /// fixed by retrying at once: the resolver waits [`AUTH_RETRY`] before
    /// dialling again.
    #[error("authentication failed on {addr}: {detail}")]
    AuthFailed { addr: String, detail: String },

    /// The node Sentinel named (or the configured URL) is not a primary.
    #[error("{addr} is not a primary (role {role})")]
    NotPrimary { addr: String, role: String },

    /// The node answered `READONLY`: it was demoted to a replica.
    #[error("primary {addr} is read-only (demoted)")]
    PrimaryReadOnly { addr: String },

    /// The node answered `MASTERDOWN`.
    #[error("{addr} answered MASTERDOWN")]
    MasterDown { addr: String },

    /// The primary refused the write with `NOREPLICAS` (fewer live replicas
    /// than `min-replicas-to-write`), or `ROLE` shows fewer replicas than the
    /// spool requires.
    #[error("primary {addr} has too few replicas: {detail}")]
    NoReplicas { addr: String, detail: String },

    /// A replica Sentinel knows already acts as the primary's successor
    /// (promoted from it) while Sentinel still names the old primary: a
    /// failover is under way, and writes to the old primary would be lost.
    #[error("failover in progress: {successor} was promoted from {addr}")]
    FailoverInProgress { addr: String, successor: String },

    /// The write reached the primary but `WAIT` confirmed fewer replicas
    /// than required within the WAIT timeout.
    #[error("write to {addr} reached {acked} of {required} replicas")]
    NotReplicated {
        addr: String,
        acked: u64,
        required: u32,
    },

    /// The node answered, but not as Warren expected: a reply of another
    /// type, a value that does not parse, an `ERR` reply (e.g. a counter
    /// that is not a number). A bug or data Warren did not write, never a
    /// lost connection: the connection is kept.
    #[error("unexpected reply from {addr}: {detail}")]
    UnexpectedReply { addr: String, detail: String },

    /// A command failed for another reason (I/O, timeout, protocol).
    #[error("redis command failed on {addr}: {source}")]
    Command {
        addr: String,
        #[source]
        source: RedisError,
    },

    /// The spool is at its size limit; the append was refused, nothing was
    /// dropped.
    #[error("spool {key} is full (limits: {max_entries} entries, {max_bytes} bytes)")]
    SpoolFull {
        key: String,
        max_entries: u64,
        max_bytes: u64,
    },

    /// The append could not be made durable before its deadline; `last` is
    /// the last failure seen while retrying.
    #[error("append not durable within {after:?}: {last}")]
    Timeout {
        after: Duration,
        #[source]
        last: Box<SpoolError>,
    },

    /// The message cannot be stored faithfully (for example a NaN float
    /// header, which JSON cannot carry).
    #[error("message cannot be spooled: {0}")]
    Unencodable(String),

    /// A stream entry could not be decoded.
    #[error("spool entry {id} is corrupt: {detail}")]
    CorruptEntry { id: String, detail: String },

    /// The spool's writer task has stopped (shutdown).
    #[error("spool is shut down")]
    Closed,
}

impl SpoolError {
    /// The primary may have changed: drop the connection and ask Sentinel
    /// again before retrying.
    pub fn is_failover(&self) -> bool {
        match self {
            SpoolError::NoPrimary { .. }
            | SpoolError::ConnectFailed { .. }
            | SpoolError::NotPrimary { .. }
            | SpoolError::PrimaryReadOnly { .. }
            | SpoolError::MasterDown { .. }
            | SpoolError::NoReplicas { .. }
            | SpoolError::FailoverInProgress { .. }
            | SpoolError::NotReplicated { .. }
            | SpoolError::Command { .. } => true,
            SpoolError::Timeout { last, .. } => last.is_failover(),
            _ => false,
        }
    }

    /// Trying again later may succeed (outage, failover, full spool being
    /// drained). False for configuration and encoding errors.
    pub fn is_transient(&self) -> bool {
        match self {
            SpoolError::InvalidConfig(_)
            | SpoolError::Unencodable(_)
            | SpoolError::CorruptEntry { .. }
            | SpoolError::Closed => false,
            SpoolError::Timeout { last, .. } => last.is_transient(),
            _ => true,
        }
    }

    /// The write was not confirmed on enough replicas (`NOREPLICAS`, a short
    /// `WAIT`, or a primary with too few replicas).
    pub fn is_not_replicated(&self) -> bool {
        match self {
            SpoolError::NoReplicas { .. } | SpoolError::NotReplicated { .. } => true,
            SpoolError::Timeout { last, .. } => last.is_not_replicated(),
            _ => false,
        }
    }

    /// Credentials or permissions were refused.
    pub fn is_auth(&self) -> bool {
        match self {
            SpoolError::AuthFailed { .. } => true,
            SpoolError::Timeout { last, .. } => last.is_auth(),
            _ => false,
        }
    }

    /// The spool refused because of its size limit.
    pub fn is_full(&self) -> bool {
        matches!(self, SpoolError::SpoolFull { .. })
    }

    /// Classify a Redis error from a command sent to `addr`.
    pub(crate) fn from_redis(addr: &str, err: RedisError) -> SpoolError {
        let addr = addr.to_owned();
        let code = err.code().unwrap_or_default().to_owned();
        let detail = err.detail().unwrap_or_default().to_owned();
        match (err.kind(), code.as_str()) {
            (ErrorKind::AuthenticationFailed, _) | (_, "NOAUTH" | "WRONGPASS" | "NOPERM") => {
                SpoolError::AuthFailed {
                    addr,
                    detail: err.to_string(),
                }
            }
            (ErrorKind::Server(ServerErrorKind::ReadOnly), _) | (_, "READONLY") => {
                SpoolError::PrimaryReadOnly { addr }
            }
            (ErrorKind::Server(ServerErrorKind::MasterDown), _) | (_, "MASTERDOWN") => {
                SpoolError::MasterDown { addr }
            }
            (_, "NOREPLICAS") => SpoolError::NoReplicas { addr, detail },
            (
                ErrorKind::UnexpectedReturnType
                | ErrorKind::Parse
                | ErrorKind::Server(ServerErrorKind::ResponseError),
                _,
            ) => SpoolError::UnexpectedReply {
                addr,
                detail: err.to_string(),
            },
            _ => SpoolError::Command { addr, source: err },
        }
    }

    /// Classify a failure to open a connection to `addr` (the handshake
    /// includes `AUTH`).
    pub(crate) fn from_connect(addr: &str, err: RedisError) -> SpoolError {
        match SpoolError::from_redis(addr, err.clone()) {
            auth @ SpoolError::AuthFailed { .. } => auth,
            _ => SpoolError::ConnectFailed {
                addr: addr.to_owned(),
                source: err,
            },
        }
    }

    /// Classify an error reply found inside a pipeline's results.
    pub(crate) fn from_server(addr: &str, err: redis::ServerError) -> SpoolError {
        SpoolError::from_redis(addr, RedisError::from(err))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_noreplicas_and_readonly() {
        let e = RedisError::from((ErrorKind::Io, "boom"));
        let s = SpoolError::from_redis("a:1", e);
        assert!(s.is_failover() && s.is_transient() && !s.is_not_replicated());
        let t = SpoolError::Timeout {
            after: Duration::from_secs(1),
            last: Box::new(SpoolError::NotReplicated {
                addr: "a:1".into(),
                acked: 0,
                required: 1,
            }),
        };
        assert!(t.is_not_replicated());
        assert!(!SpoolError::Unencodable("x".into()).is_transient());
    }

    #[test]
    fn an_unexpected_reply_keeps_the_connection() {
        for e in [
            RedisError::from((ErrorKind::UnexpectedReturnType, "not an int")),
            RedisError::from((ErrorKind::Parse, "bad float")),
            RedisError::from((
                ErrorKind::Server(ServerErrorKind::ResponseError),
                "value is not an integer",
            )),
        ] {
            let s = SpoolError::from_redis("a:1", e);
            assert!(
                matches!(s, SpoolError::UnexpectedReply { .. }) && !s.is_failover(),
                "{s:?}"
            );
        }
    }

    #[test]
    fn classifies_refused_credentials() {
        let wrong = RedisError::from((
            ErrorKind::AuthenticationFailed,
            "Password authentication failed",
        ));
        let e = SpoolError::from_connect("a:1", wrong);
        assert!(e.is_auth() && !e.is_failover(), "{e:?}");
        assert!(
            e.to_string().starts_with("authentication failed on a:1"),
            "{e}"
        );
        let refused = RedisError::from((ErrorKind::Io, "connection refused"));
        assert!(matches!(
            SpoolError::from_connect("a:1", refused),
            SpoolError::ConnectFailed { .. }
        ));
    }
}

/// A Redis call that failed, and the generation of the primary link it
/// used (0 when no link was had), so a failover repair drops that link and
/// never a newer one.
#[derive(Debug)]
pub(crate) struct RedisFailure {
    pub(crate) error: SpoolError,
    pub(crate) generation: u64,
}

impl RedisFailure {
    /// No link could be had: resolving the primary failed.
    pub(crate) fn resolving(error: SpoolError) -> Self {
        RedisFailure {
            error,
            generation: 0,
        }
    }

    /// A command on `link` failed.
    pub(crate) fn on(link: &super::sentinel::Link, e: RedisError) -> Self {
        RedisFailure {
            error: SpoolError::from_redis(&link.addr, e),
            generation: link.generation,
        }
    }

    /// Drop the link the failure happened on if the failure may mean the
    /// primary changed; the next caller resolves again. Without a link
    /// (generation 0) there is nothing to drop.
    pub(crate) async fn repair(&self, primary: &super::sentinel::Primary) {
        if self.generation != 0 && self.error.is_failover() {
            primary.invalidate(self.generation, &self.error).await;
        }
    }
}
