//! `--max-captures-per-second`: turns spaced evenly over all calls, so the emulator can play a
//! slower analysis tool. Each capture reserves the next free turn and waits for it; a service
//! that fell behind (stopped, say) takes its next capture at once but never catches up in a
//! burst beyond one turn per interval.

use std::{sync::Mutex, time::Duration};

use tokio::time::Instant;

#[derive(Debug)]
pub struct Pacer {
    interval: Duration,
    /// The earliest instant the next turn may start.
    next: Mutex<Option<Instant>>,
}

impl Pacer {
    /// A pacer allowing `per_second` turns a second; `None` for 0 (no limit).
    pub fn per_second(per_second: u32) -> Option<Self> {
        (per_second > 0).then(|| Self { interval: Duration::from_secs(1) / per_second, next: Mutex::new(None) })
    }

    /// Waits for this caller's turn.
    pub async fn wait(&self) {
        let now = Instant::now();
        let turn = {
            // A poisoned lock only means another caller panicked between two lines that
            // cannot panic; its value is still a valid instant.
            let mut next = self.next.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            reserve(&mut next, now, self.interval)
        };
        tokio::time::sleep_until(turn).await;
    }
}

/// The turn of a caller arriving at `now`, given the next free turn (none before the first
/// call), which moves one interval on.
fn reserve(next: &mut Option<Instant>, now: Instant, interval: Duration) -> Instant {
    let turn = next.map_or(now, |free| free.max(now));
    *next = Some(turn + interval);
    turn
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_means_no_limit() {
        assert!(Pacer::per_second(0).is_none());
        assert_eq!(Pacer::per_second(4).map(|p| p.interval), Some(Duration::from_millis(250)));
    }

    #[test]
    fn turns_are_one_interval_apart_when_callers_crowd() {
        let (start, interval) = (Instant::now(), Duration::from_millis(10));
        let mut next = None;
        let turns: Vec<Duration> = (0..4).map(|_| reserve(&mut next, start, interval) - start).collect();
        assert_eq!(turns, [0, 10, 20, 30].map(Duration::from_millis));
    }

    #[test]
    fn an_idle_pacer_gives_the_next_caller_its_turn_at_once_without_a_burst() {
        let (start, interval) = (Instant::now(), Duration::from_millis(10));
        let mut next = None;
        reserve(&mut next, start, interval);
        // Long after the last turn (the service was stopped, or idle).
        let later = start + Duration::from_secs(60);
        assert_eq!(reserve(&mut next, later, interval), later);
        assert_eq!(reserve(&mut next, later, interval), later + interval, "no catching up in a burst");
    }

    #[tokio::test(start_paused = true)]
    async fn wait_sleeps_until_the_turn() {
        let pacer = Pacer::per_second(10).unwrap();
        let start = Instant::now();
        for _ in 0..3 {
            pacer.wait().await;
        }
        // The clock is paused and auto-advances only by sleeping: two intervals were slept.
        assert_eq!(Instant::now() - start, Duration::from_millis(200));
    }
}
