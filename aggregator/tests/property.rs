//! Property: whatever header names, values and bodies a proxy reports, the synthesized capture
//! is something tshark reads without malformed packets or expert errors, for HTTP/1.1 and
//! HTTP/2 (gRPC included). Methods come from the registered ones (Wireshark does not dissect a
//! message with an extension method as a request) and gRPC paths have gRPC's
//! `/package.Service/Method` shape (no gRPC call has another); everything else is arbitrary,
//! except that HTTP/2 paths leave out `:`, `@` and `'`: Wireshark 4.0's HTTP/2 path display
//! mis-splits "sub segments" at those characters and, when a percent-escape follows, throws on
//! a valid frame (HTTP/1.1 dissects the same paths fine). The README lists this limitation. Cases come from a seeded generator, so a failure is reproducible
//! (the seed and case number are printed); each protocol's cases share one pcap file, one
//! conversation per case, so tshark runs once per protocol.

mod common;

use common::grpc_message;
use packet_inspector_aggregator::{
    assembly::{HttpMessage, Transaction},
    capture::{self, BodyForm},
};
use packet_inspector_proto::{
    analysis::PcapRecord,
    capture::{EndReason, Header, Protocol, SocketAddress, TransactionMetadata},
    pcap,
};
use packet_inspector_tests::tshark;

const CASES: u32 = 1000;
const SERVER_PORT: u32 = 18080;

/// xorshift64*: small, seeded, good enough to vary inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn bytes(&mut self, max: u64) -> Vec<u8> {
        (0..self.below(max + 1)).map(|_| self.next() as u8).collect()
    }
}

fn name(rng: &mut Rng) -> Vec<u8> {
    const TOKEN: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789-";
    let len = 1 + rng.below(24);
    (0..len)
        .map(|_| if rng.chance(8) { rng.next() as u8 } else { TOKEN[rng.below(TOKEN.len() as u64) as usize] })
        .collect()
}

/// Headers with arbitrary values; one may be large, as Envoy allows (its default limit for a
/// whole header block is 60 KiB).
fn headers(rng: &mut Rng, count: u64) -> Vec<Header> {
    let large = rng.chance(15).then(|| rng.below(count + 1));
    (0..rng.below(count + 1))
        .map(|index| {
            let value = if Some(index) == large {
                (0..10_000 + rng.below(30_000)).map(|_| rng.next() as u8).collect()
            } else {
                rng.bytes(200)
            };
            Header { name: name(rng), value }
        })
        .collect()
}

/// gRPC-framed body of valid protobuf messages (field 1, bytes), as gRPC peers send.
fn grpc_body(rng: &mut Rng) -> Vec<u8> {
    (0..1 + rng.below(4)).flat_map(|_| grpc_message(&rng.bytes(100))).collect()
}

fn message(rng: &mut Rng, pseudo: Vec<Header>, grpc: bool, at: u64) -> HttpMessage {
    let mut all = pseudo;
    if grpc {
        all.push(Header { name: b"content-type".to_vec(), value: b"application/grpc".to_vec() });
    }
    all.extend(headers(rng, 6));
    let body = if grpc {
        grpc_body(rng)
    } else if rng.chance(10) {
        rng.bytes(70_000)
    } else {
        rng.bytes(3000)
    };
    let mut chunks = Vec::new();
    let mut rest = body.as_slice();
    let mut time = at + 1;
    while !rest.is_empty() {
        let take = (1 + rng.below(rest.len() as u64)) as usize;
        chunks.push((time, rest[..take].to_vec()));
        rest = &rest[take..];
        time += 1;
    }
    let truncated_bytes = if rng.chance(20) { 1 + rng.below(100_000) } else { 0 };
    let trailers = if rng.chance(30) || grpc { headers(rng, 3) } else { Vec::new() };
    HttpMessage { headers: all, headers_ns: at, body: chunks, truncated_bytes, trailers, trailers_ns: time }
}

fn case(rng: &mut Rng, number: u32, protocol: Protocol) -> Transaction {
    let grpc = protocol == Protocol::Grpc;
    let at = 1_700_000_000_000_000_000 + u64::from(number) * 1_000_000_000;
    const METHODS: [&str; 7] = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"];
    let method = if grpc { b"POST".to_vec() } else { METHODS[rng.below(7) as usize].as_bytes().to_vec() };
    let path = match protocol {
        Protocol::Grpc => [b"/pkg.Service/".as_slice(), &name(rng)].concat(),
        Protocol::Http2 => rng.bytes(80).into_iter().map(|b| if b":@'".contains(&b) { b'-' } else { b }).collect(),
        _ => rng.bytes(80),
    };
    let authority = rng.bytes(30);
    let pseudo = vec![
        Header { name: b":method".to_vec(), value: method },
        Header { name: b":path".to_vec(), value: path },
        Header { name: b":authority".to_vec(), value: authority },
    ];
    let request = message(rng, pseudo, grpc, at);
    let status = if rng.chance(80) { (100 + rng.below(500)).to_string().into_bytes() } else { rng.bytes(5) };
    let response = rng
        .chance(90)
        .then(|| message(rng, vec![Header { name: b":status".to_vec(), value: status }], grpc, at + 100_000));
    let complete = response.is_some() && rng.chance(90);
    Transaction {
        metadata: TransactionMetadata {
            protocol: protocol as i32,
            downstream_remote: Some(SocketAddress { ip: "10.0.0.1".into(), port: 20_000 + number }),
            downstream_local: Some(SocketAddress { ip: "10.0.0.2".into(), port: SERVER_PORT }),
            start_time_ns: at,
            ..Default::default()
        },
        request,
        response,
        end_ns: at + 500_000,
        end_reason: if complete { EndReason::Complete } else { EndReason::Aborted },
        segment: 1,
        last_segment: true,
        segment_start_ns: at,
    }
}

fn check(protocol: Protocol, decode_as: Option<&str>) {
    let seed = 0x5eed_0000 + protocol as u64;
    let mut rng = Rng(seed);
    let mut records: Vec<PcapRecord> = Vec::new();
    let mut bodies_in_records = 0;
    for number in 0..CASES {
        let transaction = case(&mut rng, number, protocol);
        let joined = |m: &HttpMessage| m.body.iter().flat_map(|(_, chunk)| chunk.iter().copied()).collect::<Vec<u8>>();
        let expected = [Some(joined(&transaction.request)), transaction.response.as_ref().map(joined)];
        let capture = capture::build(transaction, "node", BodyForm::InRecords)
            .unwrap_or_else(|err| panic!("seed {seed:#x} case {number}: {err}"));
        // The body reaches the analysis service whole, whether inline or as slices of the records.
        let http = capture.http.as_ref().expect("an HTTP capture");
        for (message, expected) in [&http.request, &http.response].into_iter().zip(expected) {
            let body = message.as_ref().map(|m| m.captured_body(&capture.records).map(|b| b.into_owned()));
            assert_eq!(body.transpose(), Ok(expected), "seed {seed:#x} case {number}: the body");
            bodies_in_records += message.as_ref().map_or(0, |m| usize::from(!m.body_in_records.is_empty()));
        }
        records.extend(capture.records);
    }
    assert!(bodies_in_records > CASES as usize / 2, "only {bodies_in_records} bodies went as slices of the records");
    let path = std::env::temp_dir().join(format!("pi-property-{}-{}.pcap", protocol.as_str_name(), std::process::id()));
    pcap::write_file(&mut std::fs::File::create(&path).unwrap(), pcap::LINKTYPE_ETHERNET, &records).unwrap();
    let bad = tshark::read_filtered(
        &path,
        decode_as,
        "_ws.malformed || _ws.expert.severity >= 8388608",
        &["tcp.srcport", "frame.number", "_ws.expert.message"],
    )
    .unwrap();
    assert!(
        bad.is_empty(),
        "seed {seed:#x}: malformed packets (case = client port - 20000), kept in {}: {bad:?}",
        path.display()
    );
    std::fs::remove_file(path).unwrap();
}

/// HTTP on the server port, as for HTTP/2: without it, case 0 (client port 20000, DNP3's) and
/// case 256 (20256, PCOM's) would be offered to those dissectors before HTTP's heuristic.
#[test]
fn arbitrary_http1_exchanges_decode() {
    check(Protocol::Http1, Some("tcp.port==18080,http"));
}

#[test]
fn arbitrary_http2_exchanges_decode() {
    check(Protocol::Http2, Some("tcp.port==18080,http2"));
}

#[test]
fn arbitrary_grpc_exchanges_decode() {
    check(Protocol::Grpc, Some("tcp.port==18080,http2"));
}
