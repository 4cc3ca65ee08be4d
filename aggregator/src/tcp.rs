//! Synthesizes one standalone TCP conversation carrying timed payload pieces, as Ethernet
//! frames ready for pcap: three-way handshake, data segmented to the MSS with consistent
//! sequence and acknowledgement numbers and valid IP/TCP checksums (etherparse computes them),
//! an ACK after each burst, and a FIN exchange.
//!
//! Pieces of both directions are merged by time, so any interleaving (an early response,
//! streaming) comes out as it happened. Timestamps never go backwards: a record is never
//! earlier than the one before it.
//!
//! Where a piece carries body bytes of its message ([`BodySpan`]), the conversation reports
//! where they landed in the records ([`BodyTrail`]), so the analysis service can be sent the
//! body as slices of the packets instead of a second copy.

use std::{
    borrow::Cow,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    ops::Range,
};

use bytes::{BufMut, BytesMut};
use etherparse::PacketBuilder;
use packet_inspector_proto::analysis::{PcapRecord, RecordSlice};

/// A run of bytes one end sent, as the proxy saw it at `timestamp_ns`; body bytes are borrowed
/// from the transaction where the framing leaves them as they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece<'a> {
    pub timestamp_ns: u64,
    pub bytes: Cow<'a, [u8]>,
    /// Where bytes of the sending message's captured body lie in `bytes`: the conversation
    /// reports where they land in the records ([`Packets::client_body`]), so the analysis
    /// service gets the body from the packets rather than a second time.
    pub body: Vec<BodySpan>,
}

impl<'a> Piece<'a> {
    /// A piece without body bytes (a head, framing, a handshake).
    pub fn new(timestamp_ns: u64, bytes: impl Into<Cow<'a, [u8]>>) -> Self {
        Self { timestamp_ns, bytes: bytes.into(), body: Vec::new() }
    }
}

/// Body bytes within a piece: `bytes[within]` is the captured body from `body_offset` on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodySpan {
    pub body_offset: usize,
    pub within: Range<usize>,
}

/// Where one side's body bytes went in the records, in the order they were sent.
#[derive(Debug, Default)]
pub struct BodyTrail {
    slices: Vec<RecordSlice>,
    /// The body offset the next slice must start at for the slices to read as the body.
    next: usize,
    /// A slice arrived out of body order or did not fit the contract's `u32`s.
    broken: bool,
}

impl BodyTrail {
    fn add(&mut self, body_offset: usize, record: usize, offset: usize, length: usize) {
        let slice = (u32::try_from(record), u32::try_from(offset), u32::try_from(length));
        match slice {
            (Ok(record), Ok(offset), Ok(length)) if body_offset == self.next => {
                self.slices.push(RecordSlice { record, offset, length });
                self.next += length as usize;
            }
            _ => self.broken = true,
        }
    }

    /// The slices, when concatenated they are exactly a body of `len` bytes; otherwise the
    /// body must be sent as it is.
    pub fn covering(self, len: usize) -> Option<Vec<RecordSlice>> {
        (!self.broken && self.next == len).then_some(self.slices)
    }
}

/// A synthesized conversation: its records, and where each side's body lies in them.
#[derive(Debug, Default)]
pub struct Packets {
    pub records: Vec<PcapRecord>,
    pub client_body: BodyTrail,
    pub server_body: BodyTrail,
}

/// Which end sent a piece.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

const WINDOW: u16 = 65_535;
const TTL: u8 = 64;
/// Ethernet, IPv6 and TCP headers: the most a packet adds to its payload.
const MAX_HEADERS: usize = 14 + 40 + 20;

#[derive(Debug, thiserror::Error)]
#[error("cannot build a packet: {0}")]
pub struct BuildError(String);

struct Peer {
    address: SocketAddr,
    mac: [u8; 6],
    next_seq: u32,
}

/// A locally administered MAC derived from the IP, so each endpoint keeps one address.
fn mac_for(ip: &IpAddr) -> [u8; 6] {
    let octets = match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    let tail: Vec<u8> = octets.iter().rev().take(4).rev().copied().collect();
    [0x02, 0x00, tail[0], tail[1], tail[2], tail[3]]
}

/// The MSS of an Ethernet path (1500-byte MTU) for the address family.
fn mss_of(address: &SocketAddr) -> usize {
    match address {
        SocketAddr::V4(_) => 1460,
        SocketAddr::V6(_) => 1440,
    }
}

/// Both ends must be of one family; a v4 end facing a v6 one is written v4-mapped.
fn same_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    let to_v6 = |s: SocketAddr| match s.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), s.port()),
        IpAddr::V6(_) => s,
    };
    match (a.ip(), b.ip()) {
        (IpAddr::V4(_), IpAddr::V6(_)) | (IpAddr::V6(_), IpAddr::V4(_)) => (to_v6(a), to_v6(b)),
        _ => (a, b),
    }
}

/// A deterministic initial sequence number (stable captures, golden tests).
fn isn(seed: u64, side: u64) -> u32 {
    let mixed = (seed ^ side.wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    (mixed >> 32) as u32
}

#[derive(Clone, Copy, Default)]
struct Flags {
    syn: bool,
    ack: bool,
    psh: bool,
    fin: bool,
}

pub struct Conversation {
    client: Peer,
    server: Peer,
    records: Vec<PcapRecord>,
    /// Where packets are built, sized for the whole conversation up front: each record's data
    /// is a view of it, so the packets of a capture are one allocation.
    packets: BytesMut,
    last_ns: u64,
}

impl Conversation {
    /// Appends a packet; returns the length of its headers (where the payload starts in it).
    fn emit(&mut self, from: Side, at: u64, flags: Flags, payload: &[u8]) -> Result<usize, BuildError> {
        let (src, dst) = match from {
            Side::Client => (&self.client, &self.server),
            Side::Server => (&self.server, &self.client),
        };
        let ack_number = dst.next_seq;
        let ethernet = PacketBuilder::ethernet2(src.mac, dst.mac);
        let ip = match (src.address.ip(), dst.address.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => ethernet.ipv4(s.octets(), d.octets(), TTL),
            (s, d) => ethernet.ipv6(v6(s).octets(), v6(d).octets(), TTL),
        };
        let mut tcp = ip.tcp(src.address.port(), dst.address.port(), src.next_seq, WINDOW);
        if flags.syn {
            tcp = tcp.syn();
        }
        if flags.ack {
            tcp = tcp.ack(ack_number);
        }
        if flags.psh {
            tcp = tcp.psh();
        }
        if flags.fin {
            tcp = tcp.fin();
        }
        let mut writer = (&mut self.packets).writer();
        tcp.write(&mut writer, payload).map_err(|err| BuildError(err.to_string()))?;
        let data = self.packets.split().freeze();
        let headers = data.len() - payload.len();
        let sender = match from {
            Side::Client => &mut self.client,
            Side::Server => &mut self.server,
        };
        // SYN and FIN each take one sequence number.
        let consumed = payload.len() as u32 + u32::from(flags.syn) + u32::from(flags.fin);
        sender.next_seq = sender.next_seq.wrapping_add(consumed);
        let timestamp_ns = at.max(self.last_ns);
        self.last_ns = timestamp_ns;
        self.records.push(PcapRecord { timestamp_ns, data });
        Ok(headers)
    }
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Builds the whole conversation. `open_ns` is when the connection is shown opening,
/// `close_ns` when it is shown closing; `seed` makes the initial sequence numbers stable. The
/// pieces' body spans come back as slices of the records, per side.
///
/// # Errors
/// [`BuildError`] when a packet cannot be built (it never is for MSS-sized segments).
pub fn conversation(
    client: SocketAddr,
    server: SocketAddr,
    mut pieces: Vec<(Side, Piece<'_>)>,
    open_ns: u64,
    close_ns: u64,
    seed: u64,
) -> Result<Packets, BuildError> {
    let (client, server) = same_family(client, server);
    let mss = mss_of(&client);
    // At most: 6 for the handshake and the close, for each piece an ACK and a segment beyond
    // one per full MSS of its bytes.
    let payload: usize = pieces.iter().map(|(_, piece)| piece.bytes.len()).sum();
    let packets = 6 + 2 * pieces.len() + payload / mss;
    let mut conv = Conversation {
        client: Peer { address: client, mac: mac_for(&client.ip()), next_seq: isn(seed, 1) },
        server: Peer { address: server, mac: mac_for(&server.ip()), next_seq: isn(seed, 2) },
        records: Vec::with_capacity(packets),
        packets: BytesMut::with_capacity(payload + packets * MAX_HEADERS),
        last_ns: open_ns,
    };
    let flags = |syn, ack, psh, fin| Flags { syn, ack, psh, fin };
    let (mut client_body, mut server_body) = (BodyTrail::default(), BodyTrail::default());
    conv.emit(Side::Client, open_ns, flags(true, false, false, false), &[])?;
    conv.emit(Side::Server, open_ns, flags(true, true, false, false), &[])?;
    conv.emit(Side::Client, open_ns, flags(false, true, false, false), &[])?;

    pieces.sort_by_key(|(_, piece)| piece.timestamp_ns); // stable: order within a time is kept
    let mut index = 0;
    while index < pieces.len() {
        let (side, _) = pieces[index];
        // A burst: consecutive pieces from one side, acknowledged once by the other.
        let mut last_at = open_ns;
        while let Some((_, piece)) = pieces.get(index).filter(|(s, _)| *s == side) {
            let segments = piece.bytes.len().div_ceil(mss);
            for (n, segment) in piece.bytes.chunks(mss).enumerate() {
                let last = n + 1 == segments;
                let headers = conv.emit(side, piece.timestamp_ns, flags(false, true, last, false), segment)?;
                let start = n * mss;
                let trail = match side {
                    Side::Client => &mut client_body,
                    Side::Server => &mut server_body,
                };
                // The body bytes in this segment, as a slice of the record just emitted.
                for span in &piece.body {
                    let (from, to) = (span.within.start.max(start), span.within.end.min(start + segment.len()));
                    if from < to {
                        let record = conv.records.len() - 1;
                        trail.add(
                            span.body_offset + (from - span.within.start),
                            record,
                            headers + from - start,
                            to - from,
                        );
                    }
                }
            }
            last_at = piece.timestamp_ns;
            index += 1;
        }
        let other = match side {
            Side::Client => Side::Server,
            Side::Server => Side::Client,
        };
        conv.emit(other, last_at, flags(false, true, false, false), &[])?;
    }

    conv.emit(Side::Client, close_ns, flags(false, true, false, true), &[])?;
    conv.emit(Side::Server, close_ns, flags(false, true, false, true), &[])?;
    conv.emit(Side::Client, close_ns, flags(false, true, false, false), &[])?;
    Ok(Packets { records: conv.records, client_body, server_body })
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    fn piece(at: u64, bytes: &[u8]) -> Piece<'static> {
        Piece::new(at, bytes.to_vec())
    }

    struct Seen {
        src_port: u16,
        seq: u32,
        ack: u32,
        syn: bool,
        fin: bool,
        payload: Vec<u8>,
    }

    fn parse(record: &PcapRecord) -> Seen {
        let packet = SlicedPacket::from_ethernet(&record.data).unwrap();
        assert!(matches!(packet.net, Some(NetSlice::Ipv4(_)) | Some(NetSlice::Ipv6(_))));
        let Some(TransportSlice::Tcp(tcp)) = packet.transport else { panic!("not tcp") };
        Seen {
            src_port: tcp.source_port(),
            seq: tcp.sequence_number(),
            ack: tcp.acknowledgment_number(),
            syn: tcp.syn(),
            fin: tcp.fin(),
            payload: tcp.payload().to_vec(),
        }
    }

    #[test]
    fn sequence_and_ack_numbers_are_consistent() {
        let client: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let server: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let big = vec![b'x'; 3000];
        let records = conversation(
            client,
            server,
            vec![(Side::Client, piece(10, b"GET / HTTP/1.1\r\n\r\n")), (Side::Server, piece(20, &big))],
            5,
            30,
            42,
        )
        .unwrap()
        .records;
        let seen: Vec<Seen> = records.iter().map(parse).collect();
        // SYN, SYN-ACK, ACK, request, ACK, 3 response segments, ACK, FIN, FIN, ACK.
        assert_eq!(seen.len(), 12);
        assert!(seen[0].syn && seen[1].syn && !seen[2].syn);
        let (c_isn, s_isn) = (seen[0].seq, seen[1].seq);
        assert_eq!(seen[1].ack, c_isn + 1);
        assert_eq!((seen[3].seq, seen[3].ack), (c_isn + 1, s_isn + 1));
        assert_eq!(seen[4].ack, c_isn + 1 + 18, "server acks the request");
        let response: Vec<u8> = seen[5..8].iter().flat_map(|s| s.payload.clone()).collect();
        assert_eq!(response, big);
        assert_eq!(seen[5..8].iter().map(|s| s.payload.len()).collect::<Vec<_>>(), vec![1460, 1460, 80]);
        assert_eq!(seen[7].seq, s_isn + 1 + 2920);
        assert_eq!(seen[8].ack, s_isn + 1 + 3000);
        assert!(seen[9].fin && seen[10].fin && seen[9].src_port == 40000 && seen[10].src_port == 80);
        assert_eq!(seen[11].ack, s_isn + 1 + 3000 + 1);
        let times: Vec<u64> = records.iter().map(|r| r.timestamp_ns).collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    }

    #[test]
    fn syn_golden_bytes() {
        let client: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let server: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let records = conversation(client, server, vec![], 7, 8, 42).unwrap().records;
        let isn = isn(42, 1).to_be_bytes();
        #[rustfmt::skip]
        let expected: Vec<u8> = [
            // Ethernet: dst MAC (from 10.0.0.2), src MAC (from 10.0.0.1), IPv4.
            &[0x02, 0x00, 10, 0, 0, 2, 0x02, 0x00, 10, 0, 0, 1, 0x08, 0x00][..],
            // IPv4: v4/IHL 5, len 40, id 0, DF, TTL 64, TCP, checksum, 10.0.0.1 → 10.0.0.2.
            &[0x45, 0x00, 0x00, 0x28, 0x00, 0x00, 0x40, 0x00, 0x40, 0x06, 0x26, 0xce, 10, 0, 0, 1, 10, 0, 0, 2],
            // TCP: 40000 → 80, seq = ISN, ack 0, offset 5, SYN, window 65535, checksum, urgent 0.
            &[0x9c, 0x40, 0x00, 0x50], &isn, &[0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff],
        ]
        .concat();
        let syn = &records[0].data;
        assert_eq!(&syn[..expected.len()], expected.as_slice());
        assert_eq!(syn.len(), expected.len() + 4, "checksum and urgent pointer follow");
        assert_eq!(records[0].timestamp_ns, 7);
    }

    #[test]
    fn ipv6_and_mixed_families() {
        let client: SocketAddr = "[fd00::1]:40000".parse().unwrap();
        let server: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let records = conversation(client, server, vec![(Side::Client, piece(1, b"hi"))], 0, 2, 1).unwrap().records;
        let packet = SlicedPacket::from_ethernet(&records[3].data).unwrap();
        let Some(NetSlice::Ipv6(ip)) = packet.net else { panic!("not v6") };
        assert_eq!(ip.header().destination_addr(), "::ffff:10.0.0.2".parse::<Ipv6Addr>().unwrap());
    }

    #[test]
    fn checksums_are_valid() {
        let client: SocketAddr = "192.0.2.1:1234".parse().unwrap();
        let server: SocketAddr = "192.0.2.2:80".parse().unwrap();
        let records =
            conversation(client, server, vec![(Side::Client, piece(1, b"payload"))], 0, 2, 7).unwrap().records;
        for record in &records {
            let packet = SlicedPacket::from_ethernet(&record.data).unwrap();
            let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Tcp(tcp))) = (packet.net, packet.transport) else {
                panic!()
            };
            let header = ip.header().to_header();
            assert_eq!(header.header_checksum, header.calc_header_checksum());
            let expected = tcp.to_header().calc_checksum_ipv4(&header, tcp.payload()).unwrap();
            assert_eq!(tcp.checksum(), expected);
        }
    }

    #[test]
    fn the_packets_of_a_conversation_are_one_buffer() {
        for (client, server) in [("10.0.0.1:40000", "10.0.0.2:80"), ("[fd00::1]:40000", "[fd00::2]:80")] {
            let (client, server) = (client.parse().unwrap(), server.parse().unwrap());
            // Sizes around the MSS, one byte pieces, alternating sides: the most packets and
            // bursts per byte.
            let bodies: Vec<Vec<u8>> =
                [1, 1439, 1440, 1441, 1460, 1461, 2921, 65536, 1, 1].iter().map(|&len| vec![b'x'; len]).collect();
            let pieces = bodies
                .iter()
                .enumerate()
                .map(|(n, body)| (if n % 2 == 0 { Side::Client } else { Side::Server }, piece(n as u64 + 10, body)))
                .collect();
            let records = conversation(client, server, pieces, 5, 100, 7).unwrap().records;
            for pair in records.windows(2) {
                let end_of_first = pair[0].data.as_ptr().wrapping_add(pair[0].data.len());
                assert_eq!(end_of_first, pair[1].data.as_ptr(), "{client}: a packet outside the shared buffer");
            }
        }
    }

    /// A body in two pieces, framed (a prefix and suffix around each part, as chunked HTTP/1.1
    /// or HTTP/2 DATA frames have), the second part crossing several segment boundaries.
    fn framed_body(first: &[u8], second: &[u8]) -> Vec<(Side, Piece<'static>)> {
        let framed = |part: &[u8], body_offset: usize| {
            let bytes = [b"<frame>".as_slice(), part, b"</frame>"].concat();
            Piece { body: vec![BodySpan { body_offset, within: 7..7 + part.len() }], ..Piece::new(20, bytes) }
        };
        vec![
            (Side::Client, piece(10, b"GET / HTTP/1.1\r\n\r\n")),
            (Side::Server, piece(20, b"HTTP/1.1 200 OK\r\n\r\n")),
            (Side::Server, framed(first, 0)),
            (Side::Server, framed(second, first.len())),
        ]
    }

    #[test]
    fn body_spans_come_back_as_record_slices_that_read_as_the_body() {
        let body: Vec<u8> = (0..5000u32).map(|n| (n % 251) as u8).collect();
        let (first, second) = body.split_at(1453);
        for (client, server) in [("10.0.0.1:40000", "10.0.0.2:80"), ("[fd00::1]:40000", "[fd00::2]:80")] {
            let (client, server) = (client.parse().unwrap(), server.parse().unwrap());
            let packets = conversation(client, server, framed_body(first, second), 5, 100, 7).unwrap();
            let slices = packets.server_body.covering(body.len()).expect("the body lies whole in the records");
            assert!(slices.len() >= 4, "the second part crosses segments: {slices:?}");
            let message =
                packet_inspector_proto::analysis::HttpMessage { body_in_records: slices, ..Default::default() };
            assert_eq!(message.captured_body(&packets.records).unwrap().as_ref(), body.as_slice(), "{client}");
            assert_eq!(packets.client_body.covering(0), Some(vec![]), "the request has no body");
        }
    }

    #[test]
    fn a_body_whose_spans_are_not_in_order_or_whole_is_not_reported() {
        let client: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let server: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let mut pieces = framed_body(b"first", b"second");
        pieces.swap(2, 3);
        let packets = conversation(client, server, pieces, 5, 100, 7).unwrap();
        assert_eq!(packets.server_body.covering(11), None, "second part sent first");
        let packets = conversation(client, server, framed_body(b"first", b"second"), 5, 100, 7).unwrap();
        assert_eq!(packets.server_body.covering(12), None, "the body has a byte the records lack");
    }
}
