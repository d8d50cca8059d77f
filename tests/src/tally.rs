//! The acceptance load of key-value state: `n` requests to the `tally`
//! example, one in ten retried once and one in twenty trapped, and what
//! its counts in Redis must say afterwards.

use std::collections::BTreeMap;

use anyhow::Result;

/// How request `i` ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Ack,
    /// Its first attempt returns a retry; the second succeeds.
    RetryOnce,
    /// It traps: dead-lettered, never counted.
    Trap,
}

/// One run's requests, under keys no other run uses.
pub struct Load {
    pub run: String,
    pub n: usize,
    /// Requests share `k` keys (`<run>-k<i % k>`); `None`: one key each
    /// (`<run>-m<i>`), so a request counted twice shows.
    pub shared_keys: Option<usize>,
}

impl Load {
    pub fn new(n: usize, shared_keys: Option<usize>) -> Load {
        Load {
            run: uuid::Uuid::new_v4().simple().to_string(),
            n,
            shared_keys,
        }
    }

    pub fn fate(i: usize) -> Fate {
        match (i % 20, i % 10) {
            (0, _) => Fate::Trap,
            (_, 5) => Fate::RetryOnce,
            _ => Fate::Ack,
        }
    }

    pub fn key(&self, i: usize) -> String {
        match self.shared_keys {
            Some(k) => format!("{}-k{}", self.run, i % k),
            None => format!("{}-m{i}", self.run),
        }
    }

    /// The request bodies, in order.
    pub fn bodies(&self) -> Vec<String> {
        (0..self.n)
            .map(|i| {
                let fail = match Self::fate(i) {
                    Fate::Ack => serde_json::Value::Null,
                    Fate::RetryOnce => "retry-once".into(),
                    Fate::Trap => "trap".into(),
                };
                serde_json::json!({ "key": self.key(i), "fail": fail }).to_string()
            })
            .collect()
    }

    /// The request bodies with no failure asked for: every one acks.
    pub fn plain_bodies(&self) -> Vec<String> {
        (0..self.n)
            .map(|i| serde_json::json!({ "key": self.key(i) }).to_string())
            .collect()
    }

    /// Requests that end acknowledged (not trapped).
    pub fn acked(&self) -> usize {
        (0..self.n).filter(|i| Self::fate(*i) != Fate::Trap).count()
    }

    /// Requests that trap.
    pub fn trapped(&self) -> usize {
        self.n - self.acked()
    }

    /// The count each key must end with: its acknowledged requests.
    pub fn expected(&self) -> BTreeMap<String, i64> {
        let mut out = BTreeMap::new();
        for i in (0..self.n).filter(|i| Self::fate(*i) != Fate::Trap) {
            *out.entry(self.key(i)).or_insert(0) += 1;
        }
        out
    }

    /// The counts `tally` committed for this run, read from `redis_url`.
    pub async fn counts(&self, redis_url: &str) -> Result<BTreeMap<String, i64>> {
        let mut conn = redis::Client::open(redis_url)?
            .get_multiplexed_async_connection()
            .await?;
        let prefix = "warren:kv:tally:count:";
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}{}-*", self.run))
            .query_async(&mut conn)
            .await?;
        let mut out = BTreeMap::new();
        for k in keys {
            let v: i64 = redis::cmd("GET").arg(&k).query_async(&mut conn).await?;
            out.insert(k[prefix.len()..].to_string(), v);
        }
        Ok(out)
    }

    /// Delete this run's counts.
    pub async fn cleanup(&self, redis_url: &str) {
        let Ok(counts) = self.counts(redis_url).await else {
            return;
        };
        let Ok(client) = redis::Client::open(redis_url) else {
            return;
        };
        if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
            for k in counts.keys() {
                let _: redis::RedisResult<()> = redis::cmd("DEL")
                    .arg(format!("warren:kv:tally:count:{k}"))
                    .query_async(&mut conn)
                    .await;
            }
        }
    }
}
