//! One HTTP exchange as the filter records it: builds the frames for each callback and applies
//! the per-direction body limit, so truncation is counted exactly (never silent). Header and
//! body frames borrow what the host handed over (see [`crate::wire`]).

use packet_inspector_proto::capture::{frame::Kind, Direction, EndReason, Frame, SocketAddress, TransactionEnd};

use crate::{
    connections::ConnectionFacts,
    metadata,
    pairs::Pair,
    pipeline::{Fate, Host, Pipeline},
    wire::{BodyBytes, FrameRef, StartRef},
};

/// What starting an exchange takes, from the edge that saw its request headers.
#[derive(Debug, Clone, Copy)]
pub struct ExchangeStart<'a> {
    /// The id [`Pipeline::begin`] gave it.
    pub id: u64,
    pub now_ns: u64,
    pub connection_id: u64,
    pub connection: &'a ConnectionFacts,
    pub request_headers: &'a [Pair<'a>],
    pub end_of_stream: bool,
}

#[derive(Debug, Default, Clone, Copy)]
struct DirectionState {
    captured: u64,
    finished: bool,
}

#[derive(Debug)]
pub struct HttpTransaction {
    id: u64,
    pub fate: Fate,
    max_body_bytes: u64,
    request: DirectionState,
    response: DirectionState,
    /// When the second direction finished: the exchange's end, known before Envoy's log phase.
    completed_at_ns: Option<u64>,
}

impl HttpTransaction {
    /// A new exchange's transaction with its first two frames recorded: the start (with what its
    /// connection shares) and the request headers. Its fate says what became of them. The Wasm
    /// and the native edges both start every exchange here.
    pub fn open<H: Host>(pipeline: &mut Pipeline, host: &mut H, max_body_bytes: u64, start: ExchangeStart<'_>) -> Self {
        let ExchangeStart { id, now_ns, connection_id, connection, request_headers, end_of_stream } = start;
        let start = StartRef {
            shared: &connection.metadata,
            protocol: metadata::protocol(connection.request_protocol.as_deref(), request_headers),
            request_id: metadata::header_value(request_headers, b"x-request-id")
                .and_then(|v| std::str::from_utf8(v).ok())
                .unwrap_or_default(),
            connection_id,
            start_time_ns: now_ns,
        };
        let mut transaction = Self::new(id, max_body_bytes);
        let fate = pipeline.record(host, Fate::Recording, &transaction.start(now_ns, start));
        let headers = transaction.headers(now_ns, Direction::Request, request_headers, end_of_stream);
        transaction.fate = if fate == Fate::Abandoned { fate } else { pipeline.record(host, fate, &headers) };
        transaction
    }

    pub fn new(id: u64, max_body_bytes: u64) -> Self {
        Self {
            id,
            fate: Fate::Recording,
            max_body_bytes,
            request: DirectionState::default(),
            response: DirectionState::default(),
            completed_at_ns: None,
        }
    }

    /// Marks `direction` finished when `end_of_stream`, noting when the exchange completed.
    fn finish(&mut self, direction: Direction, timestamp_ns: u64, end_of_stream: bool) {
        self.state(direction).finished |= end_of_stream;
        if self.completed_at_ns.is_none() && self.request.finished && self.response.finished {
            self.completed_at_ns = Some(timestamp_ns);
        }
    }

    /// When both directions had ended, if they have: the time the end frame carries. The log
    /// phase, where the end frame is built, then need not read the clock again (a host call).
    pub fn completed_at_ns(&self) -> Option<u64> {
        self.completed_at_ns
    }

    fn frame(&self, timestamp_ns: u64, kind: Kind) -> FrameRef<'static> {
        FrameRef::Message(Frame { transaction_id: self.id, timestamp_ns, kind: Some(kind) })
    }

    fn state(&mut self, direction: Direction) -> &mut DirectionState {
        match direction {
            Direction::Response => &mut self.response,
            _ => &mut self.request,
        }
    }

    pub fn start<'a>(&self, timestamp_ns: u64, start: StartRef<'a>) -> FrameRef<'a> {
        FrameRef::Start { transaction_id: self.id, timestamp_ns, start }
    }

    pub fn headers<'a>(
        &mut self,
        timestamp_ns: u64,
        direction: Direction,
        pairs: &'a [Pair<'a>],
        end_of_stream: bool,
    ) -> FrameRef<'a> {
        self.finish(direction, timestamp_ns, end_of_stream);
        FrameRef::Headers { transaction_id: self.id, timestamp_ns, trailers: false, direction, pairs, end_of_stream }
    }

    /// How many bytes of a `chunk_len`-byte body chunk to read from the host (what is left of
    /// the limit); reading only those keeps large bodies off the wasm heap.
    pub fn body_budget(&self, direction: Direction, chunk_len: usize) -> usize {
        let captured = match direction {
            Direction::Response => self.response.captured,
            _ => self.request.captured,
        };
        let left = self.max_body_bytes.saturating_sub(captured);
        usize::try_from(left).map_or(chunk_len, |left| left.min(chunk_len))
    }

    /// A body chunk of `chunk_len` bytes of which `data` (at most the budget) was read.
    /// Returns `None` for an empty, non-final chunk (nothing to tell).
    pub fn body<'a>(
        &mut self,
        timestamp_ns: u64,
        direction: Direction,
        data: BodyBytes<'a>,
        chunk_len: usize,
        end_of_stream: bool,
    ) -> Option<FrameRef<'a>> {
        if chunk_len == 0 && !end_of_stream {
            return None;
        }
        self.state(direction).captured += data.len() as u64;
        self.finish(direction, timestamp_ns, end_of_stream);
        let truncated_bytes = chunk_len.saturating_sub(data.len()) as u64;
        Some(FrameRef::Body { transaction_id: self.id, timestamp_ns, direction, data, truncated_bytes, end_of_stream })
    }

    pub fn trailers<'a>(&mut self, timestamp_ns: u64, direction: Direction, pairs: &'a [Pair<'a>]) -> FrameRef<'a> {
        self.finish(direction, timestamp_ns, true);
        FrameRef::Headers {
            transaction_id: self.id,
            timestamp_ns,
            trailers: true,
            direction,
            pairs,
            end_of_stream: true,
        }
    }

    /// The end frame: complete when both directions finished, else aborted; damaged captures
    /// say so.
    pub fn end(&self, timestamp_ns: u64, upstream: Option<SocketAddress>) -> FrameRef<'static> {
        let reason = if self.fate == Fate::Damaged {
            EndReason::FramesDropped
        } else if self.request.finished && self.response.finished {
            EndReason::Complete
        } else {
            EndReason::Aborted
        };
        self.frame(timestamp_ns, Kind::End(TransactionEnd { reason: reason as i32, upstream }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records a body event whose captured bytes are `data`, in one piece; what its frame says,
    /// when it makes one.
    fn body(
        txn: &mut HttpTransaction,
        timestamp_ns: u64,
        direction: Direction,
        data: &[u8],
        chunk_len: usize,
        end_of_stream: bool,
    ) -> Option<(usize, u64, bool)> {
        txn.body(timestamp_ns, direction, BodyBytes::whole(&data), chunk_len, end_of_stream).map(body_of)
    }

    /// (captured bytes, truncated bytes, end of stream) of a body frame.
    fn body_of(frame: FrameRef<'_>) -> (usize, u64, bool) {
        match frame {
            FrameRef::Body { data, truncated_bytes, end_of_stream, .. } => (data.len(), truncated_bytes, end_of_stream),
            other => panic!("not a body: {other:?}"),
        }
    }

    fn end_reason(frame: FrameRef<'_>) -> EndReason {
        match frame {
            FrameRef::Message(Frame { kind: Some(Kind::End(end)), .. }) => end.reason(),
            other => panic!("not an end: {other:?}"),
        }
    }

    #[test]
    fn body_limit_truncates_exactly_and_says_how_much() {
        let mut txn = HttpTransaction::new(7, 10);
        assert_eq!(txn.body_budget(Direction::Request, 6), 6);
        assert_eq!(body(&mut txn, 1, Direction::Request, &[1; 6], 6, false).unwrap(), (6, 0, false));
        assert_eq!(txn.body_budget(Direction::Request, 8), 4);
        assert_eq!(body(&mut txn, 2, Direction::Request, &[2; 4], 8, false).unwrap(), (4, 4, false));
        assert_eq!(txn.body_budget(Direction::Request, 100), 0);
        assert_eq!(body(&mut txn, 3, Direction::Request, &[], 100, true).unwrap(), (0, 100, true));
        // The response has a budget of its own.
        assert_eq!(txn.body_budget(Direction::Response, 100), 10);
    }

    #[test]
    fn empty_intermediate_chunks_are_skipped() {
        let mut txn = HttpTransaction::new(1, 10);
        assert!(body(&mut txn, 1, Direction::Response, &[], 0, false).is_none());
        assert!(body(&mut txn, 1, Direction::Response, &[], 0, true).is_some());
    }

    #[test]
    fn the_exchange_completes_when_its_second_direction_ends() {
        let mut txn = HttpTransaction::new(1, 10);
        txn.headers(1, Direction::Request, &[], false);
        txn.headers(2, Direction::Response, &[], false);
        body(&mut txn, 3, Direction::Response, &[1], 1, true);
        assert_eq!(txn.completed_at_ns(), None, "the request has not ended");
        body(&mut txn, 4, Direction::Request, &[], 0, true);
        assert_eq!(txn.completed_at_ns(), Some(4));
        txn.trailers(5, Direction::Response, &[]);
        assert_eq!(txn.completed_at_ns(), Some(4), "the first completion stands");

        let mut trailers = HttpTransaction::new(2, 10);
        trailers.headers(1, Direction::Request, &[], true);
        trailers.headers(2, Direction::Response, &[], false);
        trailers.trailers(7, Direction::Response, &[]);
        assert_eq!(trailers.completed_at_ns(), Some(7));
    }

    #[test]
    fn end_reason_reflects_what_was_seen() {
        let mut txn = HttpTransaction::new(1, 10);
        txn.headers(1, Direction::Request, &[], true);
        assert_eq!(end_reason(txn.end(2, None)), EndReason::Aborted);
        txn.headers(3, Direction::Response, &[], false);
        txn.trailers(4, Direction::Response, &[]);
        assert_eq!(end_reason(txn.end(5, None)), EndReason::Complete);
        txn.fate = Fate::Damaged;
        assert_eq!(end_reason(txn.end(6, None)), EndReason::FramesDropped);
    }
}
