//! `cargo xtask demo`: the main job on the embedded default. Starts a local mesh (client and
//! server sidecars on real Envoy with the built filter, mTLS between them, the aggregator, the
//! analysis emulator, a sample HTTP app, a sample gRPC service and real Diameter peers), sends
//! HTTP/1.1, HTTP/2, gRPC and Diameter traffic through it, prints the captures written, read back
//! with tshark, and stops everything cleanly.

use std::path::Path;

use anyhow::{Context, Result};
use packet_inspector_tests::{
    clients,
    mesh::{self, CaptureFiles, Mesh, MeshOptions},
    tshark,
};

/// The demo's HTTP/1.1 traffic: what the calling pod's app sends to the called service.
const HTTP1_REQUESTS: &[(&str, &[u8])] = &[
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
    protocol: String,
    method: String,
    path: String,
    status: String,
}

fn first(rows: &[Vec<String>], column: usize) -> String {
    rows.first().and_then(|r| r.get(column)).filter(|v| !v.is_empty()).cloned().unwrap_or_else(|| "-".into())
}

/// One table row, read back from the capture: method, path and status as tshark decodes them.
fn row(files: &CaptureFiles) -> Result<Row> {
    let document = files.document()?;
    let metadata = document.get_document("metadata")?;
    let role = metadata.get_str("role")?.to_owned();
    let mut protocol = metadata.get_str("protocol")?.to_owned();
    let (method, path, status) = if protocol == "diameter" {
        let rows = tshark::fields(&files.pcap, "diameter", &["diameter.cmd.code", "diameter.Result-Code"])?;
        let code = first(&rows, 0);
        let name = match code.as_str() {
            "257" => "Capabilities-Exchange",
            "272" => "Credit-Control",
            "280" => "Device-Watchdog",
            "282" => "Disconnect-Peer",
            _ => "command",
        };
        let result =
            rows.get(1).and_then(|r| r.get(1)).filter(|v| !v.is_empty()).cloned().unwrap_or_else(|| "-".into());
        (format!("{name} ({code})"), "-".to_owned(), format!("Result-Code {result}"))
    } else if protocol == "http1" {
        let rule = tshark::decode_rule(&files.pcap, "http")?;
        let request =
            tshark::fields_decoded(&files.pcap, &rule, "http.request", &["http.request.method", "http.request.uri"])?;
        let response = tshark::fields_decoded(&files.pcap, &rule, "http.response", &["http.response.code"])?;
        (first(&request, 0), first(&request, 1), first(&response, 0))
    } else {
        let headers = tshark::fields_decoded(
            &files.pcap,
            &tshark::decode_rule(&files.pcap, "http2")?,
            "http2.type == 1",
            &["http2.header.name", "http2.header.value"],
        )?;
        let pairs: Vec<(String, String)> = headers
            .iter()
            .flat_map(|row| {
                row[0]
                    .split('\u{1f}')
                    .map(str::to_owned)
                    .zip(row[1].split('\u{1f}').map(str::to_owned))
                    .collect::<Vec<_>>()
            })
            .collect();
        let value = |name: &str| pairs.iter().find(|(n, _)| n == name).map_or("-".to_owned(), |(_, v)| v.clone());
        let status = match value("grpc-status").as_str() {
            "-" => value(":status"),
            grpc => format!("{} grpc-status {grpc}", value(":status")),
        };
        (value(":method"), value(":path"), status)
    };
    if document.get_i64("segment").unwrap_or(1) > 1 || !document.get_bool("lastSegment").unwrap_or(true) {
        protocol = format!("{protocol} (segment {})", document.get_i64("segment").unwrap_or(1));
    }
    Ok(Row {
        file: files.pcap.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        pod: metadata.get_str("podName")?.to_owned(),
        role,
        protocol,
        method,
        path,
        status,
    })
}

fn rows_for(mesh: &Mesh, request_id: &str, rows: &mut Vec<Row>) -> Result<()> {
    for role in ["consumer", "producer"] {
        for files in mesh.wait_for_all_segments(role, request_id)? {
            rows.push(row(&files)?);
        }
    }
    Ok(())
}

/// A table column: its title and how a row shows in it.
type Column = (&'static str, fn(&Row) -> &str);

fn print_table(rows: &[Row]) {
    let columns: [Column; 7] = [
        ("FILE", |r| &r.file),
        ("POD", |r| &r.pod),
        ("ROLE", |r| &r.role),
        ("PROTOCOL", |r| &r.protocol),
        ("METHOD", |r| &r.method),
        ("PATH", |r| &r.path),
        ("STATUS", |r| &r.status),
    ];
    let widths: Vec<usize> = columns
        .iter()
        .map(|(title, get)| rows.iter().map(|r| get(r).len()).chain([title.len()]).max().unwrap_or(0))
        .collect();
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(columns.iter().map(|(title, _)| *title).collect());
    for row in rows {
        line(columns.iter().map(|(_, get)| get(row)).collect());
    }
}

pub fn run(output_dir: &Path) -> Result<()> {
    std::fs::create_dir_all(output_dir).with_context(|| format!("creating {}", output_dir.display()))?;
    eprintln!("demo: starting the local mesh (2 Envoy sidecars, aggregator, analysis emulator, sample apps)");
    let mesh = Mesh::start(MeshOptions { output_dir: Some(output_dir.to_owned()), ..Default::default() })?;
    let mut rows = Vec::new();
    for (head, body) in HTTP1_REQUESTS {
        let response = mesh.request(head, body)?;
        let request_id =
            String::from_utf8_lossy(response.header("x-request-id").context("the sidecar returns x-request-id")?)
                .into_owned();
        eprintln!(
            "demo: HTTP/1.1 {} → {} (x-request-id {request_id})",
            head.lines().next().unwrap_or(""),
            response.status
        );
        rows_for(&mesh, &request_id, &mut rows)?;
    }
    let request = http::Request::get("http://reviews:9080/reviews/2").header("user-agent", "demo-h2/1.0").body(())?;
    let response = clients::h2_request(mesh.client_listener, request, b"", None)?;
    let request_id = response.headers.get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    eprintln!("demo: HTTP/2 GET /reviews/2 → {} (x-request-id {request_id})", response.status);
    rows_for(&mesh, &request_id, &mut rows)?;
    for (call, request_id) in clients::grpc_demo_calls(mesh.client_listener, 5)? {
        eprintln!("demo: gRPC {call} (x-request-id {request_id})");
        rows_for(&mesh, &request_id, &mut rows)?;
    }

    let answers = mesh.run_diameter_client(1)?;
    eprintln!("demo: Diameter CER, CCR ({} answer(s)), DWR, DPR between real peers", answers.len());
    for pod in [mesh::CLIENT_POD, mesh::SERVER_POD] {
        // CER, CCR, DWR, DPR: four exchanges on each side.
        let captures =
            packet_inspector_tests::wait_for("the Diameter captures", std::time::Duration::from_secs(30), || {
                let captures = mesh.diameter_captures(pod);
                (captures.len() >= 4).then_some(captures)
            })?;
        for files in captures {
            rows.push(row(&files)?);
        }
    }

    println!("\nCaptures written to {} (read back with tshark):\n", output_dir.display());
    print_table(&rows);
    println!(
        "\nThe conversation's server port is the first packet's destination:\n  \
         PORT=$(tshark -r FILE.pcap -c 1 -T fields -e tcp.dstport)\n\
         HTTP/1.1: wireshark FILE.pcap, or tshark -r FILE.pcap -Y http; if it shows another protocol\n  \
         (Wireshark gives some ports to others, 34980 to EtherCAT): tshark -r FILE.pcap -d tcp.port==$PORT,http\n\
         HTTP/2 and gRPC: tshark -r FILE.pcap -d tcp.port==$PORT,http2 -Y http2\n  \
         (Wireshark: Analyze > Decode As..., TCP port, HTTP or HTTP2)\n\
         Diameter (port 3868): wireshark FILE.pcap, or tshark -r FILE.pcap -Y diameter"
    );
    mesh.shutdown().context("stopping the demo")?;
    eprintln!("demo: every component stopped cleanly");
    Ok(())
}
