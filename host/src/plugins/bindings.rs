//! The one `bindgen!` of the host, generated from `wit/plugin.wit`.
//! Only the items the runtime uses are re-exported.

wasmtime::component::bindgen!({
    world: "plugin",
    path: "../wit",
    exports: { default: async },
});

pub(crate) use self::exports::warren::plugin::handler::HandleError;
pub(crate) use self::warren::plugin::host::Host;
pub(crate) use self::warren::plugin::types::Host as TypesHost;
pub(crate) use self::warren::plugin::types::{
    Binding, Decimal, Delivery, DeliveryMode, ExchangeKind, Header, HeaderValue, LogLevel,
    Manifest, Message, Properties, PublishError, QueueKind, Subscription,
};
pub(crate) use Plugin as PluginWorld;
pub(crate) use PluginPre as PluginWorldPre;
