//! How long the source's offset commits have waited for librdkafka's answer.
//!
//! Commits are asynchronous: each is answered later through the consumer's commit callback,
//! success or failure. A commit that is never answered is neither: after a broker restart, one
//! worker's commits have been seen to wait in librdkafka's group-coordinator queue for 30 s and
//! more while its fetches went on (docs/architecture.md, "Broker faults"). Nothing is lost
//! meanwhile, but the group's committed offsets stop moving; the source warns, so that an
//! operator sees it and a failing test says so.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use profile::RateLimit;

/// A commit unanswered this long is worth a warning: far longer than a commit takes, and
/// longer than librdkafka's own request timeout in the tests (4 s) and a reconnect's backoff.
pub(super) const UNANSWERED_WARNING: Duration = Duration::from_secs(20);

/// When each commit not yet answered was sent, oldest first.
#[derive(Debug)]
pub(super) struct UnansweredCommits {
    sent: VecDeque<Instant>,
    /// The answers counted so far (the callback's running count).
    answered: u64,
    /// The warning's own limit (once a second), apart from the source's other warnings
    /// (invalid messages, refused commits), which it would otherwise crowd out: it is looked
    /// at every epoch.
    warnings: RateLimit,
}

impl Default for UnansweredCommits {
    fn default() -> Self {
        UnansweredCommits {
            sent: VecDeque::new(),
            answered: 0,
            warnings: RateLimit::per_second(),
        }
    }
}

impl UnansweredCommits {
    /// A commit was sent at `now`.
    pub(super) fn sent(&mut self, now: Instant) {
        self.sent.push_back(now);
    }

    /// The callback has answered `answered` commits in all. Answers are taken as coming in
    /// the order the commits were sent: a commit answered out of order only makes the wait
    /// of another look shorter or longer by the gap between them.
    pub(super) fn answered(&mut self, answered: u64) {
        let new = answered.saturating_sub(self.answered);
        self.answered = self.answered.max(answered);
        for _ in 0..new {
            self.sent.pop_front();
        }
    }

    /// How long the oldest commit not yet answered has waited, if there is one.
    pub(super) fn oldest_wait(&self, now: Instant) -> Option<Duration> {
        self.sent
            .front()
            .map(|sent| now.saturating_duration_since(*sent))
    }

    /// Warns (at most once a second) while the oldest commit not yet answered has waited
    /// [`UNANSWERED_WARNING`] or more.
    pub(super) fn warn_if_waiting(&self, worker: usize, now: Instant) {
        let Some(waited) = self
            .oldest_wait(now)
            .filter(|waited| *waited >= UNANSWERED_WARNING)
        else {
            return;
        };
        if let Some(suppressed) = self.warnings.allow() {
            tracing::warn!(
                worker,
                suppressed,
                waited_seconds = waited.as_secs_f64(),
                "an offset commit has not been answered: the group coordinator may be \
                 unreachable; reading goes on, the group's committed offsets wait"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_unanswered_commit_is_the_wait() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut commits = UnansweredCommits::default();
        assert_eq!(commits.oldest_wait(at(0)), None);
        commits.sent(at(0));
        commits.sent(at(100));
        commits.sent(at(200));
        assert_eq!(
            commits.oldest_wait(at(300)),
            Some(Duration::from_millis(300))
        );
        // One answer: the second is now the oldest.
        commits.answered(1);
        assert_eq!(
            commits.oldest_wait(at(300)),
            Some(Duration::from_millis(200))
        );
        // The same count again changes nothing; more answers than commits empty it.
        commits.answered(1);
        assert_eq!(
            commits.oldest_wait(at(300)),
            Some(Duration::from_millis(200))
        );
        commits.answered(5);
        assert_eq!(commits.oldest_wait(at(300)), None);
        // A commit sent after is counted from its own send.
        commits.sent(at(400));
        assert_eq!(
            commits.oldest_wait(at(450)),
            Some(Duration::from_millis(50))
        );
    }
}
