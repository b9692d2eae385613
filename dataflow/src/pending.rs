//! Data held back by an operator until its epoch is complete, with the capability to emit the
//! epoch's results.

use std::collections::BTreeMap;

use timely::dataflow::operators::{Capability, InputCapability};
use timely::progress::frontier::AntichainRef;

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

    /// Holds each of `data`'s records, which arrived with `capability`, at its own epoch
    /// (`epoch_of`): a collection's updates carry their times, which may be later than the
    /// capability's.
    pub fn hold_each(
        &mut self,
        capability: &InputCapability<u64>,
        data: &mut Vec<D>,
        epoch_of: impl Fn(&D) -> u64,
    ) {
        for record in data.drain(..) {
            let epoch = epoch_of(&record);
            self.at(epoch, || capability.delayed(&epoch, 0))
                .push(record);
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
