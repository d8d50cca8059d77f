//! A publish the broker nacks: the channel that took the nack is replaced,
//! the output is kept (spooled) and published again from the first
//! unconfirmed one, and the nacks show in `/status`.

use std::collections::BTreeSet;
use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable, LongString};
use warren_it::broker::{Broker, unique};
use warren_it::config::WarrenToml;

use crate::admin::get;

/// The output queue holds 5 and rejects publishes beyond (a quorum queue
/// nacks them): the rest are nacked, kept, and published once the test
/// empties the queue. On 3.10 only: the 4.0 node took every publish past
/// the limit here (no nack to observe).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nacked_channel_is_replaced_and_nothing_is_lost() {
    let target = warren_it::rabbit::shared(warren_it::rabbit::Version::V3_10)
        .await
        .unwrap();
    let broker = Broker::connect(&target.url).await.unwrap();
    let (input, output, dlq) = (unique("nack-in"), unique("nack-out"), unique("nack-dlq"));
    let mut args = FieldTable::default();
    let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
    args.insert("x-queue-type".into(), text("quorum"));
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(5));
    args.insert("x-overflow".into(), text("reject-publish"));
    broker.declare_queue_with(&output, args).await.unwrap();
    let dir = crate::host::plugins_dir(&[("echo", "echo")]).unwrap();
    let config = crate::host::parse(
        &WarrenToml::isolated(dir.path())
            .amqp_url(&target.url)
            .dead_letters(&unique("nack-dlx"), &dlq)
            .admin_bind("127.0.0.1:0")
            .merge(&format!(
                r#"
                [plugin.echo]
                subscriptions = [{{ queue = "{input}" }}]
                config = {{ routing-key = "{output}" }}
                "#
            )),
    );
    let (app, handle) = crate::host::start_ready(config).await.unwrap();
    let mut bodies: Vec<String> = (0..20).map(|i| format!("n-{i:03}")).collect();
    // The queue's limit is checked against what it holds, so fill it
    // first: every output after that is nacked.
    broker.publish_all("", &input, &bodies[..5]).await.unwrap();
    warren_it::wait::until_true("the output queue full", Duration::from_secs(30), || {
        let (b, q) = (&broker, &output);
        async move { b.message_count(q).await.unwrap_or(0) >= 5 }
    })
    .await
    .unwrap();
    broker.publish_all("", &input, &bodies[5..]).await.unwrap();
    // A quorum queue's length limit is applied by its leader a little
    // late: on a busy node a wave can land past it unrefused. Another wave
    // then finds the queue over its limit.
    let mut nacked = Err(anyhow::anyhow!("no wave sent"));
    for wave in 1..=5 {
        nacked = warren_it::wait::until_true("a nack", Duration::from_secs(20), || {
            let h = handle.clone();
            async move { h.amqp.publisher().nacks().nacks >= 1 }
        })
        .await;
        if nacked.is_ok() {
            break;
        }
        let more: Vec<String> = (0..15).map(|i| format!("n-{wave}{i:02}")).collect();
        broker.publish_all("", &input, &more).await.unwrap();
        bodies.extend(more);
    }
    nacked.unwrap_or_else(|e| {
        panic!(
            "{e}: {:?}, spool depth {}, appended {}",
            handle.amqp.publisher().nacks(),
            handle.spool.subscribe().borrow().depth,
            handle.spool.subscribe().borrow().appended,
        )
    });
    let want: BTreeSet<Vec<u8>> = bodies.iter().map(|b| b.clone().into_bytes()).collect();
    let (got, missing) = broker
        .collect_until_complete(&output, &want, Duration::from_secs(90))
        .await
        .unwrap();
    assert!(missing.is_empty(), "{} outputs lost", missing.len());
    let status = get(app.admin_addr(), "/status").await.json().unwrap();
    let nacks = &status["connection"]["publish_nacks"];
    println!(
        "{:?}: {} outputs received for {}, nacks {nacks}",
        target.version,
        got.len(),
        bodies.len()
    );
    assert!(nacks["nacks"].as_u64().unwrap() >= 1, "{nacks}");
    assert!(nacks["channels_replaced"].as_u64().unwrap() >= 1, "{nacks}");
    assert_eq!(broker.message_count(&dlq).await.unwrap(), 0);
    app.shutdown().await;
    for q in [&input, &output, &dlq] {
        broker.delete_queue(q).await.unwrap();
    }
}
