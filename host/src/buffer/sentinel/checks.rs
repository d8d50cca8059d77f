//! Checks of a data node: that it is a primary with enough replicas, what
//! `INFO replication` says, and the settings that make it unsafe for the
//! spool.

use redis::Role;
use redis::aio::MultiplexedConnection;

use crate::buffer::SpoolError;

/// What `INFO replication` on a data node says.
#[derive(Debug, Default)]
pub(super) struct ReplInfo {
    pub(super) role: String,
    pub(super) replid: String,
    pub(super) replid2: String,
    pub(super) online_replicas: u32,
}

pub(super) fn too_few(addr: &str, online: u32, required: u32) -> SpoolError {
    SpoolError::NoReplicas {
        addr: addr.to_owned(),
        detail: format!("{online} online, {required} required"),
    }
}

/// Value of `name` in a flat `[name, value, ...]` reply.
pub(super) fn field<'a>(flat: &'a [String], name: &str) -> Option<&'a str> {
    flat.chunks(2)
        .find(|c| c.first().map(String::as_str) == Some(name))
        .and_then(|c| c.get(1))
        .map(String::as_str)
}

/// `ROLE` must say primary; then `INFO replication` for ids and replicas.
pub(super) async fn check_primary(
    conn: &mut MultiplexedConnection,
    addr: &str,
) -> Result<ReplInfo, SpoolError> {
    let role: Role = redis::cmd("ROLE")
        .query_async(conn)
        .await
        .map_err(|e| SpoolError::from_redis(addr, e))?;
    match role {
        Role::Primary { .. } => repl_info(conn, addr).await,
        Role::Replica { .. } => Err(SpoolError::NotPrimary {
            addr: addr.to_owned(),
            role: "replica".into(),
        }),
        _ => Err(SpoolError::NotPrimary {
            addr: addr.to_owned(),
            role: "sentinel".into(),
        }),
    }
}

pub(super) async fn repl_info(
    conn: &mut MultiplexedConnection,
    addr: &str,
) -> Result<ReplInfo, SpoolError> {
    let text: String = redis::cmd("INFO")
        .arg("replication")
        .query_async(conn)
        .await
        .map_err(|e| SpoolError::from_redis(addr, e))?;
    Ok(parse_repl_info(&text))
}

fn parse_repl_info(text: &str) -> ReplInfo {
    let mut info = ReplInfo::default();
    for line in text.lines() {
        let Some((k, v)) = line.trim().split_once(':') else {
            continue;
        };
        match k {
            "role" => info.role = v.to_owned(),
            "master_replid" => info.replid = v.to_owned(),
            "master_replid2" => info.replid2 = v.to_owned(),
            k if k.starts_with("slave") && v.contains("state=online") => {
                info.online_replicas += 1;
            }
            _ => {}
        }
    }
    info
}

/// Start-up checks of the primary's durability settings (`appendonly`,
/// `min-replicas-to-write`, `maxmemory-policy`): findings are reported, not
/// fatal.
pub(super) async fn startup_checks(conn: &mut MultiplexedConnection, addr: &str) -> Vec<String> {
    let mut p = redis::pipe();
    p.cmd("CONFIG")
        .arg("GET")
        .arg("appendonly")
        .cmd("CONFIG")
        .arg("GET")
        .arg("min-replicas-to-write")
        .cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy");
    let replies: Result<(Vec<String>, Vec<String>, Vec<String>), _> = p.query_async(conn).await;
    match replies {
        Ok((aof, minrep, policy)) => check_findings(
            field(&aof, "appendonly"),
            field(&minrep, "min-replicas-to-write"),
            field(&policy, "maxmemory-policy"),
        ),
        Err(e) => vec![format!("could not read the configuration of {addr}: {e}")],
    }
}

fn check_findings(aof: Option<&str>, minrep: Option<&str>, policy: Option<&str>) -> Vec<String> {
    let mut findings = Vec::new();
    if aof != Some("yes") {
        findings.push(format!(
            "appendonly is {} (want yes: a restart loses the spool)",
            aof.unwrap_or("unknown")
        ));
    }
    if minrep.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) == 0 {
        findings.push(format!(
            "min-replicas-to-write is {} (want >= 1: an isolated primary accepts writes a failover discards)",
            minrep.unwrap_or("unknown")
        ));
    }
    if policy != Some("noeviction") {
        findings.push(format!(
            "maxmemory-policy is {} (want noeviction: Redis may evict spooled messages)",
            policy.unwrap_or("unknown")
        ));
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_info_replication() {
        let text = "# Replication\r\nrole:master\r\nconnected_slaves:2\r\n\
            slave0:ip=127.0.0.1,port=7001,state=online,offset=1,lag=0\r\n\
            slave1:ip=127.0.0.1,port=7002,state=wait_bgsave,offset=0,lag=0\r\n\
            master_failover_state:no-failover\r\nmaster_replid:abc\r\nmaster_replid2:def\r\n";
        let i = parse_repl_info(text);
        assert_eq!(i.role, "master");
        assert_eq!(i.replid, "abc");
        assert_eq!(i.replid2, "def");
        assert_eq!(i.online_replicas, 1);
    }

    #[test]
    fn findings_flag_unsafe_settings() {
        assert!(check_findings(Some("yes"), Some("1"), Some("noeviction")).is_empty());
        let f = check_findings(Some("no"), Some("0"), Some("allkeys-lru"));
        assert_eq!(f.len(), 3, "{f:?}");
        assert!(f[0].starts_with("appendonly is no"));
    }

    #[test]
    fn field_reads_flat_maps() {
        let flat: Vec<String> = ["ip", "1.2.3.4", "port", "7"].map(String::from).to_vec();
        assert_eq!(field(&flat, "port"), Some("7"));
        assert_eq!(field(&flat, "nope"), None);
    }
}
