//! Key-value state in the sandbox: whether a plugin has a namespace, the
//! delivery's pending writes, and the host side of `warren:plugin/kv` and
//! `wasi:keyvalue` over them (one implementation for both).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::State;
use crate::kv::{KvError, Namespace, Seen, Txn};
use crate::plugins::bindings as wit;

/// Whether a plugin may use key-value state, and where.
#[derive(Clone, Debug)]
pub(crate) enum KvAccess {
    Granted(Arc<Namespace>),
    /// Why not (no store here, or the manifest does not declare `state`).
    Denied(Arc<str>),
}

impl Default for KvAccess {
    fn default() -> Self {
        KvAccess::Denied(Arc::from("key-value state is not available here"))
    }
}

/// The `wasi:keyvalue` bucket resource: a plugin has one bucket, its own
/// namespace, so the resource carries nothing.
pub struct Bucket;

pub(super) struct KvState {
    pub(super) access: KvAccess,
    pub(super) txn: Txn,
}

impl KvState {
    pub(super) fn namespace(&self) -> Result<Arc<Namespace>, KvError> {
        match &self.access {
            KvAccess::Granted(ns) => Ok(ns.clone()),
            KvAccess::Denied(why) => Err(KvError::Unavailable(why.to_string())),
        }
    }
}

/// Key-value operations shared by `warren:plugin/kv` and `wasi:keyvalue`.
impl State {
    async fn kv_get(&mut self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let ns = self.kv.namespace()?;
        self.kv.txn.check_key(key)?;
        match self.kv.txn.seen(key) {
            Seen::Pending(v) => Ok(v),
            Seen::Incremented { delta } => {
                let base = ns.get(key).await?;
                let n = crate::kv::parse_int(key, base.as_deref())?.saturating_add(delta);
                Ok(Some(n.to_string().into_bytes()))
            }
            Seen::Committed => ns.get(key).await,
        }
    }

    fn kv_set(&mut self, key: &str, value: Vec<u8>) -> Result<(), KvError> {
        self.kv.namespace()?;
        self.kv.txn.set(key, value)
    }

    fn kv_delete(&mut self, key: &str) -> Result<(), KvError> {
        self.kv.namespace()?;
        self.kv.txn.delete(key)
    }

    async fn kv_increment(&mut self, key: &str, delta: i64) -> Result<i64, KvError> {
        let ns = self.kv.namespace()?;
        self.kv.txn.check_key(key)?;
        let committed = match self.kv.txn.seen(key) {
            Seen::Pending(_) => None,
            Seen::Incremented { .. } | Seen::Committed => ns.get(key).await?,
        };
        self.kv.txn.increment(key, delta, committed.as_deref())
    }

    /// Keys after `cursor`, as this delivery sees them: its deletions left
    /// out, and the keys it creates added to the first page.
    async fn kv_list(
        &mut self,
        cursor: Option<u64>,
    ) -> Result<(Vec<String>, Option<u64>), KvError> {
        let ns = self.kv.namespace()?;
        let (mut keys, next) = ns.scan(cursor.unwrap_or(0)).await?;
        let pending: BTreeMap<&str, bool> = self.kv.txn.pending_keys().collect();
        keys.retain(|k| pending.get(k.as_str()) != Some(&false));
        if cursor.is_none() {
            for (k, exists) in pending {
                if exists && !keys.iter().any(|have| have == k) {
                    keys.push(k.to_string());
                }
            }
        }
        Ok((keys, (next != 0).then_some(next)))
    }
}

fn to_wit_kv(e: KvError) -> wit::WitKvError {
    match e {
        KvError::LimitExceeded(t) => wit::WitKvError::LimitExceeded(t),
        KvError::Invalid(t) => wit::WitKvError::Invalid(t),
        KvError::Unavailable(t) => wit::WitKvError::Unavailable(t),
    }
}

impl wit::KvHost for State {
    async fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, wit::WitKvError> {
        self.kv_get(&key).await.map_err(to_wit_kv)
    }

    fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), wit::WitKvError> {
        self.kv_set(&key, value).map_err(to_wit_kv)
    }

    fn delete(&mut self, key: String) -> Result<(), wit::WitKvError> {
        self.kv_delete(&key).map_err(to_wit_kv)
    }

    async fn increment(&mut self, key: String, delta: i64) -> Result<i64, wit::WitKvError> {
        self.kv_increment(&key, delta).await.map_err(to_wit_kv)
    }

    fn add(&mut self, key: String, delta: i64) -> Result<(), wit::WitKvError> {
        self.kv
            .namespace()
            .and_then(|_| self.kv.txn.add(&key, delta))
            .map_err(to_wit_kv)
    }
}

mod keyvalue {
    //! `wasi:keyvalue` over the same operations as `warren:plugin/kv`.

    use wasmtime::component::Resource;

    use super::super::State;
    use super::{Bucket, KvAccess};
    use crate::kv::KvError;
    use crate::plugins::bindings::keyvalue::{atomics, batch, store};

    fn to_wasi(e: KvError) -> store::Error {
        store::Error::Other(e.to_string())
    }

    impl store::Host for State {
        async fn open(&mut self, identifier: String) -> Result<Resource<Bucket>, store::Error> {
            if let KvAccess::Denied(why) = &self.kv.access {
                tracing::debug!(plugin = %self.ident.name, %why, "wasi:keyvalue open refused.");
                return Err(store::Error::AccessDenied);
            }
            if !identifier.is_empty() && identifier != "default" {
                return Err(store::Error::NoSuchStore);
            }
            self.table
                .push(Bucket)
                .map_err(|e| store::Error::Other(e.to_string()))
        }
    }

    impl store::HostBucket for State {
        async fn get(
            &mut self,
            _: Resource<Bucket>,
            key: String,
        ) -> Result<Option<Vec<u8>>, store::Error> {
            self.kv_get(&key).await.map_err(to_wasi)
        }

        async fn set(
            &mut self,
            _: Resource<Bucket>,
            key: String,
            value: Vec<u8>,
        ) -> Result<(), store::Error> {
            self.kv_set(&key, value).map_err(to_wasi)
        }

        async fn delete(&mut self, _: Resource<Bucket>, key: String) -> Result<(), store::Error> {
            self.kv_delete(&key).map_err(to_wasi)
        }

        async fn exists(&mut self, _: Resource<Bucket>, key: String) -> Result<bool, store::Error> {
            self.kv_get(&key)
                .await
                .map(|v| v.is_some())
                .map_err(to_wasi)
        }

        async fn list_keys(
            &mut self,
            _: Resource<Bucket>,
            cursor: Option<u64>,
        ) -> Result<store::KeyResponse, store::Error> {
            let (keys, cursor) = self.kv_list(cursor).await.map_err(to_wasi)?;
            Ok(store::KeyResponse { keys, cursor })
        }

        async fn drop(&mut self, bucket: Resource<Bucket>) -> wasmtime::Result<()> {
            self.table.delete(bucket)?;
            Ok(())
        }
    }

    impl atomics::Host for State {
        async fn increment(
            &mut self,
            _: Resource<Bucket>,
            key: String,
            delta: u64,
        ) -> Result<u64, store::Error> {
            let delta = i64::try_from(delta)
                .map_err(|_| to_wasi(KvError::Invalid(format!("delta {delta} is over 2^63-1"))))?;
            let n = self.kv_increment(&key, delta).await.map_err(to_wasi)?;
            u64::try_from(n).map_err(|_| {
                to_wasi(KvError::Invalid(format!(
                    "{key:?} is {n}, which wasi:keyvalue's unsigned increment cannot return"
                )))
            })
        }
    }

    impl batch::Host for State {
        async fn get_many(
            &mut self,
            _: Resource<Bucket>,
            keys: Vec<String>,
        ) -> Result<Vec<Option<(String, Vec<u8>)>>, store::Error> {
            let mut out = Vec::with_capacity(keys.len());
            for key in keys {
                let v = self.kv_get(&key).await.map_err(to_wasi)?;
                out.push(v.map(|v| (key, v)));
            }
            Ok(out)
        }

        async fn set_many(
            &mut self,
            _: Resource<Bucket>,
            key_values: Vec<(String, Vec<u8>)>,
        ) -> Result<(), store::Error> {
            for (k, v) in key_values {
                self.kv_set(&k, v).map_err(to_wasi)?;
            }
            Ok(())
        }

        async fn delete_many(
            &mut self,
            _: Resource<Bucket>,
            keys: Vec<String>,
        ) -> Result<(), store::Error> {
            for k in keys {
                self.kv_delete(&k).map_err(to_wasi)?;
            }
            Ok(())
        }
    }
}
