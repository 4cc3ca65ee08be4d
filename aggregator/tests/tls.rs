//! The aggregator's TLS boundaries, in process on port 0: filters must present a certificate
//! from the configured CA, and captures are forwarded only to an analysis service whose
//! certificate carries a DNS-name SAN equal to the configured host.

mod common;

use std::time::Duration;

use common::{eventually, identity, metric, send_batch, start, start_with, stored, temp_dir, transaction};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificates_are_used_without_a_restart() {
    let dir = temp_dir("rotation");
    let (old_ca, new_ca) = (Ca::new("mesh 2025").unwrap(), Ca::new("mesh 2026").unwrap());
    let running = start_with(&dir, &old_ca, "localhost", &["--tls-reload-interval-seconds=1".to_owned()]).await;
    let old_filter = identity(&old_ca.issue(&dir.join("old-filter"), &["filter.ns.svc"]).unwrap());
    let new_filter = identity(&new_ca.issue(&dir.join("new-filter"), &["filter.ns.svc"]).unwrap());
    let (old_root, new_root) = (dir.join("old-filter/root-cert.pem"), dir.join("new-filter/root-cert.pem"));
    assert_eq!(send_batch(running.port, &old_root, Some(&old_filter), transaction("before")).await, Ok(1));

    // The secret is updated in place: new certificate, key and CA bundle.
    new_ca.issue(&dir.join("aggregator"), &["localhost"]).unwrap();
    eventually("new connections to use the new certificates", std::time::Duration::from_secs(20), || async {
        send_batch(running.port, &new_root, Some(&new_filter), transaction("after")).await == Ok(1)
    })
    .await;
    assert!(
        send_batch(running.port, &old_root, Some(&old_filter), transaction("stale")).await.is_err(),
        "the old CA is gone"
    );
    running.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}
