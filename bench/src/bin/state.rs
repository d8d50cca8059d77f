//! What key-value state costs a delivery: all of Warren draining a
//! pre-filled quorum queue through the `noop` plugin, then through `bump`
//! (`noop` plus one `kv::increment("count", 1)`: a read of the key, and
//! a commit batched with other deliveries' before the ack), in one run,
//! same prefetch and instance policy. Prints msg/s, their ratio (issue
//! #28: ≥ 0.6×), CPU per message of Warren and of Redis, and Redis script
//! calls per run; fails unless `count` ends at the number of messages.
//!
//! `cargo run --release -p warren-bench --bin state [messages] [max-batch]`
//! (default 50,000 × 256 bytes, `[kv] max-batch` as shipped). Needs
//! RabbitMQ on 127.0.0.1:5672 and Redis on 127.0.0.1:6379 (the spool's and
//! so the store's default); deletes only `bump`'s keys there, before and
//! after.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use lapin::options::QueueDeleteOptions;
use warren_bench::{
    Drained, connect_shared, count_arg, cpu_of, declare_quorum, drain_warren, fill,
};
use warren_it::broker::inspect;

const BODY: usize = 256;
const PREFETCH: u16 = 1000;
const INSTANCE: &str = "fresh";
const REDIS: &str = "redis://127.0.0.1:6379";
/// `bump`'s one key and its namespace's key and byte counts.
const COUNT_KEY: &str = "warren:kv:bump:count";
const META_KEY: &str = "warren:kv-meta:bump";

/// One plugin's drain, and what Redis did meanwhile.
struct Row {
    plugin: &'static str,
    drained: Drained,
    /// Redis's CPU time over the whole run (start and stop included).
    redis_cpu: Option<Duration>,
    /// `EVAL` and `GET` calls Redis served over the whole run, from every
    /// client of the shared instance.
    evals: u64,
    gets: u64,
    left: u32,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let n = count_arg(50_000)?;
    let max_batch: Option<usize> = std::env::args()
        .nth(2)
        .map(|a| a.parse().with_context(|| format!("max-batch {a:?}")))
        .transpose()?;
    let extra = max_batch.map_or_else(String::new, |m| format!("[kv]\nmax-batch = {m}"));
    let conn = connect_shared().await?;
    let mut redis = redis::Client::open(REDIS)?
        .get_multiplexed_async_connection()
        .await
        .with_context(|| format!("Redis on {REDIS}"))?;
    clear(&mut redis).await?;
    let redis_pid = info_field(&mut redis, "server", "process_id")
        .await?
        .unwrap_or_default();

    let mut rows = Vec::new();
    // `bump` counts with `kv::increment` (a read, then the commit), then
    // with `kv::add` (the commit alone).
    // (`drain_warren` puts `extra` inside `[plugin.<name>]`.)
    let add = format!("config = {{ op = \"add\" }}\n{extra}");
    for (plugin, label, extra) in [
        ("noop", "noop", extra.as_str()),
        ("bump", "bump, `kv::increment`", extra.as_str()),
        ("bump", "bump, `kv::add`", add.as_str()),
    ] {
        let queue = format!("bench.state.{}", uuid::Uuid::new_v4().simple());
        let ch = conn.create_channel().await?;
        declare_quorum(&ch, &queue).await?;
        eprintln!("{plugin}: filling {queue} with {n} messages…");
        fill(&ch, &queue, n, BODY).await?;
        eprintln!("{plugin}: draining…");
        let redis_cpu = cpu_of(&redis_pid).ok();
        let (evals, gets) = calls(&mut redis).await?;
        let drained = drain_warren(plugin, &queue, n, PREFETCH, INSTANCE, extra).await?;
        let (evals_after, gets_after) = calls(&mut redis).await?;
        let redis_cpu = redis_cpu
            .zip(cpu_of(&redis_pid).ok())
            .map(|(before, after)| after.saturating_sub(before));
        let (left, _) = inspect(&conn, &queue).await?;
        ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await?;
        rows.push(Row {
            plugin: label,
            drained,
            redis_cpu,
            evals: evals_after.saturating_sub(evals),
            gets: gets_after.saturating_sub(gets),
            left,
        });
    }
    let count: Option<i64> = redis::cmd("GET")
        .arg(COUNT_KEY)
        .query_async(&mut redis)
        .await?;
    clear(&mut redis).await?;

    let rate = |d: &Drained| n as f64 / d.secs;
    let per_msg = |t: Duration| format!("{:.1}", t.as_secs_f64() * 1e6 / n as f64);
    let batch = max_batch.map_or_else(|| "as shipped".to_string(), |m| m.to_string());
    println!(
        "## State: {n} pre-filled {BODY}-byte messages (quorum queue, prefetch {PREFETCH}, instance = \"{INSTANCE}\", kv max-batch {batch})\n"
    );
    println!(
        "| plugin | seconds | msg/s | vs noop | Warren CPU µs/msg | Redis CPU µs/msg | Redis EVAL calls | Redis GET calls | left in queue |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let noop = rate(&rows[0].drained);
    for r in &rows {
        println!(
            "| {} | {:.2} | {:.0} | {:.2}× | {} | {} | {} | {} | {} |",
            r.plugin,
            r.drained.secs,
            rate(&r.drained),
            rate(&r.drained) / noop,
            per_msg(r.drained.cpu),
            r.redis_cpu.map_or_else(|| "–".into(), per_msg),
            r.evals,
            r.gets,
            r.left,
        );
    }
    let bump = &rows[1];
    println!(
        "\n`bump` counts one key for every delivery. \
         Redis calls are the shared instance's, every client's; \
         {:.0} commits per script call.",
        n as f64 / bump.evals.max(1) as f64
    );
    for r in &rows[1..] {
        let ratio = rate(&r.drained) / noop;
        println!(
            "\ntarget: {} ≥ 0.6× noop — {ratio:.2}× {}",
            r.plugin,
            if ratio >= 0.6 { "met" } else { "NOT met" }
        );
    }
    println!(
        "\ncount in Redis: {} (expected {}, two runs of {n})",
        count.map_or_else(|| "none".into(), |c| c.to_string()),
        2 * n
    );
    if count != Some(2 * n as i64) {
        bail!(
            "bump's count is {count:?}, not {}: increments were lost or doubled",
            2 * n
        );
    }
    Ok(())
}

/// Delete `bump`'s keys (its one counter and its key and byte counts).
async fn clear(redis: &mut redis::aio::MultiplexedConnection) -> Result<()> {
    redis::cmd("DEL")
        .arg(COUNT_KEY)
        .arg(META_KEY)
        .query_async::<()>(redis)
        .await?;
    Ok(())
}

/// `field` of `INFO <section>`.
async fn info_field(
    redis: &mut redis::aio::MultiplexedConnection,
    section: &str,
    field: &str,
) -> Result<Option<String>> {
    let info: String = redis::cmd("INFO").arg(section).query_async(redis).await?;
    Ok(info.lines().find_map(|l| {
        l.strip_prefix(field)
            .and_then(|r| r.strip_prefix(':'))
            .map(|v| v.trim().to_string())
    }))
}

/// The `EVAL` and `GET` calls Redis has served since its start.
async fn calls(redis: &mut redis::aio::MultiplexedConnection) -> Result<(u64, u64)> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(redis)
        .await?;
    let count = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{name}:calls=")))
            .and_then(|r| r.split(',').next())
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    };
    Ok((count("eval"), count("get")))
}
