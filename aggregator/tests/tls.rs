//! The aggregator's TLS boundaries, in process on port 0: filters must present a certificate
//! from the configured CA, and captures are forwarded only to an analysis service whose
//! certificate carries a DNS-name SAN equal to the configured host.

mod common;

use std::time::Duration;

use common::{eventually, identity, metric, send_batch, start, stored, temp_dir, transaction};
use packet_inspector_tests::certs::Ca;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_must_present_a_certificate_from_the_mesh_ca() {
    let dir = temp_dir("mtls");
    let ca = Ca::new("mesh").unwrap();
    let rogue = Ca::new("rogue").unwrap();
    let running = start(&dir, &ca, "localhost").await;
    let filter = identity(&ca.issue(&dir.join("filter"), &["filter.ns.svc"]).unwrap());
    let impostor = identity(&rogue.issue(&dir.join("impostor"), &["filter.ns.svc"]).unwrap());
    let root = dir.join("aggregator/root-cert.pem");

    let without = send_batch(running.port, &root, None, transaction("no-cert")).await;
    assert!(without.is_err(), "a client without a certificate was served: {without:?}");
    let other_ca = send_batch(running.port, &root, Some(&impostor), transaction("other-ca")).await;
    assert!(other_ca.is_err(), "a client signed by another CA was served: {other_ca:?}");
    assert_eq!(metric(running.admin_port, "streams_total").await, 0, "refused clients never reach the service");

    // The positive control: the same call with a mesh certificate is served and stored.
    assert_eq!(send_batch(running.port, &root, Some(&filter), transaction("mesh-cert")).await, Ok(1));
    let expected = format!("client-pod-consumer-mesh-cert-{}.pcap", 1_700_000_000_000_000_000u64);
    eventually("the capture to be stored", Duration::from_secs(20), || {
        let found = stored(&running.output).contains(&expected);
        async move { found }
    })
    .await;
    running.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captures_are_not_forwarded_to_a_service_whose_san_does_not_match() {
    let dir = temp_dir("san");
    let ca = Ca::new("mesh").unwrap();
    let running = start(&dir, &ca, "analysis.elsewhere.example").await;
    let filter = identity(&ca.issue(&dir.join("filter"), &["filter.ns.svc"]).unwrap());
    let root = dir.join("aggregator/root-cert.pem");

    assert_eq!(send_batch(running.port, &root, Some(&filter), transaction("san-mismatch")).await, Ok(1));
    eventually("the forward to be given up", Duration::from_secs(30), || async {
        metric(running.admin_port, "captures_forward_failed_total").await == 1
    })
    .await;
    assert_eq!(metric(running.admin_port, "captures_forwarded_total").await, 0);
    assert!(stored(&running.output).is_empty(), "nothing may reach a service with the wrong name");
    running.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}
