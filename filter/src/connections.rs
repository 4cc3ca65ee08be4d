//! What the filter learns once per downstream connection and reuses for each of its requests.
//!
//! Envoy gives HTTP filters no connection-level context, and each property read costs Envoy a
//! trip through its expression machinery and a call back into the module for the result's
//! memory: 4-8 µs a read in the bench's A/B, more than the module's whole own work for an
//! exchange. So the addresses, the listener direction and the HTTP version are read on the
//! first request of a connection and kept here, keyed by Envoy's `connection_id` (unique for the
//! life of the Envoy process, never reused), with the metadata its exchanges share already
//! encoded for their start frames, and handed to each request by reference count, not copied.
//! The cache is bounded: past `capacity` connections the oldest entry is forgotten, and a later
//! request of that connection reads the properties again.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
};

use crate::wire::SharedMetadata;

/// The facts about one downstream connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionFacts {
    /// `request.protocol` as Envoy reports it (`HTTP/1.1`, `HTTP/2`, ...).
    pub request_protocol: Option<Vec<u8>>,
    /// The metadata every exchange of the connection shares (identity, role, addresses),
    /// encoded for its start frames.
    pub metadata: SharedMetadata,
}

/// Facts by connection id, shared with the requests that use them (no copy per request).
#[derive(Debug)]
pub struct ConnectionCache<T = ConnectionFacts> {
    facts: HashMap<u64, Arc<T>>,
    /// Connection ids, oldest first.
    order: VecDeque<u64>,
    capacity: usize,
}

impl<T> ConnectionCache<T> {
    pub fn new(capacity: usize) -> Self {
        Self { facts: HashMap::new(), order: VecDeque::new(), capacity: capacity.max(1) }
    }

    /// The facts of connection `id`, read with `read` unless known. Id 0 means Envoy did not say
    /// which connection: they are read every time then.
    pub fn facts(&mut self, id: u64, read: impl FnOnce() -> T) -> Arc<T> {
        if id == 0 {
            return Arc::new(read());
        }
        if let Some(known) = self.facts.get(&id) {
            return Arc::clone(known);
        }
        if self.order.len() >= self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.facts.remove(&oldest);
            }
        }
        let facts = Arc::new(read());
        self.order.push_back(id);
        self.facts.insert(id, Arc::clone(&facts));
        facts
    }

    pub fn len(&self) -> usize {
        self.facts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.facts.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stands for what was read about a connection.
    fn facts(port: u32) -> u32 {
        port
    }

    #[test]
    fn reads_once_per_connection() {
        let mut cache = ConnectionCache::new(8);
        let mut reads = 0;
        for _ in 0..3 {
            let got = cache.facts(42, || {
                reads += 1;
                facts(1)
            });
            assert_eq!(*got, facts(1));
        }
        assert_eq!(reads, 1);
        let (first, again) = (cache.facts(42, || facts(2)), cache.facts(42, || facts(3)));
        assert!(Arc::ptr_eq(&first, &again), "requests share the facts, not copies");
    }

    #[test]
    fn bounded_oldest_forgotten_first() {
        let mut cache = ConnectionCache::new(2);
        cache.facts(1, || facts(1));
        cache.facts(2, || facts(2));
        cache.facts(3, || facts(3));
        assert_eq!(cache.len(), 2);
        let mut reread = false;
        cache.facts(1, || {
            reread = true;
            facts(1)
        });
        assert!(reread, "connection 1 was evicted");
        let mut reread_three = false;
        cache.facts(3, || {
            reread_three = true;
            facts(3)
        });
        assert!(!reread_three);
    }

    #[test]
    fn unknown_connection_is_read_every_time() {
        let mut cache = ConnectionCache::new(2);
        let mut reads = 0;
        for port in 0..3 {
            cache.facts(0, || {
                reads += 1;
                facts(port)
            });
        }
        assert_eq!(reads, 3);
        assert!(cache.is_empty());
    }
}
