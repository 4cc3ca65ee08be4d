//! Pairs Diameter requests with their answers, per filter stream.
//!
//! A request and its answer share the hop-by-hop and end-to-end ids on one connection (RFC 6733
//! §6.2); either peer may send requests (a server's DWR, say). A request left unanswered past
//! the timeout is delivered alone, flagged; an answer whose request was never seen (the filter
//! started mid-conversation, or dropped it) is delivered alone too, so nothing is silently lost.
//! Pending requests are bounded; past the bound the oldest is delivered unanswered.

use std::collections::HashMap;

use packet_inspector_proto::capture::DiameterMessage;

/// One message as it arrived, with the time the filter saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    pub message: DiameterMessage,
    pub at_ns: u64,
}

/// A request and its answer; at least one is present.
#[derive(Debug, Clone, PartialEq)]
pub struct Exchange {
    pub request: Option<Seen>,
    pub answer: Option<Seen>,
}

impl Exchange {
    /// The message the capture is described by (the request when there is one).
    pub fn first(&self) -> Option<&Seen> {
        self.request.as_ref().or(self.answer.as_ref())
    }
}

/// (connection, hop-by-hop id, end-to-end id)
type Key = (u64, u32, u32);

fn key(message: &DiameterMessage) -> Key {
    let connection = message.metadata.as_ref().map_or(0, |m| m.connection_id);
    (connection, message.hop_by_hop_id, message.end_to_end_id)
}

#[derive(Debug)]
pub struct Pairer {
    pending: HashMap<Key, Seen>,
    timeout_ns: u64,
    max_pending: usize,
}

impl Pairer {
    pub fn new(timeout_ns: u64, max_pending: usize) -> Self {
        Self { pending: HashMap::new(), timeout_ns, max_pending: max_pending.max(1) }
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Takes a message; returns the exchanges it completes or pushes out.
    pub fn offer(&mut self, message: DiameterMessage, at_ns: u64) -> Vec<Exchange> {
        let key = key(&message);
        let seen = Seen { message, at_ns };
        let mut done = Vec::new();
        if seen.message.request {
            // A retransmission (same ids) replaces the earlier copy, which goes out unanswered.
            if let Some(earlier) = self.pending.insert(key, seen) {
                done.push(Exchange { request: Some(earlier), answer: None });
            }
            if self.pending.len() > self.max_pending {
                if let Some(oldest) = self.pending.iter().min_by_key(|(_, seen)| seen.at_ns).map(|(key, _)| *key) {
                    done.extend(
                        self.pending.remove(&oldest).map(|request| Exchange { request: Some(request), answer: None }),
                    );
                }
            }
        } else {
            done.push(Exchange { request: self.pending.remove(&key), answer: Some(seen) });
        }
        done
    }

    /// Requests unanswered for longer than the timeout, as of `now_ns`.
    pub fn sweep(&mut self, now_ns: u64) -> Vec<Exchange> {
        let expired: Vec<Key> = self
            .pending
            .iter()
            .filter(|(_, seen)| now_ns.saturating_sub(seen.at_ns) >= self.timeout_ns)
            .map(|(key, _)| *key)
            .collect();
        expired
            .into_iter()
            .filter_map(|key| self.pending.remove(&key))
            .map(|r| Exchange { request: Some(r), answer: None })
            .collect()
    }

    /// Everything still pending (the filter stream ended).
    pub fn drain(&mut self) -> Vec<Exchange> {
        self.pending.drain().map(|(_, request)| Exchange { request: Some(request), answer: None }).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use packet_inspector_proto::capture::TransactionMetadata;

    fn message(connection: u64, request: bool, hbh: u32, e2e: u32) -> DiameterMessage {
        DiameterMessage {
            metadata: Some(TransactionMetadata { connection_id: connection, ..Default::default() }),
            request,
            hop_by_hop_id: hbh,
            end_to_end_id: e2e,
            ..Default::default()
        }
    }

    #[test]
    fn answers_pair_with_their_request_whatever_else_is_in_flight() {
        let mut pairer = Pairer::new(1_000, 100);
        assert!(pairer.offer(message(1, true, 10, 20), 1).is_empty());
        assert!(pairer.offer(message(1, true, 11, 21), 2).is_empty());
        assert!(pairer.offer(message(2, true, 10, 20), 3).is_empty(), "same ids, other connection");
        let done = pairer.offer(message(1, false, 11, 21), 4);
        assert_eq!(done.len(), 1);
        assert_eq!((done[0].request.as_ref().unwrap().at_ns, done[0].answer.as_ref().unwrap().at_ns), (2, 4));
        let done = pairer.offer(message(2, false, 10, 20), 5);
        assert_eq!(done[0].request.as_ref().unwrap().at_ns, 3);
        assert_eq!(pairer.pending(), 1);
    }

    #[test]
    fn unanswered_requests_time_out_and_stray_answers_are_kept() {
        let mut pairer = Pairer::new(1_000, 100);
        pairer.offer(message(1, true, 1, 1), 100);
        assert!(pairer.sweep(1_099).is_empty());
        let expired = pairer.sweep(1_100);
        assert_eq!(expired.len(), 1);
        assert!(expired[0].answer.is_none());
        let stray = pairer.offer(message(1, false, 1, 1), 1_200);
        assert_eq!(stray.len(), 1);
        assert!(stray[0].request.is_none() && stray[0].answer.is_some());
    }

    #[test]
    fn bounded_and_drained() {
        let mut pairer = Pairer::new(1_000, 2);
        pairer.offer(message(1, true, 1, 1), 1);
        pairer.offer(message(1, true, 2, 2), 2);
        let pushed_out = pairer.offer(message(1, true, 3, 3), 3);
        assert_eq!(pushed_out.len(), 1);
        assert_eq!(pushed_out[0].request.as_ref().unwrap().message.hop_by_hop_id, 1, "the oldest goes");
        let retransmitted = pairer.offer(message(1, true, 3, 3), 4);
        assert_eq!(retransmitted[0].request.as_ref().unwrap().at_ns, 3);
        assert_eq!(pairer.drain().len(), 2);
        assert_eq!(pairer.pending(), 0);
    }
}
