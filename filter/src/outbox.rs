//! Frames waiting to be sent, encoded and cut into batches, with the aggregator's acks as flow
//! control.
//!
//! Envoy never pushes back on a gRPC stream (it buffers without limit), so the bound is here:
//! at most `max_buffer_bytes` of frames wait, at most `max_batches_in_flight` batches are
//! unacknowledged, and each batch is at most `max_batch_bytes`. Pushing into a full outbox fails
//! and the caller drops the capture; nothing here grows without bound.
//!
//! Frames are encoded as they are pushed, into the batch that will carry them (see
//! [`crate::wire`]): a batch is sent as it was filled, with its sequence number appended.

use std::collections::VecDeque;

use crate::wire::{encode_batch_trailer, FrameRef};

/// Bytes beyond the buffer bound that end frames may use (see [`Outbox::push_end`]).
pub const END_RESERVE: usize = 64 * 1024;

/// Room left after the frames of a batch for its sequence and drop count (two varint fields).
const TRAILER_BYTES: usize = 2 * 11;

/// Buffers kept for reuse. Two: a frame larger than a batch goes alone, so one flush may send
/// two batches (the one it cut short, and its own), and both buffers are needed again.
const SPARES: usize = 2;

/// The outbox is full; the frame was not taken.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

#[derive(Debug)]
pub struct Outbox {
    /// Encoded `FrameBatch.frames` entries, one buffer per batch; only the last one is still
    /// being filled.
    batches: VecDeque<Vec<u8>>,
    /// Sent batches' buffers, kept for the next batches: no allocation per batch. At most
    /// [`SPARES`].
    spares: Vec<Vec<u8>>,
    /// The largest buffer kept as a spare: a batch's, or that of a frame larger than a batch
    /// (see [`Self::with_frames_up_to`]).
    max_spare_bytes: usize,
    buffered_bytes: usize,
    in_flight: VecDeque<u64>,
    next_sequence: u64,
    max_buffer_bytes: usize,
    max_batch_bytes: usize,
    max_in_flight: usize,
}

impl Outbox {
    pub fn new(max_buffer_bytes: usize, max_batch_bytes: usize, max_in_flight: usize) -> Self {
        Self {
            batches: VecDeque::new(),
            spares: Vec::new(),
            max_spare_bytes: max_batch_bytes + TRAILER_BYTES,
            buffered_bytes: 0,
            in_flight: VecDeque::new(),
            next_sequence: 1,
            max_buffer_bytes,
            max_batch_bytes,
            max_in_flight,
        }
    }

    /// Keeps the buffer of a frame up to `max_frame_bytes` for reuse too, as a batch's, when
    /// that is at most twice a batch. A frame larger than a batch goes alone, in a buffer of its
    /// own: a body chunk at the body limit (64 KiB by default) is just larger than a batch
    /// (64 KiB by default), and without this each one would take a new buffer. A larger limit
    /// is not kept, so that two spares never hold more than four batches' worth of memory.
    #[must_use]
    pub fn with_frames_up_to(mut self, max_frame_bytes: usize) -> Self {
        let frame_buffer = max_frame_bytes.saturating_add(TRAILER_BYTES);
        if frame_buffer <= 2 * self.max_spare_bytes {
            self.max_spare_bytes = self.max_spare_bytes.max(frame_buffer);
        }
        self
    }

    /// Queues a frame.
    ///
    /// # Errors
    /// [`Full`] when the frame would take the buffer past its byte bound.
    pub fn push(&mut self, frame: &FrameRef<'_>) -> Result<(), Full> {
        self.push_within(frame, self.max_buffer_bytes)
    }

    /// Queues a transaction's end frame, which may use [`END_RESERVE`] bytes beyond the bound:
    /// an end lost to a full buffer would leave its transaction open at the aggregator. End
    /// frames are tiny and there is at most one per exchange in flight, so the reserve is a
    /// bound too.
    ///
    /// # Errors
    /// [`Full`] when even the reserve is used up.
    pub fn push_end(&mut self, frame: &FrameRef<'_>) -> Result<(), Full> {
        self.push_within(frame, self.max_buffer_bytes + END_RESERVE)
    }

    fn push_within(&mut self, frame: &FrameRef<'_>, bound: usize) -> Result<(), Full> {
        let len = frame.framed_len();
        if self.buffered_bytes + len > bound {
            return Err(Full);
        }
        let fits = self.batches.back().is_some_and(|batch| batch.len() + len <= self.max_batch_bytes);
        if !fits {
            // A batch's buffer, or one for a frame larger than a batch, which still goes, alone
            // (frames are bounded by the body limit). The sizes are fixed rather than the
            // frame's own, so that a spare fits the next such frame (ids and times grow).
            let capacity = match len + TRAILER_BYTES {
                batch if batch <= self.max_batch_bytes + TRAILER_BYTES => self.max_batch_bytes + TRAILER_BYTES,
                large if large <= self.max_spare_bytes => self.max_spare_bytes,
                larger => larger,
            };
            let buffer = self.buffer(capacity);
            self.batches.push_back(buffer);
        }
        if let Some(batch) = self.batches.back_mut() {
            frame.encode(batch);
            self.buffered_bytes += len;
        }
        Ok(())
    }

    /// An empty buffer of at least `capacity` bytes: a spare large enough, else one grown to
    /// size, else a new one.
    fn buffer(&mut self, capacity: usize) -> Vec<u8> {
        let smallest_that_fits = self
            .spares
            .iter()
            .enumerate()
            .filter(|(_, spare)| spare.capacity() >= capacity)
            .min_by_key(|(_, spare)| spare.capacity())
            .map(|(at, _)| at);
        let mut buffer = match smallest_that_fits {
            Some(at) => self.spares.swap_remove(at),
            None => self.spares.pop().unwrap_or_default(),
        };
        buffer.clear();
        buffer.reserve_exact(capacity);
        buffer
    }

    pub fn buffered_bytes(&self) -> usize {
        self.buffered_bytes
    }

    /// Whether a full-size batch is waiting (worth sending before the next tick).
    pub fn has_full_batch(&self) -> bool {
        self.batches.len() > 1 || self.batches.front().is_some_and(|batch| batch.len() >= self.max_batch_bytes)
    }

    /// Takes the next batch if it is full (see [`Self::has_full_batch`]) and the in-flight
    /// window has room. The batch still being filled waits: sent now, it would go out nearly
    /// empty, and every full batch would be followed by one.
    pub fn next_full_batch(&mut self, captures_dropped: u64) -> Option<(u64, Vec<u8>)> {
        if self.has_full_batch() {
            self.next_batch(captures_dropped)
        } else {
            None
        }
    }

    /// Takes the next batch, encoded, full or not, if frames wait and the in-flight window has
    /// room.
    pub fn next_batch(&mut self, captures_dropped: u64) -> Option<(u64, Vec<u8>)> {
        if self.in_flight.len() >= self.max_in_flight {
            return None;
        }
        let mut batch = self.batches.pop_front()?;
        self.buffered_bytes -= batch.len();
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        self.in_flight.push_back(sequence);
        encode_batch_trailer(sequence, captures_dropped, &mut batch);
        Some((sequence, batch))
    }

    /// Hands back a sent batch's buffer for reuse (an empty one, when the host took the batch's,
    /// is let go).
    pub fn recycle(&mut self, mut buffer: Vec<u8>) {
        // Up to the bound only: the buffer of a frame larger than expected is let go.
        if buffer.capacity() > 0 && buffer.capacity() <= self.max_spare_bytes && self.spares.len() < SPARES {
            buffer.clear();
            self.spares.push(buffer);
        }
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
    use packet_inspector_proto::capture::{frame::Kind, BodyChunk, Frame, FrameBatch};
    use prost::Message;

    fn frame(id: u64, body: usize) -> FrameRef<'static> {
        FrameRef::Message(Frame {
            transaction_id: id,
            timestamp_ns: 1,
            kind: Some(Kind::Body(BodyChunk { data: vec![7; body], ..Default::default() })),
        })
    }

    fn end(id: u64) -> FrameRef<'static> {
        FrameRef::Message(Frame { transaction_id: id, timestamp_ns: 1, kind: Some(Kind::End(Default::default())) })
    }

    fn decode(batch: &[u8]) -> FrameBatch {
        FrameBatch::decode(batch).unwrap()
    }

    #[test]
    fn batches_respect_the_byte_cap_and_carry_every_frame_in_order() {
        let mut outbox = Outbox::new(1 << 20, 1000, 8);
        for id in 0..10 {
            outbox.push(&frame(id, 300)).unwrap();
        }
        let mut ids = Vec::new();
        while let Some((sequence, bytes)) = outbox.next_batch(0) {
            assert!(bytes.len() <= 1000 + TRAILER_BYTES, "batch of {} bytes", bytes.len());
            let batch = decode(&bytes);
            assert_eq!(batch.sequence, sequence);
            ids.extend(batch.frames.iter().map(|f| f.transaction_id));
        }
        assert_eq!(ids, (0..10).collect::<Vec<_>>());
        assert_eq!(outbox.buffered_bytes(), 0);
    }

    #[test]
    fn full_buffer_refuses_and_recovers_after_sending() {
        let one = frame(1, 100).framed_len();
        let mut outbox = Outbox::new(one * 3, one * 3, 1);
        for id in 1..=3 {
            outbox.push(&frame(id, 100)).unwrap();
        }
        assert_eq!(outbox.push(&frame(4, 100)), Err(Full));
        assert!(outbox.next_batch(0).is_some());
        outbox.push(&frame(5, 100)).unwrap();
    }

    #[test]
    fn end_frames_use_a_bounded_reserve() {
        let one = frame(1, 100).framed_len();
        let mut outbox = Outbox::new(one, one, 1);
        outbox.push(&frame(1, 100)).unwrap();
        assert_eq!(outbox.push(&frame(2, 1)), Err(Full));
        outbox.push_end(&end(3)).unwrap();
        let mut taken = 1;
        while outbox.push_end(&end(3)).is_ok() {
            taken += 1;
        }
        let end_len = end(3).framed_len();
        assert!(taken * end_len <= END_RESERVE && (taken + 1) * end_len > END_RESERVE);
    }

    #[test]
    fn in_flight_window_gates_batches_until_acked() {
        let mut outbox = Outbox::new(1 << 20, 10, 2);
        for id in 0..5 {
            outbox.push(&frame(id, 20)).unwrap();
        }
        let first = outbox.next_batch(0).unwrap();
        let second = outbox.next_batch(0).unwrap();
        assert_eq!((first.0, second.0), (1, 2));
        assert!(outbox.next_batch(0).is_none(), "window of 2 is full");
        assert_eq!(outbox.ack(1), 1);
        assert_eq!(outbox.next_batch(0).unwrap().0, 3);
        assert_eq!(outbox.ack(3), 2, "a cumulative ack releases every earlier batch");
    }

    #[test]
    fn oversized_single_frame_still_goes_alone() {
        let mut outbox = Outbox::new(1 << 20, 100, 2);
        outbox.push(&frame(1, 500)).unwrap();
        outbox.push(&frame(2, 1)).unwrap();
        assert!(outbox.has_full_batch());
        assert_eq!(decode(&outbox.next_batch(0).unwrap().1).frames.len(), 1);
        assert_eq!(decode(&outbox.next_batch(0).unwrap().1).frames.len(), 1);
    }

    #[test]
    fn a_partial_batch_is_not_full_until_the_next_frame_overflows_it() {
        let mut outbox = Outbox::new(1 << 20, 1000, 2);
        outbox.push(&frame(1, 300)).unwrap();
        assert!(!outbox.has_full_batch());
        outbox.push(&frame(2, 300)).unwrap();
        outbox.push(&frame(3, 300)).unwrap();
        assert!(!outbox.has_full_batch());
        outbox.push(&frame(4, 300)).unwrap();
        assert!(outbox.has_full_batch());
    }

    #[test]
    fn stream_loss_forgets_in_flight_and_restarts_sequences() {
        let mut outbox = Outbox::new(1 << 20, 10, 4);
        for id in 0..3 {
            outbox.push(&frame(id, 20)).unwrap();
        }
        outbox.next_batch(0).unwrap();
        outbox.next_batch(0).unwrap();
        assert_eq!(outbox.stream_lost(), 2);
        let batch = decode(&outbox.next_batch(5).unwrap().1);
        assert_eq!((batch.sequence, batch.captures_dropped, batch.frames[0].transaction_id), (1, 5, 2));
    }
}
