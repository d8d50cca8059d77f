//! The topology registry: the exchanges, queues and bindings Warren
//! declares on every (re)connect, before any consumer starts, and that a
//! consumer re-declares for its own queue when it is re-established.
//!
//! The registry is shared (`Arc<RwLock<…>>`) and updatable at run time;
//! removing an entity only stops Warren from declaring it, it never deletes
//! anything on the broker.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

use super::convert::{short, to_amqp_value};
use super::failure::{AmqpError, FailureClass, classify, conflicting_argument};
use crate::message::HeaderValue;

/// An exchange type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExchangeType {
    /// `direct`.
    Direct,
    /// `fanout`.
    Fanout,
    /// `topic`.
    Topic,
    /// `headers`.
    Headers,
    /// A plugin type such as `x-delayed-message`.
    Custom(String),
}

impl ExchangeType {
    fn to_lapin(&self) -> ExchangeKind {
        match self {
            ExchangeType::Direct => ExchangeKind::Direct,
            ExchangeType::Fanout => ExchangeKind::Fanout,
            ExchangeType::Topic => ExchangeKind::Topic,
            ExchangeType::Headers => ExchangeKind::Headers,
            ExchangeType::Custom(s) => ExchangeKind::Custom(s.clone()),
        }
    }
}

/// An exchange to declare.
#[derive(Debug, Clone, PartialEq)]
pub struct ExchangeSpec {
    /// Name (never empty: the default exchange is not declared).
    pub name: String,
    /// Type.
    pub kind: ExchangeType,
    /// Survives a broker restart.
    pub durable: bool,
    /// Deleted when its last binding goes.
    pub auto_delete: bool,
    /// Extra arguments.
    pub arguments: Vec<(String, HeaderValue)>,
    /// Declared only so that it exists (a plugin's output): one that
    /// already exists with other settings is used as it is, not reported
    /// as a conflict.
    pub existing_ok: bool,
}

impl ExchangeSpec {
    /// A durable exchange of `kind`.
    pub fn durable(name: impl Into<String>, kind: ExchangeType) -> Self {
        Self {
            name: name.into(),
            kind,
            durable: true,
            auto_delete: false,
            arguments: Vec::new(),
            existing_ok: false,
        }
    }
}

/// The queue type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueType {
    /// A classic queue (no `x-queue-type` argument is sent).
    #[default]
    Classic,
    /// A quorum queue (`x-queue-type = quorum`, always durable).
    Quorum,
}

/// A queue to declare.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct QueueSpec {
    /// Name.
    pub name: String,
    /// Survives a broker restart.
    pub durable: bool,
    /// Deleted when its last consumer goes.
    pub auto_delete: bool,
    /// Classic or quorum.
    pub queue_type: QueueType,
    /// `x-dead-letter-exchange`.
    pub dead_letter_exchange: Option<String>,
    /// `x-dead-letter-routing-key`.
    pub dead_letter_routing_key: Option<String>,
    /// `x-message-ttl`.
    pub message_ttl: Option<Duration>,
    /// `x-delivery-limit` (quorum queues).
    pub delivery_limit: Option<u32>,
    /// Any other arguments, sent as given.
    pub arguments: Vec<(String, HeaderValue)>,
    /// Declared only so that it exists (a plugin's output): one that
    /// already exists with other arguments is used as it is, not reported
    /// as a conflict.
    pub existing_ok: bool,
}

impl QueueSpec {
    /// A durable classic queue.
    pub fn durable(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            durable: true,
            ..Self::default()
        }
    }

    /// A quorum queue.
    pub fn quorum(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            durable: true,
            queue_type: QueueType::Quorum,
            ..Self::default()
        }
    }

    /// The declaration arguments.
    pub fn field_table(&self) -> FieldTable {
        let mut t = FieldTable::default();
        if self.queue_type == QueueType::Quorum {
            t.insert("x-queue-type".into(), long("quorum"));
        }
        if let Some(v) = &self.dead_letter_exchange {
            t.insert("x-dead-letter-exchange".into(), long(v));
        }
        if let Some(v) = &self.dead_letter_routing_key {
            t.insert("x-dead-letter-routing-key".into(), long(v));
        }
        if let Some(v) = self.message_ttl {
            let ms = i64::try_from(v.as_millis()).unwrap_or(i64::MAX);
            t.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ms));
        }
        if let Some(v) = self.delivery_limit {
            t.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(v.into()));
        }
        for (k, v) in &self.arguments {
            t.insert(short(k), to_amqp_value(v));
        }
        t
    }
}

/// A binding of a queue to an exchange.
#[derive(Debug, Clone, PartialEq)]
pub struct BindingSpec {
    /// The queue.
    pub queue: String,
    /// The exchange.
    pub exchange: String,
    /// The binding key.
    pub routing_key: String,
    /// Binding arguments (headers exchanges).
    pub arguments: Vec<(String, HeaderValue)>,
}

impl BindingSpec {
    /// Bind `queue` to `exchange` with `routing_key`.
    pub fn new(
        queue: impl Into<String>,
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
    ) -> Self {
        Self {
            queue: queue.into(),
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            arguments: Vec::new(),
        }
    }
}

/// A set of declarations.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Topology {
    /// Exchanges by name.
    pub exchanges: BTreeMap<String, ExchangeSpec>,
    /// Queues by name.
    pub queues: BTreeMap<String, QueueSpec>,
    /// Bindings.
    pub bindings: Vec<BindingSpec>,
}

impl Topology {
    /// Add or replace an exchange.
    pub fn exchange(mut self, spec: ExchangeSpec) -> Self {
        self.exchanges.insert(spec.name.clone(), spec);
        self
    }

    /// Add or replace a queue.
    pub fn queue(mut self, spec: QueueSpec) -> Self {
        self.queues.insert(spec.name.clone(), spec);
        self
    }

    /// Add a binding (duplicates are ignored).
    pub fn binding(mut self, spec: BindingSpec) -> Self {
        if !self.bindings.contains(&spec) {
            self.bindings.push(spec);
        }
        self
    }

    /// Add what `other` declares that this does not: an entity both name
    /// keeps this one's declaration.
    pub fn with_missing(mut self, other: Topology) -> Self {
        for (name, e) in other.exchanges {
            self.exchanges.entry(name).or_insert(e);
        }
        for (name, q) in other.queues {
            self.queues.entry(name).or_insert(q);
        }
        for b in other.bindings {
            self = self.binding(b);
        }
        self
    }

    /// Everything one queue needs: the queue, its bindings and the exchanges
    /// they name.
    pub fn for_queue(&self, queue: &str) -> Topology {
        let bindings: Vec<BindingSpec> = self
            .bindings
            .iter()
            .filter(|b| b.queue == queue)
            .cloned()
            .collect();
        let exchanges = bindings
            .iter()
            .filter_map(|b| self.exchanges.get(&b.exchange))
            .map(|e| (e.name.clone(), e.clone()))
            .collect();
        let queues = self
            .queues
            .get(queue)
            .map(|q| (q.name.clone(), q.clone()))
            .into_iter()
            .collect();
        Topology {
            exchanges,
            queues,
            bindings,
        }
    }
}

/// The shared, updatable registry (cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct TopologyRegistry {
    inner: Arc<RwLock<Topology>>,
}

impl TopologyRegistry {
    /// A registry holding `topology`.
    pub fn new(topology: Topology) -> Self {
        Self {
            inner: Arc::new(RwLock::new(topology)),
        }
    }

    /// A copy of the current topology.
    pub fn snapshot(&self) -> Topology {
        crate::sync::read(&self.inner).clone()
    }

    /// Merge `more` into the registry (same names replace).
    pub fn merge(&self, more: Topology) {
        self.update(|t| {
            t.exchanges.extend(more.exchanges);
            t.queues.extend(more.queues);
            for b in more.bindings {
                if !t.bindings.contains(&b) {
                    t.bindings.push(b);
                }
            }
        });
    }

    /// Stop declaring queue `name` and its bindings.
    pub fn remove_queue(&self, name: &str) {
        self.update(|t| {
            t.queues.remove(name);
            t.bindings.retain(|b| b.queue != name);
        });
    }

    fn update(&self, f: impl FnOnce(&mut Topology)) {
        f(&mut crate::sync::write(&self.inner));
    }
}

/// Declare `topology` on `channel`: exchanges, then queues, then bindings.
/// Stops at the first error, because a failed declaration closes the
/// channel (an `existing_ok` entity that exists with other settings closes
/// it too: use a channel per entity where the topology may hold one).
pub async fn declare(channel: &Channel, topology: &Topology) -> Result<(), AmqpError> {
    for e in topology.exchanges.values() {
        declare_exchange(channel, e).await?;
    }
    for q in topology.queues.values() {
        declare_queue(channel, q).await?;
    }
    for b in &topology.bindings {
        declare_binding(channel, b).await?;
    }
    Ok(())
}

/// Declare one exchange.
pub async fn declare_exchange(channel: &Channel, e: &ExchangeSpec) -> Result<(), AmqpError> {
    let opts = ExchangeDeclareOptions {
        durable: e.durable,
        auto_delete: e.auto_delete,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            short(&e.name),
            e.kind.to_lapin(),
            opts,
            super::convert::to_field_table(&e.arguments),
        )
        .await
        .map_err(|err| declaration_error(format!("exchange '{}'", e.name), &err))
        .or_else(|err| tolerate_existing(e.existing_ok, err))
}

/// An `existing_ok` entity that exists with other settings is fine.
fn tolerate_existing(existing_ok: bool, err: AmqpError) -> Result<(), AmqpError> {
    match err {
        AmqpError::DeclarationConflict { .. } if existing_ok => Ok(()),
        err => Err(err),
    }
}

/// Declare one queue; returns the broker's consumer and message counts.
pub async fn declare_queue(channel: &Channel, q: &QueueSpec) -> Result<(u32, u32), AmqpError> {
    let opts = QueueDeclareOptions {
        durable: q.durable || q.queue_type == QueueType::Quorum,
        auto_delete: q.auto_delete,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(short(&q.name), opts, q.field_table())
        .await
        .map(|ok| (ok.consumer_count(), ok.message_count()))
        .map_err(|err| declaration_error(format!("queue '{}'", q.name), &err))
        .or_else(|err| tolerate_existing(q.existing_ok, err).map(|()| (0, 0)))
}

/// One setting of an existing queue that differs from what Warren declares
/// for it. The queue is used as it is; the difference is shown in
/// `/status` and as a `degraded` reason until it is fixed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ArgumentDiff {
    /// `x-dead-letter-exchange`, `x-queue-type`, `durable`, ...
    pub argument: String,
    /// What Warren declares (`none`: Warren sets nothing).
    pub declared: String,
    /// What the queue has (`none`: it has no such argument).
    pub existing: String,
}

impl ArgumentDiff {
    /// How an operator makes the queue match: a policy can set most
    /// optional arguments on a live queue; the queue type and the
    /// declaration flags are fixed at creation.
    pub fn remedy(&self) -> &'static str {
        match self.argument.as_str() {
            "x-queue-type" | "durable" | "auto_delete" | "exclusive" => {
                "delete and re-create the queue (fixed at creation)"
            }
            _ => "set it with a policy, or delete and re-create the queue",
        }
    }
}

/// Queue settings the broker reported as differing, most learned from one
/// 406 each: a bound on the re-declarations a conflict costs.
const MAX_DIFFS: usize = 16;

/// Declare `q` and, when it exists with other settings, use it as it is:
/// re-declare with each setting the broker names as different (its 406
/// says what the queue has) until the declaration matches, which changes
/// nothing on the broker and yields every difference, not only the first.
/// Each 406 closes its channel, so `open` is called for a fresh one per
/// try. A difference whose value cannot be read back ends the probing with
/// a passive declare (the queue is still used, the difference named).
pub async fn declare_or_adopt_queue<F, Fut>(
    mut open: F,
    q: &QueueSpec,
) -> Result<Vec<ArgumentDiff>, AmqpError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Channel, AmqpError>>,
{
    let mut opts = QueueDeclareOptions {
        durable: q.durable || q.queue_type == QueueType::Quorum,
        auto_delete: q.auto_delete,
        ..QueueDeclareOptions::default()
    };
    let mut table = q.field_table();
    let mut diffs: Vec<ArgumentDiff> = Vec::new();
    loop {
        let channel = open().await?;
        let err = match channel
            .queue_declare(short(&q.name), opts, table.clone())
            .await
        {
            Ok(_) => {
                let _ = channel.close(200, "declared".into()).await;
                return Ok(diffs);
            }
            Err(err) => declaration_error(format!("queue '{}'", q.name), &err),
        };
        let AmqpError::DeclarationConflict { message, .. } = &err else {
            return Err(err);
        };
        let Some(found) = Inequivalent::parse(message) else {
            return Err(err);
        };
        // A setting named twice (its value did not read back as the
        // broker's) or too many: stop probing, use the queue as it is.
        let repeated = diffs.iter().any(|d| d.argument == found.argument);
        let applied = !repeated && diffs.len() < MAX_DIFFS && found.apply(&mut opts, &mut table);
        if !repeated {
            diffs.push(found.diff);
        }
        if !applied {
            let channel = open().await?;
            inspect_queue(&channel, &q.name).await?;
            let _ = channel.close(200, "inspected".into()).await;
            return Ok(diffs);
        }
    }
}

/// A parsed `inequivalent arg 'A' for queue 'q' in vhost '/': received X but
/// current is Y`, where X and Y are `none`, `'V'` or `the value 'V' of type
/// 'T'`.
struct Inequivalent {
    argument: String,
    diff: ArgumentDiff,
    /// The existing value and its AMQP type, when it has one.
    current: Option<(String, Option<String>)>,
}

impl Inequivalent {
    fn parse(text: &str) -> Option<Inequivalent> {
        let argument = conflicting_argument(text)?;
        let (_, rest) = text.split_once("received ")?;
        let (received, current) = rest.split_once(" but current is ")?;
        let value = |s: &str| -> Option<(String, Option<String>)> {
            let s = s.trim();
            if s == "none" {
                return None;
            }
            if let Some(v) = s.strip_prefix("the value '") {
                let (v, ty) = v.rsplit_once("' of type '")?;
                return Some((v.to_owned(), Some(ty.trim_end_matches('\'').to_owned())));
            }
            Some((s.trim_matches('\'').to_owned(), None))
        };
        let show = |v: &Option<(String, Option<String>)>| match v {
            None => "none".to_owned(),
            Some((v, _)) => v.clone(),
        };
        let received = value(received);
        let current = value(current);
        Some(Inequivalent {
            diff: ArgumentDiff {
                argument: argument.clone(),
                declared: show(&received),
                existing: show(&current),
            },
            argument,
            current,
        })
    }

    /// Make the declaration carry the existing setting; false when it cannot
    /// be expressed (an AMQP type this does not read).
    fn apply(&self, opts: &mut QueueDeclareOptions, table: &mut FieldTable) -> bool {
        let flag = |v: &Option<(String, Option<String>)>| matches!(v, Some((v, _)) if v == "true");
        match self.argument.as_str() {
            "durable" => opts.durable = flag(&self.current),
            "auto_delete" => opts.auto_delete = flag(&self.current),
            "exclusive" => opts.exclusive = flag(&self.current),
            arg => {
                let mut inner = table.inner().clone();
                match &self.current {
                    None => {
                        inner.remove(arg);
                    }
                    Some((v, ty)) => {
                        let Some(value) = typed(v, ty.as_deref()) else {
                            return false;
                        };
                        inner.insert(short(arg), value);
                    }
                }
                *table = FieldTable::from(inner);
            }
        }
        true
    }
}

/// An argument value as RabbitMQ prints it, in its AMQP type. When both
/// sides have a value the broker prints no type (`received '2000' but
/// current is '60000'`): a number is then an integer (the broker compares
/// integers of any width as equal), anything else a string.
fn typed(v: &str, ty: Option<&str>) -> Option<AMQPValue> {
    Some(match ty {
        None => match v.parse::<i64>() {
            Ok(n) => AMQPValue::LongLongInt(n),
            Err(_) => long(v),
        },
        Some("longstr") => long(v),
        Some("long") => AMQPValue::LongLongInt(v.parse().ok()?),
        Some("signedint") => AMQPValue::LongInt(v.parse().ok()?),
        Some("unsignedint") => AMQPValue::LongUInt(v.parse().ok()?),
        Some("short") => AMQPValue::ShortInt(v.parse().ok()?),
        Some("unsignedshort") => AMQPValue::ShortUInt(v.parse().ok()?),
        Some("byte") => AMQPValue::ShortShortInt(v.parse().ok()?),
        Some("unsignedbyte") => AMQPValue::ShortShortUInt(v.parse().ok()?),
        Some("bool") => AMQPValue::Boolean(v.parse().ok()?),
        Some("double") => AMQPValue::Double(v.parse().ok()?),
        Some("float") => AMQPValue::Float(v.parse().ok()?),
        Some(_) => return None,
    })
}

/// Check a queue exists without changing it; returns the broker's consumer
/// and message counts.
pub async fn inspect_queue(channel: &Channel, name: &str) -> Result<(u32, u32), AmqpError> {
    let opts = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(short(name), opts, FieldTable::default())
        .await
        .map(|ok| (ok.consumer_count(), ok.message_count()))
        .map_err(|err| declaration_error(format!("queue '{name}'"), &err))
}

/// Declare one binding.
pub async fn declare_binding(channel: &Channel, b: &BindingSpec) -> Result<(), AmqpError> {
    channel
        .queue_bind(
            short(&b.queue),
            short(&b.exchange),
            short(&b.routing_key),
            QueueBindOptions::default(),
            super::convert::to_field_table(&b.arguments),
        )
        .await
        .map_err(|err| {
            declaration_error(
                format!(
                    "binding of queue '{}' to exchange '{}' with key '{}'",
                    b.queue, b.exchange, b.routing_key
                ),
                &err,
            )
        })
}

fn declaration_error(entity: String, err: &lapin::Error) -> AmqpError {
    let class = classify(err);
    let message = err.to_string();
    if class == FailureClass::PreconditionFailed {
        AmqpError::DeclarationConflict {
            entity,
            argument: conflicting_argument(&message).unwrap_or_else(|| "unknown".to_owned()),
            message,
        }
    } else {
        AmqpError::DeclarationFailed {
            entity,
            class,
            message,
        }
    }
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quorum_queue_arguments() {
        let mut q = QueueSpec::quorum("q");
        q.dead_letter_exchange = Some("dlx".into());
        q.message_ttl = Some(Duration::from_secs(2));
        q.arguments
            .push(("x-max-length".into(), HeaderValue::I64(10)));
        let t = q.field_table();
        assert!(t.contains_key("x-queue-type"));
        assert!(t.contains_key("x-dead-letter-exchange"));
        assert_eq!(
            t.inner().get("x-message-ttl"),
            Some(&AMQPValue::LongLongInt(2000))
        );
        assert!(t.contains_key("x-max-length"));
    }

    #[test]
    fn reads_what_the_broker_says_differs() {
        let t = |text: &str| {
            let i = Inequivalent::parse(text).unwrap();
            (i.diff, i.current)
        };
        let (d, cur) = t(
            "PRECONDITION_FAILED - inequivalent arg 'x-message-ttl' for queue 'probe.q' in vhost '/': received none but current is the value '1000' of type 'signedint'",
        );
        assert_eq!(
            (
                d.argument.as_str(),
                d.declared.as_str(),
                d.existing.as_str()
            ),
            ("x-message-ttl", "none", "1000")
        );
        assert_eq!(cur, Some(("1000".into(), Some("signedint".into()))));
        let (d, cur) = t(
            "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q' in vhost '/': received 'classic' but current is 'quorum'",
        );
        assert_eq!(
            (d.declared.as_str(), d.existing.as_str()),
            ("classic", "quorum")
        );
        assert_eq!(cur, Some(("quorum".into(), None)));
        let (d, cur) = t(
            "PRECONDITION_FAILED - inequivalent arg 'x-dead-letter-exchange' for queue 'q' in vhost '/': received the value 'warren.dlx' of type 'longstr' but current is none",
        );
        assert_eq!(
            (d.declared.as_str(), d.existing.as_str()),
            ("warren.dlx", "none")
        );
        assert_eq!(cur, None);
        let i = Inequivalent::parse(
            "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'q' in vhost '/': received 'false' but current is 'true'",
        )
        .unwrap();
        let mut opts = QueueDeclareOptions::default();
        let mut table = FieldTable::default();
        assert!(i.apply(&mut opts, &mut table));
        assert!(opts.durable);
        assert_eq!(typed("7", Some("signedint")), Some(AMQPValue::LongInt(7)));
        assert_eq!(typed("60000", None), Some(AMQPValue::LongLongInt(60000)));
        assert_eq!(typed("quorum", None), Some(long("quorum")));
        assert_eq!(typed("x", Some("table")), None);
    }

    #[test]
    fn for_queue_selects_its_bindings_and_exchanges() {
        let t = Topology::default()
            .exchange(ExchangeSpec::durable("ex", ExchangeType::Topic))
            .exchange(ExchangeSpec::durable("other", ExchangeType::Fanout))
            .queue(QueueSpec::durable("a"))
            .queue(QueueSpec::durable("b"))
            .binding(BindingSpec::new("a", "ex", "k.#"))
            .binding(BindingSpec::new("b", "other", ""));
        let a = t.for_queue("a");
        assert_eq!(a.queues.len(), 1);
        assert_eq!(a.bindings.len(), 1);
        assert!(a.exchanges.contains_key("ex") && !a.exchanges.contains_key("other"));
        let reg = TopologyRegistry::new(t);
        reg.remove_queue("a");
        assert!(reg.snapshot().for_queue("a").bindings.is_empty());
    }
}
