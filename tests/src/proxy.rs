//! An in-repo TCP fault proxy for putting between Warren and a broker.
//!
//! Modes, switched from the test at any time:
//! - [`Mode::Pass`]: forward both ways.
//! - [`Mode::Blackhole`]: keep every socket open and forward nothing (a
//!   partition: only heartbeats or timeouts notice). A connection that lost
//!   bytes this way is reset when forwarding resumes: TCP delivers every
//!   byte or breaks the connection, it never resumes with a gap (a gap of
//!   whole frames would leave both ends alive and out of step, e.g. the
//!   client counting publishes the broker never saw).
//! - [`Mode::Refuse`]: reset every live socket and reset new ones as soon
//!   as they are accepted (a dead broker).
//! - [`Mode::Closed`]: reset every live socket and stop listening, so a
//!   connect is refused (a broker whose node is down: nothing listens).
//! - [`Mode::Throttle`]: forward both ways, but client-to-broker bytes at
//!   most at the given rate (a slow or congested broker: everything the
//!   client sends arrives, late).
//! - [`Mode::Hold`]: read nothing either way until the mode changes (a
//!   paused broker: nothing is lost, everything arrives late).
//!
//! [`Proxy::cut`] resets the live sockets once and keeps accepting. Sockets
//! are closed with `SO_LINGER 0`, so the peer sees a TCP RST.
//! [`Proxy::drop_server_methods`] silently drops chosen AMQP methods sent
//! by the broker (for example `basic.cancel`, to make a zombie consumer);
//! broker-to-client traffic is forwarded in whole AMQP frames.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward.
    Pass,
    /// Hold sockets open, forward nothing.
    Blackhole,
    /// Reset live and new sockets.
    Refuse,
    /// Reset live sockets and stop listening: a connect is refused
    /// (nothing listens on the port), as when the broker is down. The
    /// port is listened on again when the mode changes.
    Closed,
    /// Forward, client-to-broker at most this many bytes a second.
    Throttle(u32),
    /// Read nothing either way: bytes wait in the socket buffers and flow
    /// on when the mode changes. A broker paused (by its disk, a GC, a
    /// starved CPU) without losing a byte.
    Hold,
}

impl Mode {
    /// Whether traffic is forwarded at all.
    fn forwards(self) -> bool {
        matches!(self, Mode::Pass | Mode::Throttle(_) | Mode::Hold)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ctl {
    mode: Mode,
    cuts: u64,
}

/// A running proxy; stops when dropped.
pub struct Proxy {
    addr: SocketAddr,
    ctl: watch::Sender<Ctl>,
    accepted: Arc<AtomicU64>,
    live: Arc<AtomicUsize>,
    filter: Filter,
    task: JoinHandle<()>,
}

/// AMQP methods (class id, method id) to drop from the broker, and how many
/// frames were dropped.
#[derive(Clone, Default)]
struct Filter {
    methods: Arc<Mutex<Vec<(u16, u16)>>>,
    dropped: Arc<AtomicU64>,
}

impl Proxy {
    /// Listen on a free loopback port and forward to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("failed to bind the proxy listener")?;
        let addr = listener.local_addr()?;
        let (ctl, ctl_rx) = watch::channel(Ctl {
            mode: Mode::Pass,
            cuts: 0,
        });
        let accepted = Arc::new(AtomicU64::new(0));
        let live = Arc::new(AtomicUsize::new(0));
        let filter = Filter::default();
        let task = tokio::spawn(accept_loop(
            listener,
            upstream,
            ctl_rx,
            accepted.clone(),
            live.clone(),
            filter.clone(),
        ));
        Ok(Proxy {
            addr,
            ctl,
            accepted,
            live,
            filter,
            task,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// An `amqp://` URL through the proxy with guest credentials.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    /// Switch mode; `Refuse` also resets every live socket.
    pub fn set_mode(&self, mode: Mode) {
        self.ctl.send_modify(|c| c.mode = mode);
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.ctl.borrow().mode
    }

    /// Reset every live socket once; keep accepting in the current mode.
    pub fn cut(&self) {
        self.ctl.send_modify(|c| c.cuts += 1);
    }

    /// Drop these AMQP methods, as `(class id, method id)`, when the broker
    /// sends them (`(60, 30)` is `basic.cancel`). Empty forwards all.
    pub fn drop_server_methods(&self, methods: &[(u16, u16)]) {
        if let Ok(mut m) = self.filter.methods.lock() {
            *m = methods.to_vec();
        }
    }

    /// Broker frames dropped by [`Proxy::drop_server_methods`] so far.
    pub fn dropped(&self) -> u64 {
        self.filter.dropped.load(Ordering::SeqCst)
    }

    /// Connections accepted so far (connection attempts by clients).
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Connections open right now.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    ctl: watch::Receiver<Ctl>,
    accepted: Arc<AtomicU64>,
    live: Arc<AtomicUsize>,
    filter: Filter,
) {
    let mut conns = tokio::task::JoinSet::new();
    let mut ctl = ctl;
    let addr = listener.local_addr().ok();
    let mut listener = Some(listener);
    loop {
        let closed = ctl.borrow().mode == Mode::Closed;
        if closed {
            listener = None;
        } else if listener.is_none()
            && let Some(a) = addr
        {
            listener = TcpListener::bind(a).await.ok();
        }
        tokio::select! {
            r = ctl.changed() => if r.is_err() { return },
            r = async { match &listener { Some(l) => l.accept().await, None => std::future::pending().await } } => {
                let Ok((client, _)) = r else { continue };
                accepted.fetch_add(1, Ordering::SeqCst);
                let _ = client.set_zero_linger();
                if ctl.borrow().mode == Mode::Refuse {
                    drop(client);
                    continue;
                }
                conns.spawn(pipe(client, upstream, ctl.clone(), live.clone(), filter.clone()));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

struct LiveGuard(Arc<AtomicUsize>);
impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn pipe(
    mut client: TcpStream,
    upstream: SocketAddr,
    mut ctl: watch::Receiver<Ctl>,
    live: Arc<AtomicUsize>,
    filter: Filter,
) {
    live.fetch_add(1, Ordering::SeqCst);
    let _guard = LiveGuard(live);
    let start = *ctl.borrow_and_update();
    let mut server = match TcpStream::connect(upstream).await {
        Ok(s) => s,
        Err(_) => return, // client is reset on drop
    };
    let _ = server.set_zero_linger();
    let _ = server.set_nodelay(true);
    let _ = client.set_nodelay(true);
    let (mut cr, mut cw) = client.split();
    let (mut sr, mut sw) = server.split();
    let mut cbuf = vec![0u8; 64 * 1024];
    let mut sbuf = vec![0u8; 64 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    let mut client_open = true;
    let mut server_open = true;
    // Bytes were read and dropped (blackhole): this connection must not
    // forward again.
    let mut lost = false;
    loop {
        let limit = read_limit(ctl.borrow().mode);
        let hold = ctl.borrow().mode == Mode::Hold;
        tokio::select! {
            changed = ctl.changed() => {
                if changed.is_err() { return; }
                let now = *ctl.borrow_and_update();
                if now.cuts != start.cuts || matches!(now.mode, Mode::Refuse | Mode::Closed) || (lost && now.mode.forwards()) {
                    return; // both sockets reset on drop (linger 0)
                }
            }
            n = cr.read(&mut cbuf[..limit]), if client_open && !hold => match n {
                Ok(0) | Err(_) => {
                    client_open = false;
                    if ctl.borrow().mode.forwards() { let _ = sw.shutdown().await; return; }
                }
                Ok(n) => {
                    let mode = ctl.borrow().mode;
                    if !mode.forwards() { lost = true; continue; }
                    if sw.write_all(&cbuf[..n]).await.is_err() { return; }
                    if let Mode::Throttle(rate) = mode {
                        tokio::time::sleep(Duration::from_secs_f64(n as f64 / f64::from(rate.max(1)))).await;
                    }
                }
            },
            n = sr.read(&mut sbuf), if server_open && !hold => match n {
                Ok(0) | Err(_) => {
                    server_open = false;
                    if ctl.borrow().mode.forwards() { let _ = cw.shutdown().await; return; }
                }
                Ok(n) => {
                    if !ctl.borrow().mode.forwards() {
                        pending.clear();
                        lost = true;
                        continue;
                    }
                    pending.extend_from_slice(&sbuf[..n]);
                    let out = whole_frames(&mut pending, &filter);
                    if !out.is_empty() && cw.write_all(&out).await.is_err() { return; }
                }
            },
        }
        if !client_open && !server_open {
            return;
        }
    }
}

/// How much to read from the client at once: all of the buffer, or about
/// 20 ms worth when throttled (so the pause after each read stays short
/// and the broker's frames, heartbeats included, are not held up).
fn read_limit(mode: Mode) -> usize {
    match mode {
        Mode::Throttle(rate) => (rate as usize / 50).clamp(1, 64 * 1024),
        _ => 64 * 1024,
    }
}

/// Take the complete AMQP frames off the front of `pending`, minus the
/// filtered methods.
fn whole_frames(pending: &mut Vec<u8>, filter: &Filter) -> Vec<u8> {
    let methods = filter.methods.lock().map(|m| m.clone()).unwrap_or_default();
    let mut out = Vec::with_capacity(pending.len());
    let mut at = 0;
    while pending.len() - at >= 7 {
        let f = &pending[at..];
        let size = u32::from_be_bytes([f[3], f[4], f[5], f[6]]) as usize;
        let total = 7 + size + 1;
        if f.len() < total {
            break;
        }
        let drop = f[0] == 1
            && size >= 4
            && methods.contains(&(
                u16::from_be_bytes([f[7], f[8]]),
                u16::from_be_bytes([f[9], f[10]]),
            ));
        if drop {
            filter.dropped.fetch_add(1, Ordering::SeqCst);
        } else {
            out.extend_from_slice(&f[..total]);
        }
        at += total;
    }
    pending.drain(..at);
    out
}
