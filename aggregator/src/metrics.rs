//! The aggregator's counters and gauges, served in the Prometheus text format by [`crate::admin`].
//! Names follow `packet_inspector_aggregator_<name>_<unit>_total`; label values are bounded.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! metrics {
    ($( $(#[doc = $help:literal])* $field:ident: $kind:literal, )*) => {
        #[derive(Debug, Default)]
        pub struct Metrics {
            $( $(#[doc = $help])* pub $field: AtomicU64, )*
        }

        impl Metrics {
            /// The Prometheus exposition text.
            pub fn render(&self) -> String {
                let mut out = String::new();
                $(
                    let name = concat!("packet_inspector_aggregator_", stringify!($field));
                    let help = concat!($($help),*).trim();
                    out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {}\n{name} {}\n", $kind, self.$field.load(Relaxed)));
                )*
                out
            }
        }
    };
}

metrics! {
    /// Filter streams currently open.
    streams_open: "gauge",
    /// Filter streams accepted since start.
    streams_total: "counter",
    /// Frame batches received from filters.
    batches_received_total: "counter",
    /// Frames received from filters.
    frames_received_total: "counter",
    /// Frames refused by transaction assembly (orphans, duplicates, limits).
    frames_rejected_total: "counter",
    /// Open transactions evicted (delivered as aborted) at the open-transaction bound.
    transactions_evicted_total: "counter",
    /// Captures the filters reported dropping before they reached the aggregator.
    filter_captures_dropped_total: "counter",
    /// Transactions assembled into captures.
    captures_built_total: "counter",
    /// Transactions that could not become a capture (unsupported protocol, build error).
    captures_unbuildable_total: "counter",
    /// Captures dropped because the forwarding queue was full.
    captures_queue_full_total: "counter",
    /// Captures waiting in the forwarding queue (its bound is `--forward-queue`).
    forward_queue_captures: "gauge",
    /// Bytes (encoded captures) waiting in the forwarding queue (its bound is
    /// `--forward-queue-bytes`).
    forward_queue_bytes: "gauge",
    /// Captures stored by the analysis service.
    captures_forwarded_total: "counter",
    /// Captures given up after retries (analysis service unreachable, TLS refused, rejected).
    captures_forward_failed_total: "counter",
    /// Captures sent to the analysis service again: left unanswered by a broken call, or a
    /// `Submit` retried (delivery is at least once, so each may be stored twice).
    captures_forward_retried_total: "counter",
    /// Captured payload bytes forwarded.
    forwarded_payload_bytes_total: "counter",
    /// Diameter messages received from filters.
    diameter_messages_total: "counter",
    /// Diameter exchanges delivered without an answer (timed out) or without a request.
    diameter_unpaired_total: "counter",
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }
}

/// Lets a warning through at most once per interval and says how many were held back, so an
/// overload shows in the log without flooding it (the counters count every event).
#[derive(Debug, Default)]
pub struct LogLimiter {
    last: std::sync::Mutex<Option<std::time::Instant>>,
    suppressed: AtomicU64,
}

impl LogLimiter {
    const INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

    /// `Some(n)`: log now, `n` earlier occurrences were held back; `None`: hold this one back.
    pub fn allow(&self) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = std::time::Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < Self::INTERVAL) {
            self.suppressed.fetch_add(1, Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.suppressed.swap(0, Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_lets_one_through_per_interval_and_counts_the_rest() {
        let limiter = LogLimiter::default();
        assert_eq!(limiter.allow(), Some(0));
        assert_eq!(limiter.allow(), None);
        assert_eq!(limiter.allow(), None);
        *limiter.last.lock().unwrap() = Some(std::time::Instant::now() - LogLimiter::INTERVAL);
        assert_eq!(limiter.allow(), Some(2));
    }

    #[test]
    fn render_has_help_type_and_value() {
        let metrics = Metrics::default();
        Metrics::add(&metrics.captures_forwarded_total, 3);
        let text = metrics.render();
        assert!(text.contains(
            "# HELP packet_inspector_aggregator_captures_forwarded_total Captures stored by the analysis service."
        ));
        assert!(text.contains("# TYPE packet_inspector_aggregator_captures_forwarded_total counter\npacket_inspector_aggregator_captures_forwarded_total 3\n"));
    }
}
