//! Outbound HTTP for plugins: what a plugin may call (its grants), and the
//! one client that makes every call (`warren:plugin/http` and
//! `wasi:http/outgoing-handler` alike).
//!
//! Rules, in the order a call meets them:
//! - The URL's origin (scheme, host, port) must match a granted origin: the
//!   manifest's `outbound` list when the runtime grants manifest origins
//!   (the default), plus the operator's `allow-outbound` entries (runtime
//!   wide and per plugin). A wildcard `*.example.com` matches subdomains
//!   only, never `example.com` itself or `evil-example.com`.
//! - The name is resolved by the client, and every address it resolves to
//!   is checked before the client connects to it (no second lookup that
//!   could answer differently): a loopback, private, link-local, shared,
//!   unspecified or metadata address is refused unless the operator
//!   granted that host by name (an origin in `allow-outbound`) or a CIDR
//!   containing the address. A URL with an address literal meets the same
//!   check.
//! - An `https://` call verifies the server's certificate for the URL's
//!   host (also the name sent as SNI) against the system's roots and the
//!   operator's `outbound-ca-file`; TLS runs over the connection to the
//!   checked address, so it changes nothing about where a call may go.
//! - No redirect is followed: the guest gets the 3xx and decides.
//! - A `Host` header, if the guest sets one, must be the URL's authority.
//! - The response body is read up to the plugin's `max-response-bytes`.
//! - The call's timeout is capped by what is left of the delivery's wall
//!   budget; a call that finds the budget spent marks the delivery for a
//!   retry.
//!
//! The client (and so its keep-alive pool, per origin) belongs to the
//! plugin's settings and is shared by all its instances; a per-plugin
//! semaphore bounds the calls in flight.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Semaphore;

/// How often a denial of one plugin and origin is logged at most.
const DENIAL_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// An origin pattern: scheme, host (or `*.` suffix), port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Origin {
    pub scheme: String,
    /// Lowercase host; for a wildcard, the suffix after `*.`.
    pub host: String,
    pub wildcard: bool,
    pub port: u16,
}

impl Origin {
    /// Parse `scheme://host[:port]` (host may be `*.domain`). A path other
    /// than `/` is refused: a grant is of an origin, not a URL.
    pub fn parse(s: &str) -> Result<Origin, String> {
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| format!("outbound origin `{s}` has no scheme (http:// or https://)"))?;
        let scheme = scheme.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "http" => 80,
            "https" => 443,
            _ => {
                return Err(format!(
                    "outbound origin `{s}`: scheme must be http or https"
                ));
            }
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains('/') || authority.contains('@') || authority.is_empty() {
            return Err(format!(
                "outbound origin `{s}` must be scheme://host[:port], without path or user"
            ));
        }
        let (host, port) = split_host_port(authority)
            .ok_or_else(|| format!("outbound origin `{s}` has an invalid port"))?;
        let port = port.unwrap_or(default_port);
        let host = host.to_ascii_lowercase();
        let (host, wildcard) = match host.strip_prefix("*.") {
            Some(suffix) => (suffix.to_string(), true),
            None => (host, false),
        };
        if host.is_empty() || host.contains('*') {
            return Err(format!(
                "outbound origin `{s}`: a wildcard is allowed only as a whole first label (`*.example.com`)"
            ));
        }
        Ok(Origin {
            scheme,
            host,
            wildcard,
            port,
        })
    }

    fn matches(&self, scheme: &str, host: &str, port: u16) -> bool {
        if self.scheme != scheme || self.port != port {
            return false;
        }
        if self.wildcard {
            host.strip_suffix(&self.host)
                .and_then(|p| p.strip_suffix('.'))
                .is_some_and(|label| !label.is_empty())
        } else {
            self.host == host
        }
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let star = if self.wildcard { "*." } else { "" };
        write!(f, "{}://{star}{}:{}", self.scheme, self.host, self.port)
    }
}

/// `host[:port]`, IPv6 literals in brackets.
fn split_host_port(authority: &str) -> Option<(String, Option<u16>)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None if after.is_empty() => None,
            None => return None,
        };
        return Some((host.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => Some((h.to_string(), Some(p.parse().ok()?))),
        None => Some((authority.to_string(), None)),
    }
}

/// An address range, `10.0.0.0/8` or `fd00::/8` (a bare address is /32 or
/// /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Cidr> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.parse().ok().filter(|p| *p <= max)?,
            None => max,
        };
        Some(Cidr { addr, prefix })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(a) & mask == u32::from(b) & mask
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(a) & mask == u128::from(b) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it stands for.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Why an address is not public, or `None` when it is.
pub fn non_public(ip: IpAddr) -> Option<&'static str> {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            if v4.is_loopback() {
                Some("loopback")
            } else if o == [169, 254, 169, 254] || o == [100, 100, 100, 200] {
                Some("metadata")
            } else if v4.is_link_local() {
                Some("link-local")
            } else if v4.is_private() {
                Some("private")
            } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
                Some("shared (CGNAT)")
            } else if v4.is_unspecified() || o[0] == 0 {
                Some("unspecified")
            } else if v4.is_broadcast() || v4.is_multicast() || o[0] >= 240 {
                Some("reserved")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if s == [0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x254] {
                Some("metadata")
            } else if (s[0] & 0xffc0) == 0xfe80 {
                Some("link-local")
            } else if (s[0] & 0xfe00) == 0xfc00 {
                Some("private")
            } else if v6.is_multicast() {
                Some("reserved")
            } else {
                None
            }
        }
    }
}

/// What the operator grants, runtime wide or for one plugin: origins, and
/// address ranges for non-public addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct OperatorGrants {
    pub origins: Vec<Origin>,
    pub cidrs: Vec<Cidr>,
}

impl OperatorGrants {
    /// Parse `allow-outbound` entries: origins (`https://host`) or CIDRs.
    pub fn parse(entries: &[String]) -> Result<OperatorGrants, String> {
        let mut g = OperatorGrants::default();
        for e in entries {
            if let Some(c) = Cidr::parse(e) {
                g.cidrs.push(c);
            } else {
                g.origins.push(Origin::parse(e)?);
            }
        }
        Ok(g)
    }
}

/// What one plugin may call.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Grants {
    /// Origins from the manifest that are granted.
    pub manifest: Vec<Origin>,
    /// Origins and ranges the operator granted (runtime wide and for this
    /// plugin).
    pub operator: OperatorGrants,
}

/// Why a call was refused; the text names the rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    pub rule: &'static str,
    pub text: String,
}

impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "denied by rule `{}`: {}", self.rule, self.text)
    }
}

impl std::error::Error for Denied {}

impl Grants {
    /// Whether any origin is granted at all.
    pub fn is_empty(&self) -> bool {
        self.manifest.is_empty() && self.operator.origins.is_empty()
    }

    /// The origin rule: `Ok` when `scheme://host:port` is granted.
    pub fn check_origin(&self, scheme: &str, host: &str, port: u16) -> Result<(), Denied> {
        let granted = self
            .manifest
            .iter()
            .chain(&self.operator.origins)
            .any(|o| o.matches(scheme, host, port));
        if granted {
            return Ok(());
        }
        Err(Denied {
            rule: "origin-not-granted",
            text: format!(
                "{scheme}://{host}:{port} is not among the plugin's granted origins (manifest `outbound` and operator `allow-outbound`)"
            ),
        })
    }

    /// The address rule: `Ok` when `ip`, reached for `host`, is public or
    /// granted by the operator.
    pub fn check_address(&self, host: &str, ip: IpAddr) -> Result<(), Denied> {
        let Some(kind) = non_public(ip) else {
            return Ok(());
        };
        let host_granted = self
            .operator
            .origins
            .iter()
            .any(|o| !o.wildcard && o.host == host);
        if host_granted || self.operator.cidrs.iter().any(|c| c.contains(ip)) {
            return Ok(());
        }
        Err(Denied {
            rule: "non-public-address",
            text: format!(
                "{host} resolves to {ip}, a {kind} address; such addresses need an operator grant of the host or a CIDR in `allow-outbound`"
            ),
        })
    }

    /// Manifest origins granted under `grant_manifest`, with the operator's.
    pub fn resolve(manifest: &[String], grant_manifest: bool, operator: OperatorGrants) -> Grants {
        let manifest = if grant_manifest {
            manifest
                .iter()
                .filter_map(|s| Origin::parse(s).ok())
                .collect()
        } else {
            Vec::new()
        };
        Grants { manifest, operator }
    }

    /// Origins (and ranges) `self` grants that `old` did not, as text.
    pub fn widened_from(&self, old: &Grants) -> Vec<String> {
        let mut out = Vec::new();
        for o in self.manifest.iter().chain(&self.operator.origins) {
            let had = old
                .manifest
                .iter()
                .chain(&old.operator.origins)
                .any(|x| x == o);
            if !had {
                out.push(o.to_string());
            }
        }
        for c in &self.operator.cidrs {
            if !old.operator.cidrs.contains(c) {
                out.push(c.to_string());
            }
        }
        out
    }
}

/// The W3C `traceparent` of `span`, when it is exported (sampled or not).
fn traceparent(span: &tracing::Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// Resolves names for one plugin's client, refusing what its grants do
/// not allow; the client connects only to the addresses returned here.
struct GrantedResolver {
    grants: Arc<Grants>,
    hosts: Arc<std::collections::BTreeMap<String, IpAddr>>,
}

impl reqwest::dns::Resolve for GrantedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let grants = self.grants.clone();
        let host = name.as_str().to_ascii_lowercase();
        let fixed = self.hosts.get(&host).copied();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = match fixed {
                Some(ip) => vec![SocketAddr::new(ip, 0)],
                None => tokio::net::lookup_host((host.as_str(), 0)).await?.collect(),
            };
            for a in &addrs {
                grants.check_address(&host, a.ip())?;
            }
            let addrs: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

/// Runtime-wide outbound settings (a part of `[plugins.runtime]`).
#[derive(Debug, Clone)]
pub struct OutboundDefaults {
    pub call_timeout: Duration,
    pub max_in_flight: u32,
    /// Static name entries, answered instead of DNS and checked the same.
    pub hosts: Arc<std::collections::BTreeMap<String, IpAddr>>,
    /// TLS for `https://` origins (see [`tls_config`]).
    pub tls: rustls::ClientConfig,
}

/// The certificates of the operator's `outbound-ca-file`: at least one,
/// all of them PEM.
pub fn read_ca_file(
    path: &std::path::Path,
) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;

    let shown = path.display();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("plugins.runtime.outbound-ca-file {shown}: {e}"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("plugins.runtime.outbound-ca-file {shown}: {e}"))?;
    if certs.is_empty() {
        return Err(format!(
            "plugins.runtime.outbound-ca-file {shown} holds no PEM certificate"
        ));
    }
    Ok(certs)
}

/// The TLS settings of outbound clients: the system's trusted roots plus
/// the operator's `ca_file` (PEM), verified with the ring provider. The
/// server name sent (SNI) and verified is the URL's host, which is the
/// granted origin's; the connection goes to the address the granted
/// resolver returned, so TLS changes nothing about where a call may go.
pub fn tls_config(ca_file: Option<&std::path::Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    if added == 0 {
        // Not fatal: calls to services under `ca_file` still work, and any
        // other https call fails with an unknown-issuer error naming it.
        tracing::warn!(
            errors = ?native.errors,
            "no system CA certificates found; outbound https calls trust only plugins.runtime.outbound-ca-file"
        );
    }
    if let Some(path) = ca_file {
        for c in read_ca_file(path)? {
            roots
                .add(c)
                .map_err(|e| format!("plugins.runtime.outbound-ca-file {}: {e}", path.display()))?;
        }
    }
    // The ring provider, as everywhere else in the host (AMQP, Redis): its
    // deprecation only notes that it lacks post-quantum key exchange, and
    // the alternative (aws-lc) needs a C and assembler build.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// One plugin's outbound side: grants, client, limits, counters.
pub struct Outbound {
    pub plugin: String,
    pub grants: Arc<Grants>,
    client: reqwest::Client,
    permits: Arc<Semaphore>,
    pub max_response_bytes: u64,
    pub call_timeout: Duration,
    denials_logged: Mutex<HashMap<String, Instant>>,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound")
            .field("plugin", &self.plugin)
            .field("grants", &self.grants)
            .finish_non_exhaustive()
    }
}

/// One request, in host terms.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
    pub timeout: Option<Duration>,
}

/// A whole response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Why a call produced no response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    Denied(String),
    Timeout(String),
    TooLarge(String),
    Invalid(String),
    Failed(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Denied(t) => write!(f, "denied: {t}"),
            CallError::Timeout(t) => write!(f, "timeout: {t}"),
            CallError::TooLarge(t) => write!(f, "too large: {t}"),
            CallError::Invalid(t) => write!(f, "invalid: {t}"),
            CallError::Failed(t) => write!(f, "failed: {t}"),
        }
    }
}

/// The per-delivery wall budget, shared by the calls of one delivery.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub deadline: Instant,
    pub total: Duration,
}

impl Outbound {
    pub fn new(
        plugin: &str,
        grants: Grants,
        max_response_bytes: u64,
        defaults: &OutboundDefaults,
    ) -> Result<Outbound, String> {
        let grants = Arc::new(grants);
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(Arc::new(GrantedResolver {
                grants: grants.clone(),
                hosts: defaults.hosts.clone(),
            }))
            .pool_idle_timeout(Duration::from_secs(60))
            .tls_backend_preconfigured(defaults.tls.clone())
            .build()
            .map_err(|e| format!("cannot build the outbound HTTP client: {e}"))?;
        Ok(Outbound {
            plugin: plugin.to_string(),
            grants,
            client,
            permits: Arc::new(Semaphore::new(defaults.max_in_flight.max(1) as usize)),
            max_response_bytes,
            call_timeout: defaults.call_timeout,
            denials_logged: Mutex::default(),
        })
    }

    /// Make one call under the grants. `budget_spent` is set when the
    /// delivery's wall budget ran out before or during the call.
    pub async fn call(
        &self,
        req: Request,
        budget: Option<Budget>,
        budget_spent: &mut bool,
    ) -> Result<Response, CallError> {
        let started = Instant::now();
        let url = reqwest::Url::parse(&req.url)
            .map_err(|e| CallError::Invalid(format!("URL `{}`: {e}", req.url)))?;
        let scheme = url.scheme().to_string();
        if scheme != "http" && scheme != "https" {
            return Err(CallError::Invalid(format!(
                "URL scheme `{scheme}` is not http or https"
            )));
        }
        let host = match url.host_str() {
            Some(h) => h
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_ascii_lowercase(),
            None => return Err(CallError::Invalid("URL has no host".into())),
        };
        let port = url.port_or_known_default().unwrap_or(80);
        let origin = format!("{scheme}://{host}:{port}");
        let checked = self
            .grants
            .check_origin(&scheme, &host, port)
            .and_then(|()| {
                // An address literal is never resolved: check it here.
                match host.parse::<IpAddr>() {
                    Ok(ip) => self.grants.check_address(&host, ip),
                    Err(_) => Ok(()),
                }
            });
        if let Err(d) = checked {
            return Err(self.denied(&origin, d));
        }
        let authority = match (url.host_str(), url.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            (None, _) => String::new(),
        };
        let method = reqwest::Method::from_bytes(req.method.as_bytes())
            .map_err(|_| CallError::Invalid(format!("method `{}`", req.method)))?;
        let mut rb = self.client.request(method.clone(), url.clone());
        for (k, v) in &req.headers {
            if k.eq_ignore_ascii_case("host") {
                if !v.eq_ignore_ascii_case(&authority) {
                    let d = Denied {
                        rule: "host-header",
                        text: format!("Host header `{v}` is not the URL's authority `{authority}`"),
                    };
                    return Err(self.denied(&origin, d));
                }
                continue;
            }
            rb = rb.header(k.as_str(), v.as_str());
        }
        if let Some(b) = req.body {
            rb = rb.body(b);
        }
        // The call's own timeout, capped by what is left of the budget.
        let mut timeout = req.timeout.unwrap_or(self.call_timeout);
        let mut by_budget = false;
        if let Some(b) = budget {
            let left = b.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                *budget_spent = true;
                return Err(CallError::Timeout(format!(
                    "the delivery's wall budget of {} ms is spent",
                    b.total.as_millis()
                )));
            }
            if left <= timeout {
                timeout = left;
                by_budget = true;
            }
        }
        let span = tracing::info_span!(
            "http.client",
            otel.kind = "client",
            otel.name = %method,
            http.request.method = %method,
            server.address = %host,
            server.port = port,
            url.full = %url,
            http.response.status_code = tracing::field::Empty,
            plugin = %self.plugin,
        );
        // The call continues the delivery's trace: `traceparent` names this
        // span, unless the guest set its own.
        let has_traceparent = req
            .headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("traceparent"));
        if !has_traceparent && let Some(tp) = traceparent(&span) {
            rb = rb.header("traceparent", tp);
        }
        let exchange =
            async {
                let _permit = self
                    .permits
                    .acquire()
                    .await
                    .map_err(|_| CallError::Failed("outbound client is closed".into()))?;
                let resp = rb.send().await.map_err(|e| self.send_error(&origin, &e))?;
                let status = resp.status().as_u16();
                let headers = resp
                    .headers()
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.as_str().to_string(),
                            String::from_utf8_lossy(v.as_bytes()).into_owned(),
                        )
                    })
                    .collect();
                let mut resp = resp;
                let mut body = Vec::new();
                while let Some(chunk) = resp.chunk().await.map_err(|e| {
                    CallError::Failed(format!("reading the response of {origin}: {e}"))
                })? {
                    if (body.len() + chunk.len()) as u64 > self.max_response_bytes {
                        return Err(CallError::TooLarge(format!(
                            "response body of {origin} exceeds max-response-bytes ({})",
                            self.max_response_bytes
                        )));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(Response {
                    status,
                    headers,
                    body,
                })
            };
        let result = match tokio::time::timeout(
            timeout,
            tracing::Instrument::instrument(exchange, span.clone()),
        )
        .await
        {
            Ok(r) => r,
            Err(_) if by_budget => {
                *budget_spent = true;
                Err(CallError::Timeout(format!(
                    "the delivery's wall budget ran out after {} ms calling {origin}",
                    budget.map_or(0, |b| b.total.as_millis())
                )))
            }
            Err(_) => Err(CallError::Timeout(format!(
                "no response from {origin} within {} ms",
                timeout.as_millis()
            ))),
        };
        let class = match &result {
            Ok(r) => {
                span.record("http.response.status_code", r.status);
                match r.status {
                    100..=199 => "1xx",
                    200..=299 => "2xx",
                    300..=399 => "3xx",
                    400..=499 => "4xx",
                    _ => "5xx",
                }
            }
            Err(CallError::Denied(_)) => "denied",
            Err(CallError::Timeout(_)) => "timeout",
            Err(_) => "error",
        };
        metrics::counter!(
            "warren_plugin_outbound_calls_total",
            "plugin" => self.plugin.clone(),
            "origin" => origin.clone(),
            "status" => class,
        )
        .increment(1);
        metrics::histogram!(
            "warren_plugin_outbound_seconds",
            "plugin" => self.plugin.clone(),
            "origin" => origin,
        )
        .record(started.elapsed().as_secs_f64());
        result
    }

    /// A send error, telling a denial by the resolver from other failures.
    fn send_error(&self, origin: &str, e: &reqwest::Error) -> CallError {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(s) = source {
            if let Some(d) = s.downcast_ref::<Denied>() {
                return self.denied(origin, d.clone());
            }
            source = s.source();
        }
        let mut text = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        CallError::Failed(text)
    }

    /// Count a denial, log it once per origin and interval, and turn it
    /// into the guest's error.
    fn denied(&self, origin: &str, d: Denied) -> CallError {
        metrics::counter!(
            "warren_plugin_outbound_denied_total",
            "plugin" => self.plugin.clone(),
            "rule" => d.rule,
        )
        .increment(1);
        let now = Instant::now();
        let log = {
            let mut logged = crate::sync::lock(&self.denials_logged);
            match logged.get(origin) {
                Some(at) if now.duration_since(*at) < DENIAL_LOG_INTERVAL => false,
                _ => {
                    logged.insert(origin.to_string(), now);
                    true
                }
            }
        };
        if log {
            tracing::warn!(plugin = %self.plugin, origin, rule = d.rule, "outbound call {d}");
        }
        CallError::Denied(d.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_subdomains_only() {
        let o = Origin::parse("https://*.example.com").unwrap();
        assert!(o.matches("https", "api.example.com", 443));
        assert!(o.matches("https", "a.b.example.com", 443));
        assert!(!o.matches("https", "example.com", 443));
        assert!(!o.matches("https", "evil-example.com", 443));
        assert!(!o.matches("http", "api.example.com", 80));
        assert!(Origin::parse("https://api.*.com").is_err());
        assert!(Origin::parse("https://host/path").is_err());
    }

    #[test]
    fn non_public_addresses_need_an_operator_grant() {
        let g = Grants::resolve(
            &["http://svc.test:8080".into()],
            true,
            OperatorGrants::default(),
        );
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let md: IpAddr = "169.254.169.254".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(
            g.check_address("svc.test", lo).unwrap_err().rule,
            "non-public-address"
        );
        assert!(
            g.check_address("svc.test", md)
                .unwrap_err()
                .text
                .contains("metadata")
        );
        assert!(g.check_address("svc.test", mapped).is_err());
        let aws6: IpAddr = "fd00:ec2::254".parse().unwrap();
        assert!(
            g.check_address("svc.test", aws6)
                .unwrap_err()
                .text
                .contains("metadata")
        );
        assert!(
            g.check_address("svc.test", "93.184.216.34".parse().unwrap())
                .is_ok()
        );
        let op = OperatorGrants::parse(&["127.0.0.0/8".into()]).unwrap();
        let g = Grants::resolve(&[], true, op);
        assert!(g.check_address("any", lo).is_ok());
        assert!(g.check_address("any", md).is_err());
        let op = OperatorGrants::parse(&["http://svc.test:8080".into()]).unwrap();
        let g = Grants::resolve(&[], true, op);
        assert!(g.check_address("svc.test", lo).is_ok());
        assert!(g.check_address("other.test", lo).is_err());
    }
}
