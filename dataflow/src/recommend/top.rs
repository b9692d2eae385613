//! Each key's first `k` values ranked by a count, kept up to date as the counts change: a
//! hand-made structure where differential's `reduce` (and `count` before it) measured too slow.
//!
//! A `reduce` reads a key's whole group whenever one of its values changes. The neighbours of a
//! popular item come from tens of thousands of partners, and the popularity order from every
//! item; even split into 64 buckets first (a top per bucket, then of the buckets' winners), a
//! message of the bench workload, which replaces a user's window of 10 items, made the two
//! reduces read ~100,000 values (docs/performance.md). Here a batch's changes of a key are
//! merged with the key's sorted counts (a value of count 1 is 4 bytes, copied in order, not
//! a tuple with its times to consolidate), the key's strongest values stay ordered as the
//! changes come, and only the keys changed in an epoch have their first `k` compared.
//!
//! [`TopByCount`] serves both: the neighbours (c(a, b), counted from the window changes by
//! [`super::covisit`]) and each worker's part of the popularity order (one key, the items
//! ranked by n(x), in [`super::scores::popular_order`]). Keys and values are numbered by the
//! worker, and a key keeps in order only its strongest values, not all of them: this is the
//! recommendations' largest state.

use super::intern::Interner;

/// Each key's first `k` values ranked by count (descending, ties by value ascending), kept as
/// the counts change: the co-visits' state, c(a, b) for every pair and each item's neighbours.
///
/// Keys and values are of one kind (items) and held under one worker-local numbering
/// ([`Interner`], whose ids break ties). Each (key, value) count is kept once, in sorted
/// arrays by key, and each key keeps in order only its strongest values (`Counted`): the
/// recommendations' largest state. Replaces `count` followed by a top-K `reduce`, which kept
/// every pair three times and read a popular item's whole group on every change
/// (docs/performance.md, "co-visitation without the self-join"). Changes come in batches, in
/// any order within an epoch ([`TopByCount::apply`]); [`TopByCount::end_epoch`] then compares
/// the touched keys' first `k` before and after.
#[derive(Debug)]
pub struct TopByCount {
    k: usize,
    /// How many of a key's strongest values it keeps in order: `k` and as many again, so that
    /// a key whose first `k` lose values to decrements rarely has to scan all its counts again.
    kept: usize,
    /// By the key's number.
    keys: Vec<Counted>,
    /// The keys the epoch being applied touched, each with where its first `k` as before the
    /// epoch are in `before`.
    touched: Vec<(u32, std::ops::Range<usize>)>,
    before: Vec<(u32, u32)>,
    /// One key's changes of a batch, by value, consolidated.
    merging: Vec<(u32, i32)>,
    /// Where a key's merged counts are built before they are copied back.
    scratch: Scratch,
}

impl TopByCount {
    /// Keeps the first `k` values of each key.
    pub fn new(k: usize) -> Self {
        TopByCount {
            k,
            kept: 2 * k.max(1),
            keys: Vec::new(),
            touched: Vec::new(),
            before: Vec::new(),
            merging: Vec::new(),
            scratch: Scratch::default(),
        }
    }

    /// Applies a batch of changes (key, value, change of the count), in any order, and leaves
    /// `changes` empty; `values` names the numbers.
    ///
    /// The batch is sorted by key, and each key's changes by value, so that a key's counts are
    /// merged with its changes in one pass over its sorted arrays, read and written in order.
    /// A count of 1 then takes 4 bytes and a quarter more of room, where a hash set per key
    /// took ~8 and a cache miss or two per change (docs/performance.md, "counts merged by
    /// key").
    pub fn apply<V: Ord>(&mut self, changes: &mut Vec<(u32, u32, i32)>, values: &Interner<V>) {
        radsort::sort_by_key(changes, |(key, _, _)| *key);
        if let Some(&(last, _, _)) = changes.last() {
            let len = last as usize + 1;
            if self.keys.len() < len {
                // Grown by a quarter, not doubled: a slot is 80 bytes, and there is one for
                // every item.
                self.keys.reserve_exact(len + len / 4 - self.keys.len());
                self.keys.resize_with(len, Counted::default);
            }
        }
        // A few keys at a time: their slots and the start of their arrays read first, in a
        // loop that does nothing with what it loads, so that those cache misses overlap; the
        // merges that follow find them in cache, where each merge waited for its own
        // (`perf annotate`: a quarter of this function's samples on those loads).
        let mut groups = changes.chunk_by_mut(|x, y| x.0 == y.0);
        let mut slice: Vec<&mut [(u32, u32, i32)]> = Vec::with_capacity(TOUCH_AHEAD);
        loop {
            slice.extend(groups.by_ref().take(TOUCH_AHEAD));
            if slice.is_empty() {
                break;
            }
            self.touch(slice.iter().map(|group| group[0].0));
            for group in slice.drain(..) {
                self.apply_key(group, values);
            }
        }
        changes.clear();
    }

    /// Reads the slots of `keys` and the first entries of their arrays (see [`Self::apply`]).
    fn touch(&self, keys: impl Iterator<Item = u32>) {
        let mut sum = 0u32;
        for key in keys {
            let counted = &self.keys[key as usize];
            sum = sum.wrapping_add(counted.ones.first().copied().unwrap_or(0));
            sum = sum.wrapping_add(counted.counts.first().map_or(0, |(value, _)| *value));
            sum = sum.wrapping_add(counted.top.first().map_or(0, |(_, value)| *value));
        }
        std::hint::black_box(sum);
    }

    /// Applies one key's changes of a batch (sorted by key, so all of the key's).
    fn apply_key<V: Ord>(&mut self, group: &mut [(u32, u32, i32)], values: &Interner<V>) {
        group.sort_unstable_by_key(|(_, value, _)| *value);
        let merging = &mut self.merging;
        merging.clear();
        for &(_, value, diff) in group.iter() {
            match merging.last_mut() {
                Some((last, sum)) if *last == value => *sum = sum.saturating_add(diff),
                _ => merging.push((value, diff)),
            }
        }
        merging.retain(|(_, diff)| *diff != 0);
        if merging.is_empty() {
            return;
        }
        let key = group[0].0 as usize;
        let counted = &mut self.keys[key];
        if !counted.touched {
            counted.touched = true;
            let start = self.before.len();
            self.before.extend_from_slice(counted.first(self.k));
            self.touched.push((key as u32, start..self.before.len()));
        }
        counted.merge(merging, self.kept, values, &mut self.scratch);
    }

    /// Ends the epoch: for each key whose first `k` it changed, `emit(key, changed)`, where
    /// `changed` holds (value, count) for each value whose place in them changed: its count
    /// now, or 0 for a value that left them.
    pub fn end_epoch<V: Ord>(
        &mut self,
        values: &Interner<V>,
        mut emit: impl FnMut(u32, &[(u32, u32)]),
    ) {
        let mut changed: Vec<(u32, u32)> = Vec::new();
        let touched = std::mem::take(&mut self.touched);
        for (at, (key, range)) in touched.iter().cloned().enumerate() {
            // The keys a few places on read ahead, as in `apply`: at full scale an epoch
            // touches most keys, and the first ones' lines are gone by its end.
            if at % TOUCH_AHEAD == 0 {
                let ahead = touched[at..].iter().take(TOUCH_AHEAD);
                self.touch(ahead.map(|(key, _)| *key));
            }
            let counted = &mut self.keys[key as usize];
            counted.touched = false;
            counted.refill_below(self.k, self.kept, values, &mut self.scratch.ranked);
            let (was, now) = (&self.before[range], counted.first(self.k));
            // What is the same at the same place from either end is unchanged: a change
            // usually moves a value a place or two, and only the rest is compared entry by
            // entry (K² comparisons for all of it: ~5% of the dataflow's time at K = 20).
            // (Values are distinct within each list, so an entry left out cannot match one
            // compared.)
            let same_start = was.iter().zip(now).take_while(|(x, y)| x == y).count();
            let (was, now) = (&was[same_start..], &now[same_start..]);
            let same_end = was
                .iter()
                .rev()
                .zip(now.iter().rev())
                .take_while(|(x, y)| x == y)
                .count();
            let (was, now) = (&was[..was.len() - same_end], &now[..now.len() - same_end]);
            if was.is_empty() && now.is_empty() {
                continue;
            }
            changed.clear();
            for &(count, value) in now.iter().filter(|x| !was.contains(x)) {
                changed.push((value, count));
            }
            for &(_, value) in was.iter().filter(|(_, v)| !now.iter().any(|(_, x)| x == v)) {
                changed.push((value, 0));
            }
            emit(key, &changed);
        }
        self.touched = touched;
        self.touched.clear();
        self.before.clear();
    }

    /// The first `k` values of `key`, strongest first, as (count, value).
    #[cfg(test)]
    fn first(&self, key: u32) -> &[(u32, u32)] {
        self.keys
            .get(key as usize)
            .map_or(&[], |counted| counted.first(self.k))
    }
}

/// How many keys [`TopByCount::apply`] and [`TopByCount::end_epoch`] read ahead: enough for
/// their misses to overlap, few enough that what they read is still in cache when used.
const TOUCH_AHEAD: usize = 32;

/// A change of a count as [`TopByCount::apply`] takes it: a count beyond `i32` would need two
/// billion users holding one pair, and a change is 12 bytes, not 16, in the batches of
/// millions that the counts operator sorts.
pub fn count_change(diff: isize) -> i32 {
    diff.clamp(-(i32::MAX as isize), i32::MAX as isize) as i32
}

/// Where [`Counted::merge`] builds a key's arrays, and [`Counted::rebuild_top`] ranks them.
#[derive(Debug, Default)]
struct Scratch {
    ones: Vec<u32>,
    counts: Vec<(u32, i32)>,
    ranked: Vec<Ranked>,
}

/// A value as ranked in a rebuild: (count descending, order prefix, number).
type Ranked = (std::cmp::Reverse<u32>, u64, u32);

/// One key's values (by local number) with their counts, and its strongest values in order.
///
/// `ones` holds the values whose count is 1, sorted, and `counts` every other value whose
/// count is not zero, sorted by value: most pairs are held by one user (95% at full scale),
/// and such a value takes 4 bytes. Within an epoch, applied in batches, a retraction may come
/// in a batch before the insertion it cancels, so a count may be negative for a while. Only
/// positive counts rank.
///
/// `top` holds (count, number) of the key's strongest values, strongest first (count
/// descending, then the value ascending). The invariant: every value with a positive count not
/// in `top` ranks after every value in it, and when `complete`, `top` holds every such value.
/// A change moves its value within `top`, or into it when it now ranks before `top`'s last, or
/// out of it when, no longer complete, it falls to the end (a value outside might now rank
/// before it). When the first `k` are no longer all known, [`Counted::refill_below`] reads
/// every count once to rebuild `top`: a popular item's first values have counts far above the
/// rest, so that is rare where it is costly.
#[derive(Debug, Default)]
struct Counted {
    ones: Vec<u32>,
    counts: Vec<(u32, i32)>,
    top: Vec<(u32, u32)>,
    complete: bool,
    /// Whether the epoch being applied has changed it.
    touched: bool,
}

/// Room for one more entry in `vec`, which never holds more than `most`: grown by doubling
/// (from 4), but not past `most`, where doubling would give the next power of two. Many small
/// vectors of this kind (a key's `top`, a copy's neighbours of an item) are much of the
/// recommendations' memory.
pub(super) fn make_room<T>(vec: &mut Vec<T>, most: usize) {
    if vec.len() == vec.capacity() {
        let room = vec.len().max(4).min(most.saturating_sub(vec.len()));
        vec.reserve_exact(room.max(1));
    }
}

/// Sets `vec` to `from`, with room for a quarter more (a count array grows a little most
/// epochs), given back when it holds less than half of its room.
fn copy_with_room<T: Copy>(vec: &mut Vec<T>, from: &[T]) {
    vec.clear();
    let room = from.len() + from.len() / 4;
    if from.len() > vec.capacity() || room < vec.capacity() / 2 {
        vec.shrink_to(0);
        vec.reserve_exact(room);
    }
    vec.extend_from_slice(from);
}

/// The number of `sorted`'s first elements for which `before` holds (it holds for a prefix),
/// as `partition_point` gives it, searched from the start outward: 1, 2, 4, ... elements on,
/// then by halves within the last step. A merge's next change is usually a few values past the
/// last (at full scale a batch changes one value in ~16), so this reads a cache line or two
/// where a binary search over the whole rest of a large key started with a miss at each halving:
/// that search was ~37% of `TopByCount::apply`'s samples (docs/performance.md).
fn gallop<T>(sorted: &[T], before: impl Fn(&T) -> bool) -> usize {
    // Every element before `known` holds; `step` is how far past it the next look goes.
    let (mut known, mut step) = (0, 1);
    while known < sorted.len() && before(&sorted[known]) {
        known += 1;
        let next = known + step;
        if next > sorted.len() || !before(&sorted[next - 1]) {
            return known + sorted[known..next.min(sorted.len())].partition_point(&before);
        }
        known = next;
        step *= 2;
    }
    known
}

/// Whether `x` ranks before `y`: count descending, then value ascending.
fn ranks_before<V: Ord>(x: (u32, u32), y: (u32, u32), values: &Interner<V>) -> bool {
    x.0 > y.0 || (x.0 == y.0 && values.cmp(x.1, y.1).is_lt())
}

impl Counted {
    /// The first `k` values, strongest first.
    fn first(&self, k: usize) -> &[(u32, u32)] {
        &self.top[..k.min(self.top.len())]
    }

    /// Adds each change, (value's number, change of its count), sorted by number and each
    /// number once, to the counts, and keeps `top` (at most `kept` long) as its invariant says.
    fn merge<V: Ord>(
        &mut self,
        changes: &[(u32, i32)],
        kept: usize,
        values: &Interner<V>,
        scratch: &mut Scratch,
    ) {
        scratch.ones.clear();
        scratch.counts.clear();
        // A key that holds all its values in `top` and gets changes for a good part of them
        // ranks them all again at the end: each value's prefix is then read once, where moving
        // each change in `top` compared it with several others, a cache miss each (at the
        // bench's scale most keys are complete and their counts tie at 1).
        let rebuild = self.complete && changes.len() * 4 >= self.ones.len() + self.counts.len();
        // The counts before `number` are in `scratch`, the rest from `ones[i..]`, `counts[j..]`.
        let (mut i, mut j) = (0, 0);
        for &(number, diff) in changes {
            if scratch.ones.is_empty()
                && scratch.counts.is_empty()
                && i == self.ones.len()
                && j == self.counts.len()
            {
                // A new key (or one that had lost every value) holds all of its no values.
                self.complete = true;
            }
            let run = gallop(&self.ones[i..], |x| *x < number);
            scratch.ones.extend_from_slice(&self.ones[i..i + run]);
            i += run;
            let run = gallop(&self.counts[j..], |(x, _)| *x < number);
            scratch.counts.extend_from_slice(&self.counts[j..j + run]);
            j += run;
            let old = if self.ones.get(i) == Some(&number) {
                i += 1;
                1
            } else if let Some(&(_, count)) = self.counts.get(j).filter(|(x, _)| *x == number) {
                j += 1;
                count
            } else {
                0
            };
            let new = old.saturating_add(diff);
            match new {
                0 => {}
                1 => scratch.ones.push(number),
                _ => scratch.counts.push((number, new)),
            }
            if !rebuild {
                self.rerank(number, old, new, kept, values);
            }
        }
        scratch.ones.extend_from_slice(&self.ones[i..]);
        scratch.counts.extend_from_slice(&self.counts[j..]);
        copy_with_room(&mut self.ones, &scratch.ones);
        copy_with_room(&mut self.counts, &scratch.counts);
        if rebuild {
            self.rebuild_top(kept, values, &mut scratch.ranked);
        }
    }

    /// Moves the value numbered `number`, whose count went from `old` to `new`, in `top`.
    fn rerank<V: Ord>(
        &mut self,
        number: u32,
        old: i32,
        new: i32,
        kept: usize,
        values: &Interner<V>,
    ) {
        // A value in `top` ranks no later than its last (the invariant): one comparison spares
        // the search for most values of a popular item.
        let was_in_top = old > 0
            && self
                .top
                .last()
                .is_some_and(|last| !ranks_before(*last, (old as u32, number), values));
        if was_in_top {
            if let Some(at) = self.top.iter().position(|(_, n)| *n == number) {
                self.top.remove(at);
            }
        }
        if new <= 0 {
            return;
        }
        let entry = (new as u32, number);
        // Most changes are of values far down a long list: one comparison with the last of
        // `top` settles them, before any search.
        if !self.complete
            && self
                .top
                .last()
                .is_none_or(|last| ranks_before(*last, entry, values))
        {
            return;
        }
        let at = self
            .top
            .partition_point(|x| ranks_before(*x, entry, values));
        // Outside `top`, a value that ranks after its last may rank after values outside too.
        if at < self.top.len() || self.complete {
            // A full `top` of K = 20 holds 41 entries for a moment.
            make_room(&mut self.top, kept + 1);
            self.top.insert(at, entry);
            if self.top.len() > kept {
                self.top.pop();
                self.complete = false;
            }
        }
    }

    /// Rebuilds `top` from every count when fewer than `k` of its first values are known.
    fn refill_below<V: Ord>(
        &mut self,
        k: usize,
        kept: usize,
        values: &Interner<V>,
        ranked: &mut Vec<Ranked>,
    ) {
        if !self.complete && self.top.len() < k {
            self.rebuild_top(kept, values, ranked);
        }
    }

    /// Ranks every positive count: `top` becomes the first `kept`, complete if there are no
    /// more. Each value's order prefix is read once, into `ranked`, and the ids are compared
    /// only where prefixes are equal.
    fn rebuild_top<V: Ord>(&mut self, kept: usize, values: &Interner<V>, ranked: &mut Vec<Ranked>) {
        use std::cmp::Reverse;
        ranked.clear();
        ranked.extend(
            self.ones
                .iter()
                .map(|&number| (Reverse(1), values.prefix(number), number)),
        );
        ranked.extend(
            self.counts
                .iter()
                .filter(|(_, count)| *count > 0)
                .map(|&(number, count)| (Reverse(count as u32), values.prefix(number), number)),
        );
        let order = |x: &Ranked, y: &Ranked| {
            (x.0, x.1)
                .cmp(&(y.0, y.1))
                .then_with(|| values.cmp(x.2, y.2))
        };
        self.complete = ranked.len() <= kept;
        if !self.complete {
            ranked.select_nth_unstable_by(kept - 1, order);
            ranked.truncate(kept);
        }
        ranked.sort_unstable_by(order);
        self.top.clear();
        // Room for what it holds, and not more: a rebuild of a popular item reads every count.
        if self.top.capacity() > kept + 1 {
            self.top.shrink_to(kept + 1);
        }
        self.top.reserve_exact(ranked.len());
        self.top.extend(
            ranked
                .iter()
                .map(|&(Reverse(count), _, number)| (count, number)),
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::cmp::Reverse;
    use std::collections::BTreeMap;

    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::recommend::test_histories::set_count;

    type Record = (u32, u32);
    type Epochs = Vec<Vec<(Record, isize)>>;

    /// Twelve epochs of `per_epoch` random updates of records from `keys` × `values`: a
    /// retraction of a present record with probability `retract`, else an insertion; and the
    /// multiset after each epoch.
    fn random_epochs(
        seed: u64,
        per_epoch: usize,
        (keys, values): (u32, u32),
        retract: f64,
    ) -> (Epochs, Vec<BTreeMap<Record, isize>>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut state: BTreeMap<Record, isize> = BTreeMap::new();
        let mut epochs = Vec::new();
        let mut states = Vec::new();
        for _ in 0..12 {
            let mut updates = Vec::new();
            for _ in 0..per_epoch {
                let record = (rng.random_range(0..keys), rng.random_range(0..values));
                let present = state.get(&record).copied().unwrap_or(0);
                let diff = if present > 0 && rng.random_bool(retract) {
                    -1
                } else {
                    1
                };
                *state.entry(record).or_insert(0) += diff;
                updates.push((record, diff));
            }
            epochs.push(updates);
            states.push(state.clone());
        }
        (epochs, states)
    }

    /// The first `k` of each key's present values, ranked by `rank(count, value)`, by brute
    /// force.
    fn expected<R: Ord + Clone>(
        state: &BTreeMap<Record, isize>,
        k: usize,
        rank: impl Fn(u64, u32) -> R,
    ) -> BTreeMap<(u32, R), isize> {
        let mut by_key: BTreeMap<u32, Vec<R>> = BTreeMap::new();
        for (&(key, value), &count) in state {
            if count > 0 {
                by_key
                    .entry(key)
                    .or_default()
                    .push(rank(count as u64, value));
            }
        }
        by_key
            .into_iter()
            .flat_map(|(key, mut ranks)| {
                ranks.sort();
                ranks.into_iter().take(k).map(move |r| ((key, r), 1))
            })
            .collect()
    }

    #[test]
    fn gallop_finds_what_partition_point_finds() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for len in [0usize, 1, 2, 3, 5, 8, 17, 64, 100, 1000] {
            for _ in 0..20 {
                let mut sorted: Vec<u32> = (0..len).map(|_| rng.random_range(0..2000)).collect();
                sorted.sort_unstable();
                // Every threshold from below the first to past the last, and each value itself.
                for threshold in (0..=2001).step_by(7).chain(sorted.iter().copied()) {
                    assert_eq!(
                        gallop(&sorted, |x| *x < threshold),
                        sorted.partition_point(|x| *x < threshold),
                        "len {len}, threshold {threshold}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_keys_first_values_stay_exact_through_every_change() {
        // One key, values 0..30, counts walking up and down a few changes at a time: after each
        // merge (and the refill an epoch ends with) the first k of the positive counts are
        // those of brute force.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let mut values: Interner<u32> = Interner::default();
        for value in (0..30).rev() {
            values.number(&value);
        }
        let (k, kept) = (2, 4);
        let mut counted = Counted::default();
        let mut scratch = Scratch::default();
        let mut counts: BTreeMap<u32, isize> = BTreeMap::new();
        for step in 0..20_000 {
            // Up to four changes, merged as one key's part of a batch: by number, each once.
            let mut changes: BTreeMap<u32, i32> = BTreeMap::new();
            for _ in 0..rng.random_range(1..=4) {
                let value = rng.random_range(0..30u32);
                let present = counts.get(&value).copied().unwrap_or(0);
                // Sometimes a retraction of an absent value: within an epoch, applied in
                // batches, a count may go below zero before its insertion comes.
                let retract = if present > 0 { 0.5 } else { 0.1 };
                let diff = if rng.random_bool(retract) { -1 } else { 1 };
                *counts.entry(value).or_insert(0) += diff as isize;
                *changes.entry(values.number(&value)).or_insert(0) += diff;
            }
            let changes: Vec<(u32, i32)> = changes.into_iter().filter(|(_, d)| *d != 0).collect();
            counted.merge(&changes, kept, &values, &mut scratch);
            counted.refill_below(k, kept, &values, &mut scratch.ranked);
            assert!(counted.ones.is_sorted() && counted.counts.is_sorted());
            let mut expected: Vec<(Reverse<isize>, u32)> = counts
                .iter()
                .filter(|(_, count)| **count > 0)
                .map(|(value, count)| (Reverse(*count), *value))
                .collect();
            expected.sort();
            expected.truncate(k);
            let actual: Vec<(Reverse<isize>, u32)> = counted
                .first(k)
                .iter()
                .map(|(count, number)| (Reverse(*count as isize), *values.value(*number)))
                .collect();
            assert_eq!(actual, expected, "step {step}");
        }
    }

    #[test]
    fn keeps_each_keys_first_values_by_count_over_random_epochs() {
        // From a small pool, so that counts grow, tie and fall back to zero; and from a pool
        // larger than the values a key keeps in order (2·k), so that keys lose their first
        // values to decrements and read all their counts again. Batches are cut after an update
        // with probability `cut`: the rarer, the more keys a batch holds (the last case's hold
        // ~100, so that `apply` reads them ahead in several slices of `TOUCH_AHEAD`).
        for (seed, per_epoch, pool, retract, cut) in [
            (11, 60, (4, 8), 0.4, 0.05),
            (13, 400, (3, 40), 0.45, 0.05),
            (17, 3000, (200, 30), 0.4, 0.005),
        ] {
            by_count_matches_brute_force(seed, per_epoch, pool, retract, cut);
        }
    }

    fn by_count_matches_brute_force(
        seed: u64,
        per_epoch: usize,
        pool: (u32, u32),
        retract: f64,
        cut: f64,
    ) {
        let (epochs, states) = random_epochs(seed, per_epoch, pool, retract);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        // Numbers in the reverse of the values' order, so that a tie broken by number fails.
        let mut values: Interner<u32> = Interner::default();
        for value in (0..pool.0.max(pool.1)).rev() {
            values.number(&value);
        }
        let mut top = TopByCount::new(3);
        // What the emitted changes say each key's first values are: value → count.
        let mut output: BTreeMap<u32, BTreeMap<u32, u64>> = BTreeMap::new();
        for (epoch, (updates, state)) in epochs.iter().zip(&states).enumerate() {
            // In an arrival order of their own: a retraction may come before its insertion.
            let mut updates = updates.clone();
            for i in (1..updates.len()).rev() {
                updates.swap(i, rng.random_range(0..=i));
            }
            // In batches of random sizes, as the counts operator bounds them.
            let mut batch = Vec::new();
            for ((key, value), diff) in updates {
                batch.push((
                    values.number(&key),
                    values.number(&value),
                    count_change(diff),
                ));
                if rng.random_bool(cut) {
                    top.apply(&mut batch, &values);
                }
            }
            top.apply(&mut batch, &values);
            top.end_epoch(&values, |key, changed| {
                let first = output.entry(*values.value(key)).or_default();
                assert!(!changed.is_empty(), "a key is emitted only when it changed");
                for &(value, count) in changed {
                    set_count(first, values.value(value), u64::from(count));
                }
            });
            let actual: BTreeMap<(u32, (Reverse<u64>, u32)), isize> = output
                .iter()
                .flat_map(|(key, first)| {
                    first
                        .iter()
                        .map(move |(value, count)| ((*key, (Reverse(*count), *value)), 1))
                })
                .collect();
            let expected = expected(state, 3, |count, value| (Reverse(count), value));
            assert_eq!(actual, expected, "epoch {epoch}");
            for key in 0..pool.0 {
                let first: Vec<(Reverse<u64>, u32)> = top
                    .first(values.number(&key))
                    .iter()
                    .map(|(count, value)| (Reverse(u64::from(*count)), *values.value(*value)))
                    .collect();
                let listed: Vec<(Reverse<u64>, u32)> = actual
                    .keys()
                    .filter(|(k, _)| *k == key)
                    .map(|(_, ranked)| *ranked)
                    .collect();
                assert_eq!(first, listed, "key {key} at epoch {epoch}");
            }
        }
    }
}
