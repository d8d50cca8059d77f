//! Failure classes and the module's error type.
//!
//! Every way a connection, channel or declaration can fail is folded into a
//! [`FailureClass`], the label used in status, logs and the
//! `warren_amqp_reconnects_total{class}` counter. Classification is pure and
//! does no I/O; deciding what to do about a class is the supervisor's job.

use std::fmt;
use std::io;
use std::time::SystemTime;

use lapin::ErrorKind;
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};

/// Why a connection, channel or declaration failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureClass {
    /// The TCP connection was reset, refused, or ended unexpectedly.
    TcpReset,
    /// Nothing was read from the broker for twice the heartbeat interval,
    /// or a connect attempt timed out (a partition).
    HeartbeatTimeout,
    /// The broker closed the connection (320 CONNECTION_FORCED), for
    /// example `rabbitmqctl close_connection`.
    ConnectionForced,
    /// 403 ACCESS_REFUSED: wrong credentials or missing permissions.
    AccessRefused,
    /// 530 NOT_ALLOWED: usually the vhost does not exist or is not allowed.
    NotAllowed,
    /// 404 NOT_FOUND: a queue or exchange is missing.
    NotFound,
    /// 406 PRECONDITION_FAILED: a declaration conflicts with what exists.
    PreconditionFailed,
    /// The broker is shutting down (320 with a shutdown reason).
    BrokerShutdown,
    /// The broker gave up waiting for an acknowledgement: a delivery was
    /// held unacknowledged past its `consumer_timeout` (RabbitMQ closes the
    /// channel with 406 "delivery acknowledgement … timed out" up to 4.2,
    /// and cancels the consumer from 4.3). Its deliveries are requeued.
    ConsumerTimeout,
    /// TLS handshake or certificate failure.
    Tls,
    /// Anything else.
    Other,
}

impl FailureClass {
    /// The label used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::TcpReset => "tcp_reset",
            FailureClass::HeartbeatTimeout => "heartbeat_timeout",
            FailureClass::ConnectionForced => "connection_forced",
            FailureClass::AccessRefused => "access_refused",
            FailureClass::NotAllowed => "not_allowed",
            FailureClass::NotFound => "not_found",
            FailureClass::PreconditionFailed => "precondition_failed",
            FailureClass::BrokerShutdown => "broker_shutdown",
            FailureClass::ConsumerTimeout => "consumer_timeout",
            FailureClass::Tls => "tls",
            FailureClass::Other => "other",
        }
    }

    /// Failures that retrying quickly cannot fix (credentials, vhost,
    /// certificates, conflicting declarations): retried at the backoff cap.
    pub fn is_slow_retry(self) -> bool {
        matches!(
            self,
            FailureClass::AccessRefused
                | FailureClass::NotAllowed
                | FailureClass::Tls
                | FailureClass::PreconditionFailed
        )
    }

    /// Failures that mean an operator must act (reported as auth-failed).
    pub fn is_auth(self) -> bool {
        matches!(self, FailureClass::AccessRefused | FailureClass::NotAllowed)
    }
}

impl fmt::Display for FailureClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One classified failure, as shown in status.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// The class.
    pub class: FailureClass,
    /// The error text (never contains a password).
    pub message: String,
    /// The session generation it happened in, if a session was up.
    pub generation: Option<u64>,
    /// When it was observed.
    pub at: SystemTime,
}

impl Failure {
    /// A failure of `class` now.
    pub fn new(class: FailureClass, message: impl Into<String>, generation: Option<u64>) -> Self {
        Self {
            class,
            message: message.into(),
            generation,
            at: SystemTime::now(),
        }
    }

    /// Classify a lapin error.
    pub fn from_lapin(err: &lapin::Error, generation: Option<u64>) -> Self {
        Self::new(classify(err), err.to_string(), generation)
    }
}

/// The class of a lapin error.
pub fn classify(err: &lapin::Error) -> FailureClass {
    match err.kind() {
        ErrorKind::IOError(e) | ErrorKind::RuntimeShutdownError(e) => classify_io(e),
        ErrorKind::MissingHeartbeatError => FailureClass::HeartbeatTimeout,
        ErrorKind::ProtocolError(e) => classify_amqp(e.kind(), e.get_message().as_str()),
        _ => FailureClass::Other,
    }
}

/// The class of a raw AMQP reply code and text.
pub fn classify_amqp(kind: &AMQPErrorKind, text: &str) -> FailureClass {
    match kind {
        AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED) => {
            if text.contains("shutdown") {
                FailureClass::BrokerShutdown
            } else {
                FailureClass::ConnectionForced
            }
        }
        AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => FailureClass::NotAllowed,
        AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => FailureClass::AccessRefused,
        AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => FailureClass::NotFound,
        AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) if is_consumer_timeout(text) => {
            FailureClass::ConsumerTimeout
        }
        AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => FailureClass::PreconditionFailed,
        _ => FailureClass::Other,
    }
}

/// RabbitMQ's text when a delivery outlived `consumer_timeout`
/// (`PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out.
/// Timeout value used: 1800000 ms. …`).
pub fn is_consumer_timeout(text: &str) -> bool {
    text.contains("delivery acknowledgement") && text.contains("timed out")
}

fn classify_io(e: &io::Error) -> FailureClass {
    use io::ErrorKind as K;
    match e.kind() {
        K::ConnectionReset
        | K::ConnectionRefused
        | K::ConnectionAborted
        | K::BrokenPipe
        | K::UnexpectedEof
        | K::NotConnected
        | K::AddrNotAvailable => FailureClass::TcpReset,
        K::TimedOut => FailureClass::HeartbeatTimeout,
        _ => {
            let text = e.to_string().to_ascii_lowercase();
            if text.contains("certificate") || text.contains("tls") || text.contains("handshake") {
                FailureClass::Tls
            } else if text.contains("access_refused") || text.contains("access-refused") {
                FailureClass::AccessRefused
            } else if text.contains("reset") || text.contains("refused") || text.contains("eof") {
                FailureClass::TcpReset
            } else {
                FailureClass::Other
            }
        }
    }
}

/// Whether a lapin error ends the whole connection (as opposed to one
/// channel).
pub fn is_connection_level(err: &lapin::Error) -> bool {
    match err.kind() {
        ErrorKind::ProtocolError(e) => matches!(e.kind(), AMQPErrorKind::Hard(_)),
        ErrorKind::InvalidChannel(_) | ErrorKind::InvalidChannelState(..) => false,
        _ => true,
    }
}

/// If a 406 text names an inequivalent argument, that argument
/// (`PRECONDITION_FAILED - inequivalent arg 'x-message-ttl' for queue …`).
pub fn conflicting_argument(text: &str) -> Option<String> {
    let rest = text.split("inequivalent arg '").nth(1)?;
    rest.split('\'').next().map(str::to_owned)
}

/// Errors of the AMQP module.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    /// The connection URL could not be parsed (the text never includes the
    /// password).
    #[error("invalid amqp url: {0}")]
    InvalidUrl(String),
    /// A declaration conflicts with the broker's existing entity (406).
    #[error(
        "declaration of {entity} conflicts with the existing one on argument {argument}: {message}"
    )]
    DeclarationConflict {
        /// `queue 'name'` or `exchange 'name'`.
        entity: String,
        /// The conflicting argument, or `unknown` when the broker did not
        /// name one.
        argument: String,
        /// The broker's text.
        message: String,
    },
    /// A declaration failed for another reason.
    #[error("declaration of {entity} failed ({class}): {message}")]
    DeclarationFailed {
        /// `queue 'name'`, `exchange 'name'` or `binding …`.
        entity: String,
        /// The failure class.
        class: FailureClass,
        /// The error text.
        message: String,
    },
    /// There is no live connection right now.
    #[error("not connected to the broker")]
    NotConnected,
    /// A channel operation failed.
    #[error("channel operation {op} failed ({class}): {message}")]
    ChannelFailed {
        /// What was attempted.
        op: &'static str,
        /// The failure class.
        class: FailureClass,
        /// The error text.
        message: String,
    },
    /// A subscription to this queue already exists.
    #[error("a subscription to queue {0} already exists")]
    DuplicateSubscription(String),
    /// No subscription to this queue exists.
    #[error("no subscription to queue {0}")]
    UnknownSubscription(String),
    /// The supervisor has stopped.
    #[error("the amqp supervisor has stopped")]
    Stopped,
}

impl AmqpError {
    /// A channel-operation error from lapin.
    pub fn channel(op: &'static str, err: &lapin::Error) -> Self {
        AmqpError::ChannelFailed {
            op,
            class: classify(err),
            message: err.to_string(),
        }
    }

    /// Whether trying again later may succeed without operator action.
    pub fn is_transient(&self) -> bool {
        match self {
            AmqpError::InvalidUrl(_)
            | AmqpError::DeclarationConflict { .. }
            | AmqpError::DuplicateSubscription(_)
            | AmqpError::UnknownSubscription(_)
            | AmqpError::Stopped => false,
            AmqpError::DeclarationFailed { class, .. } | AmqpError::ChannelFailed { class, .. } => {
                !class.is_slow_retry()
            }
            AmqpError::NotConnected => true,
        }
    }

    /// The failure class, where one applies.
    pub fn class(&self) -> FailureClass {
        match self {
            AmqpError::DeclarationConflict { .. } => FailureClass::PreconditionFailed,
            AmqpError::DeclarationFailed { class, .. } | AmqpError::ChannelFailed { class, .. } => {
                *class
            }
            AmqpError::NotConnected => FailureClass::TcpReset,
            _ => FailureClass::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::protocol::AMQPError;

    fn amqp(kind: AMQPErrorKind, text: &str) -> lapin::Error {
        lapin::Error::from(ErrorKind::ProtocolError(AMQPError::new(kind, text.into())))
    }

    #[test]
    fn classifies_close_codes() {
        let forced = amqp(
            AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED),
            "CONNECTION_FORCED - test outage",
        );
        assert_eq!(classify(&forced), FailureClass::ConnectionForced);
        let shutdown = amqp(
            AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED),
            "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'",
        );
        assert_eq!(classify(&shutdown), FailureClass::BrokerShutdown);
        let denied = amqp(
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED),
            "ACCESS_REFUSED - Login was refused",
        );
        assert_eq!(classify(&denied), FailureClass::AccessRefused);
        assert!(classify(&denied).is_auth());
        let vhost = amqp(
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED),
            "NOT_ALLOWED",
        );
        assert_eq!(classify(&vhost), FailureClass::NotAllowed);
        let nf = amqp(
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND),
            "NOT_FOUND - no queue",
        );
        assert_eq!(classify(&nf), FailureClass::NotFound);
        assert!(!is_connection_level(&nf));
        assert!(is_connection_level(&forced));
        let pf = amqp(
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED),
            "PRECONDITION_FAILED - inequivalent arg 'x-message-ttl' for queue 'q' in vhost '/'",
        );
        assert_eq!(classify(&pf), FailureClass::PreconditionFailed);
        assert!(classify(&pf).is_slow_retry());
    }

    #[test]
    fn classifies_io_and_heartbeat() {
        let reset = lapin::Error::from(io::Error::from(io::ErrorKind::ConnectionReset));
        assert_eq!(classify(&reset), FailureClass::TcpReset);
        let refused = lapin::Error::from(io::Error::from(io::ErrorKind::ConnectionRefused));
        assert_eq!(classify(&refused), FailureClass::TcpReset);
        let hb = lapin::Error::from(ErrorKind::MissingHeartbeatError);
        assert_eq!(classify(&hb), FailureClass::HeartbeatTimeout);
        let tls = lapin::Error::from(io::Error::other("invalid peer certificate: UnknownIssuer"));
        assert_eq!(classify(&tls), FailureClass::Tls);
    }

    #[test]
    fn a_consumer_timeout_is_its_own_class() {
        let text = "PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out. Timeout value used: 3000 ms. This timeout value can be configured, see consumers doc guide to learn more";
        assert_eq!(
            classify_amqp(
                &AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED),
                text
            ),
            FailureClass::ConsumerTimeout
        );
        assert!(!FailureClass::ConsumerTimeout.is_slow_retry());
    }

    #[test]
    fn finds_conflicting_argument() {
        let text = "PRECONDITION_FAILED - inequivalent arg 'x-message-ttl' for queue 'q' in vhost '/': received none but current is the value '1000' of type 'long'";
        assert_eq!(conflicting_argument(text).as_deref(), Some("x-message-ttl"));
        assert_eq!(conflicting_argument("PRECONDITION_FAILED - other"), None);
    }
}
