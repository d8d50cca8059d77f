//! What one live instance of a component takes from the pooling allocator,
//! read once at load, and the pool's admission by it.
//!
//! The pool has fixed totals of component instances, core instances,
//! memories and tables (see `runtime::engine_config`). A Rust component is
//! one core module and a few shims; an interpreter (componentize-py) is 14
//! core instances. Counting only component instances let 147 concurrent
//! Python deliveries exhaust the core instances, and the next one failed
//! to instantiate: a good message dead-lettered as a trap. So every
//! instantiation first takes its footprint from [`Pool`], waiting
//! (backpressure) until the pool can hold it, and a component that could
//! never fit is refused at load.

use std::sync::Arc;

use serde::Serialize;
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};
use wasmparser::{Instance, Parser, Payload};

/// Pool slots one instance takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Footprint {
    /// Core module instances (`instantiate` entries, nested components
    /// included).
    pub core_instances: u32,
    /// Linear memories.
    pub memories: u32,
    /// Tables.
    pub tables: u32,
}

impl Footprint {
    /// The footprint of the component in `bytes`, compiled as `component`.
    pub(crate) fn of(
        bytes: &[u8],
        component: &wasmtime::component::Component,
    ) -> Result<Footprint, String> {
        let mut core_instances = 0u32;
        for payload in Parser::new(0).parse_all(bytes) {
            if let Payload::InstanceSection(reader) = payload.map_err(|e| e.to_string())? {
                for instance in reader {
                    if let Instance::Instantiate { .. } = instance.map_err(|e| e.to_string())? {
                        core_instances += 1;
                    }
                }
            }
        }
        // `None` when a module is imported rather than defined: then count
        // one memory and one table per core instance, generously.
        let (memories, tables) = match component.resources_required() {
            Some(r) => (r.num_memories, r.num_tables),
            None => (core_instances, core_instances),
        };
        Ok(Footprint {
            core_instances: core_instances.max(1),
            memories,
            tables,
        })
    }
}

/// The pool's totals, as semaphores: an instantiation holds its footprint
/// of each until its store is dropped.
pub(crate) struct Pool {
    components: Arc<Semaphore>,
    core_instances: Arc<Semaphore>,
    memories: Arc<Semaphore>,
    tables: Arc<Semaphore>,
    /// The totals, for refusals.
    totals: Footprint,
}

/// Slots held for one live instance.
pub(crate) struct Admitted {
    _permits: [OwnedSemaphorePermit; 4],
}

impl Pool {
    pub(crate) fn new(total_components: u32, totals: Footprint) -> Pool {
        let sem = |n: u32| Arc::new(Semaphore::new(n as usize));
        Pool {
            components: sem(total_components),
            core_instances: sem(totals.core_instances),
            memories: sem(totals.memories),
            tables: sem(totals.tables),
            totals,
        }
    }

    /// Why a component of footprint `f` can never be instantiated here.
    pub(crate) fn refuses(&self, f: &Footprint) -> Option<String> {
        let t = &self.totals;
        let over = [
            ("core instances", f.core_instances, t.core_instances),
            ("memories", f.memories, t.memories),
            ("tables", f.tables, t.tables),
        ];
        over.iter().find(|(_, need, have)| need > have).map(|(what, need, have)| {
            format!("one instance needs {need} {what}; the whole pool has {have} (raise plugins.runtime.max-instances)")
        })
    }

    /// Wait until one instance of footprint `f` fits, and hold its slots.
    /// Always in the same order, so two waiters never hold what the other
    /// needs.
    pub(crate) async fn admit(&self, f: &Footprint) -> Result<Admitted, AcquireError> {
        let component = self.components.clone().acquire_owned().await?;
        let core = self
            .core_instances
            .clone()
            .acquire_many_owned(f.core_instances)
            .await?;
        let memories = self.memories.clone().acquire_many_owned(f.memories).await?;
        let tables = self.tables.clone().acquire_many_owned(f.tables).await?;
        Ok(Admitted {
            _permits: [component, core, memories, tables],
        })
    }
}
