//! Values that must never reach a log line, `/status` or an error message:
//! [`Secret`] prints and serializes as `<redacted>`, [`read_secret_file`]
//! is the one way a `*-file` setting is read, and [`redact_url`] is the one
//! way a URL with a password in it is shown.

use std::path::Path;

use serde::{Deserialize, Serialize, Serializer};

/// A value that never appears in logs, `Debug` output or serialized status.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself, for the places that hand it to a peer or compare it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// Read a secret from `path` (a `password-file` setting, a mounted
/// Kubernetes or Docker secret): the whole file, one trailing newline
/// removed. `key` names the setting in the error, which never holds the
/// file's contents.
pub fn read_secret_file(key: &str, path: &Path) -> Result<Secret, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {key} {}: {e}", path.display()))?;
    let value = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(&text);
    if value.is_empty() {
        return Err(format!("{key} {} is empty", path.display()));
    }
    Ok(Secret::new(value))
}

/// `url` (`scheme://user[:old]@host/...`) with `password` as its password,
/// percent-encoded; an error, naming `key`, when the URL has no user.
pub fn with_password(key: &str, url: &str, password: &Secret) -> Result<String, String> {
    let shown = redact_url(url);
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!("{key} {shown:?} is not a URL"));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return Err(format!(
            "{key} {shown:?} names no user, so a password file has no password to set"
        ));
    };
    let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
    let mut encoded = String::new();
    for b in password.expose().bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            encoded.push(char::from(b));
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    Ok(format!("{scheme}://{user}:{encoded}@{host}{path}"))
}

/// `scheme://user:password@host/...` with the password replaced by
/// `<redacted>`; a URL without one is returned as it is.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            if userinfo.contains(':') {
                format!("{scheme}://{user}:<redacted>@{host}{path}")
            } else {
                format!("{scheme}://{user}@{host}{path}")
            }
        }
        None => url.to_string(),
    }
}

/// Serializes a URL through [`redact_url`] (`warren config`, `/config`).
pub fn redacted_url<S: Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_url(url))
}

/// Serializes URLs through [`redact_url`].
pub fn redacted_urls<S: Serializer>(urls: &[String], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(urls.iter().map(|u| redact_url(u)))
}

/// Serializes an optional URL through [`redact_url`].
pub fn redacted_opt_url<S: Serializer>(url: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match url {
        Some(u) => s.serialize_some(&redact_url(u)),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_printed() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "\"<redacted>\"");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"<redacted>\"");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn file_loses_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "s3cret\n").unwrap();
        assert_eq!(
            read_secret_file("spool.password-file", &p)
                .unwrap()
                .expose(),
            "s3cret"
        );
        std::fs::write(&p, "\n").unwrap();
        let e = read_secret_file("spool.password-file", &p).unwrap_err();
        assert!(e.contains("is empty"), "{e}");
        let e = read_secret_file("spool.password-file", &dir.path().join("nope")).unwrap_err();
        assert!(e.starts_with("cannot read spool.password-file"), "{e}");
    }

    #[test]
    fn a_password_file_replaces_the_url_s_password_encoded() {
        let pw = Secret::new("p@ss:w/rd");
        assert_eq!(
            with_password("amqp.url", "amqp://warren:old@h:5672/%2f", &pw).unwrap(),
            "amqp://warren:p%40ss%3Aw%2Frd@h:5672/%2f"
        );
        assert_eq!(
            with_password("amqp.url", "amqps://warren@h", &pw).unwrap(),
            "amqps://warren:p%40ss%3Aw%2Frd@h"
        );
        let e = with_password("amqp.url", "amqp://h:5672", &pw).unwrap_err();
        assert!(e.contains("names no user"), "{e}");
    }

    #[test]
    fn the_password_and_token_files_are_read_into_the_settings() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("amqp-password");
        std::fs::write(&pw, "guest\n").unwrap();
        let amqp = crate::amqp::AmqpSection {
            url: "amqp://guest:wrong@127.0.0.1:5672/%2f".into(),
            password_file: Some(pw),
            ..Default::default()
        };
        assert!(amqp.problems().is_empty(), "{:?}", amqp.problems());
        assert_eq!(
            amqp.supervisor("main").url,
            "amqp://guest:guest@127.0.0.1:5672/%2f"
        );
        let missing = crate::amqp::AmqpSection {
            password_file: Some(dir.path().join("nope")),
            ..Default::default()
        };
        assert!(
            missing
                .problems()
                .iter()
                .any(|p| p.contains("amqp.password-file"))
        );

        let token = dir.path().join("admin-token");
        std::fs::write(&token, "0123456789abcdef-token\n").unwrap();
        let mut admin = crate::admin::AdminConfig {
            token_file: Some(token),
            ..Default::default()
        };
        assert!(admin.problems().is_empty(), "{:?}", admin.problems());
        assert_eq!(
            admin.resolved_token().unwrap().unwrap().expose(),
            "0123456789abcdef-token"
        );
        admin.token = Some(Secret::new("another-token-of-16"));
        assert!(admin.problems().iter().any(|p| p.contains("not both")));
    }

    #[test]
    fn redact_url_keeps_everything_but_the_password() {
        assert_eq!(redact_url("amqp://u:p@h:1/v"), "amqp://u:<redacted>@h:1/v");
        assert_eq!(redact_url("amqp://h:1/v"), "amqp://h:1/v");
        assert_eq!(redact_url("redis://:pw@h:1"), "redis://:<redacted>@h:1");
    }
}
