//! A minimal HTTP/1.1 client over a raw TCP socket, for the admin API
//! tests: exact control over what is sent (malformed requests included)
//! and no dependency on Warren's own HTTP stack.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long one exchange may take.
const TIMEOUT: Duration = Duration::from_secs(60);

/// A response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("response is not JSON: {}", self.text()))
    }

    /// Header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Send one request and read the response. Bodies over 64 KiB are sent
/// with `Expect: 100-continue`, so a server that refuses them early is not
/// sent the body (and does not reset the connection).
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<Response> {
    tokio::time::timeout(TIMEOUT, request_inner(addr, method, path, headers, body))
        .await
        .with_context(|| format!("{method} {path}: no response within {TIMEOUT:?}"))?
}

async fn request_inner(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<Response> {
    let mut s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    let expect = body.is_some_and(|b| b.len() > 64 << 10);
    if let Some(b) = body {
        head.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    if expect {
        head.push_str("Expect: 100-continue\r\n");
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await?;
    let mut buf = Vec::new();
    if let Some(b) = body {
        if expect {
            let (status, used) = read_head(&mut s, &mut buf).await?;
            if status.0 != 100 {
                return finish(s, buf, status, used).await;
            }
            buf.drain(..used);
        }
        s.write_all(b).await?;
    }
    let (status, used) = read_head(&mut s, &mut buf).await?;
    finish(s, buf, status, used).await
}

type Head = (u16, Vec<(String, String)>);

/// Read until the end of a response head; returns it and its length.
async fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(Head, usize)> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let text = String::from_utf8_lossy(&buf[..end]).into_owned();
            let mut lines = text.split("\r\n");
            let status_line = lines.next().unwrap_or_default();
            let status: u16 = status_line
                .split(' ')
                .nth(1)
                .and_then(|c| c.parse().ok())
                .with_context(|| format!("bad status line {status_line:?}"))?;
            let headers = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .collect();
            return Ok(((status, headers), end + 4));
        }
        let mut chunk = [0u8; 8192];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed before a response head");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn finish(mut s: TcpStream, mut buf: Vec<u8>, head: Head, used: usize) -> Result<Response> {
    let (status, headers) = head;
    // Connection: close, so the body ends at EOF (a reset after a complete
    // response is fine).
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest).await;
    buf.extend_from_slice(&rest);
    let raw = buf.split_off(used);
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let body = if chunked { dechunk(&raw)? } else { raw };
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn dechunk(mut raw: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else {
            bail!("truncated chunked body");
        };
        let size_text = String::from_utf8_lossy(&raw[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("bad chunk size {size_text:?}"))?;
        raw = &raw[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if raw.len() < size + 2 {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

/// Send `bytes` as they are and return whatever comes back until the
/// server closes (or `timeout`). For malformed-request tests.
pub async fn raw(addr: SocketAddr, bytes: &[u8], timeout: Duration) -> Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await?;
    let _ = s.write_all(bytes).await;
    let _ = s.shutdown().await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(timeout, s.read_to_end(&mut out)).await;
    Ok(out)
}

/// The status code of a raw response, if it has a status line.
pub fn raw_status(response: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(response.get(..64.min(response.len()))?);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// `http://127.0.0.1:<port>` of a server on a thread of its own that
/// answers every request with 200 `pong`, for tests without a runtime.
pub fn pong_server() -> Result<String> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for mut sock in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = sock.read(&mut buf);
            let _ = sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\npong");
        }
    });
    Ok(format!("http://127.0.0.1:{port}"))
}

/// `GET /metrics` of the admin API at `addr`: the Prometheus text.
pub async fn metrics(addr: SocketAddr) -> Result<String> {
    let r = request(addr, "GET", "/metrics", &[], None).await?;
    if r.status != 200 {
        bail!("GET /metrics: {} {}", r.status, r.text());
    }
    Ok(r.text())
}

/// The sum of the samples of `name` in the Prometheus text `text` whose
/// labels include each of `labels` (all of its samples when `labels` is
/// empty); 0 when there are none. For a histogram, name the series
/// (`warren_handle_seconds_count`).
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (labelled, value) = match rest.strip_prefix('{') {
                Some(r) => r.split_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            labels
                .iter()
                .all(|(k, v)| {
                    let pair = format!("{k}=\"{v}\"");
                    labelled.starts_with(&pair) || labelled.contains(&format!(",{pair}"))
                })
                .then(|| value.trim().parse::<f64>().ok())?
        })
        .sum()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::metric_sum;

    #[test]
    fn metric_sums_match_the_name_and_labels_only() {
        let text = "# TYPE a_count counter\n\
                    a_count{queue=\"q\",outcome=\"ack\"} 3\n\
                    a_count{queue=\"q\",outcome=\"retry\"} 2\n\
                    a_count{queue=\"other\",outcome=\"ack\"} 7\n\
                    a_count_more{queue=\"q\"} 100\n\
                    a_count{xqueue=\"q\"} 1000\n\
                    b 4.5\n";
        assert_eq!(metric_sum(text, "a_count", &[("queue", "q")]), 5.0);
        assert_eq!(metric_sum(text, "a_count", &[]), 1012.0);
        assert_eq!(metric_sum(text, "a_count", &[("queue", "none")]), 0.0);
        assert_eq!(metric_sum(text, "b", &[]), 4.5);
    }
}
