//! `cargo xtask demo`: the main job on the embedded default. Starts a local mesh (client and
//! server sidecars on real Envoy with the built filter, mTLS between them, the aggregator, the
//! analysis emulator and a sample app), sends real traffic through it, prints the captures
//! written, read back with tshark, and stops everything cleanly.

use std::path::Path;

use anyhow::{Context, Result};
use packet_inspector_tests::{
    mesh::{CaptureFiles, Mesh, MeshOptions},
    tshark,
};

/// The demo's traffic: what the calling pod's app sends to the called service.
const REQUESTS: &[(&str, &[u8])] = &[
    ("GET /reviews/1?user=kim HTTP/1.1\r\nhost: reviews:9080\r\nuser-agent: demo-client/1.0", b""),
    (
        "POST /reviews/1 HTTP/1.1\r\nhost: reviews:9080\r\ncontent-type: application/json",
        br#"{"reviewer":"kim","rating":5,"text":"grand"}"#,
    ),
    ("GET /status/404 HTTP/1.1\r\nhost: reviews:9080", b""),
];

struct Row {
    file: String,
    pod: String,
    role: String,
    method: String,
    path: String,
    status: String,
}

fn row(files: &CaptureFiles) -> Result<Row> {
    let document = files.document()?;
    let metadata = document.get_document("metadata")?;
    let request = tshark::fields(&files.pcap, "http.request", &["http.request.method", "http.request.uri"])?;
    let response = tshark::fields(&files.pcap, "http.response", &["http.response.code"])?;
    let first = |rows: &[Vec<String>], column: usize| {
        rows.first().and_then(|r| r.get(column)).cloned().unwrap_or_else(|| "-".into())
    };
    Ok(Row {
        file: files.pcap.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        pod: metadata.get_str("podName")?.to_owned(),
        role: metadata.get_str("role")?.to_owned(),
        method: first(&request, 0),
        path: first(&request, 1),
        status: first(&response, 0),
    })
}

pub fn run(output_dir: &Path) -> Result<()> {
    std::fs::create_dir_all(output_dir).with_context(|| format!("creating {}", output_dir.display()))?;
    eprintln!("demo: starting the local mesh (2 Envoy sidecars, aggregator, analysis emulator, sample app)");
    let mesh = Mesh::start(MeshOptions { output_dir: Some(output_dir.to_owned()), ..Default::default() })?;
    let mut rows = Vec::new();
    for (head, body) in REQUESTS {
        let response = mesh.request(head, body)?;
        let request_id =
            String::from_utf8_lossy(response.header("x-request-id").context("the sidecar returns x-request-id")?)
                .into_owned();
        eprintln!("demo: {} → {} (x-request-id {request_id})", head.lines().next().unwrap_or(""), response.status);
        for role in ["consumer", "producer"] {
            rows.push(row(&mesh.wait_for_capture(role, &request_id)?)?);
        }
    }
    let widths =
        |f: fn(&Row) -> &str, title: &str| rows.iter().map(|r| f(r).len()).chain([title.len()]).max().unwrap_or(0);
    let w = [
        widths(|r| &r.file, "FILE"),
        widths(|r| &r.pod, "POD"),
        widths(|r| &r.role, "ROLE"),
        widths(|r| &r.method, "METHOD"),
        widths(|r| &r.path, "PATH"),
    ];
    println!("\nCaptures written to {} (read back with tshark):\n", output_dir.display());
    println!(
        "{:<a$}  {:<b$}  {:<c$}  {:<d$}  {:<e$}  STATUS",
        "FILE",
        "POD",
        "ROLE",
        "METHOD",
        "PATH",
        a = w[0],
        b = w[1],
        c = w[2],
        d = w[3],
        e = w[4]
    );
    for r in &rows {
        println!(
            "{:<a$}  {:<b$}  {:<c$}  {:<d$}  {:<e$}  {}",
            r.file,
            r.pod,
            r.role,
            r.method,
            r.path,
            r.status,
            a = w[0],
            b = w[1],
            c = w[2],
            d = w[3],
            e = w[4]
        );
    }
    println!(
        "\nOpen one with: wireshark {}/{}   (or: tshark -r ... -Y http)",
        output_dir.display(),
        rows.first().map_or("", |r| r.file.as_str())
    );
    mesh.shutdown().context("stopping the demo")?;
    eprintln!("demo: every component stopped cleanly");
    Ok(())
}
