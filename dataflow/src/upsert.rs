//! Upserts into differential arrangements: events that set the current value of a key, applied
//! once their epoch is complete, in read order, with the outcome kept in an arrangement (a
//! spine of immutable batches, merged in the background) that other operators read through
//! cursors and can import.
//!
//! Differential's own `arrange_from_upsert` orders a key's updates by dataflow time alone and
//! breaks ties by value. The contract wants more (semantics §4): a profile message older than
//! the user's current profile is stale, whatever its epoch, and within an epoch the message
//! read later wins. So [`arrange_upserts`] hands each complete epoch's events, with a cursor to
//! each key's current value ([`Prior`]), to a rule of the caller's (`settle`), which says what
//! changes; the operator builds the epoch's batch of retractions and insertions with
//! differential's builder, inserts it into the trace and sends it downstream.
//!
//! One batch per epoch, on every worker, even an empty one: its description moves the trace's
//! frontier, which is how readers learn that the epoch is complete.

use std::rc::Rc;

use differential_dataflow::operators::arrange::{Arranged, TraceAgent};
use differential_dataflow::trace::cursor::{cursor_list, CursorList};
use differential_dataflow::trace::implementations::{ValBuilder, ValSpine};
use differential_dataflow::trace::TraceReader;
use differential_dataflow::trace::{Builder, Cursor, Description, Navigable, Span};
use timely::dataflow::channels::pact::ParallelizationContract;
use timely::dataflow::operators::Operator;
use timely::dataflow::Stream;
use timely::progress::Antichain;

use crate::pending::PendingEpochs;

/// The spine of an arrangement with one value per key, by epoch.
pub type UpsertSpine<K, V> = ValSpine<K, V, u64, isize>;
/// A handle to such an arrangement's trace: cloned or imported, it holds back compaction until
/// its reader has moved on.
pub type UpsertTrace<K, V> = TraceAgent<UpsertSpine<K, V>>;
/// One batch of such an arrangement.
pub type UpsertBatch<K, V> = <UpsertSpine<K, V> as TraceReader>::Batch;
/// The updates of one epoch: (key, value), epoch, +1 or -1.
pub type Update<K, V> = ((K, V), u64, isize);

type UpsertBuilder<K, V> = ValBuilder<K, V, u64, isize>;
type BatchCursorOf<K, V> = <UpsertBatch<K, V> as Navigable>::Cursor;

/// How much merge work each batch inserted pays for, as a multiple of its length. Every
/// change of a value leaves the old value and its retraction in the spine until a merge
/// consolidates them away, and every batch not yet merged is one more seek for each key looked
/// up; merging faster than differential's default (1) keeps fewer of both (see
/// docs/performance.md: the incremental cost with a large state and the full-scale memory).
const MERGE_EFFORT: usize = 16;

/// The current value of each key, for the keys of one epoch asked in increasing order.
pub struct Prior<K: Ord + Clone + 'static, V: Ord + Clone + 'static> {
    cursor: CursorList<BatchCursorOf<K, V>>,
    storage: Vec<UpsertBatch<K, V>>,
}

impl<K: Ord + Clone + 'static, V: Ord + Clone + 'static> Prior<K, V> {
    /// A cursor over `batches`, every batch of the trace.
    pub fn new(batches: Vec<UpsertBatch<K, V>>) -> Self {
        let (cursor, storage) = cursor_list(batches);
        Prior { cursor, storage }
    }

    /// The value of `key` once every update up to `as_of` is counted, if it has one. Keys must
    /// be asked in increasing order: the cursor only moves forward.
    pub fn get(&mut self, key: K, as_of: u64) -> Option<V> {
        let (cursor, storage) = (&mut self.cursor, &self.storage);
        cursor.seek_key(storage, &key);
        if cursor.get_key(storage) != Some(&key) {
            return None;
        }
        value_as_of(cursor, storage, as_of).cloned()
    }
}

/// The value at the cursor's key once its updates up to `as_of` are counted, if it has one,
/// with the cursor left past the key's values. Over a whole trace that is the key's value then;
/// over one batch of an upsert arrangement (`as_of` its epoch or later), the value it inserts,
/// `None` for a key it only retracts.
pub fn value_as_of<'a, C, V: 'a>(
    cursor: &mut C,
    storage: &'a C::Storage,
    as_of: u64,
) -> Option<&'a V>
where
    C: for<'b> Cursor<Val<'b> = &'b V, TimeGat<'b> = &'b u64, DiffGat<'b> = &'b isize>,
{
    let mut current = None;
    while let Some(value) = cursor.get_val(storage) {
        let mut count = 0;
        cursor.map_times(storage, |&time, &diff| {
            if time <= as_of {
                count += diff;
            }
        });
        // An upsert arrangement holds at most one value per key at any time.
        debug_assert!(count <= 1, "count {count}");
        if count > 0 {
            current = Some(value);
        }
        cursor.step_val(storage);
    }
    current
}

/// What one batch of an upsert arrangement does to the cursor's key: the value it retracts and
/// the value it inserts (each `None` if it has none: a new key, a deleted key), with the cursor
/// left past the key's values. Every update of a batch counts, whatever its time.
pub fn retracted_and_inserted<'a, C, V: 'a>(
    cursor: &mut C,
    storage: &'a C::Storage,
) -> (Option<&'a V>, Option<&'a V>)
where
    C: for<'b> Cursor<Val<'b> = &'b V, TimeGat<'b> = &'b u64, DiffGat<'b> = &'b isize>,
{
    let (mut retracted, mut inserted) = (None, None);
    while let Some(value) = cursor.get_val(storage) {
        let mut count = 0;
        cursor.map_times(storage, |_, &diff| count += diff);
        debug_assert!((-1..=1).contains(&count), "count {count}");
        match count {
            ..0 => retracted = Some(value),
            1.. => inserted = Some(value),
            0 => {}
        }
        cursor.step_val(storage);
    }
    (retracted, inserted)
}

impl<K: Ord + Clone + 'static, V: Ord + Clone + 'static> std::fmt::Debug for Prior<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prior")
            .field("batches", &self.storage.len())
            .finish()
    }
}

/// Arranges `events` by key, one value per key: once an epoch is complete, `settle(epoch,
/// events, prior, updates)` turns its events into updates of the current values (a retraction
/// of the old value and the new value, for each key that changed), read from `prior`. The
/// updates need not be sorted.
///
/// `pact` says which worker holds which keys: an exchange by key, or the pipeline after a
/// broadcast for a collection every worker holds whole.
pub fn arrange_upserts<'scope, E, K, V, P, F>(
    events: Stream<'scope, u64, Vec<E>>,
    pact: P,
    name: &str,
    mut settle: F,
) -> Arranged<'scope, UpsertTrace<K, V>>
where
    E: Clone + 'static,
    K: Ord + Clone + 'static,
    V: Ord + Clone + 'static,
    P: ParallelizationContract<u64, Vec<E>>,
    F: FnMut(u64, Vec<E>, &mut Prior<K, V>, &mut Vec<Update<K, V>>) + 'static,
{
    let scope = events.scope();
    let mut reader: Option<UpsertTrace<K, V>> = None;
    let stream = {
        let reader = &mut reader;
        events.unary_frontier(pact, name, move |_capability, info| {
            let logger = scope
                .worker()
                .logger_for::<differential_dataflow::logging::DifferentialEventBuilder>(
                    "differential/arrange",
                )
                .map(Into::into);
            let activator = Some(scope.activator_for(Rc::clone(&info.address)));
            let empty = UpsertSpine::<K, V>::with_effort(
                MERGE_EFFORT,
                info.clone(),
                logger.clone(),
                activator,
            );
            let (mut trace, mut writer) = TraceAgent::new(empty, info, logger);
            *reader = Some(trace.clone());
            let mut pending = PendingEpochs::<E>::default();
            // Where the next batch starts: the end of the last one.
            let mut lower = Antichain::from_elem(0u64);
            let mut updates: Vec<Update<K, V>> = Vec::new();
            move |(input, frontier), output| {
                input.for_each(|capability, data| {
                    if let Some(capability) = capability.retain_least(0) {
                        pending.at(*capability.time(), || capability).append(data);
                    }
                });
                while let Some((capability, events)) = pending.take_complete(frontier.frontier()) {
                    let epoch = *capability.time();
                    // The batch ends where the next pending epoch or the frontier begins.
                    let end = pending
                        .first_epoch()
                        .into_iter()
                        .chain(frontier.frontier().iter().copied())
                        .min();
                    let upper = end.map_or_else(Antichain::new, Antichain::from_elem);
                    #[allow(clippy::expect_used)]
                    let batches = trace
                        .batches_through(Antichain::new().borrow())
                        .expect("the operator's own trace is never compacted past its input");
                    let mut prior = Prior::new(batches);
                    settle(epoch, events, &mut prior, &mut updates);
                    drop(prior);
                    // The builder takes updates in (key, value, time) order.
                    updates.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                    let mut builder = UpsertBuilder::<K, V>::default();
                    builder.push(&mut updates);
                    updates.clear();
                    let description =
                        Description::new(lower.clone(), upper.clone(), Antichain::from_elem(0u64));
                    let span = Span::new(description, builder.done().map(Rc::new));
                    writer.insert(span.clone(), timely::progress::Stamp::from_elem(epoch));
                    output.session(&capability).give(span);
                    lower = upper;
                }
                // Progress without data: every epoch before the frontier is complete and empty
                // (any epoch still pending is at or past the frontier).
                if lower.borrow() != frontier.frontier() {
                    lower = frontier.frontier().to_owned();
                    writer.seal(lower.clone());
                }
                // This handle reads only the current values: merges may forget the rest.
                trace.set_logical_compaction(lower.borrow());
                trace.set_physical_compaction(lower.borrow());
                writer.exert();
            }
        })
    };
    #[allow(clippy::expect_used)]
    let trace = reader.expect("the operator's constructor ran");
    Arranged { stream, trace }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a panic in a test is a test failure

    use timely::dataflow::channels::pact::Pipeline;
    use timely::dataflow::operators::Input;

    use super::*;

    /// The trace's frontier follows the input's through epochs without any event: readers
    /// that wait for an epoch to be complete in the trace (a checkpoint) do not wait for the
    /// next event.
    #[test]
    fn the_trace_follows_the_frontier_through_epochs_without_events() {
        timely::execute_directly(|worker| {
            let (mut input, mut trace) = worker.dataflow::<u64, _, _>(|scope| {
                let (input, events) = scope.new_input::<Vec<(u32, u32)>>();
                let arranged = arrange_upserts(
                    events,
                    Pipeline,
                    "Test",
                    |epoch, events: Vec<(u32, u32)>, _: &mut Prior<u32, u32>, updates| {
                        updates.extend(events.into_iter().map(|(k, v)| ((k, v), epoch, 1)));
                    },
                );
                (input, arranged.trace)
            });
            let mut trace_upper = |input_time: u64, worker: &mut timely::worker::Worker| {
                let mut upper = Antichain::new();
                for _ in 0..100 {
                    worker.step();
                    trace.read_upper(&mut upper);
                    if upper.elements() == [input_time] {
                        break;
                    }
                }
                upper.elements().to_vec()
            };
            input.send((1, 10));
            input.advance_to(1);
            assert_eq!(trace_upper(1, worker), [1], "the epoch with an event");
            input.advance_to(5);
            assert_eq!(trace_upper(5, worker), [5], "four epochs without one");
            input.send((1, 11));
            input.advance_to(6);
            assert_eq!(trace_upper(6, worker), [6]);
        });
    }
}
