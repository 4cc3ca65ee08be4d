//! Frames waiting to be sent, cut into batches, with the aggregator's acks as flow control.
//!
//! Envoy never pushes back on a gRPC stream (it buffers without limit), so the bound is here:
//! at most `max_buffer_bytes` of frames wait, at most `max_batches_in_flight` batches are
//! unacknowledged, and each batch is at most `max_batch_bytes`. Pushing into a full outbox fails
//! and the caller drops the capture; nothing here grows without bound.

use std::collections::VecDeque;

use packet_inspector_proto::capture::{Frame, FrameBatch};
use prost::Message;

/// Bytes beyond the buffer bound that end frames may use (see [`Outbox::push_end`]).
pub const END_RESERVE: usize = 64 * 1024;

/// The outbox is full; the frame was not taken.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

#[derive(Debug)]
pub struct Outbox {
    frames: VecDeque<(Frame, usize)>,
    buffered_bytes: usize,
    in_flight: VecDeque<u64>,
    next_sequence: u64,
    max_buffer_bytes: usize,
    max_batch_bytes: usize,
    max_in_flight: usize,
}

/// Bytes a frame adds to an encoded `FrameBatch` (field tag, length prefix, body).
pub fn framed_len(frame: &Frame) -> usize {
    let len = frame.encoded_len();
    1 + prost::length_delimiter_len(len) + len
}

impl Outbox {
    pub fn new(max_buffer_bytes: usize, max_batch_bytes: usize, max_in_flight: usize) -> Self {
        Self {
            frames: VecDeque::new(),
            buffered_bytes: 0,
            in_flight: VecDeque::new(),
            next_sequence: 1,
            max_buffer_bytes,
            max_batch_bytes,
            max_in_flight,
        }
    }

    /// Queues a frame.
    ///
    /// # Errors
    /// [`Full`] when the frame would take the buffer past its byte bound.
    pub fn push(&mut self, frame: Frame) -> Result<(), Full> {
        self.push_within(frame, self.max_buffer_bytes)
    }

    /// Queues a transaction's end frame, which may use [`END_RESERVE`] bytes beyond the bound:
    /// an end lost to a full buffer would leave its transaction open at the aggregator. End
    /// frames are tiny and there is at most one per exchange in flight, so the reserve is a
    /// bound too.
    ///
    /// # Errors
    /// [`Full`] when even the reserve is used up.
    pub fn push_end(&mut self, frame: Frame) -> Result<(), Full> {
        self.push_within(frame, self.max_buffer_bytes + END_RESERVE)
    }

    fn push_within(&mut self, frame: Frame, bound: usize) -> Result<(), Full> {
        let len = framed_len(&frame);
        if self.buffered_bytes + len > bound {
            return Err(Full);
        }
        self.buffered_bytes += len;
        self.frames.push_back((frame, len));
        Ok(())
    }

    pub fn buffered_bytes(&self) -> usize {
        self.buffered_bytes
    }

    /// Whether a full-size batch is waiting (worth sending before the next tick).
    pub fn has_full_batch(&self) -> bool {
        self.buffered_bytes >= self.max_batch_bytes
    }

    /// Cuts the next batch if frames wait and the in-flight window has room. A single frame
    /// larger than `max_batch_bytes` still goes alone (frames are bounded by the body limit).
    pub fn next_batch(&mut self, captures_dropped: u64) -> Option<FrameBatch> {
        if self.frames.is_empty() || self.in_flight.len() >= self.max_in_flight {
            return None;
        }
        let mut batch_bytes = 0;
        let mut frames = Vec::new();
        while let Some((_, len)) = self.frames.front() {
            if !frames.is_empty() && batch_bytes + len > self.max_batch_bytes {
                break;
            }
            let Some((frame, len)) = self.frames.pop_front() else { break };
            batch_bytes += len;
            self.buffered_bytes -= len;
            frames.push(frame);
        }
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        self.in_flight.push_back(sequence);
        Some(FrameBatch { sequence, frames, captures_dropped })
    }

    /// Records the aggregator's ack; acks cover every batch up to `sequence` (the stream is
    /// ordered). Returns how many batches it released.
    pub fn ack(&mut self, sequence: u64) -> usize {
        let before = self.in_flight.len();
        while self.in_flight.front().is_some_and(|&s| s <= sequence) {
            self.in_flight.pop_front();
        }
        before - self.in_flight.len()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The stream is gone: unacknowledged batches are lost with it (returned as a count) and a
    /// new stream numbers its batches from 1 again. Frames not yet sent stay queued.
    pub fn stream_lost(&mut self) -> usize {
        let lost = self.in_flight.len();
        self.in_flight.clear();
        self.next_sequence = 1;
        lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use packet_inspector_proto::capture::{frame::Kind, BodyChunk};

    fn frame(id: u64, body: usize) -> Frame {
        Frame {
            transaction_id: id,
            timestamp_ns: 1,
            kind: Some(Kind::Body(BodyChunk { data: vec![7; body], ..Default::default() })),
        }
    }

    #[test]
    fn batches_respect_the_byte_cap_and_encode_to_their_accounted_size() {
        let mut outbox = Outbox::new(1 << 20, 1000, 8);
        for id in 0..10 {
            outbox.push(frame(id, 300)).unwrap();
        }
        let mut total = 0;
        while let Some(batch) = outbox.next_batch(0) {
            let accounted: usize = batch.frames.iter().map(framed_len).sum();
            assert!(accounted <= 1000, "batch of {accounted} bytes");
            // `sequence` and `captures_dropped` are the only bytes beyond the frames.
            assert!(batch.encoded_len() <= accounted + 2 * 11);
            total += batch.frames.len();
        }
        assert_eq!(total, 10);
        assert_eq!(outbox.buffered_bytes(), 0);
    }

    #[test]
    fn full_buffer_refuses_and_recovers_after_sending() {
        let one = framed_len(&frame(1, 100));
        let mut outbox = Outbox::new(one * 3, one * 3, 1);
        for id in 1..=3 {
            outbox.push(frame(id, 100)).unwrap();
        }
        assert_eq!(outbox.push(frame(4, 100)), Err(Full));
        assert!(outbox.next_batch(0).is_some());
        outbox.push(frame(5, 100)).unwrap();
    }

    #[test]
    fn end_frames_use_a_bounded_reserve() {
        let one = framed_len(&frame(1, 100));
        let mut outbox = Outbox::new(one, one, 1);
        outbox.push(frame(1, 100)).unwrap();
        assert_eq!(outbox.push(frame(2, 1)), Err(Full));
        let end = Frame { transaction_id: 3, timestamp_ns: 1, kind: Some(Kind::End(Default::default())) };
        outbox.push_end(end.clone()).unwrap();
        let mut taken = 1;
        while outbox.push_end(end.clone()).is_ok() {
            taken += 1;
        }
        assert!(taken * framed_len(&end) <= END_RESERVE && (taken + 1) * framed_len(&end) > END_RESERVE);
    }

    #[test]
    fn in_flight_window_gates_batches_until_acked() {
        let mut outbox = Outbox::new(1 << 20, 10, 2);
        for id in 0..5 {
            outbox.push(frame(id, 20)).unwrap();
        }
        let first = outbox.next_batch(0).unwrap();
        let second = outbox.next_batch(0).unwrap();
        assert_eq!((first.sequence, second.sequence), (1, 2));
        assert!(outbox.next_batch(0).is_none(), "window of 2 is full");
        assert_eq!(outbox.ack(1), 1);
        assert_eq!(outbox.next_batch(0).unwrap().sequence, 3);
        assert_eq!(outbox.ack(3), 2, "a cumulative ack releases every earlier batch");
    }

    #[test]
    fn oversized_single_frame_still_goes_alone() {
        let mut outbox = Outbox::new(1 << 20, 100, 2);
        outbox.push(frame(1, 500)).unwrap();
        outbox.push(frame(2, 1)).unwrap();
        assert_eq!(outbox.next_batch(0).unwrap().frames.len(), 1);
        assert_eq!(outbox.next_batch(0).unwrap().frames.len(), 1);
    }

    #[test]
    fn stream_loss_forgets_in_flight_and_restarts_sequences() {
        let mut outbox = Outbox::new(1 << 20, 10, 4);
        for id in 0..3 {
            outbox.push(frame(id, 20)).unwrap();
        }
        outbox.next_batch(0).unwrap();
        outbox.next_batch(0).unwrap();
        assert_eq!(outbox.stream_lost(), 2);
        let batch = outbox.next_batch(5).unwrap();
        assert_eq!((batch.sequence, batch.captures_dropped, batch.frames[0].transaction_id), (1, 5, 2));
    }
}
