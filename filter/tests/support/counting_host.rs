//! A [`Host`] that only counts what it is sent, for the measurements that drive the pipeline
//! without Envoy: the allocation test (`tests/allocations.rs`) and the filter part of the bench
//! (`examples/exchange_cost.rs`), which include this file as a module.

use packet_inspector_filter::pipeline::{Counter, Host};

/// Counts the batches it is sent and their bytes. Copies each batch out, as Envoy's `grpc_send`
/// does for the Wasm filter (the outbox keeps the buffer), or, with `takes_batches`, takes it, as
/// the native capture's host does (the outbox needs a new one).
#[derive(Debug, Default)]
pub struct CountingHost {
    pub now_ns: u64,
    pub takes_batches: bool,
    pub batches: u64,
    pub bytes: u64,
    pub warnings: Vec<String>,
}

impl Host for CountingHost {
    fn now_ns(&self) -> u64 {
        self.now_ns
    }
    fn open_stream(&mut self, _cluster: &str) -> Result<u32, String> {
        Ok(1)
    }
    fn send(&mut self, _token: u32, batch: &mut Vec<u8>) -> Result<(), String> {
        self.batches += 1;
        self.bytes += batch.len() as u64;
        if self.takes_batches {
            drop(std::mem::take(batch));
        }
        Ok(())
    }
    fn cancel(&mut self, _token: u32) {}
    fn count(&mut self, _counter: Counter, _delta: u64) {}
    fn warn(&mut self, message: &str) {
        self.warnings.push(message.to_owned());
    }
}
