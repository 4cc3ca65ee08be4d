//! The admin endpoint serves the capture modules with their sha256, so proxies can fetch them
//! from the aggregator of their node without an OCI registry.

mod common;

use clap::Parser;
use common::{admin_get, start_with, temp_dir};
use packet_inspector_tests::certs::Ca;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_the_modules_and_their_sha256() {
    let dir = temp_dir("admin");
    let (module, native) = (dir.join("filter.wasm"), dir.join("libcapture.so"));
    std::fs::write(&module, b"abc").unwrap();
    std::fs::write(&native, b"").unwrap();
    let ca = Ca::new("mesh").unwrap();
    let flags = [format!("--filter-module={}", module.display()), format!("--native-module={}", native.display())];
    let running = start_with(&dir, &ca, "localhost", &flags).await;
    let (status, body) = admin_get(running.admin_port, "/filter.wasm").await;
    assert_eq!((status.as_str(), body.as_slice()), ("HTTP/1.1 200 OK", &b"abc"[..]));
    let (_, sha) = admin_get(running.admin_port, "/filter.wasm.sha256").await;
    // SHA-256("abc"), FIPS 180-2 appendix B.1.
    assert_eq!(sha, b"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n");
    let (status, body) = admin_get(running.admin_port, "/native-capture.so").await;
    assert_eq!((status.as_str(), body.as_slice()), ("HTTP/1.1 200 OK", &b""[..]));
    let (_, sha) = admin_get(running.admin_port, "/native-capture.so.sha256").await;
    // SHA-256 of nothing.
    assert_eq!(sha, b"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\n");
    for nothing in ["/nothing", "/filter.wasm.sha256.sha256", "/.sha256"] {
        let (status, _) = admin_get(running.admin_port, nothing).await;
        assert_eq!(status, "HTTP/1.1 404 Not Found", "{nothing}");
    }
    running.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_missing_module_is_a_configuration_error() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dir = temp_dir("admin-missing");
    let ca = Ca::new("mesh").unwrap();
    let certs = ca.issue(&dir.join("aggregator"), &["localhost"]).unwrap();
    let args = packet_inspector_aggregator::config::Args::parse_from([
        "aggregator".to_owned(),
        format!("--tls-cert={}", certs.join("cert-chain.pem").display()),
        format!("--tls-key={}", certs.join("key.pem").display()),
        format!("--client-ca={}", certs.join("root-cert.pem").display()),
        format!("--analysis-ca={}", certs.join("root-cert.pem").display()),
        "--analysis-address=localhost:21000".to_owned(),
        "--native-module=/nonexistent/libcapture.so".to_owned(),
    ]);
    let error = packet_inspector_aggregator::run(args, listener, None, Default::default()).await.unwrap_err();
    assert!(error.to_string().starts_with("cannot read --native-module /nonexistent/libcapture.so"), "{error}");
    std::fs::remove_dir_all(&dir).unwrap();
}
