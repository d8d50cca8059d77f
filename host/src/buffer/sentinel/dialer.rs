//! Building the spool's Redis clients: TLS and the credentials of the
//! data nodes and of the sentinels, which Redis keeps apart.

use redis::{
    Client, ClientTlsConfig, ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo,
    TlsCertificates,
};

use crate::buffer::{SpoolConfig, SpoolError};
use crate::secret::{Secret, read_secret_file};

/// Builds the spool's Redis clients: TLS material shared by every node, and
/// the credentials of the data nodes (the sentinels' are baked into their
/// clients at start).
pub(super) struct Dialer {
    /// `rediss` or `redis`, for the data nodes Sentinel names.
    scheme: &'static str,
    /// CA and client certificate, when configured (else the system's roots).
    certificates: Option<TlsCertificates>,
    /// Credentials of the data nodes (and of `url`).
    pub(super) data: Credentials,
    /// Credentials of the sentinels.
    pub(super) sentinel: Credentials,
}

/// A user and password that replace whatever a URL carries, where set.
#[derive(Default)]
pub(super) struct Credentials {
    username: Option<String>,
    password: Option<Secret>,
}

impl Credentials {
    /// `base` with these credentials put in where set.
    fn apply(&self, mut base: RedisConnectionInfo) -> RedisConnectionInfo {
        if let Some(u) = &self.username {
            base = base.set_username(u);
        }
        if let Some(p) = &self.password {
            base = base.set_password(p.expose());
        }
        base
    }
}

impl Dialer {
    /// Read the TLS files and password files of `cfg`; every problem at once.
    pub(super) fn new(cfg: &SpoolConfig, problems: &mut Vec<String>) -> Dialer {
        let tls = match cfg.plain_url() {
            Some(url) => url.starts_with("rediss://"),
            None => cfg.sentinels.iter().any(|s| s.starts_with("rediss://")),
        };
        let read = |key: &str, path: &std::path::Path, problems: &mut Vec<String>| {
            std::fs::read(path)
                .map_err(|e| problems.push(format!("cannot read {key} {}: {e}", path.display())))
                .ok()
        };
        let root_cert = cfg
            .tls_ca_file
            .as_ref()
            .and_then(|p| read("tls_ca_file", p, problems));
        let client_tls = match (&cfg.tls_cert_file, &cfg.tls_key_file) {
            (Some(cert), Some(key)) => {
                match (
                    read("tls_cert_file", cert, problems),
                    read("tls_key_file", key, problems),
                ) {
                    (Some(client_cert), Some(client_key)) => Some(ClientTlsConfig {
                        client_cert,
                        client_key,
                    }),
                    _ => None,
                }
            }
            (None, None) => None,
            _ => {
                problems.push("`tls_cert_file` and `tls_key_file` go together".into());
                None
            }
        };
        let certificates =
            (root_cert.is_some() || client_tls.is_some()).then_some(TlsCertificates {
                client_tls,
                root_cert,
            });
        if certificates.is_some() && !tls {
            problems.push("TLS files are set but the addresses use redis://, not rediss://".into());
        }
        let data = Credentials::read(
            "password_file",
            &cfg.username,
            &cfg.password,
            &cfg.password_file,
            problems,
        );
        let sentinel = Credentials::read(
            "sentinel_password_file",
            &cfg.sentinel_username,
            &cfg.sentinel_password,
            &cfg.sentinel_password_file,
            problems,
        );
        Dialer {
            scheme: if tls { "rediss" } else { "redis" },
            certificates,
            data,
            sentinel,
        }
    }

    /// A client for a configured URL; `credentials`, where set, replace the
    /// URL's own. The error never holds the URL (it may carry a password).
    pub(super) fn for_url(&self, url: &str, credentials: &Credentials) -> Result<Client, String> {
        let info = url
            .into_connection_info()
            .map_err(|e| format!("bad redis url: {e}"))?;
        let redis = credentials.apply(info.redis_settings().clone());
        self.build(info.set_redis_settings(redis))
            .map_err(|e| format!("bad redis url: {e}"))
    }

    /// A client for the data node at `addr` (`ip:port` as Sentinel names it).
    pub(super) fn data_node(&self, addr: &str) -> Result<Client, SpoolError> {
        let fail = |source| SpoolError::ConnectFailed {
            addr: addr.to_owned(),
            source,
        };
        let host_port = match addr.rsplit_once(':') {
            Some((host, port)) if host.contains(':') => format!("[{host}]:{port}"),
            _ => addr.to_owned(),
        };
        let info = format!("{}://{host_port}", self.scheme)
            .into_connection_info()
            .map_err(fail)?
            .set_redis_settings(self.data.apply(RedisConnectionInfo::default()));
        self.build(info).map_err(fail)
    }

    fn build(&self, info: ConnectionInfo) -> redis::RedisResult<Client> {
        match &self.certificates {
            Some(certificates) => Client::build_with_tls(info, certificates.clone()),
            None => Client::open(info),
        }
    }
}

impl Credentials {
    /// A user and the password given inline or in a file (`file_key`
    /// names the file's setting in a problem).
    fn read(
        file_key: &str,
        username: &Option<String>,
        inline: &Option<Secret>,
        file: &Option<std::path::PathBuf>,
        problems: &mut Vec<String>,
    ) -> Credentials {
        let password = match (inline, file) {
            (Some(s), _) => Some(s.clone()),
            (None, Some(path)) => read_secret_file(file_key, path)
                .map_err(|e| problems.push(e))
                .ok(),
            (None, None) => None,
        };
        Credentials {
            username: username.clone(),
            password,
        }
    }
}
