//! File names of stored captures, as DESIGN.md fixes them, sanitised whatever the metadata says:
//!
//! - HTTP: `<podName>-consumer-<requestId>-<timestampNs>` (or `-producer-`, `-unknown-`
//!   when the proxy could not tell its side);
//! - Diameter: `<podName>-<endToEndId>-<hopByHopId>-<timestampNs>`, ids in decimal.
//!
//! Each component keeps `[A-Za-z0-9._]` and turns anything else, path separators included,
//! into `_`; a leading dot is replaced so no name is hidden or `..`; components are capped so
//! the whole name stays well under 255 bytes.

use packet_inspector_proto::capture::{Role, TransactionMetadata};

/// Longest kept component, in bytes.
const MAX_COMPONENT: usize = 80;

/// One name component, safe on any filesystem.
pub fn sanitize(component: &str) -> String {
    let mut out: String = component
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' { c } else { '_' })
        .take(MAX_COMPONENT)
        .collect();
    if out.starts_with('.') {
        out.replace_range(0..1, "_");
    }
    let out = out.replace("..", "__");
    if out.is_empty() {
        "unknown".to_owned()
    } else {
        out
    }
}

fn role(role: Role) -> &'static str {
    match role {
        Role::Consumer => "consumer",
        Role::Producer => "producer",
        Role::Unspecified => "unknown",
    }
}

/// The file name stem (no extension) of an HTTP capture starting at `timestamp_ns` (the
/// transaction's start; for a later segment of a long-lived stream, that segment's start).
pub fn http_stem(metadata: &TransactionMetadata, timestamp_ns: u64) -> String {
    format!(
        "{}-{}-{}-{}",
        sanitize(&metadata.pod_name),
        role(metadata.role()),
        sanitize(&metadata.request_id),
        timestamp_ns
    )
}

/// The file name stem of a Diameter capture.
pub fn diameter_stem(
    metadata: &TransactionMetadata,
    end_to_end_id: u32,
    hop_by_hop_id: u32,
    timestamp_ns: u64,
) -> String {
    format!("{}-{end_to_end_id}-{hop_by_hop_id}-{timestamp_ns}", sanitize(&metadata.pod_name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_design() {
        let metadata = TransactionMetadata {
            pod_name: "productpage-v1-6b746f74dc-9stvs".into(),
            role: Role::Consumer as i32,
            request_id: "5c8b4a3e-95a4-4f4e-9a37-1f0e3cbd1d12".into(),
            start_time_ns: 1675782061987009574,
            ..Default::default()
        };
        assert_eq!(
            http_stem(&metadata, metadata.start_time_ns),
            "productpage-v1-6b746f74dc-9stvs-consumer-5c8b4a3e-95a4-4f4e-9a37-1f0e3cbd1d12-1675782061987009574"
        );
        let producer = TransactionMetadata { role: Role::Producer as i32, ..metadata };
        assert!(http_stem(&producer, 1).ends_with("-producer-5c8b4a3e-95a4-4f4e-9a37-1f0e3cbd1d12-1"));
    }

    #[test]
    fn diameter_names_follow_the_design() {
        let metadata =
            TransactionMetadata { pod_name: "diameter-client-6464c65b66-4c8jl".into(), ..Default::default() };
        assert_eq!(
            diameter_stem(&metadata, 1339708294, 1857878061, 1675782061987009574),
            "diameter-client-6464c65b66-4c8jl-1339708294-1857878061-1675782061987009574"
        );
    }

    #[test]
    fn hostile_metadata_cannot_escape_the_directory() {
        for hostile in ["../../etc/passwd", "/abs", "..", ".hidden", "a/../b", "\0", "ü…", ""] {
            let name = sanitize(hostile);
            assert!(
                !name.contains('/') && !name.contains("..") && !name.starts_with('.') && !name.is_empty(),
                "{hostile:?} → {name:?}"
            );
        }
        assert_eq!(sanitize(&"x".repeat(500)).len(), MAX_COMPONENT);
        let metadata = TransactionMetadata { pod_name: "../x".into(), request_id: "a/b".into(), ..Default::default() };
        assert_eq!(http_stem(&metadata, 0), "_._x-unknown-a_b-0");
    }
}
