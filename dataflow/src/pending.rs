//! Data held back by an operator until its epoch is complete, with the capability to emit the
//! epoch's results.

use std::collections::BTreeMap;

use timely::dataflow::operators::{Capability, InputCapability};
use timely::progress::frontier::AntichainRef;
use timely::progress::Antichain;

/// Buffers data by epoch; [`PendingEpochs::take_complete`] hands back, oldest first, each epoch
/// the input frontier has passed.
#[derive(Debug)]
pub struct PendingEpochs<D> {
    epochs: BTreeMap<u64, (Capability<u64>, Vec<D>)>,
}

impl<D> Default for PendingEpochs<D> {
    fn default() -> Self {
        PendingEpochs {
            epochs: BTreeMap::new(),
        }
    }
}

impl<D> PendingEpochs<D> {
    /// The buffer of `epoch`, created with the capability `capability()` if new.
    pub fn at(&mut self, epoch: u64, capability: impl FnOnce() -> Capability<u64>) -> &mut Vec<D> {
        &mut self
            .epochs
            .entry(epoch)
            .or_insert_with(|| (capability(), Vec::new()))
            .1
    }

    /// Holds each of `data`'s records, which arrived with `capability`, at its own epoch:
    /// `place` turns a record into its epoch and what is held of it (a collection's updates
    /// carry their times, which may be later than the capability's).
    pub fn hold_each<I>(
        &mut self,
        capability: &InputCapability<u64>,
        data: &mut Vec<I>,
        mut place: impl FnMut(I) -> (u64, D),
    ) {
        for record in data.drain(..) {
            let (epoch, held) = place(record);
            self.at(epoch, || capability.delayed(&epoch, 0)).push(held);
        }
    }

    /// The oldest epoch held back, if any.
    pub fn first_epoch(&self) -> Option<u64> {
        self.epochs.keys().next().copied()
    }

    /// Removes and returns the oldest epoch that `frontier` has passed, if any.
    pub fn take_complete(
        &mut self,
        frontier: AntichainRef<'_, u64>,
    ) -> Option<(Capability<u64>, Vec<D>)> {
        let entry = self.epochs.first_entry()?;
        if frontier.less_equal(entry.key()) {
            return None;
        }
        Some(entry.remove())
    }
}

/// The times two inputs have both passed: the frontier that is the union of theirs. An epoch
/// is complete once neither input can bring more of it.
pub fn passed_by_both(
    first: AntichainRef<'_, u64>,
    second: AntichainRef<'_, u64>,
) -> Antichain<u64> {
    first.iter().chain(second.iter()).copied().collect()
}
