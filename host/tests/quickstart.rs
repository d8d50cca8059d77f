//! The README's quickstart, typed as a newcomer types it: every `sh` block
//! of its Quickstart section runs exactly as written (with `bash`, from the
//! repository root), against the shared broker and Redis, and what the
//! README says happens is checked.
//!
//! The blocks build with cargo while `cargo test` holds the lock on its own
//! target directory, so they get one of their own (`quickstart/` inside
//! it, kept between runs); the README's copy step honours
//! `CARGO_TARGET_DIR` as any user's shell would set it.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use warren_it::broker::Broker;
use warren_it::plugins::repo_root;

/// Queues the quickstart's plugins and Warren's defaults declare, removed
/// before and after so the counts the README shows start from nothing.
/// The retry tiers stay: every Warren with the default prefix shares them,
/// and the README shows none of their counts.
const QUEUES: [&str; 5] = [
    "orders.in",
    "echo.in",
    "echo.out",
    "orders.routed.all",
    "warren.dlq",
];

/// The `sh` blocks of the README's Quickstart section (its `###`
/// subsections included), in order.
fn quickstart_blocks() -> Vec<String> {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let start = readme
        .find("\n## Quickstart")
        .expect("README has a Quickstart");
    let section = &readme[start + 1..];
    let end = section[3..].find("\n## ").map_or(section.len(), |i| i + 3);
    let mut blocks = Vec::new();
    let mut rest = &section[..end];
    while let Some(open) = rest.find("```sh\n") {
        let body = &rest[open + 6..];
        let close = body.find("```").expect("closed block");
        blocks.push(body[..close].trim_end().to_owned());
        rest = &body[close + 3..];
    }
    blocks
}

/// Where the blocks' cargo builds go.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
        .join("quickstart")
}

/// `line` as the user's shell runs it, in its own process group (as a
/// terminal's foreground job is).
fn sh(line: &str) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(line)
        .current_dir(repo_root())
        .env("CARGO_TARGET_DIR", target_dir())
        // The settings of the cargo running this test are not the user's.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_MANIFEST_DIR")
        .env_remove("CARGO_PKG_NAME")
        .stdin(Stdio::null())
        .process_group(0);
    cmd
}

fn run(line: &str) -> Output {
    let out = sh(line).output().unwrap();
    assert!(
        out.status.success(),
        "`{line}` failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Ctrl-C to the job, as a terminal sends it to its process group.
fn interrupt(child: &Child) {
    let group = format!("-{}", child.id());
    let sent = Command::new("kill")
        .args(["-INT", "--", &group])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// The quickstart's job, killed with its whole process group if the test
/// ends before it stopped (a failed assertion must not leave a Warren
/// holding port 9090 for the next run).
struct Job(Child);

impl Drop for Job {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let group = format!("-{}", self.0.id());
            let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
            let _ = self.0.wait();
        }
    }
}

async fn ready() -> bool {
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], 9090).into();
    warren_it::http::request(addr, "GET", "/ready", &[], None)
        .await
        .is_ok_and(|r| r.status == 200)
}

async fn clean(broker: &Broker) {
    for q in QUEUES {
        broker.delete_queue(q).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_quickstart_works_as_written() {
    let blocks = quickstart_blocks();
    let [setup, start, publish, invoke] = blocks.as_slice() else {
        panic!("expected four sh blocks in the quickstart, found {blocks:#?}");
    };
    let broker = Broker::shared().await.unwrap();
    clean(&broker).await;

    // Where RabbitMQ and Redis answer (the shared ones), the set-up
    // changes nothing and succeeds.
    let set_up = stdout(&run(setup));
    assert!(set_up.contains("nothing to do"), "{set_up}");

    // Port 9090 must be free, or the answers below would come from
    // whatever holds it.
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", 9090)).is_err(),
        "something already listens on 127.0.0.1:9090 (a Warren left running?); the quickstart's Warren needs it"
    );
    // Cold builds of the plugins and of Warren come first.
    let log_path =
        std::env::temp_dir().join(format!("warren-quickstart-{}.log", std::process::id()));
    let log = std::fs::File::create(&log_path).unwrap();
    let mut job = Job(sh(start)
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap());
    let warren = &mut job.0;
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30 * 60);
    while !ready().await {
        if let Some(status) = warren.try_wait().unwrap() {
            panic!(
                "`{start}` exited ({status}) before Warren was ready:\n{}",
                log()
            );
        }
        assert!(Instant::now() < deadline, "Warren not ready:\n{}", log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let mut lines = publish.lines();
    let (post, see) = (lines.next().unwrap(), lines.next().unwrap());
    assert_eq!(stdout(&run(post)).trim(), r#"{"placement":"broker"}"#);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let shown = stdout(&run(see));
        if shown
            .lines()
            .any(|l| l.split_whitespace().eq(["orders.routed.all", "1"]))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the routed order never showed in orders.routed.all:\n{shown}\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let routed = broker
        .collect("orders.routed.all", 1, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(routed[0].routing_key, "orders.eu");
    assert_eq!(routed[0].body, br#"{"id":7,"region":"eu"}"#);
    assert_eq!(
        broker.message_count("warren.dlq").await.unwrap(),
        0,
        "{}",
        log()
    );

    let invoked: serde_json::Value = serde_json::from_str(&stdout(&run(invoke))).unwrap();
    assert_eq!(invoked["outcome"], "ack");
    assert_eq!(invoked["outputs"][0]["exchange"], "orders.routed");
    assert_eq!(invoked["outputs"][0]["routing_key"], "orders.eu");

    interrupt(warren);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = warren.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "Ctrl-C did not stop Warren:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        status.success(),
        "Ctrl-C stops Warren cleanly ({status}):\n{}",
        log()
    );
    clean(&broker).await;
    let _ = std::fs::remove_file(&log_path);
}
