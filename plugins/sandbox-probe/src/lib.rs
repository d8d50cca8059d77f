//! Test fixture `sandbox-probe`: tries to read a host file, list the root
//! directory, read an environment variable, open a TCP socket and resolve a
//! name, then publishes one JSON message to routing key `probe.out`
//! saying what each attempt returned. The sandbox test asserts every
//! attempt failed (tests/it/plugins).

use std::io::Read;

use warren_sdk::{Delivery, HandleError, Manifest, Message, Plugin, Subscription};

struct Probe;

fn outcome<T, E: std::fmt::Display>(r: Result<T, E>) -> String {
    match r {
        Ok(_) => "ok".to_string(),
        Err(e) => format!("error: {e}"),
    }
}

impl Plugin for Probe {
    fn manifest() -> Manifest {
        Manifest::new("sandbox-probe", env!("CARGO_PKG_VERSION"))
            .subscribe(Subscription::queue("fixture.sandbox-probe"))
    }

    fn handle(_d: Delivery) -> Result<(), HandleError> {
        let file = outcome(std::fs::File::open("/etc/hostname").and_then(|mut f| {
            let mut s = String::new();
            f.read_to_string(&mut s)
        }));
        let dir = outcome(std::fs::read_dir("/"));
        let env = match std::env::var("HOME").or_else(|_| std::env::var("PATH")) {
            Ok(v) => format!("ok: {v}"),
            Err(e) => format!("error: {e}"),
        };
        let vars = std::env::vars().count();
        let tcp = outcome(std::net::TcpStream::connect("127.0.0.1:5672"));
        let dns = outcome(std::net::ToSocketAddrs::to_socket_addrs("localhost:80"));
        let report = format!(
            r#"{{"file":{file:?},"dir":{dir:?},"env":{env:?},"env_count":{vars},"tcp":{tcp:?},"dns":{dns:?}}}"#
        );
        warren_sdk::publish(Message::new("", "probe.out", report))?;
        Ok(())
    }
}

warren_sdk::export_plugin!(Probe);
