//! Test fixture `kv-user`: the key-value contract, the same protocol as
//! mode `kv` of the Python and JavaScript fixtures (`plugins/python/fixture`,
//! `plugins/js/fixture`), so one contract test runs against all three.
//!
//! The body is commands separated by `;` (spaces around each trimmed),
//! run in order:
//! - `set K V`: set `K` to the text `V` (the rest of the command);
//! - `get K`: publish `K=<value as text>`, or `K=(none)`;
//! - `inc K N`: increment `K` by the signed integer `N`, publish
//!   `K+=N -> <the value returned>`;
//! - `del K`: delete `K`;
//! - `big-key`: set a key of 100,000 bytes (`k` repeated) to `x`;
//! - `big-value`: set `big` to 2 MiB of `v`;
//! - `retry`: return a retry (`asked to retry`) after all commands;
//! - `panic`: panic at once (`asked to panic`).
//!
//! This Rust fixture also speaks the standard `wasi:keyvalue` (bucket
//! `default`), for the host's implementation of it:
//! - `wasi-get K`, `wasi-inc K N` (N unsigned), `wasi-set K V`: as above;
//! - `wasi-list`: publish `keys=<the first page's keys, sorted, comma-separated>`.
//!
//! A key-value error is published as `error: <kind>: <text>` (`kind` is
//! `limit-exceeded`, `invalid` or `unavailable`) and the next command
//! runs. Everything is published through the default exchange with routing
//! key `kv.out`, or host config `routing-key`. A command it does not know
//! rejects the delivery.

use warren_sdk::{Delivery, HandleError, Manifest, Message, Plugin, Subscription, kv};

struct KvUser;

impl Plugin for KvUser {
    fn manifest() -> Manifest {
        Manifest::new("kv-user", env!("CARGO_PKG_VERSION"))
            .subscribe(Subscription::queue("fixture.kv-user"))
            .state()
    }

    fn handle(d: Delivery) -> Result<(), HandleError> {
        let out = warren_sdk::config("routing-key").unwrap_or_else(|| "kv.out".to_string());
        let body = String::from_utf8_lossy(&d.body);
        let mut retry = false;
        for command in body.split(';').map(str::trim).filter(|c| !c.is_empty()) {
            if command == "retry" {
                retry = true;
                continue;
            }
            let said = match run(command)? {
                Ok(None) => continue,
                Ok(Some(text)) => text,
                Err(e) => format!("error: {}: {}", e.kind(), e.text()),
            };
            warren_sdk::publish(Message::new("", &out, said))?;
        }
        if retry {
            return Err(HandleError::retry("asked to retry"));
        }
        Ok(())
    }
}

/// Runs one command: the text to publish, if any, or the key-value error.
fn run(command: &str) -> Result<Result<Option<String>, kv::Error>, HandleError> {
    let mut words = command.splitn(3, ' ');
    let done = |r: Result<(), kv::Error>| r.map(|()| None);
    Ok(
        match (words.next().unwrap_or(""), words.next(), words.next()) {
            ("set", Some(k), Some(v)) => done(kv::set(k, v)),
            ("get", Some(k), None) => kv::get(k).map(|v| {
                let v = v.map_or("(none)".into(), |v| {
                    String::from_utf8_lossy(&v).into_owned()
                });
                Some(format!("{k}={v}"))
            }),
            ("inc", Some(k), Some(n)) => {
                let n: i64 = n
                    .parse()
                    .map_err(|_| HandleError::reject(format!("not an integer: {n:?}")))?;
                kv::increment(k, n).map(|v| Some(format!("{k}+={n} -> {v}")))
            }
            ("del", Some(k), None) => done(kv::delete(k)),
            // Rust only: `add K N`, an increment without its answer.
            ("add", Some(k), Some(n)) => {
                let n: i64 = n
                    .parse()
                    .map_err(|_| HandleError::reject(format!("not an integer: {n:?}")))?;
                done(kv::add(k, n))
            }
            ("big-key", None, None) => done(kv::set(&"k".repeat(100_000), "x")),
            ("big-value", None, None) => done(kv::set("big", "v".repeat(2 * 1024 * 1024))),
            ("panic", None, None) => panic!("asked to panic"),
            (w, ..) if w.starts_with("wasi-") => return Ok(Ok(Some(wasi(command)))),
            _ => return Err(HandleError::reject(format!("unknown command {command:?}"))),
        },
    )
}

/// A `wasi-*` command through `wasi:keyvalue`: what to publish, errors
/// included (as `error: <the wasi error>`).
fn wasi(command: &str) -> String {
    use warren_sdk::bindings::wasi::keyvalue::{atomics, store};
    let run = || -> Result<String, store::Error> {
        let bucket = store::open("default")?;
        let mut words = command.splitn(3, ' ');
        Ok(
            match (words.next().unwrap_or(""), words.next(), words.next()) {
                ("wasi-get", Some(k), None) => {
                    let v = bucket.get(k)?;
                    let v = v.map_or("(none)".into(), |v| {
                        String::from_utf8_lossy(&v).into_owned()
                    });
                    format!("{k}={v}")
                }
                ("wasi-set", Some(k), Some(v)) => {
                    bucket.set(k, v.as_bytes())?;
                    format!("{k} set")
                }
                ("wasi-inc", Some(k), Some(n)) => {
                    let n: u64 = n.parse().unwrap_or(0);
                    format!("{k}+={n} -> {}", atomics::increment(&bucket, k, n)?)
                }
                ("wasi-list", None, None) => {
                    let mut keys = bucket.list_keys(None)?.keys;
                    keys.sort();
                    format!("keys={}", keys.join(","))
                }
                _ => format!("unknown command {command:?}"),
            },
        )
    };
    run().unwrap_or_else(|e| format!("error: {e:?}"))
}

warren_sdk::export_plugin!(KvUser);
