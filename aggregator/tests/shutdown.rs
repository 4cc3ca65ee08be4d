//! A clean shutdown delivers what was acknowledged: a filter that got its ack can rely on the
//! capture reaching the analysis service even if the aggregator is stopped right after.

mod common;

use std::time::Duration;

use common::{eventually, identity, metric, send_batch, start, stored, temp_dir, transaction};
use packet_inspector_tests::certs::Ca;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_right_after_the_ack_still_delivers_the_capture() {
    let dir = temp_dir("shutdown");
    let ca = Ca::new("mesh").unwrap();
    let running = start(&dir, &ca, "localhost").await;
    let filter = identity(&ca.issue(&dir.join("filter"), &["filter.ns.svc"]).unwrap());
    let root = dir.join("aggregator/root-cert.pem");
    let output = running.output.clone();

    assert_eq!(send_batch(running.port, &root, Some(&filter), transaction("last-words")).await, Ok(1));
    // Stop at once: no waiting for the capture to show up first.
    running.stop().await;
    let files = stored(&output);
    assert!(files.iter().any(|f| f.contains("-last-words-") && f.ends_with(".pcap")), "{files:?}");
    assert!(files.iter().any(|f| f.contains("-last-words-") && f.ends_with(".bson")), "{files:?}");
    assert!(files.iter().all(|f| !f.starts_with('.')), "no temporary file is left: {files:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The aggregator keeps its `SubmitStream` calls open; an emulator being stopped must end them
/// (after answering what it received) rather than wait for them forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_emulator_stops_promptly_while_the_aggregator_holds_a_call_open() {
    let dir = temp_dir("emulator-stop");
    let ca = Ca::new("mesh").unwrap();
    let running = start(&dir, &ca, "localhost").await;
    let filter = identity(&ca.issue(&dir.join("filter"), &["filter.ns.svc"]).unwrap());
    let root = dir.join("aggregator/root-cert.pem");
    let output = running.output.clone();

    assert_eq!(send_batch(running.port, &root, Some(&filter), transaction("before-stop")).await, Ok(1));
    let admin = running.admin_port;
    eventually("the capture forwarded", Duration::from_secs(10), || async {
        metric(admin, "captures_forwarded_total").await == 1
    })
    .await;
    running.stop_emulator_first(Duration::from_secs(5)).await;
    assert!(stored(&output).iter().any(|f| f.contains("-before-stop-") && f.ends_with(".pcap")));
    std::fs::remove_dir_all(&dir).unwrap();
}
