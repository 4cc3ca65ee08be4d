//! Turning what Envoy reports (property values, header maps) into the contract's
//! [`TransactionMetadata`](packet_inspector_proto::capture::TransactionMetadata) pieces: node identity, role, addresses, protocol.

use std::collections::HashMap;

use packet_inspector_proto::capture::{Protocol, Role, SocketAddress};

use crate::{config::RoleSetting, pairs::Pair};

/// `xds.listener_direction` values (Envoy's `envoy.config.core.v3.TrafficDirection`).
const INBOUND: i64 = 1;
const OUTBOUND: i64 = 2;

/// Who this proxy is: read once per root context from the node metadata Istio sets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeIdentity {
    pub pod_name: String,
    pub namespace: String,
    pub workload: String,
    pub labels: HashMap<String, String>,
}

/// Text of a string property; absent or non-UTF-8 values are empty (the capture still goes on).
pub fn property_text(value: Option<&[u8]>) -> String {
    value.and_then(|bytes| std::str::from_utf8(bytes).ok()).unwrap_or_default().to_owned()
}

/// Keeps the `selected` labels of a pairs-encoded `LABELS` struct.
pub fn select_labels(pairs: &[Pair<'_>], selected: &[String]) -> HashMap<String, String> {
    pairs
        .iter()
        .filter_map(|(key, value)| Some((std::str::from_utf8(key).ok()?, std::str::from_utf8(value).ok()?)))
        .filter(|(key, _)| selected.iter().any(|wanted| wanted == key))
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect()
}

/// An int64 property (little-endian, as Envoy encodes them).
pub fn property_i64(value: Option<&[u8]>) -> Option<i64> {
    value.and_then(|bytes| <[u8; 8]>::try_from(bytes).ok()).map(i64::from_le_bytes)
}

/// The role: configured, or from the listener direction (OUTBOUND → consumer, INBOUND → producer).
pub fn role(setting: RoleSetting, listener_direction: Option<i64>) -> Role {
    match (setting, listener_direction) {
        (RoleSetting::Consumer, _) => Role::Consumer,
        (RoleSetting::Producer, _) => Role::Producer,
        (RoleSetting::Auto, Some(OUTBOUND)) => Role::Consumer,
        (RoleSetting::Auto, Some(INBOUND)) => Role::Producer,
        (RoleSetting::Auto, _) => Role::Unspecified,
    }
}

/// Parses Envoy's `"ip:port"` / `"[ipv6]:port"` address strings.
pub fn socket_address(value: Option<&[u8]>) -> Option<SocketAddress> {
    let text = std::str::from_utf8(value?).ok()?;
    let address: std::net::SocketAddr = text.parse().ok()?;
    let ip = match address {
        // An IPv4 address parses from its one dotted-decimal form only (no leading zeros), so
        // the text before the port is what formatting the address would print; this runs on
        // every request (`upstream.address`), and formatting is the larger code to run cold.
        std::net::SocketAddr::V4(_) => text.rsplit_once(':').map(|(ip, _)| ip.to_owned())?,
        std::net::SocketAddr::V6(v6) => v6.ip().to_string(),
    };
    Some(SocketAddress { ip, port: u32::from(address.port()) })
}

/// The protocol from `request.protocol` and the request's `content-type`.
pub fn protocol(request_protocol: Option<&[u8]>, headers: &[Pair<'_>]) -> Protocol {
    let grpc = header_value(headers, b"content-type").is_some_and(|ct| ct.starts_with(b"application/grpc"));
    match request_protocol {
        Some(b"HTTP/1.0" | b"HTTP/1.1") => Protocol::Http1,
        _ if grpc => Protocol::Grpc,
        Some(_) => Protocol::Http2,
        None => Protocol::Unspecified,
    }
}

/// The first value of a header (names are lower-case in Envoy's maps).
pub fn header_value<'a>(headers: &[Pair<'a>], name: &[u8]) -> Option<&'a [u8]> {
    headers.iter().find(|(key, _)| *key == name).map(|(_, value)| *value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_v4_and_v6() {
        assert_eq!(socket_address(Some(b"10.1.2.3:8080")), Some(SocketAddress { ip: "10.1.2.3".into(), port: 8080 }));
        assert_eq!(socket_address(Some(b"[fd00::1]:443")), Some(SocketAddress { ip: "fd00::1".into(), port: 443 }));
        assert_eq!(socket_address(Some(b"/var/run/sock")), None);
        assert_eq!(socket_address(None), None);
        // Not an address in the form Envoy prints: refused rather than passed on as text.
        assert_eq!(socket_address(Some(b"010.1.2.3:8080")), None);
        assert_eq!(socket_address(Some(b"[0:0:0:0:0:0:0:1]:80")), Some(SocketAddress { ip: "::1".into(), port: 80 }));
    }

    #[test]
    fn ipv4_text_is_what_formatting_the_address_prints() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..10_000 {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            let address = std::net::SocketAddrV4::new(std::net::Ipv4Addr::from((state >> 32) as u32), state as u16);
            let parsed = socket_address(Some(address.to_string().as_bytes())).unwrap();
            assert_eq!((parsed.ip, parsed.port), (address.ip().to_string(), u32::from(address.port())));
        }
    }

    #[test]
    fn role_from_direction_or_setting() {
        assert_eq!(role(RoleSetting::Auto, property_i64(Some(&2i64.to_le_bytes()))), Role::Consumer);
        assert_eq!(role(RoleSetting::Auto, property_i64(Some(&1i64.to_le_bytes()))), Role::Producer);
        assert_eq!(role(RoleSetting::Auto, property_i64(Some(&[1]))), Role::Unspecified);
        assert_eq!(role(RoleSetting::Producer, Some(OUTBOUND)), Role::Producer);
    }

    #[test]
    fn labels_are_selected_and_non_utf8_skipped() {
        let pairs: Vec<(&[u8], &[u8])> =
            vec![(b"app", b"reviews"), (b"pod-template-hash", b"abc"), (b"version", &[0xff])];
        let labels = select_labels(&pairs, &["app".into(), "version".into()]);
        assert_eq!(labels, HashMap::from([("app".to_string(), "reviews".to_string())]));
    }

    #[test]
    fn protocol_detection() {
        let grpc: Vec<Pair<'_>> = vec![(b"content-type", b"application/grpc+proto")];
        assert_eq!(protocol(Some(b"HTTP/1.1"), &[]), Protocol::Http1);
        assert_eq!(protocol(Some(b"HTTP/2"), &[]), Protocol::Http2);
        assert_eq!(protocol(Some(b"HTTP/2"), &grpc), Protocol::Grpc);
        assert_eq!(protocol(None, &[]), Protocol::Unspecified);
    }
}
