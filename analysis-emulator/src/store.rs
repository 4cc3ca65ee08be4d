//! Writes a capture as `<stem>.bson` (the raw exchange and all metadata) and `<stem>.pcap`,
//! each atomically: written under a hidden temporary name in the same directory, synced, then
//! renamed, so a reader never sees a half-written file.

use std::{
    fs::{self, File},
    io::{self, BufWriter, Write},
    path::{Path, PathBuf},
};

use bson::{doc, spec::BinarySubtype, Binary, Bson, Document};
use packet_inspector_proto::{
    analysis::{Capture, DiameterExchange, HttpMessage, PcapRecord},
    body::BodyError,
    capture::{Direction, Header, SocketAddress, TransactionMetadata},
    pcap,
};

use crate::naming;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("capture has no metadata")]
    NoMetadata,
    #[error("capture has neither an HTTP nor a Diameter exchange")]
    NoExchange,
    #[error("cannot write {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("cannot encode BSON: {0}")]
    Bson(#[from] bson::error::Error),
    #[error("capture body: {0}")]
    Body(#[from] BodyError),
}

fn binary(bytes: &[u8]) -> Bson {
    Bson::Binary(Binary { subtype: BinarySubtype::Generic, bytes: bytes.to_vec() })
}

/// A header value as a string when it is UTF-8 (the common case, readable in any BSON tool),
/// else as binary: nothing is lost either way.
fn text_or_binary(bytes: &[u8]) -> Bson {
    match std::str::from_utf8(bytes) {
        Ok(text) => Bson::String(text.to_owned()),
        Err(_) => binary(bytes),
    }
}

fn headers(headers: &[Header]) -> Bson {
    Bson::Array(
        headers
            .iter()
            .map(|h| Bson::Document(doc! { "name": text_or_binary(&h.name), "value": text_or_binary(&h.value) }))
            .collect(),
    )
}

/// The message's document; its body read from the records when the aggregator sent it there.
fn message(message: &HttpMessage, records: &[PcapRecord]) -> Result<Document, StoreError> {
    Ok(doc! {
        "headers": headers(&message.headers),
        "body": binary(&message.captured_body(records)?),
        "trailers": headers(&message.trailers),
        "bodyTruncated": message.body_truncated,
        "bodySize": message.body_size as i64,
    })
}

fn address(address: Option<&SocketAddress>) -> Bson {
    address.map_or(Bson::Null, |a| Bson::Document(doc! { "ip": &a.ip, "port": a.port as i32 }))
}

/// `ROLE_CONSUMER` → `consumer`: the names users see elsewhere (file names, charts).
fn short(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix).unwrap_or(name).to_ascii_lowercase()
}

fn metadata(m: &TransactionMetadata) -> Document {
    let labels: Document = m.labels.iter().map(|(k, v)| (k.clone(), Bson::String(v.clone()))).collect();
    doc! {
        "podName": &m.pod_name,
        "namespace": &m.namespace,
        "workload": &m.workload,
        "node": &m.node,
        "labels": labels,
        "role": short(m.role().as_str_name(), "ROLE_"),
        "gateway": m.gateway,
        "protocol": short(m.protocol().as_str_name(), "PROTOCOL_"),
        "downstreamRemote": address(m.downstream_remote.as_ref()),
        "downstreamLocal": address(m.downstream_local.as_ref()),
        "upstream": address(m.upstream.as_ref()),
        "requestId": &m.request_id,
        "connectionId": m.connection_id as i64,
        "startTimeNs": m.start_time_ns as i64,
    }
}

fn diameter(exchange: &DiameterExchange) -> Document {
    doc! {
        "request": binary(&exchange.request),
        "answer": binary(&exchange.answer),
        "answered": exchange.answered,
        "commandCode": exchange.command_code as i64,
        "applicationId": exchange.application_id as i64,
        "hopByHopId": exchange.hop_by_hop_id as i64,
        "endToEndId": exchange.end_to_end_id as i64,
        "requestDirection": match exchange.request_direction() {
            Direction::Request => "downstream",
            Direction::Response => "upstream",
            Direction::Unspecified => "none",
        },
        "requestTimeNs": exchange.request_time_ns as i64,
        "answerTimeNs": exchange.answer_time_ns as i64,
    }
}

/// The BSON document of a capture.
///
/// # Errors
/// [`StoreError`] when the capture lacks metadata or an exchange.
pub fn document(capture: &Capture) -> Result<Document, StoreError> {
    let meta = capture.metadata.as_ref().ok_or(StoreError::NoMetadata)?;
    let mut document = doc! { "metadata": metadata(meta) };
    match (&capture.http, &capture.diameter) {
        (Some(http), _) => {
            for (name, part) in [("request", &http.request), ("response", &http.response)] {
                let part = match part {
                    Some(part) => Bson::Document(message(part, &capture.records)?),
                    None => Bson::Null,
                };
                document.insert(name, part);
            }
        }
        (None, Some(exchange)) => {
            document.insert("diameter", diameter(exchange));
        }
        (None, None) => return Err(StoreError::NoExchange),
    }
    document.insert("endTimeNs", capture.end_time_ns as i64);
    document.insert("endReason", short(capture.end_reason().as_str_name(), "END_REASON_"));
    document.insert("segment", capture.segment as i64);
    document.insert("lastSegment", capture.last_segment);
    document.insert("segmentStartNs", capture.segment_start_ns as i64);
    Ok(document)
}

fn write_atomically(
    dir: &Path,
    name: &str,
    write: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>,
) -> Result<(), StoreError> {
    let path = dir.join(name);
    let temporary = dir.join(format!(".{name}.partial"));
    let io_error = |source| StoreError::Io { path: path.clone(), source };
    let result = (|| {
        let mut out = BufWriter::new(File::create(&temporary)?);
        write(&mut out)?;
        out.into_inner().map_err(io::IntoInnerError::into_error)?.sync_all()?;
        fs::rename(&temporary, &path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    result.map_err(io_error)
}

/// Stores a capture under `dir`; returns the file stem.
///
/// # Errors
/// [`StoreError`] for a capture that cannot be stored or a write that failed (no partial file
/// is left behind).
pub fn store(dir: &Path, capture: &Capture) -> Result<String, StoreError> {
    let document = document(capture)?;
    let metadata = capture.metadata.as_ref().ok_or(StoreError::NoMetadata)?;
    let timestamp_ns = if capture.segment_start_ns > 0 { capture.segment_start_ns } else { metadata.start_time_ns };
    let stem = match &capture.diameter {
        Some(exchange) => naming::diameter_stem(metadata, exchange.end_to_end_id, exchange.hop_by_hop_id, timestamp_ns),
        None => naming::http_stem(metadata, timestamp_ns),
    };
    let bytes = document.to_vec()?;
    write_atomically(dir, &format!("{stem}.bson"), |out| out.write_all(&bytes))?;
    write_atomically(dir, &format!("{stem}.pcap"), |out| pcap::write_file(out, capture.link_type, &capture.records))?;
    Ok(stem)
}

#[cfg(test)]
mod tests {
    use packet_inspector_proto::analysis::{HttpExchange, RecordSlice};

    use super::*;

    /// A capture whose response body is in its one record, at `slice`.
    fn capture(slice: RecordSlice) -> Capture {
        let metadata = TransactionMetadata {
            pod_name: "web-0".into(),
            request_id: "req-1".into(),
            start_time_ns: 7,
            ..Default::default()
        };
        Capture {
            metadata: Some(metadata),
            http: Some(HttpExchange {
                request: Some(HttpMessage { body: b"inline request".to_vec(), ..Default::default() }),
                response: Some(HttpMessage { body_in_records: vec![slice], ..Default::default() }),
            }),
            link_type: pcap::LINKTYPE_ETHERNET,
            records: vec![PcapRecord { timestamp_ns: 7, data: b"headers|the response body".to_vec().into() }],
            ..Default::default()
        }
    }

    fn empty_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pi-store-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn body(document: &Document, message: &str) -> Vec<u8> {
        match document.get_document(message).unwrap().get("body") {
            Some(Bson::Binary(binary)) => binary.bytes.clone(),
            other => panic!("{message} body: {other:?}"),
        }
    }

    #[test]
    fn a_body_sent_as_record_slices_is_stored_whole_in_the_bson() {
        let dir = empty_dir("slices");
        let stem = store(&dir, &capture(RecordSlice { record: 0, offset: 8, length: 17 })).unwrap();
        let bytes = fs::read(dir.join(format!("{stem}.bson"))).unwrap();
        let document = Document::from_reader(bytes.as_slice()).unwrap();
        assert_eq!(body(&document, "response"), b"the response body");
        assert_eq!(body(&document, "request"), b"inline request");
        assert!(dir.join(format!("{stem}.pcap")).exists());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_slice_outside_the_records_refuses_the_capture_and_writes_nothing() {
        let dir = empty_dir("bad-slice");
        let err = store(&dir, &capture(RecordSlice { record: 0, offset: 8, length: 18 })).unwrap_err();
        assert!(matches!(err, StoreError::Body(BodyError::OutOfRecord { .. })), "{err}");
        assert!(err.to_string().contains("overruns record 0"), "{err}");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0, "nothing written");
        fs::remove_dir_all(dir).unwrap();
    }
}
