//! One builder for the `warren.toml` files the tests give Warren: a method
//! per key tests commonly set, [`WarrenToml::set`] for any other
//! `section.key`, and [`WarrenToml::merge`] for TOML text (plugin sections
//! and the like). Sections are merged, never written twice, so a test may
//! add keys to a section the builder already holds.

use std::fmt::Display;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use toml::{Table, Value};

use crate::broker::unique;

/// A `warren.toml` under construction.
#[derive(Debug, Clone, Default)]
pub struct WarrenToml {
    table: Table,
    /// Mistakes made while building (a fragment that does not parse, a key
    /// under a value that is not a table), reported by [`Self::render`].
    errors: Vec<String>,
}

impl WarrenToml {
    /// An empty file: Warren's defaults throughout.
    pub fn new() -> Self {
        Self::default()
    }

    /// Plugins from `dir`, and a spool stream of its own, so that tests
    /// running at once on the shared broker and Redis do not meet. The
    /// retry tiers are shared: a tier's name says its delay, and a retry
    /// returns to the queue it came from by its routing key.
    pub fn isolated(dir: &Path) -> Self {
        Self::new().plugins_dir(dir).own_spool_stream()
    }

    /// `plugins.dir`.
    pub fn plugins_dir(self, dir: &Path) -> Self {
        self.set("plugins.dir", dir.display().to_string())
    }

    /// `spool.stream-key`.
    pub fn stream_key(self, key: &str) -> Self {
        self.set("spool.stream-key", key)
    }

    /// A spool stream of its own (`spool.stream-key`), so that no other
    /// test drains or counts this one's entries.
    pub fn own_spool_stream(self) -> Self {
        self.stream_key(&unique("spool"))
    }

    /// `amqp.url`.
    pub fn amqp_url(self, url: &str) -> Self {
        self.set("amqp.url", url)
    }

    /// `admin.bind`.
    pub fn admin_bind(self, bind: impl Display) -> Self {
        self.set("admin.bind", bind.to_string())
    }

    /// `dispatch.retry-exchange`.
    pub fn retry_exchange(self, name: &str) -> Self {
        self.set("dispatch.retry-exchange", name)
    }

    /// `dispatch.dead-letter-exchange` and `dispatch.dead-letter-queue`.
    pub fn dead_letters(self, exchange: &str, queue: &str) -> Self {
        self.set("dispatch.dead-letter-exchange", exchange)
            .set("dispatch.dead-letter-queue", queue)
    }

    /// Dead letters to the queue `dlq` through the exchange `<dlq>.x`.
    pub fn dead_letters_to(self, dlq: &str) -> Self {
        self.dead_letters(&format!("{dlq}.x"), dlq)
    }

    /// At most `max_attempts` deliveries of a message, retried after
    /// 50 ms, then at most 200 ms: failures play out in well under a
    /// second.
    pub fn quick_retries(self, max_attempts: i64) -> Self {
        self.set("dispatch.max-attempts", max_attempts)
            .set("dispatch.retry-delay-ms", 50)
            .set("dispatch.retry-delay-max-ms", 200)
    }

    /// `shutdown.grace-period-ms`.
    pub fn grace_period_ms(self, ms: i64) -> Self {
        self.set("shutdown.grace-period-ms", ms)
    }

    /// `plugin` consuming `queue` (its only subscription, with the
    /// defaults).
    pub fn subscribe(self, plugin: &str, queue: &str) -> Self {
        let mut subscription = Table::new();
        subscription.insert("queue".into(), queue.into());
        self.set(
            &format!("plugin.{plugin}.subscriptions"),
            vec![Value::Table(subscription)],
        )
    }

    /// `echo` consuming `input` and publishing each delivery to the
    /// default exchange with routing key `output`.
    pub fn echo(self, input: &str, output: &str) -> Self {
        self.subscribe("echo", input)
            .set("plugin.echo.config.routing-key", output)
    }

    /// Set `key`, a dotted path such as `amqp.heartbeat-secs` or
    /// `plugin.echo.subscriptions`, to `value`, replacing what was there.
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Self {
        let mut path: Vec<&str> = key.split('.').collect();
        let Some(last) = path.pop() else {
            return self;
        };
        let mut table = &mut self.table;
        for part in path {
            let entry = table
                .entry(part)
                .or_insert_with(|| Value::Table(Table::new()));
            match entry {
                Value::Table(t) => table = t,
                other => {
                    let error = format!("{key}: {part} is already {other}, not a table");
                    self.errors.push(error);
                    return self;
                }
            }
        }
        table.insert(last.to_owned(), value.into());
        self
    }

    /// Merge the TOML text `fragment` in: its sections join the ones of the
    /// same name, and its keys replace the ones already set. Keys before a
    /// section header are top-level keys (they do not join the section set
    /// last, as text appended to a file would).
    pub fn merge(mut self, fragment: &str) -> Self {
        match fragment.parse::<Table>() {
            Ok(t) => merge_into(&mut self.table, t),
            Err(e) => self.errors.push(format!("fragment {fragment:?}: {e}")),
        }
        self
    }

    /// The file's text.
    pub fn render(&self) -> Result<String> {
        if !self.errors.is_empty() {
            bail!("test configuration: {}", self.errors.join("; "));
        }
        toml::to_string(&self.table).context("rendering the test configuration")
    }

    /// Write the file to `path` and return `path`.
    pub fn write(&self, path: &Path) -> Result<PathBuf> {
        std::fs::write(path, self.render()?)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path.to_owned())
    }

    /// Write the file as `dir/warren.toml` and return its path.
    pub fn write_in(&self, dir: &Path) -> Result<PathBuf> {
        self.write(&dir.join("warren.toml"))
    }
}

/// `from`'s tables merged into `into`'s, key by key; any other value
/// replaces the one in `into`.
fn merge_into(into: &mut Table, from: Table) {
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (Some(Value::Table(mine)), Value::Table(theirs)) => merge_into(mine, theirs),
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

/// [`WarrenToml::echo`] as TOML text, for helpers that take sections as
/// text.
pub fn echo_section(input: &str, output: &str) -> String {
    let (input, output) = (Value::from(input), Value::from(output));
    format!(
        "[plugin.echo]\nsubscriptions = [{{ queue = {input} }}]\nconfig = {{ routing-key = {output} }}\n"
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn sections_are_merged_not_repeated() {
        let text = WarrenToml::new()
            .stream_key("s")
            .set("amqp.heartbeat-secs", 2)
            .merge("[spool]\nhost-id = \"h\"\n[plugin.echo]\nsubscriptions = [{ queue = \"q\" }]")
            .merge("[amqp]\nurl = \"amqp://x\"")
            .render()
            .unwrap();
        assert_eq!(text.matches("[spool]").count(), 1, "{text}");
        let parsed: Table = text.parse().unwrap();
        assert_eq!(parsed["spool"]["stream-key"].as_str(), Some("s"));
        assert_eq!(parsed["spool"]["host-id"].as_str(), Some("h"));
        assert_eq!(parsed["amqp"]["heartbeat-secs"].as_integer(), Some(2));
        assert_eq!(parsed["amqp"]["url"].as_str(), Some("amqp://x"));
        assert_eq!(
            parsed["plugin"]["echo"]["subscriptions"][0]["queue"].as_str(),
            Some("q")
        );
    }

    #[test]
    fn a_later_value_replaces_an_earlier_one() {
        let text = WarrenToml::new()
            .admin_bind("127.0.0.1:0")
            .merge("[admin]\nbind = \"127.0.0.1:1\"")
            .render()
            .unwrap();
        let parsed: Table = text.parse().unwrap();
        assert_eq!(parsed["admin"]["bind"].as_str(), Some("127.0.0.1:1"));
    }

    #[test]
    fn a_bad_fragment_or_path_is_reported() {
        assert!(WarrenToml::new().merge("[amqp").render().is_err());
        assert!(
            WarrenToml::new()
                .set("amqp.url", "x")
                .set("amqp.url.more", 1)
                .render()
                .is_err()
        );
    }

    #[test]
    fn the_echo_section_is_the_echo_method() {
        let text = echo_section("in \"q\"", "out");
        let parsed: Table = text.parse().unwrap();
        let built: Table = WarrenToml::new()
            .echo("in \"q\"", "out")
            .render()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(parsed, built, "{text}");
    }
}
