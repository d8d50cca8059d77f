//! Test fixture `old-contract`: a plugin built against the previous
//! contract, `warren:plugin@0.1.0` (its WIT is kept in `wit/` beside this
//! crate, unchanged). Loading it must fail with an error naming both that
//! version and the one the host runs (host/tests/cli.rs).

// The export glue wit-bindgen generates is unsafe code; plugins built on the
// SDK get it from the SDK's macro, this one (for the old contract) cannot.
#![allow(unsafe_code)]

wit_bindgen::generate!({ world: "plugin", path: "wit" });

use exports::warren::plugin::handler::{Delivery, Guest, HandleError};
use warren::plugin::types::{Limits, Manifest};

struct Old;

impl Guest for Old {
    fn manifest() -> Manifest {
        Manifest {
            name: "old-contract".into(),
            version: "1.0.0".into(),
            subscriptions: Vec::new(),
            limits: Limits {
                memory_bytes: None,
                deadline_ms: None,
                max_concurrency: None,
            },
        }
    }

    fn handle(_d: Delivery) -> Result<(), HandleError> {
        Ok(())
    }
}

export!(Old);
