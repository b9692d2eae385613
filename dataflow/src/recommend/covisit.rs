//! Co-visitation (semantics §8) as collections, maintained incrementally from the interest
//! collection as histories slide and are replaced:
//!
//! ```text
//! interests ─▶ window changes (left, stayed, entered) ─to each owner of an item─▶ counts
//!   counts: n(a) and c(a, b) of the items a this worker owns ─▶ n(x), neighbours(a) (top K)
//! ```
//!
//! The window of a user is the set of the distinct items of its last W history positions (see
//! [`super::reference`] for the rules). The pairs are the self-join of the windows on user;
//! when a window slides by d items, only the 2·d·(W − 1) pairs that touch an item that left or
//! entered it change, so an update costs O(d·W), not O(W²). Where a user's old and new values
//! meet, `window_changes` reduces them to what left, stayed and entered, and sends that one
//! record to each worker that owns one of its items; there `covisit_counts` applies the
//! pairs it implies to the counts of the items it owns.
//!
//! Item ids travel between workers as they are, [`SmolStr`] (inline up to 23 bytes): the
//! contract breaks ties between neighbours by the ids' bytes, which a hash would lose, and
//! users and items of every worker meet here, where one worker's numbers mean nothing to
//! another. Each operator numbers the ids it keeps for itself ([`super::intern`]).
//!
//! Each item's neighbours are its top K partners by (c desc, id asc). A popular item has tens of
//! thousands of partners, and a `reduce` reads its whole group whenever one of them changes;
//! [`TopByCount`] keeps each pair's count once, as two worker-local numbers and a count, with
//! only each item's strongest partners in order, and compares only the changed items' first K
//! (docs/performance.md has the measurements that replaced the self-join, `count` and
//! `reduce`, the string-keyed ordered sets, then the pairs sent between workers).

use std::time::{Duration, Instant};

use differential_dataflow::{AsCollection, Hashable, VecCollection};
use smol_str::SmolStr;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::core::OkErr;
use timely::dataflow::operators::Operator;
use timely::dataflow::Stream;

use super::intern::Interner;
use super::top::{count_change, TopByCount};
use super::{add_cost, CostBoard, Stage};
use crate::model::UserInterest;
use crate::pending::PendingEpochs;

/// The sizes of §8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CovisitParams {
    /// W: the history positions, newest first, whose items form a user's window.
    pub window: usize,
    /// K: neighbours kept per item.
    pub neighbours: usize,
}

/// How items changed in an epoch, as one worker's counts operator sends them: for each changed
/// item, n(item), and its neighbours (its K strongest partners by c desc, then id asc): each
/// partner whose place among them changed, with c(item, partner) now, or 0 for a partner that
/// left them. One entry per changed item and epoch, so that a worker applying it looks the
/// item up once, and a changed count is one entry, not a retraction and an insertion
/// (docs/performance.md, "window changes instead of pairs"). Up to [`ITEMS_PER_RECORD`] items
/// share a record, their partners in one vector: the records are cloned to every worker, and
/// one record an item took three allocations each time.
///
/// Items are named by the numbers of the worker that sent the record (`source`): each record
/// carries the ids of the numbers it is the first of its source's records to name. A source
/// sends its epochs in order, so a number's name comes with a record of the epoch of its first
/// use or an earlier one; a receiver learns the names of every record up to an epoch before it
/// reads any of that epoch's ([`SourceNumbers`]): it learns each record's names as it arrives
/// (a number never changes its name), and reads an epoch's records once its input has passed
/// the epoch. (Not in arrival order: timely sorts the containers waiting at an exchange by
/// time, and does not keep the order of those of one time.) So an id crosses to
/// each worker once, and a receiver maps a number with an index, not by hashing and comparing
/// the id (docs/performance.md, "item changes in the sender's numbers").
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ItemChanges {
    /// The worker whose counts operator sent it, whose numbers it uses.
    pub source: u32,
    /// (number, id) of each number first named by this record.
    pub names: Vec<(u32, SmolStr)>,
    pub items: Vec<ItemChange>,
    /// The items' partners, one item's after the other: (partner, c(item, partner) now, 0 if
    /// it is no longer a neighbour).
    pub partners: Vec<(u32, u32)>,
}

/// One item's entry in [`ItemChanges`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ItemChange {
    pub item: u32,
    /// n(item) now, if the epoch changed it (0: no window holds it any more).
    pub users: Option<u64>,
    /// Where its partners end in [`ItemChanges::partners`] (they begin where the previous
    /// item's end).
    pub partners_end: u32,
}

/// The most items in one [`ItemChanges`]: a record is cloned whole to every worker. Small in
/// the tests, so that an epoch's changes span several records.
#[cfg(not(test))]
pub const ITEMS_PER_RECORD: usize = 1024;
#[cfg(test)]
pub const ITEMS_PER_RECORD: usize = 3;

impl ItemChanges {
    /// An empty record of `source`.
    pub(crate) fn new(source: u32) -> Self {
        ItemChanges {
            source,
            names: Vec::new(),
            items: Vec::new(),
            partners: Vec::new(),
        }
    }

    /// Adds `item`'s change, n(item) if it changed and its partners' (see [`ItemChange`]).
    pub(crate) fn push(&mut self, item: u32, users: Option<u64>, partners: &[(u32, u32)]) {
        self.partners.extend_from_slice(partners);
        self.items.push(ItemChange {
            item,
            users,
            partners_end: self.partners.len() as u32,
        });
    }

    /// Each item's change with its partners.
    pub fn each(&self) -> impl Iterator<Item = (&ItemChange, &[(u32, u32)])> {
        let mut ranges = PartnerRanges::default();
        self.items
            .iter()
            .map(move |change| (change, &self.partners[ranges.next(change.partners_end)]))
    }
}

/// Where each item's partners are in a vector of partners laid one item's after the other,
/// given each item's end in turn: [`ItemChanges`] and the copies' waiting epochs store them so.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PartnerRanges {
    start: usize,
}

impl PartnerRanges {
    /// The range of the next item, whose partners end at `end`.
    pub(crate) fn next(&mut self, end: u32) -> std::ops::Range<usize> {
        let range = self.start..end as usize;
        self.start = range.end;
        range
    }
}

/// What the numbers of each source's [`ItemChanges`] stand for on a receiver: `T` is the
/// receiver's own name of the item (its number, or the id), learned from the records' names:
/// those of every record up to an epoch before any of that epoch's is read.
#[derive(Debug)]
pub struct SourceNumbers<T> {
    by_source: Vec<Vec<Option<T>>>,
}

impl<T> Default for SourceNumbers<T> {
    fn default() -> Self {
        SourceNumbers {
            by_source: Vec::new(),
        }
    }
}

impl<T: Clone> SourceNumbers<T> {
    /// Learns the names `changes` gives, each as `name` turns the id into the receiver's.
    pub fn learn(&mut self, changes: &ItemChanges, mut name: impl FnMut(&SmolStr) -> T) {
        let source = changes.source as usize;
        if self.by_source.len() <= source {
            self.by_source.resize_with(source + 1, Vec::new);
        }
        let numbers = &mut self.by_source[source];
        for (number, id) in &changes.names {
            let at = *number as usize;
            if numbers.len() <= at {
                numbers.resize(at + 1, None);
            }
            numbers[at] = Some(name(id));
        }
    }

    /// What `source`'s `number` stands for, once a record has named it.
    ///
    /// # Panics
    /// If the number has not been named: a bug in the order of learning, not an input error.
    pub fn get(&self, source: u32, number: u32) -> T {
        self.by_source
            .get(source as usize)
            .and_then(|numbers| numbers.get(number as usize))
            .cloned()
            .flatten()
            .expect("an item number that its source has not named")
    }
}

/// The co-visitation: n(x) as a collection, and the changes of each item's n and neighbours.
pub struct Covisitation<'scope> {
    /// The sizes they were built with (the scores read the same windows).
    pub params: CovisitParams,
    /// (x, n(x)) for every item in some window.
    pub item_users: VecCollection<'scope, u64, (SmolStr, isize), isize>,
    /// The items' changes, each with its epoch: applied in epoch order from nothing, they give
    /// every item's n and K strongest partners as of an epoch.
    pub item_changes: Stream<'scope, u64, Vec<(ItemChanges, u64)>>,
}

impl std::fmt::Debug for Covisitation<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Covisitation").finish_non_exhaustive()
    }
}

/// A user's window: the distinct items of `history`'s last `window` positions, each with the
/// distance k of its newest occurrence from the newest item (0 for the newest), sorted by item.
///
/// A sorted vector, not an ordered map: it is built for every changed user twice (the old
/// window and the new) and once more for its list, and a map of ten entries cost an
/// allocation a node (~2% of the dataflow's time on the bench workload).
pub fn window_items<T: Ord>(
    history: impl DoubleEndedIterator<Item = T>,
    window: usize,
) -> Vec<(T, u32)> {
    let mut items: Vec<(T, u32)> = history
        .rev()
        .take(window)
        .enumerate()
        .map(|(k, item)| (item, k as u32))
        .collect();
    // By item, then k: the first of each item's run is its newest position, the one kept.
    items.sort_unstable_by(|(x, kx), (y, ky)| x.cmp(y).then(kx.cmp(ky)));
    items.dedup_by(|(later, _), (first, _)| later == first);
    items
}

/// Builds the co-visitation collections on the interest collection.
///
/// What the window changes and the counts cost each epoch is added to `cost`.
pub fn covisitation<'scope>(
    interests: &VecCollection<'scope, u64, UserInterest, isize>,
    params: CovisitParams,
    cost: &CostBoard,
) -> Covisitation<'scope> {
    let changes = window_changes(interests, params.window, cost.clone());
    covisit_counts(changes, params, cost.clone())
}

/// The worker that keeps `item`'s counts: its n(x), and c(a, b) for `item` as a.
///
/// Items are spread as differential spreads a reduce's keys, the same on every worker.
fn owner(item: &str, peers: usize) -> usize {
    (item.hashed() % peers as u64) as usize
}

/// How one user's window changed: the items that left it, those that stayed, those that
/// entered, in that order in `items` (each item once). A record of the change stream with
/// count `d` changes c(a, b) by `d` for each pair that touches an item that left or entered:
/// −d for the pairs of the old window (left × left, left × stayed, both ways), +d for those of
/// the new one, and n(x) by −d for what left and +d for what entered.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WindowChange {
    items: Vec<SmolStr>,
    left: u32,
    stayed: u32,
}

impl WindowChange {
    /// The change from window `old` to window `new`, each a set of items sorted ascending
    /// (as [`window_items`] gives them): one merge of the two.
    fn between(old: &[&str], new: &[&str]) -> Self {
        debug_assert!(old.is_sorted() && new.is_sorted());
        let (mut left, mut stayed, mut entered) = (Vec::new(), Vec::new(), Vec::new());
        let (mut i, mut j) = (0, 0);
        while i < old.len() || j < new.len() {
            // Where the next item of each stands: only `old`'s (Less), only `new`'s (Greater).
            let order = match (old.get(i), new.get(j)) {
                (Some(x), Some(y)) => x.cmp(y),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, _) => std::cmp::Ordering::Greater,
            };
            match order {
                std::cmp::Ordering::Equal => {
                    stayed.push(SmolStr::new(old[i]));
                    (i, j) = (i + 1, j + 1);
                }
                std::cmp::Ordering::Less => {
                    left.push(SmolStr::new(old[i]));
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    entered.push(SmolStr::new(new[j]));
                    j += 1;
                }
            }
        }
        let (left_len, stayed_len) = (left.len() as u32, stayed.len() as u32);
        left.append(&mut stayed);
        left.append(&mut entered);
        WindowChange {
            items: left,
            left: left_len,
            stayed: stayed_len,
        }
    }

    /// Whether the window is the same before and after.
    fn is_empty(&self) -> bool {
        self.items.len() == self.stayed as usize
    }
}

/// Window changes as they travel: ((the worker it is sent to, change), time, count).
type ChangeStream<'scope> = Stream<'scope, u64, Vec<((usize, WindowChange), u64, isize)>>;

/// The window changes of the users' updates, each sent to every worker that owns one of its
/// items ([`owner`]): ((worker, change), time, count), for an exchange by worker.
///
/// Computed where a user's values meet: a user has one interest value at a time, and the
/// interest operator emits a changed user's retraction and insertion together, so the updates
/// of one user and time in an input batch are read as one change from the old window to the
/// new; any other grouping (a user's updates split over batches, say) is sent as whole windows
/// removed and inserted, which count to the same. A change is one record of its ~20 ids for
/// each worker it concerns, where the pairs it implies, 2·d·(W − 1) for a slide of d items,
/// are counted. Sending those pairs themselves (~160 a message at full scale, 64 bytes each)
/// and numbering both ids of each on arrival cost more than the counting (docs/performance.md,
/// "window changes instead of pairs").
fn window_changes<'scope>(
    interests: &VecCollection<'scope, u64, UserInterest, isize>,
    window: usize,
    cost: CostBoard,
) -> ChangeStream<'scope> {
    let peers = interests.inner.scope().peers();
    interests
        .inner
        .clone()
        .unary(Pipeline, "WindowChanges", move |_, _| {
            let mut changes: Vec<(WindowChange, isize)> = Vec::new();
            let mut targets: Vec<bool> = vec![false; peers];
            move |input, output| {
                input.for_each(|capability, records| {
                    let started = Instant::now();
                    records.sort_unstable_by(|(x, tx, _), (y, ty, _)| {
                        (tx, &x.user_id).cmp(&(ty, &y.user_id))
                    });
                    let first_time = records.first().map_or(0, |(_, time, _)| *time);
                    let mut session = output.session(&capability);
                    for group in records
                        .chunk_by(|(x, tx, _), (y, ty, _)| tx == ty && x.user_id == y.user_id)
                    {
                        let time = group[0].1;
                        user_changes(group, window, &mut changes);
                        for (change, diff) in changes.drain(..) {
                            targets.fill(false);
                            for item in &change.items {
                                targets[owner(item, peers)] = true;
                            }
                            let last = targets.iter().rposition(|t| *t).unwrap_or(0);
                            for target in (0..last).filter(|t| targets[*t]) {
                                session.give(((target, change.clone()), time, diff));
                            }
                            session.give(((last, change), time, diff));
                        }
                    }
                    // Counted at the batch's first time, where the updates of a user usually
                    // all are.
                    add_cost(&cost, first_time, Stage::Pairs, started.elapsed(), |_| {});
                });
            }
        })
}

/// The window changes of one user's updates at one time, into `changes`.
fn user_changes(
    group: &[(UserInterest, u64, isize)],
    window: usize,
    changes: &mut Vec<(WindowChange, isize)>,
) {
    fn items(interest: &UserInterest, window: usize) -> Vec<&str> {
        window_items(interest.history_items.iter(), window)
            .into_iter()
            .map(|(item, _)| item)
            .collect()
    }
    match group {
        // The usual case: the old value retracted and the new one inserted.
        [(first, _, d1), (second, _, d2)] if d1 + d2 == 0 && d1.abs() == 1 => {
            let (old, new) = if *d1 < 0 {
                (first, second)
            } else {
                (second, first)
            };
            let change = WindowChange::between(&items(old, window), &items(new, window));
            if !change.is_empty() {
                changes.push((change, 1));
            }
        }
        _ => {
            for (interest, _, diff) in group {
                changes.push((WindowChange::between(&[], &items(interest, window)), *diff));
            }
        }
    }
}

/// A window change with its items as the worker's numbers, as it waits for its epoch.
#[derive(Debug)]
struct NumberedChange {
    items: Box<[u32]>,
    left: u32,
    stayed: u32,
    diff: isize,
}

/// What the counts operator keeps of an item besides its pairs.
#[derive(Debug, Default, Clone, Copy)]
struct ItemCounts {
    /// Whether this worker keeps the item's counts ([`owner`]).
    owned: bool,
    /// n(x), for an item this worker owns, and as it was before the epoch being applied.
    users: i64,
    users_before: i64,
    /// Whether the epoch being applied has changed `users` (and `users_before` holds).
    users_touched: bool,
    /// Whether n(x) changed and no record of the epoch has said so yet.
    users_unsent: bool,
    /// Whether a record sent from here has named the item ([`ItemChanges::names`]).
    named: bool,
}

/// The most pair changes the counts operator sorts by item at once (12 bytes each). The
/// tests' epochs imply a few hundred: there it is small, so that they go through several
/// batches.
#[cfg(not(test))]
const PAIR_BATCH: usize = 1 << 20;
#[cfg(test)]
const PAIR_BATCH: usize = 7;

/// What the counts operator emits: a change of the neighbours or of n(x).
type CountsOutput = Result<ItemChanges, (SmolStr, isize)>;

/// The counts of the co-visits, from the window changes: each worker keeps n(a) and c(a, b)
/// for the items a it owns, and each such item's first K partners ([`TopByCount`]), and emits
/// n(a) as a collection, as `count` would give it, and each changed item's [`ItemChanges`].
///
/// The changes are numbered as they arrive (every item of a change, once, in the worker's
/// table, [`Interner`]) and wait for their epoch as numbers. Once the input has passed an
/// epoch, the pair changes its window changes imply are applied item by item (counts may go
/// below zero on the way: within an epoch the order does not matter), then the touched items'
/// first K are compared.
fn covisit_counts<'scope>(
    changes: ChangeStream<'scope>,
    params: CovisitParams,
    cost: CostBoard,
) -> Covisitation<'scope> {
    let k = params.neighbours;
    let route = |((target, _), _, _): &((usize, WindowChange), u64, isize)| *target as u64;
    let (index, peers) = (changes.scope().index(), changes.scope().peers());
    let counts: Stream<'scope, u64, Vec<(CountsOutput, u64, isize)>> =
        changes.unary_frontier(Exchange::new(route), "CovisitCounts", move |_, _| {
            let mut pending: PendingEpochs<NumberedChange> = PendingEpochs::default();
            let mut items: Interner<SmolStr> = Interner::default();
            // By number.
            let mut item_counts: Vec<ItemCounts> = Vec::new();
            let mut top = TopByCount::new(k);
            // The items whose n(x) the epoch being applied touched.
            let mut users_touched: Vec<u32> = Vec::new();
            // Time spent numbering changes as they arrived, reported with the next epoch.
            let mut numbering = Duration::ZERO;
            // Pair changes (a, b, change of c(a, b)) to apply, kept for its allocation: at
            // most `PAIR_BATCH` (one change's pairs past it doubled the vector).
            let mut pair_changes: Vec<(u32, u32, i32)> = Vec::new();
            move |(input, frontier), output| {
                input.for_each(|capability, records| {
                    let started = Instant::now();
                    pending.hold_each(&capability, records, |((_, change), time, diff)| {
                        let numbers: Box<[u32]> = change
                            .items
                            .iter()
                            .map(|item| {
                                let number = items.number(item);
                                if number as usize == item_counts.len() {
                                    item_counts.push(ItemCounts {
                                        owned: owner(item, peers) == index,
                                        ..ItemCounts::default()
                                    });
                                }
                                number
                            })
                            .collect();
                        let numbered = NumberedChange {
                            items: numbers,
                            left: change.left,
                            stayed: change.stayed,
                            diff,
                        };
                        (time, numbered)
                    });
                    numbering += started.elapsed();
                });
                while let Some((capability, changes)) = pending.take_complete(frontier.frontier()) {
                    let time = *capability.time();
                    let started = Instant::now();
                    let mut updates = 0;
                    // In batches of at most `PAIR_BATCH`: an epoch at full scale implies ~10
                    // million.
                    let mut apply = |pair_changes: &mut Vec<(u32, u32, i32)>| {
                        updates += pair_changes.len() as u64;
                        top.apply(pair_changes, &items);
                    };
                    for change in &changes {
                        // A change implies fewer pairs than the square of its items.
                        let most = change.items.len() * change.items.len();
                        if pair_changes.len() + most > PAIR_BATCH {
                            apply(&mut pair_changes);
                        }
                        let (left, stayed) = (change.left as usize, change.stayed as usize);
                        let (old, new) = (&change.items[..left + stayed], &change.items[left..]);
                        let d = count_change(change.diff);
                        for (i, &a) in change.items.iter().enumerate() {
                            if !item_counts[a as usize].owned {
                                continue;
                            }
                            // (partners, count change): an item that left loses its pairs of the
                            // old window, one that entered gains those of the new, one that stayed
                            // loses its pairs with what left and gains those with what entered.
                            let mut counts = |partners: &[u32], diff: i32| {
                                for &b in partners.iter().filter(|b| **b != a) {
                                    pair_changes.push((a, b, diff));
                                }
                            };
                            if i < left {
                                counts(old, -d);
                            } else if i < left + stayed {
                                counts(&change.items[..left], -d);
                                counts(&change.items[left + stayed..], d);
                            } else {
                                counts(new, d);
                            }
                            if i < left || i >= left + stayed {
                                let counts = &mut item_counts[a as usize];
                                if !counts.users_touched {
                                    counts.users_touched = true;
                                    counts.users_before = counts.users;
                                    users_touched.push(a);
                                }
                                counts.users += if i < left { -d } else { d } as i64;
                            }
                        }
                    }
                    apply(&mut pair_changes);
                    let mut session = output.session(&capability);
                    // n(x)'s changes, as the collection's updates.
                    users_touched.retain(|a| {
                        let counts = &mut item_counts[*a as usize];
                        counts.users_touched = false;
                        let (before, now) = (counts.users_before, counts.users);
                        if now == before {
                            return false;
                        }
                        counts.users_unsent = true;
                        let item = items.value(*a);
                        if before > 0 {
                            session.give((Err((item.clone(), before as isize)), time, -1));
                        }
                        if now > 0 {
                            session.give((Err((item.clone(), now as isize)), time, 1));
                        }
                        true
                    });
                    // One entry per changed item: its neighbours' changes and n(x)'s, if any.
                    let mut neighbour_changes = 0;
                    let mut record = ItemChanges::new(index as u32);
                    // Adds item `a` with `partners` to `record`, if there is anything to say,
                    // and sends the record when it is full.
                    let mut add = |a: u32, partners: &[(u32, u32)]| {
                        let counts = &mut item_counts[a as usize];
                        let users = std::mem::take(&mut counts.users_unsent)
                            .then_some(counts.users.max(0) as u64);
                        if users.is_none() && partners.is_empty() {
                            return;
                        }
                        for n in std::iter::once(a).chain(partners.iter().map(|(b, _)| *b)) {
                            let counts = &mut item_counts[n as usize];
                            if !counts.named {
                                counts.named = true;
                                record.names.push((n, items.value(n).clone()));
                            }
                        }
                        record.push(a, users, partners);
                        if record.items.len() == ITEMS_PER_RECORD {
                            let full =
                                std::mem::replace(&mut record, ItemChanges::new(index as u32));
                            session.give((Ok(full), time, 1));
                        }
                    };
                    top.end_epoch(&items, |a, changed| {
                        add(a, changed);
                        neighbour_changes += changed.len() as u64;
                    });
                    // n(x) of the items without neighbour changes.
                    for a in users_touched.drain(..) {
                        add(a, &[]);
                    }
                    if !record.items.is_empty() {
                        session.give((Ok(record), time, 1));
                    }
                    let took = started.elapsed() + std::mem::take(&mut numbering);
                    add_cost(&cost, time, Stage::Neighbours, took, |cost| {
                        cost.pair_updates += updates;
                        cost.neighbour_changes += neighbour_changes;
                    });
                }
            }
        });
    let (item_changes, item_users) = counts.ok_err(
        |(update, time, diff): (CountsOutput, u64, isize)| match update {
            Ok(changes) => Ok((changes, time)),
            Err(users) => Err((users, time, diff)),
        },
    );
    Covisitation {
        params,
        item_users: item_users.as_collection(),
        item_changes,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use differential_dataflow::input::Input;
    use timely::dataflow::operators::{Inspect, Probe};

    use super::*;
    use crate::recommend::reference::RecommendReference;
    use crate::recommend::test_histories::{epochs, feed, set_count, settings};

    type Updates<D> = Arc<Mutex<Vec<(D, u64, isize)>>>;

    /// The collection `updates` holds as of `epoch`: each record with its count, zeros dropped.
    fn as_of<D: Ord + Clone>(updates: &Updates<D>, epoch: u64) -> BTreeMap<D, isize> {
        let mut state = BTreeMap::new();
        for (data, time, diff) in updates.lock().unwrap().iter() {
            if *time <= epoch {
                *state.entry(data.clone()).or_insert(0) += diff;
            }
        }
        state.retain(|_, count| *count != 0);
        state
    }

    type Changes = Arc<Mutex<Vec<(ItemChanges, u64)>>>;
    type NamedChanges = (SmolStr, Option<u64>, Vec<(SmolStr, u32)>);
    type Captured = (Updates<(SmolStr, isize)>, Changes);

    /// Runs `covisitation` on `workers` workers over the epochs' histories, fed as the interest
    /// collection would be (the old value retracted, the new inserted, by the user's worker).
    fn run(
        workers: usize,
        epochs: &[BTreeMap<String, Vec<String>>],
        params: CovisitParams,
    ) -> Captured {
        let captured: Captured = Default::default();
        let epochs = epochs.to_vec();
        let shared = captured.clone();
        timely::execute(timely::Config::process(workers), move |worker| {
            let (item_users, neighbours) = shared.clone();
            let (mut input, probe) = worker.dataflow::<u64, _, _>(|scope| {
                let (input, interests) = scope.new_collection::<UserInterest, isize>();
                let built = covisitation(&interests, params, &CostBoard::default());
                built
                    .item_users
                    .inspect(move |(d, t, r)| item_users.lock().unwrap().push((d.clone(), *t, *r)));
                let probe = built
                    .item_changes
                    .inspect(move |change| neighbours.lock().unwrap().push(change.clone()))
                    .probe()
                    .0;
                (input, probe)
            });
            feed(worker, &mut input, &probe, &epochs);
        })
        .unwrap();
        captured
    }

    /// The item changes of the epochs up to `epoch`, in epoch order, under their ids: (item,
    /// n(item) if it changed, (partner, count)).
    fn changes_up_to(changes: &Changes, epoch: u64) -> Vec<NamedChanges> {
        let mut changes = changes.lock().unwrap().clone();
        changes.retain(|(_, time)| *time <= epoch);
        changes.sort_by_key(|(_, time)| *time);
        let mut names: SourceNumbers<SmolStr> = SourceNumbers::default();
        for (change, _) in &changes {
            names.learn(change, SmolStr::clone);
        }
        changes
            .into_iter()
            .flat_map(|(record, _)| {
                let name = |number: u32| names.get(record.source, number);
                record
                    .each()
                    .map(|(change, partners)| {
                        let partners = partners
                            .iter()
                            .map(|&(partner, covisits)| (name(partner), covisits))
                            .collect();
                        (name(change.item), change.users, partners)
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Each item's neighbours as of `epoch`: (partner, c(a, b)), strongest first, from the
    /// changes of the epochs up to it, applied in order.
    fn neighbour_lists(changes: &Changes, epoch: u64) -> BTreeMap<SmolStr, Vec<(String, u64)>> {
        let mut neighbours: BTreeMap<SmolStr, BTreeMap<SmolStr, u64>> = BTreeMap::new();
        for (item, _, changed) in changes_up_to(changes, epoch) {
            let partners = neighbours.entry(item).or_default();
            for (partner, covisits) in &changed {
                set_count(partners, partner, u64::from(*covisits));
            }
        }
        neighbours
            .into_iter()
            .filter(|(_, partners)| !partners.is_empty())
            .map(|(item, partners)| {
                let mut list: Vec<(String, u64)> = partners
                    .into_iter()
                    .map(|(partner, covisits)| (partner.to_string(), covisits))
                    .collect();
                list.sort_by(|x, y| y.1.cmp(&x.1).then_with(|| x.0.cmp(&y.0)));
                (item, list)
            })
            .collect()
    }

    /// Each item's n as of `epoch`, from the changes of the epochs up to it (0s dropped).
    fn users_from_changes(changes: &Changes, epoch: u64) -> BTreeMap<SmolStr, u64> {
        let mut users = BTreeMap::new();
        for (item, n, _) in changes_up_to(changes, epoch) {
            if let Some(n) = n {
                set_count(&mut users, &item, n);
            }
        }
        users
    }

    #[test]
    fn counts_and_neighbours_match_the_reference_over_epochs_and_workers() {
        for seed in testkit::seeds(7..8) {
            counts_and_neighbours_match(seed);
        }
    }

    #[test]
    fn an_item_no_window_holds_leaves_the_counts() {
        // n(a) goes from 1 to 0, then b, c and d leave every window together: n(x) as a
        // collection, as `count` gives it, has no entry for them (the random epochs seldom take
        // an item out of every window).
        let history = |items: &[&str]| items.iter().map(|s| (*s).to_owned()).collect();
        let epochs: Vec<BTreeMap<String, Vec<String>>> = [
            [
                ("u1", history(&["a", "b", "c"])),
                ("u2", history(&["b", "c", "d"])),
            ],
            [
                ("u1", history(&["e", "f", "g"])),
                ("u2", history(&["b", "c", "d"])),
            ],
            [("u1", history(&["e", "f", "g"])), ("u2", history(&["e"]))],
        ]
        .into_iter()
        .map(|users| users.map(|(u, h)| (u.to_owned(), h)).into_iter().collect())
        .collect();
        counts_and_neighbours_match_on(&epochs);
    }

    fn counts_and_neighbours_match(seed: u64) {
        counts_and_neighbours_match_on(&epochs(seed));
    }

    fn counts_and_neighbours_match_on(epochs: &[BTreeMap<String, Vec<String>>]) {
        let params = CovisitParams {
            window: 5,
            neighbours: 3,
        };
        let settings = settings(params);
        let mut outputs = Vec::new();
        for workers in [1, 2, 4] {
            let (item_users, neighbours) = run(workers, epochs, params);
            let mut per_epoch = Vec::new();
            for (epoch, histories) in epochs.iter().enumerate() {
                let reference = RecommendReference::new(histories.values(), settings);
                let epoch = epoch as u64;
                let n = as_of(&item_users, epoch);
                for ((item, count), one) in &n {
                    assert_eq!(*one, 1);
                    assert_eq!(reference.users_holding(item) as isize, *count, "n({item})");
                }
                let held = histories
                    .values()
                    .flat_map(|history| {
                        window_items(history.iter().map(String::as_str), params.window)
                    })
                    .map(|(item, _)| item)
                    .collect::<std::collections::BTreeSet<_>>();
                assert_eq!(n.len(), held.len(), "n(x) for every item in a window");
                let sent: BTreeMap<SmolStr, u64> = n
                    .keys()
                    .map(|(item, users)| (item.clone(), *users as u64))
                    .collect();
                assert_eq!(
                    users_from_changes(&neighbours, epoch),
                    sent,
                    "n(x) in the changes"
                );
                let lists = neighbour_lists(&neighbours, epoch);
                for (item, list) in &lists {
                    let expected: Vec<(String, u64)> = reference
                        .neighbours(item)
                        .iter()
                        .map(|n| (n.item_id.clone(), n.covisits))
                        .collect();
                    assert_eq!(list, &expected, "neighbours({item}) at epoch {epoch}");
                }
                assert_eq!(
                    lists.len(),
                    n.keys()
                        .filter(|(item, _)| !reference.neighbours(item).is_empty())
                        .count(),
                    "every item with a partner has neighbours"
                );
                per_epoch.push((n, lists));
            }
            outputs.push(per_epoch);
        }
        assert!(outputs.windows(2).all(|w| w[0] == w[1]));
    }

    #[test]
    fn every_pairs_count_matches_the_reference_over_epochs_and_workers() {
        for seed in testkit::seeds(19..20) {
            every_pairs_count_matches(seed);
        }
    }

    fn every_pairs_count_matches(seed: u64) {
        // With more neighbours kept than any item has partners, the neighbours are every pair
        // with its count: c(a, b) itself.
        let params = CovisitParams {
            window: 5,
            neighbours: 1000,
        };
        let settings = settings(params);
        let epochs = epochs(seed);
        for workers in [1, 2, 4] {
            let (_, neighbours) = run(workers, &epochs, params);
            for (epoch, histories) in epochs.iter().enumerate() {
                let reference = RecommendReference::new(histories.values(), settings);
                let c: BTreeMap<(String, String), u64> = neighbour_lists(&neighbours, epoch as u64)
                    .into_iter()
                    .flat_map(|(a, list)| {
                        list.into_iter().map(move |(b, c)| ((a.to_string(), b), c))
                    })
                    .collect();
                let expected: BTreeMap<(String, String), u64> = reference
                    .all_covisits()
                    .map(|(a, b, c)| ((a.to_string(), b.to_string()), c))
                    .collect();
                assert_eq!(c, expected, "c(a, b) at epoch {epoch}, {workers} workers");
            }
        }
    }

    #[test]
    fn a_change_lists_what_left_stayed_and_entered() {
        let change = WindowChange::between(&["a", "b", "c"], &["b", "c", "d", "e"]);
        assert_eq!(change.items, ["a", "b", "c", "d", "e"]);
        assert_eq!((change.left, change.stayed), (1, 2));
        assert!(!change.is_empty());
        assert!(WindowChange::between(&["a", "b"], &["a", "b"]).is_empty());
        let change = WindowChange::between(&["b", "d"], &["a", "c", "e"]);
        assert_eq!(change.items, ["b", "d", "a", "c", "e"]);
        assert_eq!((change.left, change.stayed), (2, 0));
    }

    #[test]
    fn a_window_is_the_set_of_the_last_positions() {
        let history = ["a", "b", "c", "b", "d"];
        let items = window_items(history.iter().copied(), 3);
        assert_eq!(items, [("b", 1), ("c", 2), ("d", 0)]);
        // An item twice counts once, at its newest position.
        let all = window_items(history.iter().copied(), 10);
        assert_eq!(all, [("a", 4), ("b", 1), ("c", 2), ("d", 0)]);
    }
}
