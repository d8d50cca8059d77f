//! The one `bindgen!` of the host, generated from `wit/plugin.wit`.
//! Only the items the runtime uses are re-exported.
//!
//! The world bound here is `plugin-script`: Warren's own interfaces. The
//! standard ones of the `plugin` world (`wasi:http`, `wasi:config`) are
//! linked from their wasmtime crates (see [`super::runtime`]), except
//! `wasi:keyvalue`, which Warren implements itself ([`keyvalue`]).

wasmtime::component::bindgen!({
    world: "plugin-script",
    path: "../wit",
    imports: {
        "warren:plugin/http.fetch": async,
        "warren:plugin/kv.get": async,
        "warren:plugin/kv.increment": async,
    },
    exports: { default: async },
});

/// `wasi:keyvalue` (store, atomics, batch), whose only bucket is the
/// plugin's own.
pub(crate) mod keyvalue {
    wasmtime::component::bindgen!({
        world: "wasi:keyvalue/imports",
        path: "../wit/deps/keyvalue",
        imports: { default: async },
        with: { "wasi:keyvalue/store.bucket": super::super::instance::Bucket },
    });

    pub(crate) use self::wasi::keyvalue::{atomics, batch, store};
}

pub(crate) use self::exports::warren::plugin::handler::HandleError;
pub(crate) use self::warren::plugin::host::Host;
pub(crate) use self::warren::plugin::http::{
    Host as HttpHost, HttpError, HttpRequest, HttpResponse,
};
pub(crate) use self::warren::plugin::kv::{Host as KvHost, KvError as WitKvError};
pub(crate) use self::warren::plugin::types::Host as TypesHost;
pub(crate) use self::warren::plugin::types::{
    Binding, Decimal, Delivery, DeliveryMode, ExchangeKind, Header, HeaderValue, LogLevel,
    Manifest, Message, Properties, PublishError, QueueKind, Subscription,
};
pub(crate) use PluginScript as PluginWorld;
pub(crate) use PluginScriptPre as PluginWorldPre;
