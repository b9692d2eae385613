//! The history order and window of semantics §1 and the truncation of §4.

use std::cmp::Ordering;
use std::ops::Range;

/// Orders history entries `(timestamp, item_id)`: by timestamp, ties broken by item_id compared as
/// a byte string, as the original system sorted them.
pub fn history_order(a: (u64, &str), b: (u64, &str)) -> Ordering {
    a.0.cmp(&b.0)
        .then_with(|| a.1.as_bytes().cmp(b.1.as_bytes()))
}

/// `history(user, at)`: given a user's entries sorted by [`history_order`], the positions of the
/// last `max_history` of those whose timestamp is `<= at`. A range, so that columnar stores can
/// pick the same rows from each column.
pub fn history_window<T>(
    sorted: &[T],
    at: u64,
    max_history: usize,
    timestamp_of: impl Fn(&T) -> u64,
) -> Range<usize> {
    let end = sorted.partition_point(|entry| timestamp_of(entry) <= at);
    end.saturating_sub(max_history)..end
}

/// The last `max_history` items of a history, which is all a profile keeps (semantics §4).
pub fn keep_last<T>(history: &[T], max_history: usize) -> &[T] {
    &history[history.len().saturating_sub(max_history)..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_in_time_go_by_item_bytes() {
        let mut rows = vec![(5, "b"), (3, "z"), (5, "B"), (5, "a"), (9, "a")];
        rows.sort_by(|x, y| history_order(*x, *y));
        assert_eq!(rows, vec![(3, "z"), (5, "B"), (5, "a"), (5, "b"), (9, "a")]);
    }

    #[test]
    fn window_keeps_the_newest_up_to_the_time() {
        let rows = [(1, "a"), (2, "b"), (2, "c"), (3, "d"), (7, "e")];
        let ts = |r: &(u64, &str)| r.0;
        assert_eq!(history_window(&rows, 2, 50, ts), 0..3);
        assert_eq!(history_window(&rows, 2, 2, ts), 1..3);
        assert_eq!(history_window(&rows, 6, 50, ts), 0..4);
        assert!(history_window(&rows, 0, 50, ts).is_empty());
        assert_eq!(history_window(&rows, u64::MAX, 1, ts), 4..5);
        assert!(history_window(&rows, 9, 0, ts).is_empty());
    }
}
