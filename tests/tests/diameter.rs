//! End-to-end Diameter capture between real peers (`python-diameter`, see
//! `samples/diameter-peers/peer.py`) through real Envoy sidecars, the built filter running as a
//! network filter before each TCP proxy: CER/CEA, CCR/CCA, DWR/DWA and DPR/DPA, each paired by
//! the aggregator and stored by the emulator as `<podName>-<endToEndId>-<hopByHopId>-<ts>`.
//! tshark reads the files with no options: the conversations are on port 3868.

use std::{collections::BTreeSet, time::Duration};

use bson::Bson;
use packet_inspector_tests::{
    mesh::{self, Mesh, MeshOptions, Sidecar},
    tshark, wait_for,
};

/// Command codes of the base protocol and Credit-Control.
const CER: u32 = 257;
const CCR: u32 = 272;
const DWR: u32 = 280;
const DPR: u32 = 282;

fn binary(value: Option<&Bson>) -> Vec<u8> {
    match value {
        Some(Bson::Binary(binary)) => binary.bytes.clone(),
        other => panic!("not binary: {other:?}"),
    }
}

#[test]
fn diameter_exchanges_between_real_peers_are_captured() {
    let mesh = Mesh::start(MeshOptions::default()).unwrap();
    let answers = mesh.run_diameter_client(2).unwrap();
    assert_eq!(answers.len(), 2, "the client got its answers through the mesh");
    assert!(answers.iter().all(|a| a.result_code == 2001), "{answers:?}");

    for (sidecar, pod, role, port) in [
        (Sidecar::Client, mesh::CLIENT_POD, "consumer", mesh.client_diameter.port()),
        (Sidecar::Server, mesh::SERVER_POD, "producer", mesh.server_diameter.port()),
    ] {
        // Every exchange of the conversation, each in a file of its own.
        let wanted: BTreeSet<u32> = [CER, CCR, DWR, DPR].into();
        let captures = wait_for(&format!("{role} captures of CER, CCR, DWR and DPR"), Duration::from_secs(30), || {
            let captures = mesh.diameter_captures(pod);
            let codes: BTreeSet<u32> = captures
                .iter()
                .filter_map(|f| f.document().ok()?.get_document("diameter").ok()?.get_i64("commandCode").ok())
                .map(|code| code as u32)
                .collect();
            (wanted.is_subset(&codes) && captures.len() >= 5).then_some(captures)
        })
        .unwrap();

        for files in &captures {
            let context = files.pcap.display().to_string();
            assert_eq!(tshark::problems(&files.pcap).unwrap(), Vec::<String>::new(), "{context}");
            let document = files.document().unwrap();
            let metadata = document.get_document("metadata").unwrap();
            assert_eq!(metadata.get_str("podName").unwrap(), pod, "{context}");
            assert_eq!(metadata.get_str("namespace").unwrap(), mesh::NAMESPACE, "{context}");
            assert_eq!(metadata.get_str("role").unwrap(), role, "{context}");
            assert_eq!(metadata.get_str("protocol").unwrap(), "diameter", "{context}");
            let exchange = document.get_document("diameter").unwrap();
            assert!(exchange.get_bool("answered").unwrap(), "{context}: every request was answered");
            let (hbh, e2e) =
                (exchange.get_i64("hopByHopId").unwrap() as u32, exchange.get_i64("endToEndId").unwrap() as u32);
            // The file is named by the ids, in decimal.
            let name = files.pcap.file_name().unwrap().to_string_lossy().into_owned();
            assert!(name.starts_with(&format!("{pod}-{e2e}-{hbh}-")), "{name}");
            // tshark, no options: request then answer, with the real server port 3868.
            let rows = tshark::fields(
                &files.pcap,
                "diameter",
                &[
                    "tcp.dstport",
                    "tcp.srcport",
                    "diameter.cmd.code",
                    "diameter.flags.request",
                    "diameter.hopbyhopid",
                    "diameter.endtoendid",
                    "diameter.Result-Code",
                ],
            )
            .unwrap();
            assert_eq!(rows.len(), 2, "{context}: {rows:?}");
            let code = exchange.get_i64("commandCode").unwrap().to_string();
            let (hbh_hex, e2e_hex) = (format!("{hbh:#010x}"), format!("{e2e:#010x}"));
            assert_eq!(
                rows[0][2..6],
                [code.as_str(), "1", hbh_hex.as_str(), e2e_hex.as_str()],
                "{context}: the request"
            );
            assert_eq!(
                rows[1][2..6],
                [code.as_str(), "0", hbh_hex.as_str(), e2e_hex.as_str()],
                "{context}: the answer"
            );
            assert!(
                rows.iter().any(|r| r[0] == port.to_string()) && rows.iter().any(|r| r[1] == port.to_string()),
                "{context}: port {port}"
            );
            assert_eq!(rows[1][6], "2001", "{context}: Result-Code");
            // The raw messages are kept as they were: header ids match.
            let request = binary(exchange.get("request"));
            assert_eq!(u32::from_be_bytes(request[12..16].try_into().unwrap()), hbh, "{context}");
            assert_eq!(
                request.len(),
                u32::from_be_bytes([0, request[1], request[2], request[3]]) as usize,
                "{context}"
            );
        }

        // The client's own answers are among them, under the ids it saw.
        for answer in &answers {
            let prefix = format!("{pod}-{}-{}-", answer.end_to_end_id, answer.hop_by_hop_id);
            assert!(
                captures.iter().any(|f| f.pcap.file_name().unwrap().to_string_lossy().starts_with(&prefix)),
                "{role}: no capture named {prefix}*"
            );
        }
        assert_eq!(mesh.counter(sidecar, "diameter_framing_errors").unwrap(), 0);
        assert!(mesh.counter(sidecar, "diameter_messages").unwrap() >= 10, "{role}: 5 exchanges framed");
    }
    mesh.shutdown().unwrap();
}
