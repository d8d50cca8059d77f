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

/// Admission to the pool, in one semaphore. Its permits are "core
/// instance equivalents": the pool's core-instance total, with a component
/// instance, a memory and a table each priced at the pool's ratio of core
/// instances to that resource (8, 4 and 2 with Warren's totals). An
/// instance takes the largest of its four prices, so the admitted
/// instances never use more of any one resource than the pool has, and a
/// delivery takes a single permit batch rather than four (this is on the
/// per-delivery path). The price of the guarantee: a mix of very
/// different components may be admitted a little below the pool's true
/// capacity.
pub(crate) struct Pool {
    units: Arc<Semaphore>,
    /// Units per component instance, memory and table.
    prices: [u32; 3],
    /// The totals, for refusals.
    totals: Footprint,
}

/// Slots held for one live instance.
pub(crate) struct Admitted {
    _permit: OwnedSemaphorePermit,
}

impl Pool {
    pub(crate) fn new(total_components: u32, totals: Footprint) -> Pool {
        let price = |of: u32| (totals.core_instances / of.max(1)).max(1);
        Pool {
            units: Arc::new(Semaphore::new(totals.core_instances as usize)),
            prices: [
                price(total_components),
                price(totals.memories),
                price(totals.tables),
            ],
            totals,
        }
    }

    /// Units one instance of footprint `f` takes.
    fn units(&self, f: &Footprint) -> u32 {
        let [component, memory, table] = self.prices;
        component
            .max(f.core_instances)
            .max(f.memories.saturating_mul(memory))
            .max(f.tables.saturating_mul(table))
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
    pub(crate) async fn admit(&self, f: &Footprint) -> Result<Admitted, AcquireError> {
        let units = self.units(f).min(self.totals.core_instances);
        Ok(Admitted {
            _permit: self.units.clone().acquire_many_owned(units).await?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_is_priced_by_its_scarcest_resource() {
        // Warren's totals for 10 component instances.
        let pool = Pool::new(
            10,
            Footprint {
                core_instances: 80,
                memories: 20,
                tables: 40,
            },
        );
        let rust = Footprint {
            core_instances: 3,
            memories: 1,
            tables: 2,
        };
        let python = Footprint {
            core_instances: 14,
            memories: 1,
            tables: 1,
        };
        let many_memories = Footprint {
            core_instances: 2,
            memories: 5,
            tables: 0,
        };
        assert_eq!(pool.units(&rust), 8); // one component-instance slot
        assert_eq!(pool.units(&python), 14);
        assert_eq!(pool.units(&many_memories), 20);
    }
}
