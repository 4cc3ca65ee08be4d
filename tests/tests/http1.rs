//! End-to-end HTTP/1.1 capture through real Envoy sidecars running the built filter.

use packet_inspector_tests::mesh::{Mesh, MeshOptions};

#[test]
fn smoke() {
    let mesh = Mesh::start(MeshOptions::default()).unwrap();
    let response = mesh.request("GET /hello HTTP/1.1\r\nhost: reviews:9080\r\nx-request-id: smoke-1", b"").unwrap();
    assert_eq!(response.status, 200);
    let consumer = mesh.wait_for_capture("consumer", "smoke-1").unwrap();
    let producer = mesh.wait_for_capture("producer", "smoke-1").unwrap();
    eprintln!("{consumer:?} {producer:?}");
    eprintln!("{}", mesh.log_tails(20));
    panic!("show");
}
