//! Fresh recommendations for every user whose profile changed in an epoch (semantics §8), from
//! the co-visitation collections:
//!
//! ```text
//! item changes (n(x), neighbours(a)), top P popular ─broadcast─▶ every worker's copy ─┐
//! interests ─▶ the changed users of epoch e (on their own worker) ────────────────────┴─▶ score as of e ─▶ lists
//! ```
//!
//! Every worker keeps a copy of the neighbours, n and the popularity order, applied from the
//! items' change records and the order's updates, broadcast, up to the epoch it scores; a
//! changed user's list is then computed where the user is, with W·K lookups and no exchange.
//! (A first version joined one-epoch queries with the arrangements of n and of the neighbours:
//! three joins of string-keyed terms, 556 µs of CPU a message on the bench, see
//! docs/performance.md.) The copy costs each worker the neighbours of every item, K entries an
//! item.
//!
//! A user's terms are added per candidate in order of k, then item, as the reference adds them,
//! so that equal scores are equal in bits. Floats appear only here, after the collections: their
//! keys are item ids. The fill-up needs at most N + |history| items of the popularity order: the
//! top `N + max_history` by n(x) (ties by id).

use std::cmp::Reverse;
use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use foldhash::HashMap;

use differential_dataflow::{AsCollection, VecCollection};
use smol_str::SmolStr;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::vec::{Broadcast, Map};
use timely::dataflow::operators::Concat;
use timely::dataflow::operators::Operator;
use timely::dataflow::Stream;

use super::covisit::{
    window_items, CovisitParams, Covisitation, ItemChanges, PartnerRanges, SourceNumbers,
};
use super::intern::Interner;
use super::top::{count_change, make_room, TopByCount};
use super::{add_cost, CostBoard, Stage};
use crate::model::{EncodedProfile, IdList, UserInterest};
use crate::pending::{passed_by_both, PendingEpochs};

/// The settings of the scores (semantics §8).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoreParams {
    /// N: items per list.
    pub recommendations_n: usize,
    /// The recency decay of the terms.
    pub decay: f64,
    /// The longest kept history, which bounds how far down the popularity order a fill-up goes.
    pub max_history: usize,
    /// Epochs before this time get no lists (the replay's: their users' lists are in Redis
    /// already).
    pub first_scored_time: u64,
}

impl ScoreParams {
    /// How much of the popularity order a fill-up may need: N + the longest history.
    pub fn popularity_len(&self) -> usize {
        self.recommendations_n + self.max_history
    }
}

/// A user's fresh list, as of the epoch it is emitted at.
#[derive(Debug, Clone, PartialEq)]
pub struct UserRecommendations {
    pub user_id: SmolStr,
    /// The profile's timestamp.
    pub timestamp: u64,
    /// The epoch of the change (also the stream's time).
    pub epoch: u64,
    /// Strongest first: (item, score); fill-up items score 0.
    pub items: Vec<(SmolStr, f64)>,
}

/// One entry of the popularity order: n(x) descending, then id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Popular {
    pub users: Reverse<u64>,
    pub item: SmolStr,
}

/// The popularity order as a collection (one key, `()`), as [`popular_order`] keeps it.
pub type PopularOrder<'scope> = VecCollection<'scope, u64, ((), Popular), isize>;

/// What the scoring operator shares with every worker: the items' changes (n and
/// neighbours), and the popularity order's updates, each with its time and count.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Shared {
    Item(ItemChanges),
    Popular(Popular),
}

/// Builds the scores: a stream of the fresh lists of the users whose profile changed, each at
/// the epoch of the change, computed on the user's own worker from a copy of the neighbours,
/// n and the popularity order that every worker keeps (broadcast updates).
///
/// `order` is the popularity order ([`popular_order`]), at least
/// [`ScoreParams::popularity_len`] long. The lists computed and the time they took each epoch
/// are added to `cost`.
pub fn recommendations<'scope>(
    interests: &VecCollection<'scope, u64, UserInterest, isize>,
    covisitation: &Covisitation<'scope>,
    order: &PopularOrder<'scope>,
    params: ScoreParams,
    cost: &CostBoard,
) -> Stream<'scope, u64, Vec<UserRecommendations>> {
    let first = params.first_scored_time;
    let changed = interests
        .inner
        .clone()
        .flat_map(move |(interest, epoch, diff)| {
            (diff > 0 && epoch >= first).then_some((interest, epoch))
        });
    // An item's changes are not an update of a collection: they set what they list.
    let items = covisitation
        .item_changes
        .clone()
        .map(|(changes, time)| (Shared::Item(changes), time, 1));
    let popular = order
        .inner
        .clone()
        .map(|(((), popular), time, diff)| (Shared::Popular(popular), time, diff));
    let shared = items.concat(popular).broadcast();
    score(changed, shared, covisitation.params, params, cost.clone())
}

/// The first `len` items by n(x) descending, ties by id, as a collection on worker 0.
///
/// Two steps, so that the work of a change of n(x) is spread over the workers: each worker
/// ranks the items whose n(x) it holds (those it owns, as the counts operator emits them) with
/// a [`TopByCount`] of one key, and sends the changes of its own first `len`; worker 0 merges
/// those, at most `len` an item's worker, into the order. The global first `len` are among
/// the workers' first `len`. Keeping every item's n in one ordered map on worker 0 instead
/// was 5% of the dataflow's time, all of it on one worker (docs/performance.md).
pub fn popular_order<'scope>(
    item_users: &VecCollection<'scope, u64, (SmolStr, isize), isize>,
    len: usize,
) -> PopularOrder<'scope> {
    let local = item_users
        .inner
        .clone()
        .unary_frontier(Pipeline, "PopularLocal", move |_, _| {
            let mut pending = PendingEpochs::default();
            let mut items: Interner<SmolStr> = Interner::default();
            let mut top = TopByCount::new(len);
            // An epoch's changes as (key, item, change), kept for its allocation.
            let mut batch = Vec::new();
            move |(input, frontier), output| {
                input.for_each(|capability, updates| {
                    pending.hold_each(&capability, updates, |((item, users), time, diff)| {
                        (time, (items.number(&item), users * diff))
                    })
                });
                while let Some((capability, changes)) = pending.take_complete(frontier.frontier()) {
                    let time = *capability.time();
                    batch.extend(
                        changes
                            .into_iter()
                            .map(|(item, change)| (0, item, count_change(change))),
                    );
                    top.apply(&mut batch, &items);
                    let mut session = output.session(&capability);
                    top.end_epoch(&items, |_, changed| {
                        for &(item, users) in changed {
                            session.give((items.value(item).clone(), u64::from(users), time));
                        }
                    });
                }
            }
        });
    local
        .unary_frontier(Exchange::new(|_| 0), "PopularOrder", move |_, _| {
            let mut pending = PendingEpochs::default();
            // The workers' first `len`, each item with its n, and in order.
            let mut users: HashMap<SmolStr, u64> = HashMap::default();
            let mut order: BTreeSet<Popular> = BTreeSet::new();
            // The first `len` as last emitted.
            let mut emitted: Vec<Popular> = Vec::new();
            move |(input, frontier), output| {
                input.for_each(|capability, changes| {
                    pending.hold_each(&capability, changes, |(item, users, time)| {
                        (time, (item, users))
                    })
                });
                while let Some((capability, changes)) = pending.take_complete(frontier.frontier()) {
                    let time = *capability.time();
                    for (item, now) in changes {
                        let before = match now {
                            0 => users.remove(&item),
                            _ => users.insert(item.clone(), now),
                        };
                        if let Some(before) = before {
                            order.remove(&Popular {
                                users: Reverse(before),
                                item: item.clone(),
                            });
                        }
                        if now > 0 {
                            order.insert(Popular {
                                users: Reverse(now),
                                item,
                            });
                        }
                    }
                    let first: Vec<Popular> = order.iter().take(len).cloned().collect();
                    if first == emitted {
                        continue;
                    }
                    let mut session = output.session(&capability);
                    for popular in emitted.iter().filter(|p| !first.contains(p)) {
                        session.give((((), popular.clone()), time, -1));
                    }
                    for popular in first.iter().filter(|p| !emitted.contains(p)) {
                        session.give((((), popular.clone()), time, 1));
                    }
                    emitted = first;
                }
            }
        })
        .as_collection()
}

/// The lists as the sink's values for `user_recs:{user_id}`.
pub fn encode_recommendations<'scope>(
    lists: Stream<'scope, u64, Vec<UserRecommendations>>,
) -> Stream<'scope, u64, Vec<EncodedProfile>> {
    lists.flat_map(|list| {
        match EncodedProfile::recommendations(
            &list.user_id,
            list.timestamp,
            list.epoch,
            &list.items,
        ) {
            Ok(value) => Some(value),
            // Unreachable in practice, as for profiles: timestamps and epochs stay below 2^53.
            Err(error) => {
                tracing::error!(%error, user_id = %list.user_id, "recommendations not written");
                None
            }
        }
    })
}

/// `popular_items` (the first `len` items of `order`) as a sink value, from worker 0, at each
/// epoch in which it changed.
pub fn popular_items<'scope>(
    order: &PopularOrder<'scope>,
    len: usize,
) -> Stream<'scope, u64, Vec<EncodedProfile>> {
    let updates = order.inner.clone();
    updates.unary_frontier(Exchange::new(|_| 0), "PopularItems", |_, _| {
        let mut order: BTreeMap<Popular, isize> = BTreeMap::new();
        let mut pending = PendingEpochs::default();
        // The list last written: the order beyond `len` may change without it.
        let mut written: Vec<(SmolStr, u64)> = Vec::new();
        move |(input, frontier), output| {
            input.for_each(|capability, updates| {
                pending.hold_each(&capability, updates, |update| (update.1, update))
            });
            while let Some((capability, updates)) = pending.take_complete(frontier.frontier()) {
                let epoch = *capability.time();
                for (((), popular), _, diff) in updates {
                    add_count(&mut order, popular, diff);
                }
                let items: Vec<(SmolStr, u64)> = order
                    .keys()
                    .take(len)
                    .map(|popular| (popular.item.clone(), popular.users.0))
                    .collect();
                if items != written {
                    let value = EncodedProfile::popular_items(epoch, &items);
                    output.session(&capability).give(value);
                    written = items;
                }
            }
        }
    })
}

/// Each worker's copy of what the lists are computed from, as of the last epoch it applied.
///
/// Items are held under the worker's local numbers ([`Interner`]): a neighbour is 8 bytes, not
/// a 40-byte (count, string, count), and a term's n(x) is an index, not a string lookup. Every
/// worker holds the neighbours of every item, so this is the state that grows with the workers.
#[derive(Default)]
struct SharedState {
    /// The local numbers of the items the copy has seen.
    numbers: Interner<SmolStr>,
    /// The local numbers of the numbers of the item changes' sources.
    sources: SourceNumbers<u32>,
    /// n(x) and a hash of the id by number: a column of its own, read for each of a list's
    /// ~200 terms, 16 bytes an item where an item's whole copy is 32 (docs/performance.md,
    /// "item changes in the sender's numbers").
    items: Vec<CopiedItem>,
    /// neighbours(x) by number: (partner's number, c(a, b)), at most K. A small vector, not an
    /// ordered map: it is read whole, and a list's sums do not depend on the order of a window
    /// item's neighbours (each neighbour is a different candidate).
    neighbours: Vec<Vec<(u32, u32)>>,
    /// The popularity order.
    order: BTreeMap<Popular, isize>,
    /// K: an item's neighbours are never more, so their vectors are not given room for more.
    neighbours_per_item: usize,
}

/// What a copy reads of an item for each term of a list: n(x), and the low bits of its id's
/// hash, with which a list finds the candidates that are in the history without looking the
/// history's ids up (only a candidate whose hash is a history id's has its id compared).
#[derive(Debug, Default, Clone, Copy)]
struct CopiedItem {
    users: u64,
    id_hash: u32,
}

/// The bits of an id's hash that a copy keeps ([`CopiedItem::id_hash`]): in the tests only
/// two, so that most candidates share their hash with a history id and the ids are compared.
#[cfg(not(test))]
const ID_HASH_MASK: u32 = u32::MAX;
#[cfg(test)]
const ID_HASH_MASK: u32 = 0b11;

/// The low bits of `id`'s hash in `numbers` (its table's hasher, [`CopiedItem::id_hash`]).
fn id_hash(numbers: &Interner<SmolStr>, id: &str) -> u32 {
    numbers.hash_of(id) as u32 & ID_HASH_MASK
}

/// Which ids a list's history holds, found by id hash first: an item is in the history if its
/// id is that of a position with its hash. Hashing the history's ids costs a few ns each,
/// where looking each up in the number table took two cache misses. The candidates' hashes
/// are in the copy; the fill-up's popular items are hashed as they come.
struct HistoryIds<'a> {
    history: &'a IdList,
    /// (id hash, position), sorted.
    hashes: Vec<(u32, u32)>,
}

impl<'a> HistoryIds<'a> {
    fn new(history: &'a IdList, numbers: &Interner<SmolStr>) -> Self {
        let mut hashes: Vec<(u32, u32)> = history
            .iter()
            .enumerate()
            .map(|(at, id)| (id_hash(numbers, id), at as u32))
            .collect();
        hashes.sort_unstable();
        HistoryIds { history, hashes }
    }

    /// Whether the item of id hash `hash` is in the history. Its id, `id()`, is read only when
    /// a position has that hash, which for most candidates none has: reading every
    /// candidate's id was a cache miss each, 4.6% of the dataflow's samples (`perf`, by line).
    fn contains<'id>(&self, hash: u32, id: impl FnOnce() -> &'id str) -> bool {
        let from = self.hashes.partition_point(|(h, _)| *h < hash);
        let mut same = self.hashes[from..]
            .iter()
            .take_while(|(h, _)| *h == hash)
            .peekable();
        if same.peek().is_none() {
            return false;
        }
        let id = id();
        same.any(|&(_, at)| self.history.get(at as usize) == id)
    }
}

/// Adds `diff` to `key`'s count, dropping the key when it reaches zero.
fn add_count<K: Ord>(map: &mut BTreeMap<K, isize>, key: K, diff: isize) {
    match map.entry(key) {
        Entry::Vacant(entry) => {
            entry.insert(diff);
        }
        Entry::Occupied(mut entry) => {
            *entry.get_mut() += diff;
            if *entry.get() == 0 {
                entry.remove();
            }
        }
    }
}

impl SharedState {
    /// Learns the item names `update` gives (see [`ItemChanges`]).
    fn learn(&mut self, update: &Shared) {
        if let Shared::Item(changes) = update {
            let (numbers, items, neighbours) =
                (&mut self.numbers, &mut self.items, &mut self.neighbours);
            self.sources.learn(changes, |id| {
                let number = numbers.number(id);
                // Room for the item's copy.
                if items.len() <= number as usize {
                    items.resize(number as usize + 1, CopiedItem::default());
                    neighbours.resize_with(number as usize + 1, Vec::new);
                }
                items[number as usize].id_hash = id_hash(numbers, id);
                number
            });
        }
    }

    /// Applies an epoch's item changes, waiting as [`Waiting`] keeps them: a slice of items at
    /// a time, each slice's numbers first turned into the copy's (in place), then each
    /// item's n and neighbours read, then the changes applied. The first two are loads from
    /// tables larger than the caches, done in loops that do nothing with what they load, so
    /// that their misses overlap; applied change by change, each waited for its own (`perf
    /// annotate`: three quarters of the copies' samples on those loads). A slice is small
    /// enough that what it reads is still in cache when it is applied.
    fn apply_epoch(&mut self, epoch: &mut WaitingEpoch) {
        // Small in the tests, so that an epoch's items span several slices.
        const SLICE: usize = if cfg!(test) { 3 } else { 64 };
        let WaitingEpoch {
            items, partners, ..
        } = epoch;
        let mut ranges = PartnerRanges::default();
        for slice in items.chunks_mut(SLICE) {
            let slice_ranges = ranges;
            for item in slice.iter_mut() {
                for partner in &mut partners[ranges.next(item.partners_end)] {
                    partner.0 = self.sources.get(item.source, partner.0);
                }
                item.item = self.sources.get(item.source, item.item);
            }
            let mut touched = 0u64;
            for item in slice.iter() {
                let at = item.item as usize;
                touched = touched.wrapping_add(self.items[at].users);
                if let Some((partner, _)) = self.neighbours[at].first() {
                    touched = touched.wrapping_add(u64::from(*partner));
                }
            }
            std::hint::black_box(touched);
            let mut applying = slice_ranges;
            for item in slice.iter() {
                let range = applying.next(item.partners_end);
                self.apply_item(item.item, item.users, &partners[range]);
            }
        }
    }

    /// Applies an item's change, in the copy's numbers: sent once per item and epoch, by the
    /// item's owner, with count 1. The partners that left first, so that the vector never
    /// holds more than K.
    fn apply_item(&mut self, item: u32, users: Option<u64>, partners: &[(u32, u32)]) {
        if let Some(users) = users {
            self.items[item as usize].users = users;
        }
        let neighbours = &mut self.neighbours[item as usize];
        for (partner, _) in partners.iter().filter(|(_, c)| *c == 0) {
            if let Some(at) = neighbours.iter().position(|(n, _)| n == partner) {
                neighbours.swap_remove(at);
            }
        }
        for &(partner, covisits) in partners.iter().filter(|(_, c)| *c != 0) {
            match neighbours.iter().position(|(n, _)| *n == partner) {
                Some(at) => neighbours[at].1 = covisits,
                None => {
                    make_room(neighbours, self.neighbours_per_item);
                    neighbours.push((partner, covisits));
                }
            }
        }
    }
}

/// The shared updates a copy has received and not applied yet, by epoch, in a compact form: an
/// item's change is 32 bytes here and its partners 8 bytes each in one vector of the epoch,
/// where a record as it arrives is ~100 bytes and a vector of its own. At full scale an epoch
/// in flight is hundreds of thousands of item changes on every worker (the records as they
/// came were 67 MB of the peak heap, docs/performance.md).
///
/// Names are learned as records arrive ([`SharedState::learn`]): a number keeps its name for
/// good, so learning it early changes nothing, and once the inputs have passed an epoch every
/// record up to it, and every name they use, has arrived (see [`ItemChanges`]).
#[derive(Default)]
struct Waiting {
    epochs: BTreeMap<u64, WaitingEpoch>,
    /// Emptied epochs, kept for their allocations.
    spare: Vec<WaitingEpoch>,
}

/// The updates of one epoch that wait in [`Waiting`].
#[derive(Default)]
struct WaitingEpoch {
    items: Vec<WaitingItem>,
    /// The partners of `items`, one after the other.
    partners: Vec<(u32, u32)>,
    popular: Vec<(Popular, isize)>,
}

/// An [`ItemChanges`] without its names (learned on arrival) and its partners (in
/// [`WaitingEpoch::partners`], up to `partners_end`). Its numbers are `source`'s until
/// [`SharedState::apply_epoch`] turns them into the copy's.
struct WaitingItem {
    source: u32,
    item: u32,
    users: Option<u64>,
    partners_end: u32,
}

impl Waiting {
    /// Keeps `update` of `time` until its epoch is applied; learns its names into `state`.
    fn hold(&mut self, state: &mut SharedState, update: Shared, time: u64, diff: isize) {
        state.learn(&update);
        let spare = &mut self.spare;
        let epoch = self
            .epochs
            .entry(time)
            .or_insert_with(|| spare.pop().unwrap_or_default());
        match update {
            Shared::Popular(popular) => epoch.popular.push((popular, diff)),
            Shared::Item(changes) => {
                let offset = epoch.partners.len() as u32;
                epoch.partners.extend_from_slice(&changes.partners);
                epoch
                    .items
                    .extend(changes.items.iter().map(|change| WaitingItem {
                        source: changes.source,
                        item: change.item,
                        users: change.users,
                        partners_end: offset + change.partners_end,
                    }));
            }
        }
    }

    /// Applies to `state` every update of the epochs up to `epoch`, in epoch order.
    fn apply_through(&mut self, epoch: u64, state: &mut SharedState) {
        while let Some(entry) = self.epochs.first_entry() {
            if *entry.key() > epoch {
                break;
            }
            let mut waiting = entry.remove();
            state.apply_epoch(&mut waiting);
            for (popular, diff) in waiting.popular.drain(..) {
                add_count(&mut state.order, popular, diff);
            }
            // Two spares cover the usual one or two epochs in flight; more would keep the
            // room of a burst for good.
            if self.spare.len() < 2 {
                waiting.items.clear();
                waiting.partners.clear();
                self.spare.push(waiting);
            }
        }
    }
}

/// The scoring operator: once both inputs have passed an epoch, each changed user's list.
fn score<'scope>(
    changed: Stream<'scope, u64, Vec<(UserInterest, u64)>>,
    shared: Stream<'scope, u64, Vec<(Shared, u64, isize)>>,
    covisit: CovisitParams,
    params: ScoreParams,
    cost: CostBoard,
) -> Stream<'scope, u64, Vec<UserRecommendations>> {
    changed.binary_frontier(shared, Pipeline, Pipeline, "Recommend", move |_, _| {
        let mut state = SharedState {
            neighbours_per_item: covisit.neighbours,
            ..SharedState::default()
        };
        let mut scores = Candidates::default();
        let mut waiting = Waiting::default();
        // The changed users, by the epoch of their change.
        let mut pending = PendingEpochs::default();
        move |(input, frontier), (shared, shared_frontier), output| {
            input.for_each(|capability, records| {
                pending.hold_each(&capability, records, |(interest, epoch)| (epoch, interest))
            });
            shared.for_each(|_, records| {
                for (update, time, diff) in records.drain(..) {
                    waiting.hold(&mut state, update, time, diff);
                }
            });
            // Apply what both inputs have passed, and score the epochs complete on both.
            let passed = passed_by_both(frontier.frontier(), shared_frontier.frontier());
            while let Some((capability, users)) = pending.take_complete(passed.borrow()) {
                let epoch = *capability.time();
                let started = Instant::now();
                waiting.apply_through(epoch, &mut state);
                let mut lists: Vec<UserRecommendations> = users
                    .into_iter()
                    .map(|interest| UserRecommendations {
                        items: user_list(
                            &interest.history_items,
                            &state,
                            covisit.window,
                            &params,
                            &mut scores,
                        ),
                        user_id: interest.user_id,
                        timestamp: interest.timestamp,
                        epoch,
                    })
                    .collect();
                let computed = lists.len() as u64;
                output.session(&capability).give_container(&mut lists);
                let took = started.elapsed();
                add_cost(&cost, epoch, Stage::Scoring, took, |cost| {
                    cost.lists += computed
                });
            }
        }
    })
}

/// Scratch space for one list's candidates: their scores in a small open-addressing table by
/// number, empty between lists. A list has at most W·K candidates (200 by default): the table
/// stays in L1, where a dense array by number (16 bytes for every item the copy knows) took a
/// cache miss for nearly every term (`perf annotate`: a fifth of `user_list`'s samples on that
/// one load, docs/performance.md).
#[derive(Default)]
struct Candidates {
    /// (number, score), [`Candidates::FREE`] where unused: a power of two long (or empty), at
    /// most half full.
    slots: Vec<(u32, f64)>,
    /// The slots in use, in the order their numbers came.
    used: Vec<u32>,
    /// What the copy holds of each of the window's neighbours in turn, gathered before the
    /// terms are added.
    neighbour_items: Vec<CopiedItem>,
}

impl Candidates {
    /// An unused slot's number: no copy numbers 2^32 − 1 items.
    const FREE: u32 = u32::MAX;

    /// Where `item`'s search starts in a table of `2^bits` slots: multiplicative hashing, as
    /// numbers are small dense integers.
    fn home(item: u32, bits: u32) -> usize {
        (item.wrapping_mul(0x9E37_79B9) >> (32 - bits)) as usize
    }

    /// Adds `term` to `item`'s score.
    fn add(&mut self, item: u32, term: f64) {
        debug_assert_ne!(item, Self::FREE);
        if 2 * (self.used.len() + 1) > self.slots.len() {
            self.grow();
        }
        let (mask, bits) = (self.slots.len() - 1, self.slots.len().trailing_zeros());
        let mut at = Self::home(item, bits);
        loop {
            let slot = &mut self.slots[at];
            if slot.0 == item {
                slot.1 += term;
                return;
            }
            if slot.0 == Self::FREE {
                *slot = (item, 0.0);
                slot.1 += term;
                self.used.push(at as u32);
                return;
            }
            at = (at + 1) & mask;
        }
    }

    /// Doubles the table (512 slots at first), its candidates placed again.
    fn grow(&mut self) {
        let len = (2 * self.slots.len()).max(512);
        let old = std::mem::replace(&mut self.slots, vec![(Self::FREE, 0.0); len]);
        let used = std::mem::take(&mut self.used);
        for at in used {
            let (item, score) = old[at as usize];
            self.add(item, score);
        }
    }

    /// Every candidate with its score, leaving the scratch space empty.
    fn drain(&mut self) -> impl Iterator<Item = (u32, f64)> + '_ {
        let slots = &mut self.slots;
        self.used
            .drain(..)
            .map(|at| std::mem::replace(&mut slots[at as usize], (Self::FREE, 0.0)))
    }
}

/// A window item as a list reads it: its distance k from the newest item, n and neighbours.
struct WindowItem<'a> {
    k: u32,
    users: f64,
    neighbours: &'a [(u32, u32)],
}

/// One user's list from the state as of its epoch. `scores` is scratch space, empty on entry
/// and on return.
fn user_list(
    history: &IdList,
    state: &SharedState,
    window: usize,
    params: &ScoreParams,
    scores: &mut Candidates,
) -> Vec<(SmolStr, f64)> {
    let numbers = &state.numbers;
    // The window, newest first (each item at its own k): the reference's order of summation.
    // Only its items are looked up; an item the copy does not know has no neighbours.
    let mut via_window: Vec<(u32, u32)> = window_items(history.iter(), window)
        .into_iter()
        .filter_map(|(id, k)| Some((k, numbers.get(id)?)))
        .collect();
    via_window.sort_unstable();
    let history_ids = HistoryIds::new(history, numbers);
    // The window's neighbours, and what the copy holds of each, gathered before any term is
    // added: each is a load from a table larger than the caches, and in loops that do
    // nothing with what they load their misses overlap, where adding term by term waited for
    // each in turn (`perf annotate`: over half of this function's samples on those loads).
    let lists: Vec<WindowItem<'_>> = via_window
        .iter()
        .map(|&(k, via)| {
            let via = via as usize;
            WindowItem {
                k,
                users: state.items[via].users as f64,
                neighbours: state.neighbours[via].as_slice(),
            }
        })
        .collect();
    let mut neighbour_items = std::mem::take(&mut scores.neighbour_items);
    neighbour_items.clear();
    neighbour_items.extend(
        lists
            .iter()
            .flat_map(|via| via.neighbours.iter())
            .map(|&(item, _)| state.items[item as usize]),
    );
    // Each candidate's terms are added in the window's order.
    let mut copied = neighbour_items.iter();
    for via in lists {
        let weight = params.decay.powi(via.k as i32);
        for (&(item, covisits), copied) in via.neighbours.iter().zip(copied.by_ref()) {
            if history_ids.contains(copied.id_hash, || numbers.value(item)) {
                continue;
            }
            let n_item = copied.users as f64;
            scores.add(
                item,
                weight * f64::from(covisits) / (via.users * n_item).sqrt(),
            );
        }
    }
    scores.neighbour_items = neighbour_items;
    // Strongest first, ties by id; only the first N are ordered.
    let order =
        |x: &(u32, f64), y: &(u32, f64)| y.1.total_cmp(&x.1).then_with(|| numbers.cmp(x.0, y.0));
    let n = params.recommendations_n;
    let mut ranked: Vec<(u32, f64)> = scores.drain().collect();
    if ranked.len() > n {
        ranked.select_nth_unstable_by(n, order);
        ranked.truncate(n);
    }
    ranked.sort_unstable_by(order);
    let mut list: Vec<(SmolStr, f64)> = ranked
        .into_iter()
        .map(|(item, score)| (numbers.value(item).clone(), score))
        .collect();
    if list.len() >= n {
        return list;
    }
    for (popular, count) in &state.order {
        if list.len() >= params.recommendations_n {
            break;
        }
        if *count > 0
            && !history_ids.contains(id_hash(numbers, &popular.item), || &popular.item)
            && !list.iter().any(|(item, _)| *item == popular.item)
        {
            list.push((popular.item.clone(), 0.0));
        }
    }
    list
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use differential_dataflow::input::Input;
    use timely::dataflow::operators::{Inspect, Probe};

    use super::*;
    use crate::recommend::covisit::{covisitation, CovisitParams};
    use crate::recommend::reference::{
        window_distances, RecommendReference, RecommendSettings, ScoredItem,
    };
    use crate::recommend::test_histories::{epochs, feed, settings};
    use crate::stats::RecommendCost;

    type Lists = Arc<Mutex<Vec<(u64, UserRecommendations)>>>;
    /// What the stages reported, by epoch, summed over the workers.
    type Costs = Arc<Mutex<BTreeMap<u64, RecommendCost>>>;

    fn run(
        workers: usize,
        epochs: &[BTreeMap<String, Vec<String>>],
        covisit: CovisitParams,
        params: ScoreParams,
    ) -> (Lists, Costs) {
        let lists: Lists = Default::default();
        let costs: Costs = Default::default();
        let epochs = epochs.to_vec();
        let (shared, shared_costs) = (lists.clone(), costs.clone());
        timely::execute(timely::Config::process(workers), move |worker| {
            let lists = shared.clone();
            let cost = CostBoard::default();
            let (mut input, probe) = worker.dataflow::<u64, _, _>(|scope| {
                let (input, interests) = scope.new_collection::<UserInterest, isize>();
                let covisit = covisitation(&interests, covisit, &cost);
                let order = popular_order(&covisit.item_users, params.popularity_len());
                let probe = recommendations(&interests, &covisit, &order, params, &cost)
                    .inspect(move |list| lists.lock().unwrap().push((list.epoch, list.clone())))
                    .probe()
                    .0;
                (input, probe)
            });
            feed(worker, &mut input, &probe, &epochs);
            // Every epoch has passed the probe, so every stage has added its cost.
            let mut costs = shared_costs.lock().unwrap();
            for (epoch, counters) in cost.borrow_mut().drain_before(u64::MAX) {
                costs.entry(epoch).or_default().add(&counters.recommend);
            }
        })
        .unwrap();
        (lists, costs)
    }

    /// The pair updates and neighbour changes of the epoch from `before` to `now`, as the
    /// stats define them: each window change's ordered pairs (an item that left loses its
    /// pairs of the old window, one that entered gains those of the new, one that stayed
    /// changes its pairs with what left or entered), and each entry of an item's neighbours
    /// that entered, left or changed count.
    fn expected_cost(
        before: &BTreeMap<String, Vec<String>>,
        now: &BTreeMap<String, Vec<String>>,
        settings: RecommendSettings,
    ) -> (u64, u64) {
        let window = |history: Option<&Vec<String>>| -> BTreeSet<String> {
            history.map_or_else(BTreeSet::new, |history| {
                window_distances(history, settings.covisit_window)
                    .into_keys()
                    .map(str::to_owned)
                    .collect()
            })
        };
        // An item's partners in a window; none in an empty one.
        let partners = |window: &BTreeSet<String>| window.len().saturating_sub(1) as u64;
        let mut pair_updates = 0;
        for user in before.keys().chain(now.keys()).collect::<BTreeSet<_>>() {
            let (old, new) = (window(before.get(user)), window(now.get(user)));
            let left = old.difference(&new).count() as u64;
            let entered = new.difference(&old).count() as u64;
            let stayed = old.intersection(&new).count() as u64;
            // A window that did not change adds nothing: left and entered are then 0.
            pair_updates +=
                left * partners(&old) + entered * partners(&new) + stayed * (left + entered);
        }
        let (was, is) = (
            RecommendReference::new(before.values(), settings),
            RecommendReference::new(now.values(), settings),
        );
        let items: BTreeSet<String> = before
            .values()
            .chain(now.values())
            .flatten()
            .cloned()
            .collect();
        let mut neighbour_changes = 0;
        for item in &items {
            let (was, is) = (was.neighbours(item), is.neighbours(item));
            neighbour_changes += is.iter().filter(|n| !was.contains(n)).count() as u64;
            neighbour_changes += was
                .iter()
                .filter(|w| !is.iter().any(|n| n.item_id == w.item_id))
                .count() as u64;
        }
        (pair_updates, neighbour_changes)
    }

    #[test]
    fn candidates_sum_every_items_terms_through_growth() {
        // The lists of the other tests have fewer candidates than the first table's half
        // (256), so only here does the table grow with candidates in it (W·K over 256 in
        // production). Whole-number terms, so that the sums are exact in any order. Numbers
        // from all of `u32`, not a dense range: multiplicative hashing spreads a dense range
        // without a collision, and the probing would go untested.
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let pool: Vec<u32> = (0..3_000)
            .map(|_| rng.random_range(0..Candidates::FREE))
            .collect();
        let mut candidates = Candidates::default();
        for round in 0..3 {
            // Each item's sum, in the order the items first came: the order `drain` keeps.
            let mut wanted: Vec<(u32, f64)> = Vec::new();
            let mut place: BTreeMap<u32, usize> = BTreeMap::new();
            for _ in 0..5_000 {
                let item = pool[rng.random_range(0..pool.len())];
                let term = f64::from(rng.random_range(1..100u32));
                candidates.add(item, term);
                let at = *place.entry(item).or_insert_with(|| {
                    wanted.push((item, 0.0));
                    wanted.len() - 1
                });
                wanted[at].1 += term;
            }
            let drained: Vec<(u32, f64)> = candidates.drain().collect();
            assert_eq!(drained, wanted, "round {round}");
            assert!(candidates
                .slots
                .iter()
                .all(|(item, _)| *item == Candidates::FREE));
        }
    }

    #[test]
    fn a_copy_reads_an_epochs_records_in_any_order() {
        // Timely does not keep the order of the records of one time at an exchange: a record
        // may arrive before the one that names its numbers. Source 1 names a and b with its
        // first record and c with its second, which also uses a's number and changes two
        // items; a record of the next epoch changes b.
        // (item, n, partners)
        type Change<'a> = (u32, u64, &'a [(u32, u32)]);
        let record = |names: &[(u32, &str)], items: &[Change<'_>]| {
            let mut changes = ItemChanges::new(1);
            changes.names = names.iter().map(|(n, id)| (*n, SmolStr::new(id))).collect();
            for &(item, users, partners) in items {
                changes.push(item, Some(users), partners);
            }
            changes
        };
        let first = record(&[(7, "a"), (3, "b")], &[(7, 2, &[(3, 2)])]);
        let second = record(&[(5, "c")], &[(5, 1, &[(7, 1)]), (3, 4, &[(5, 2)])]);
        for records in [[&first, &second], [&second, &first]] {
            let mut state = SharedState {
                neighbours_per_item: 3,
                ..SharedState::default()
            };
            let mut waiting = Waiting::default();
            for changes in records {
                waiting.hold(&mut state, Shared::Item(changes.clone()), 4, 1);
            }
            // A record of a later epoch waits.
            let later = record(&[], &[(3, 9, &[(7, 1)])]);
            waiting.hold(&mut state, Shared::Item(later), 5, 1);
            waiting.apply_through(4, &mut state);
            let numbers = &state.numbers;
            let copy = |id: &str| {
                let item = numbers.get(id).unwrap() as usize;
                let neighbours: Vec<(&str, u32)> = state.neighbours[item]
                    .iter()
                    .map(|(n, c)| (numbers.value(*n).as_str(), *c))
                    .collect();
                (state.items[item].users, neighbours)
            };
            assert_eq!(copy("a"), (2, vec![("b", 2)]));
            assert_eq!(copy("c"), (1, vec![("a", 1)]));
            assert_eq!(copy("b"), (4, vec![("c", 2)]), "epoch 5 not applied yet");
            let item = numbers.get("b").unwrap() as usize;
            waiting.apply_through(5, &mut state);
            assert_eq!(state.items[item].users, 9);
            assert_eq!(state.neighbours[item].len(), 2);
        }
    }

    #[test]
    fn the_popularity_order_matches_the_reference_over_epochs_and_workers() {
        for seed in testkit::seeds(23..24) {
            popularity_order_matches(seed);
        }
    }

    fn popularity_order_matches(seed: u64) {
        let covisit = CovisitParams {
            window: 5,
            neighbours: 3,
        };
        let settings = settings(covisit);
        let epochs = epochs(seed);
        // A cut-off among tied counts, and one beyond every item.
        for len in [4, 100] {
            for workers in [1, 2, 4] {
                let updates: Arc<Mutex<Vec<(Popular, u64, isize)>>> = Arc::default();
                let captured = updates.clone();
                let fed = epochs.clone();
                timely::execute(timely::Config::process(workers), move |worker| {
                    let updates = captured.clone();
                    let (mut input, probe) = worker.dataflow::<u64, _, _>(|scope| {
                        let (input, interests) = scope.new_collection::<UserInterest, isize>();
                        let built = covisitation(&interests, covisit, &CostBoard::default());
                        let probe = popular_order(&built.item_users, len)
                            .inspect(move |(((), popular), time, diff)| {
                                updates
                                    .lock()
                                    .unwrap()
                                    .push((popular.clone(), *time, *diff))
                            })
                            .probe()
                            .0;
                        (input, probe)
                    });
                    feed(worker, &mut input, &probe, &fed);
                })
                .unwrap();
                let updates = updates.lock().unwrap();
                for (epoch, histories) in epochs.iter().enumerate() {
                    let reference = RecommendReference::new(histories.values(), settings);
                    let mut order: BTreeMap<Popular, isize> = BTreeMap::new();
                    for (popular, _, diff) in updates.iter().filter(|u| u.1 <= epoch as u64) {
                        *order.entry(popular.clone()).or_insert(0) += diff;
                    }
                    order.retain(|_, count| *count != 0);
                    assert!(order.values().all(|count| *count == 1));
                    let actual: Vec<(String, u64)> = order
                        .keys()
                        .map(|p| (p.item.to_string(), p.users.0))
                        .collect();
                    let expected: Vec<(String, u64)> = reference
                        .popularity_order()
                        .iter()
                        .take(len)
                        .map(|p| (p.item_id.clone(), p.users))
                        .collect();
                    assert_eq!(
                        actual, expected,
                        "len {len}, epoch {epoch}, {workers} workers"
                    );
                }
            }
        }
    }

    #[test]
    fn lists_match_the_reference_for_every_changed_user_over_epochs_and_workers() {
        for seed in testkit::seeds(11..12) {
            lists_match(seed);
        }
    }

    fn lists_match(seed: u64) {
        let covisit = CovisitParams {
            window: 5,
            neighbours: 3,
        };
        let params = ScoreParams {
            recommendations_n: 4,
            decay: 0.9,
            max_history: 12,
            first_scored_time: 0,
        };
        let settings = RecommendSettings {
            covisit_window: 5,
            neighbours: 3,
            recommendations_n: 4,
            decay: 0.9,
        };
        let epochs = epochs(seed);
        for workers in [1, 2, 4] {
            let (lists, costs) = run(workers, &epochs, covisit, params);
            let (lists, costs) = (lists.lock().unwrap(), costs.lock().unwrap());
            let mut previous: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (epoch, histories) in epochs.iter().enumerate() {
                let reference = RecommendReference::new(histories.values(), settings);
                let changed: Vec<&String> = histories
                    .iter()
                    .filter(|(user, history)| previous.get(*user) != Some(history))
                    .map(|(user, _)| user)
                    .collect();
                let of_epoch: Vec<&UserRecommendations> = lists
                    .iter()
                    .filter(|(time, _)| *time == epoch as u64)
                    .map(|(_, list)| list)
                    .collect();
                let at: BTreeMap<&str, &UserRecommendations> = of_epoch
                    .iter()
                    .map(|list| (list.user_id.as_str(), *list))
                    .collect();
                // Counted before and after keying by user: a second list for a user (e.g. one
                // from the history the epoch retracted) would hide in the map.
                assert_eq!(
                    (of_epoch.len(), at.len()),
                    (changed.len(), changed.len()),
                    "one list per changed user at {epoch}"
                );
                let cost = costs.get(&(epoch as u64)).copied().unwrap_or_default();
                let (pair_updates, neighbour_changes) =
                    expected_cost(&previous, histories, settings);
                assert_eq!(
                    (cost.lists, cost.pair_updates, cost.neighbour_changes),
                    (changed.len() as u64, pair_updates, neighbour_changes),
                    "lists, pair updates and neighbour changes reported at {epoch}, {workers} \
                     workers"
                );
                for user in changed {
                    let list = at[user.as_str()];
                    let actual: Vec<ScoredItem> = list
                        .items
                        .iter()
                        .map(|(item, score)| ScoredItem {
                            item_id: item.to_string(),
                            score: *score,
                        })
                        .collect();
                    reference
                        .check_recommendations(&histories[user], &actual)
                        .unwrap_or_else(|e| {
                            panic!("{user} at epoch {epoch}, {workers} workers: {e}")
                        });
                }
                previous.clone_from(histories);
            }
        }
    }
}
