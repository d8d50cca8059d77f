//! A three-node RabbitMQ cluster: Warren is given every node
//! (`amqp.urls`), the node it is connected to is killed with `kill -9`
//! under load, and Warren moves to another node and goes on; after the
//! node returns nothing is lost.

use std::collections::BTreeSet;
use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable, LongString};
use warren_it::broker::{Broker, unique};
use warren_it::rabbit::{Cluster, Version};
use warren_it::wait;

use crate::host::{plugins_dir, start_ready};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_connected_cluster_node_moves_warren_to_another_and_loses_nothing() {
    let mut cluster = Cluster::start(Version::V4_0, 3).await.unwrap();
    let urls = cluster.amqp_urls();
    let (input, output) = (unique("cluster-in"), unique("cluster-out"));
    let dir = plugins_dir(&[("echo", "echo")]).unwrap();
    let list = urls
        .iter()
        .map(|u| format!("{u:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let cfg = crate::outage::config(
        &urls[0],
        (&format!("urls = [{list}]\nheartbeat-secs = 2"), ""),
        dir.path(),
        &format!(
            r#"
            [plugin.echo]
            subscriptions = [{{ queue = "{input}", prefetch = 100 }}]
            config = {{ routing-key = "{output}" }}
            "#
        ),
    );
    let (app, handle) = start_ready(cfg).await.unwrap();
    let endpoint = |h: &warren::app::AppHandle| h.amqp.status_now().endpoint.unwrap_or_default();
    let first = endpoint(&handle);
    let victim_port = cluster
        .nodes
        .iter()
        .map(|n| n.port())
        .find(|p| first.contains(&format!(":{p}/")))
        .expect("the endpoint is one of the nodes");
    // The test's own client stays on a node that is not killed.
    let other = urls
        .iter()
        .find(|u| !u.contains(&format!(":{victim_port}/")))
        .unwrap();
    let broker = Broker::connect(other).await.unwrap();
    let mut quorum = FieldTable::default();
    quorum.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from(&b"quorum"[..])),
    );
    broker.declare_queue_with(&output, quorum).await.unwrap();

    let n = 3_000;
    let bodies: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
    let (head, tail) = bodies.split_at(n / 2);
    broker.publish_all("", &input, head).await.unwrap();
    let early = broker
        .collect(&output, 500, Duration::from_secs(60))
        .await
        .unwrap();
    let gen_before = handle.amqp.status_now().generation;
    cluster.node_on(victim_port).unwrap().kill9().await.unwrap();
    broker.publish_all("", &input, tail).await.unwrap();
    wait::until_true("Warren on another node", Duration::from_secs(30), || {
        let s = handle.amqp.status_now();
        let moved = s.generation > gen_before
            && s.is_running()
            && s.endpoint
                .is_some_and(|e| !e.contains(&format!(":{victim_port}/")));
        async move { moved }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", handle.amqp.status_now()));
    eprintln!("moved from {first} to {}", endpoint(&handle));

    let seen_early: BTreeSet<&[u8]> = early.iter().map(|g| g.body.as_slice()).collect();
    let want: BTreeSet<Vec<u8>> = bodies
        .iter()
        .map(|b| b.as_bytes())
        .filter(|b| !seen_early.contains(b))
        .map(<[u8]>::to_vec)
        .collect();
    let (rest, missing) = broker
        .collect_until_complete(&output, &want, Duration::from_secs(120))
        .await
        .unwrap();
    let got = early.len() + rest.len();
    let unique_bodies: BTreeSet<&[u8]> = early
        .iter()
        .chain(&rest)
        .map(|g| g.body.as_slice())
        .collect();
    assert!(missing.is_empty(), "{} outputs missing", missing.len());
    assert_eq!(unique_bodies.len(), n, "every input has its output");
    eprintln!(
        "cluster: inputs={n} outputs={got} unique={} duplicates={}",
        unique_bodies.len(),
        got - unique_bodies.len()
    );
    cluster
        .node_on(victim_port)
        .unwrap()
        .restart()
        .await
        .unwrap();
    wait::until_true("every input acked", Duration::from_secs(30), || {
        let b = &broker;
        let q = &input;
        async move { b.message_count(q).await.is_ok_and(|c| c == 0) }
    })
    .await
    .unwrap();
    app.shutdown().await;
}
