//! One rate limit for the warnings of every streamrec component: a broker or Redis outage, or a
//! stream of bad messages, repeats the same failure thousands of times a second, and a log line
//! for each would drown the log (and cost more than the work). It lives here, in the crate every
//! component already depends on, because it needs nothing but `std`; it does not log itself, so
//! each caller keeps its own structured `tracing` fields and adds the count of lines it held
//! back.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lets one event through per period and counts the rest, which the next event let through
/// reports. Shared by reference (`&self`) across threads and tasks.
#[derive(Debug)]
pub struct RateLimit {
    period: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// When the last event was let through.
    last: Option<Instant>,
    /// Events held back since then.
    suppressed: u64,
}

impl RateLimit {
    /// At most one event per `period`.
    pub fn new(period: Duration) -> Self {
        Self {
            period,
            state: Mutex::new(State::default()),
        }
    }

    /// At most one event a second, what every component's warnings use.
    pub fn per_second() -> Self {
        Self::new(Duration::from_secs(1))
    }

    /// `Some(events held back since the last one let through)` to log this one, or `None` to
    /// stay quiet (the event is counted).
    pub fn allow(&self) -> Option<u64> {
        // A panic elsewhere while holding the lock leaves a consistent state: two plain fields.
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if state
            .last
            .is_some_and(|last| now.duration_since(last) < self.period)
        {
            state.suppressed += 1;
            return None;
        }
        state.last = Some(now);
        Some(std::mem::take(&mut state.suppressed))
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::per_second()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lets_one_through_per_period_and_counts_the_rest() {
        let limit = RateLimit::new(Duration::from_millis(50));
        assert_eq!(limit.allow(), Some(0));
        assert_eq!(limit.allow(), None);
        assert_eq!(limit.allow(), None);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(limit.allow(), Some(2));
        assert_eq!(limit.allow(), None);
    }

    #[test]
    fn shared_across_threads_lets_one_through() {
        let limit = RateLimit::new(Duration::from_secs(60));
        let allowed: usize = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..4)
                .map(|_| scope.spawn(|| (0..100).filter(|_| limit.allow().is_some()).count()))
                .collect();
            threads.into_iter().map(|t| t.join().unwrap_or(0)).sum()
        });
        assert_eq!(allowed, 1);
        // A zero period holds nothing back.
        let limit = RateLimit::new(Duration::ZERO);
        assert_eq!(limit.allow(), Some(0));
        assert_eq!(limit.allow(), Some(0));
    }
}
