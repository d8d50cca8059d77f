//! Which broker Warren talks to: product, version and cluster name, as the
//! broker introduces itself in `connection.start`.
//!
//! lapin reads `connection.start` during its handshake but does not keep
//! the server properties, so this asks again: a second TCP connection to
//! the same endpoint sends the AMQP 0-9-1 protocol header, reads the one
//! `connection.start` frame the broker answers with, and hangs up before
//! any authentication (the broker logs a handshake that ended early, once
//! per session). It runs beside the topology declaration, so it adds no
//! time to a reconnect. TLS endpoints are not asked (the name would need a
//! second TLS handshake); their status says so.

use std::time::Duration;

use lapin::protocol::{AMQPClass, connection, parse_class};
use lapin::types::{AMQPValue, FieldTable};
use lapin::uri::{AMQPScheme, AMQPUri};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The broker at the other end of a session.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServerInfo {
    /// `RabbitMQ`.
    pub product: String,
    /// `4.0.5`.
    pub version: String,
    /// `cluster_name`, when the broker sends it.
    pub cluster_name: Option<String>,
}

impl ServerInfo {
    fn from_properties(props: &FieldTable) -> ServerInfo {
        let text = |key: &str| match props.inner().get(key) {
            Some(AMQPValue::LongString(s)) => {
                Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
            }
            Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_owned()),
            _ => None,
        };
        ServerInfo {
            product: text("product").unwrap_or_else(|| "unknown".into()),
            version: text("version").unwrap_or_else(|| "unknown".into()),
            cluster_name: text("cluster_name"),
        }
    }

    fn unknown(why: &str) -> ServerInfo {
        ServerInfo {
            product: "unknown".into(),
            version: why.into(),
            cluster_name: None,
        }
    }
}

/// How long the question may take; a broker that does not answer in time
/// is reported as unknown.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// The largest `connection.start` frame read (RabbitMQ's is under 1 KiB).
const MAX_FRAME: usize = 64 * 1024;

/// Ask the broker at `uri` who it is (see the module doc).
pub(crate) async fn ask(uri: &AMQPUri) -> ServerInfo {
    if uri.scheme == AMQPScheme::AMQPS {
        return ServerInfo::unknown("not asked over TLS");
    }
    let addr = (uri.authority.host.clone(), uri.authority.port);
    match tokio::time::timeout(ASK_TIMEOUT, read_start(addr)).await {
        Ok(Ok(props)) => ServerInfo::from_properties(&props),
        Ok(Err(e)) => ServerInfo::unknown(&format!("could not ask: {e}")),
        Err(_) => ServerInfo::unknown("no answer in time"),
    }
}

async fn read_start(addr: (String, u16)) -> std::io::Result<FieldTable> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(b"AMQP\x00\x00\x09\x01").await?;
    // Frame: type (1), channel (2), size (4), payload, end marker 0xCE.
    let mut header = [0u8; 7];
    stream.read_exact(&mut header).await?;
    if header[0] != 1 {
        return Err(bad("the first frame is not a method frame"));
    }
    let size = u32::from_be_bytes([header[3], header[4], header[5], header[6]]) as usize;
    if size > MAX_FRAME {
        return Err(bad("connection.start frame too large"));
    }
    let mut payload = vec![0u8; size + 1];
    stream.read_exact(&mut payload).await?;
    payload.truncate(size);
    match parse_class(payload.as_slice()) {
        Ok((_, AMQPClass::Connection(connection::AMQPMethod::Start(start)))) => {
            Ok(start.server_properties)
        }
        _ => Err(bad("the first method is not connection.start")),
    }
}
