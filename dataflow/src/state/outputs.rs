//! Each local user's last interest vector and known items: what the interest collection holds
//! for the user now, kept so that the epoch that changes the user's output can retract the old
//! value exactly, bit for bit, without recomputing it.
//!
//! Recomputing the old vector instead (from the old history, with the features as they were
//! before the epoch) keeps no copy but costs a second vector per changed user: 50 feature rows
//! scattered over a table larger than the caches. Measured against keeping the vectors, see
//! docs/performance.md.
//!
//! The vectors live in chunks of `USERS_PER_CHUNK` users rather than in one growing array: a
//! grown array is copied, and for a moment both copies are resident, which at full scale would
//! show in the peak memory.

use super::users::UserIndex;

/// Users per chunk of vectors: at D = 32, 512 KiB a chunk.
const USERS_PER_CHUNK: usize = 4096;

/// The last output vector and known items of each user, by [`UserIndex`].
#[derive(Debug)]
pub struct OutputTable {
    dim: usize,
    chunks: Vec<Box<[f32]>>,
    known_items: Vec<u32>,
}

impl OutputTable {
    /// An empty table of vectors of `dim` values.
    pub fn new(dim: usize) -> Self {
        OutputTable {
            dim,
            chunks: Vec::new(),
            known_items: Vec::new(),
        }
    }

    /// The user's last output vector and known items: `None` past the last user recorded, zeros
    /// for a user below it never recorded.
    pub fn get(&self, user: UserIndex) -> Option<(&[f32], u32)> {
        let user = user as usize;
        let known_items = *self.known_items.get(user)?;
        let chunk = self.chunks.get(user / USERS_PER_CHUNK)?;
        let start = (user % USERS_PER_CHUNK) * self.dim;
        Some((&chunk[start..start + self.dim], known_items))
    }

    /// Records the user's new output vector and known items.
    pub fn set(&mut self, user: UserIndex, vector: &[f32], known_items: u32) {
        let user = user as usize;
        while self.chunks.len() <= user / USERS_PER_CHUNK {
            // Zeroed memory from the allocator is untouched, and so not resident, until written.
            self.chunks
                .push(vec![0.0; USERS_PER_CHUNK * self.dim].into_boxed_slice());
        }
        if self.known_items.len() <= user {
            self.known_items.resize(user + 1, 0);
        }
        self.known_items[user] = known_items;
        let start = (user % USERS_PER_CHUNK) * self.dim;
        self.chunks[user / USERS_PER_CHUNK][start..start + self.dim].copy_from_slice(vector);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_each_users_vector_across_chunks() {
        let mut table = OutputTable::new(2);
        assert_eq!(table.get(0), None);
        #[allow(clippy::unwrap_used)] // a panic in a test is a test failure
        let far = (USERS_PER_CHUNK * 2 + 3) as UserIndex;
        table.set(far, &[1.5, -0.0], 2);
        table.set(1, &[f32::MIN_POSITIVE, 3.0], 1);
        let (vector, known) = table.get(far).unwrap();
        assert_eq!(
            (vector[0], vector[1].to_bits(), known),
            (1.5, (-0.0f32).to_bits(), 2)
        );
        assert_eq!(table.get(1), Some((&[f32::MIN_POSITIVE, 3.0][..], 1)));
        table.set(1, &[0.0, 0.0], 0);
        assert_eq!(table.get(1), Some((&[0.0, 0.0][..], 0)));
    }
}
