//! Transaction assembly: frames of one filter stream in, finished transactions out.
//!
//! Long-lived HTTP/2 and gRPC streams are cut into segments: once the data seen since the last
//! segment is older than [`Segmenting::interval_ns`] or larger than [`Segmenting::max_bytes`],
//! what was seen is emitted as a transaction of its own (numbered, not last) and the stream goes
//! on with its headers kept, so every segment decodes standalone. [`Assembler::sweep`] does the
//! same for streams that went quiet.
//!
//! Frames arrive in the order the filter saw them; a transaction is open from its start frame
//! to its end frame. The assembler is bounded (open transactions per stream, bytes per
//! transaction) so a broken or hostile filter cannot grow the aggregator without limit, and
//! everything it refuses is reported as a typed error for the caller to count.

use std::collections::HashMap;

use packet_inspector_proto::capture::{
    frame::Kind, BodyChunk, Direction, EndReason, Frame, Header, Headers, Protocol, TransactionMetadata,
};

/// One direction of an HTTP exchange, with the times each part was seen.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HttpMessage {
    pub headers: Vec<Header>,
    pub headers_ns: u64,
    /// Captured body chunks with the time each was seen.
    pub body: Vec<(u64, Vec<u8>)>,
    /// Bytes that crossed the proxy but were not captured (body limit).
    pub truncated_bytes: u64,
    pub trailers: Vec<Header>,
    pub trailers_ns: u64,
}

impl HttpMessage {
    pub fn body_len(&self) -> usize {
        self.body.iter().map(|(_, chunk)| chunk.len()).sum()
    }

    pub fn header(&self, name: &[u8]) -> Option<&[u8]> {
        self.headers.iter().find(|h| h.name == name).map(|h| h.value.as_slice())
    }
}

/// A finished HTTP transaction, or one segment of a long-lived stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Transaction {
    pub metadata: TransactionMetadata,
    pub request: HttpMessage,
    /// `None` when no response headers were seen.
    pub response: Option<HttpMessage>,
    pub end_ns: u64,
    pub end_reason: EndReason,
    /// 1-based; a transaction that was not split is segment 1 and the last.
    pub segment: u32,
    pub last_segment: bool,
    /// When this segment's data starts (the transaction's start for segment 1).
    pub segment_start_ns: u64,
}

impl Transaction {
    fn streams(&self) -> bool {
        matches!(self.metadata.protocol(), Protocol::Http2 | Protocol::Grpc)
    }
}

/// Why a frame was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssemblyError {
    #[error("frame for transaction {0} which was never started (its start was lost)")]
    Orphan(u64),
    #[error("transaction {0} started twice")]
    DuplicateStart(u64),
    #[error("transaction {0} exceeded {1} bytes and was discarded")]
    TooLarge(u64, usize),
    #[error("frame for transaction {0} has no kind or an unknown one")]
    Empty(u64),
    #[error("frame for transaction {0} is not HTTP")]
    NotHttp(u64),
}

/// When long-lived streams are cut into segments.
#[derive(Debug, Clone, Copy)]
pub struct Segmenting {
    pub interval_ns: u64,
    pub max_bytes: usize,
}

impl AssemblyError {
    /// A bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Orphan(_) => "orphan",
            Self::DuplicateStart(_) => "duplicate_start",
            Self::TooLarge(..) => "too_large",
            Self::Empty(_) => "empty",
            Self::NotHttp(_) => "not_http",
        }
    }
}

#[derive(Debug)]
struct Open {
    transaction: Transaction,
    /// When its last frame arrived (eviction takes the stalest).
    last_frame_ns: u64,
    bytes: usize,
    /// Body bytes since the current segment started.
    segment_bytes: usize,
}

/// Limits of one stream's assembler.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_open_transactions: usize,
    pub max_transaction_bytes: usize,
    pub segmenting: Segmenting,
}

#[derive(Debug)]
pub struct Assembler {
    open: HashMap<u64, Open>,
    limits: Limits,
    evicted: Vec<Transaction>,
}

impl Assembler {
    pub fn new(limits: Limits) -> Self {
        Self { open: HashMap::new(), limits, evicted: Vec::new() }
    }

    pub fn open_transactions(&self) -> usize {
        self.open.len()
    }

    /// Takes one frame; returns the transaction it finished, if any.
    ///
    /// # Errors
    /// [`AssemblyError`] for a frame that cannot be placed; the stream goes on.
    pub fn accept(&mut self, frame: Frame) -> Result<Option<Transaction>, AssemblyError> {
        let id = frame.transaction_id;
        let at = frame.timestamp_ns;
        let kind = frame.kind.ok_or(AssemblyError::Empty(id))?;
        if !self.open.contains_key(&id) {
            return match kind {
                Kind::Start(start) => self.start(id, at, start.metadata.unwrap_or_default()),
                _ => Err(AssemblyError::Orphan(id)),
            };
        }
        let open = self.open.get_mut(&id).ok_or(AssemblyError::Orphan(id))?;
        open.transaction.end_ns = open.transaction.end_ns.max(at);
        open.last_frame_ns = open.last_frame_ns.max(at);
        match kind {
            Kind::Start(_) => return Err(AssemblyError::DuplicateStart(id)),
            Kind::Diameter(_) => return Err(AssemblyError::NotHttp(id)),
            Kind::Headers(Headers { direction, headers, .. }) => {
                open.bytes += header_bytes(&headers);
                let message = open.message(direction);
                message.headers = headers;
                message.headers_ns = at;
            }
            Kind::Body(BodyChunk { direction, data, truncated_bytes, .. }) => {
                open.bytes += data.len();
                open.segment_bytes += data.len();
                let message = open.message(direction);
                message.truncated_bytes += truncated_bytes;
                if !data.is_empty() {
                    message.body.push((at, data));
                }
            }
            Kind::Trailers(Headers { direction, headers, .. }) => {
                open.bytes += header_bytes(&headers);
                let message = open.message(direction);
                message.trailers = headers;
                message.trailers_ns = at;
            }
            Kind::End(end) => {
                let mut open = self.open.remove(&id).ok_or(AssemblyError::Orphan(id))?;
                open.transaction.end_reason = end.reason();
                if let Some(upstream) = end.upstream {
                    open.transaction.metadata.upstream = Some(upstream);
                }
                return Ok(Some(open.transaction));
            }
        }
        if open.bytes > self.limits.max_transaction_bytes {
            self.open.remove(&id);
            return Err(AssemblyError::TooLarge(id, self.limits.max_transaction_bytes));
        }
        Ok(open.segment_due(at, self.limits.segmenting).then(|| open.cut_segment(at)))
    }

    /// Segments of streams that have had data waiting longer than the interval, as of `now_ns`
    /// (called periodically, so a stream that went quiet is not held either).
    pub fn sweep(&mut self, now_ns: u64) -> Vec<Transaction> {
        let segmenting = self.limits.segmenting;
        self.open
            .values_mut()
            .filter(|open| open.segment_bytes > 0 && open.segment_due(now_ns, segmenting))
            .map(|open| open.cut_segment(now_ns))
            .collect()
    }

    /// Transactions evicted at the open-transaction bound since the last call, finished as
    /// aborted; the caller delivers (and counts) them.
    pub fn take_evicted(&mut self) -> Vec<Transaction> {
        std::mem::take(&mut self.evicted)
    }

    fn start(
        &mut self,
        id: u64,
        at: u64,
        mut metadata: TransactionMetadata,
    ) -> Result<Option<Transaction>, AssemblyError> {
        if self.open.len() >= self.limits.max_open_transactions {
            let stalest = self.open.iter().min_by_key(|(_, open)| open.last_frame_ns).map(|(id, _)| *id);
            if let Some(open) = stalest.and_then(|id| self.open.remove(&id)) {
                self.evicted.push(Transaction { end_reason: EndReason::Aborted, ..open.transaction });
            }
        }
        if metadata.start_time_ns == 0 {
            metadata.start_time_ns = at;
        }
        let transaction = Transaction {
            segment_start_ns: metadata.start_time_ns,
            metadata,
            request: HttpMessage::default(),
            response: None,
            end_ns: at,
            end_reason: EndReason::Unspecified,
            segment: 1,
            last_segment: true,
        };
        self.open.insert(id, Open { transaction, last_frame_ns: at, bytes: 0, segment_bytes: 0 });
        Ok(None)
    }

    /// The stream ended: every open transaction is finished as aborted, so what was seen is
    /// still delivered (flagged) rather than lost.
    pub fn drain(&mut self) -> Vec<Transaction> {
        self.open.drain().map(|(_, open)| Transaction { end_reason: EndReason::Aborted, ..open.transaction }).collect()
    }
}

fn header_bytes(headers: &[Header]) -> usize {
    headers.iter().map(|h| h.name.len() + h.value.len()).sum()
}

impl Open {
    fn segment_due(&self, now_ns: u64, segmenting: Segmenting) -> bool {
        self.transaction.streams()
            && (self.segment_bytes >= segmenting.max_bytes
                || now_ns.saturating_sub(self.transaction.segment_start_ns) >= segmenting.interval_ns)
    }

    /// Emits what was seen since the last segment and starts the next one: headers are kept
    /// (repeated in every segment), bodies and their truncation counts start afresh.
    fn cut_segment(&mut self, at: u64) -> Transaction {
        let mut segment = self.transaction.clone();
        segment.end_reason = EndReason::StreamOpen;
        segment.last_segment = false;
        segment.end_ns = segment.end_ns.max(at);
        let next = &mut self.transaction;
        for message in std::iter::once(&mut next.request).chain(next.response.as_mut()) {
            message.body.clear();
            message.truncated_bytes = 0;
        }
        next.segment += 1;
        next.segment_start_ns = at;
        self.bytes -= self.segment_bytes;
        self.segment_bytes = 0;
        segment
    }

    fn message(&mut self, direction: i32) -> &mut HttpMessage {
        if direction == Direction::Response as i32 {
            self.transaction.response.get_or_insert_with(HttpMessage::default)
        } else {
            &mut self.transaction.request
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use packet_inspector_proto::capture::{SocketAddress, TransactionEnd, TransactionStart};

    const NEVER: Segmenting = Segmenting { interval_ns: u64::MAX, max_bytes: usize::MAX };
    const LIMITS: Limits = Limits { max_open_transactions: 2, max_transaction_bytes: 100, segmenting: NEVER };

    fn frame(id: u64, at: u64, kind: Kind) -> Frame {
        Frame { transaction_id: id, timestamp_ns: at, kind: Some(kind) }
    }

    fn start(id: u64) -> Frame {
        frame(
            id,
            1,
            Kind::Start(TransactionStart {
                metadata: Some(TransactionMetadata { request_id: format!("r{id}"), ..Default::default() }),
            }),
        )
    }

    fn headers(id: u64, direction: Direction, name: &str) -> Frame {
        let headers = vec![Header { name: name.into(), value: b"v".to_vec() }];
        frame(id, 2, Kind::Headers(Headers { direction: direction as i32, headers, end_of_stream: false }))
    }

    fn body(id: u64, direction: Direction, data: &[u8], truncated: u64) -> Frame {
        frame(
            id,
            3,
            Kind::Body(BodyChunk {
                direction: direction as i32,
                data: data.to_vec(),
                truncated_bytes: truncated,
                end_of_stream: false,
            }),
        )
    }

    fn end(id: u64) -> Frame {
        let upstream = Some(SocketAddress { ip: "10.0.0.9".into(), port: 9080 });
        frame(id, 9, Kind::End(TransactionEnd { reason: EndReason::Complete as i32, upstream }))
    }

    #[test]
    fn interleaved_transactions_assemble_separately() {
        let mut assembler = Assembler::new(LIMITS);
        for f in [
            start(1),
            start(2),
            headers(1, Direction::Request, "a"),
            headers(2, Direction::Request, "b"),
            body(1, Direction::Request, b"xy", 0),
            body(1, Direction::Request, b"z", 5),
            headers(1, Direction::Response, "c"),
        ] {
            assert_eq!(assembler.accept(f).unwrap(), None);
        }
        let done = assembler.accept(end(1)).unwrap().unwrap();
        assert_eq!(done.metadata.request_id, "r1");
        assert_eq!(done.request.body, vec![(3, b"xy".to_vec()), (3, b"z".to_vec())]);
        assert_eq!(done.request.truncated_bytes, 5);
        assert_eq!(done.response.unwrap().headers[0].name, b"c");
        assert_eq!(done.end_reason, EndReason::Complete);
        assert_eq!(done.metadata.upstream.unwrap().port, 9080);
        assert_eq!(done.end_ns, 9);
        assert_eq!(assembler.open_transactions(), 1);
    }

    #[test]
    fn refusals_are_typed() {
        let mut assembler = Assembler::new(LIMITS);
        assert_eq!(assembler.accept(headers(5, Direction::Request, "a")), Err(AssemblyError::Orphan(5)));
        assembler.accept(start(1)).unwrap();
        assert_eq!(assembler.accept(start(1)), Err(AssemblyError::DuplicateStart(1)));
        assert_eq!(assembler.accept(body(1, Direction::Request, &[0; 101], 0)), Err(AssemblyError::TooLarge(1, 100)));
        assert_eq!(assembler.accept(end(1)), Err(AssemblyError::Orphan(1)), "a discarded transaction is gone");
        assert_eq!(
            assembler.accept(Frame { transaction_id: 2, timestamp_ns: 0, kind: None }),
            Err(AssemblyError::Empty(2))
        );
    }

    fn grpc_start(id: u64) -> Frame {
        let metadata = TransactionMetadata { protocol: Protocol::Grpc as i32, start_time_ns: 1, ..Default::default() };
        frame(id, 1, Kind::Start(TransactionStart { metadata: Some(metadata) }))
    }

    fn body_at(id: u64, at: u64, data: &[u8]) -> Frame {
        let chunk = BodyChunk { direction: Direction::Response as i32, data: data.to_vec(), ..Default::default() };
        frame(id, at, Kind::Body(chunk))
    }

    #[test]
    fn long_streams_are_cut_into_standalone_segments() {
        let segmenting = Segmenting { interval_ns: 100, max_bytes: 10 };
        let mut assembler =
            Assembler::new(Limits { max_open_transactions: 2, max_transaction_bytes: 1000, segmenting });
        assembler.accept(grpc_start(1)).unwrap();
        assembler.accept(headers(1, Direction::Request, ":path")).unwrap();
        assembler.accept(headers(1, Direction::Response, ":status")).unwrap();
        assert_eq!(assembler.accept(body_at(1, 10, b"abcd")).unwrap(), None);
        // Size: 4 + 6 bytes reach the 10-byte bound.
        let first = assembler.accept(body_at(1, 20, b"efghij")).unwrap().unwrap();
        assert_eq!((first.segment, first.last_segment, first.end_reason), (1, false, EndReason::StreamOpen));
        assert_eq!(first.response.as_ref().unwrap().body_len(), 10);
        // Time: data older than the interval since the segment started at 20.
        assert_eq!(assembler.accept(body_at(1, 50, b"k")).unwrap(), None);
        let second = assembler.accept(body_at(1, 130, b"l")).unwrap().unwrap();
        assert_eq!((second.segment, second.segment_start_ns), (2, 20));
        assert_eq!(second.request.headers, first.request.headers, "headers repeat in every segment");
        assert_eq!(second.response.as_ref().unwrap().body, vec![(50, b"k".to_vec()), (130, b"l".to_vec())]);
        // A quiet stream is swept.
        assert_eq!(assembler.accept(body_at(1, 140, b"m")).unwrap(), None);
        assert!(assembler.sweep(200).is_empty(), "not yet due");
        let swept = assembler.sweep(231);
        assert_eq!(swept.len(), 1);
        assert_eq!(swept[0].segment, 3);
        assert!(assembler.sweep(1000).is_empty(), "nothing new to emit");
        let last = assembler.accept(end(1)).unwrap().unwrap();
        assert_eq!((last.segment, last.last_segment, last.end_reason), (4, true, EndReason::Complete));
        assert!(last.response.unwrap().body.is_empty());
    }

    #[test]
    fn http1_is_never_segmented() {
        let segmenting = Segmenting { interval_ns: 1, max_bytes: 1 };
        let mut assembler =
            Assembler::new(Limits { max_open_transactions: 2, max_transaction_bytes: 1000, segmenting });
        assembler.accept(start(1)).unwrap();
        assert_eq!(assembler.accept(body_at(1, 100, b"abc")).unwrap(), None);
        assert!(assembler.sweep(1000).is_empty());
    }

    #[test]
    fn at_the_bound_the_stalest_transaction_is_evicted_not_the_new_one_refused() {
        let mut assembler = Assembler::new(LIMITS); // at most 2 open
        let at = |id: u64, t: u64| frame(id, t, Kind::Start(TransactionStart::default()));
        assembler.accept(at(1, 10)).unwrap();
        assembler.accept(at(2, 20)).unwrap();
        assembler.accept(body(1, Direction::Request, b"x", 0)).unwrap(); // 1 active at 3... older than 20
        assert_eq!(assembler.accept(at(3, 30)).unwrap(), None, "the new transaction is taken");
        let evicted = assembler.take_evicted();
        assert_eq!(evicted.len(), 1);
        assert_eq!(evicted[0].end_reason, EndReason::Aborted);
        assert_eq!(evicted[0].request.body, vec![(3, b"x".to_vec())], "transaction 1, last active at 3");
        assert_eq!(assembler.open_transactions(), 2);
        assert!(assembler.take_evicted().is_empty());
        assert!(assembler.accept(end(3)).unwrap().is_some());
    }

    #[test]
    fn drain_finishes_open_transactions_as_aborted() {
        let mut assembler = Assembler::new(LIMITS);
        assembler.accept(start(1)).unwrap();
        assembler.accept(headers(1, Direction::Request, "a")).unwrap();
        let drained = assembler.drain();
        assert_eq!(drained.len(), 1);
        assert_eq!(drained[0].end_reason, EndReason::Aborted);
        assert_eq!(assembler.open_transactions(), 0);
    }
}
