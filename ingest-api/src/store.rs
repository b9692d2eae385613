//! The behaviour store: the behaviour CSV loaded once at start into interned, per-user sorted
//! columns, so that `history(user, T)` is a hash lookup and a binary search.

use std::io::Read;
use std::path::Path;
use std::time::Instant;

use rand::Rng;
use rustc_hash::FxHashMap;

/// Why the behaviour CSV could not be loaded at all. Rows that do not parse are not errors: they
/// are counted in [`LoadStats::bad_rows`].
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot open behaviour CSV {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot read behaviour CSV: {0}")]
    Read(#[from] csv::Error),
    #[error("behaviour CSV header lacks column {0:?} (needs user_id,item_id,timestamp)")]
    MissingColumn(&'static str),
    #[error("behaviour CSV has more than {} distinct users or items", u32::MAX)]
    TooLarge,
}

/// What a load found, for the start-up log line and the metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadStats {
    pub users: usize,
    pub items: usize,
    pub rows: usize,
    pub bad_rows: usize,
    pub seconds: f64,
}

/// Every user's behaviour history, sorted per semantics §1.
///
/// Users and items are interned to `u32`. Item numbers follow the byte order of the item ids, so
/// sorting a user's rows by `(timestamp, item number)` is exactly the contract's
/// `(timestamp, item_id)` order. Rows live in two flat columns; user `u` owns
/// `row_start[u]..row_start[u + 1]`.
#[derive(Debug, Default)]
pub struct BehaviorStore {
    user_ids: Vec<Box<str>>,
    user_index: FxHashMap<Box<str>, u32>,
    item_ids: Vec<Box<str>>,
    row_start: Vec<usize>,
    timestamps: Vec<u64>,
    items: Vec<u32>,
    stats: LoadStats,
}

/// A history as `history(user, T)` returns it: item ids oldest first.
pub type History<'a> = Vec<&'a str>;

/// The columns a header names, by position.
struct Columns {
    user: usize,
    item: usize,
    timestamp: usize,
}

impl Columns {
    fn from_header(header: &csv::ByteRecord) -> Result<Self, LoadError> {
        let find = |name: &'static str| {
            header
                .iter()
                .position(|field| field.trim_ascii() == name.as_bytes())
                .ok_or(LoadError::MissingColumn(name))
        };
        Ok(Columns {
            user: find("user_id")?,
            item: find("item_id")?,
            timestamp: find("timestamp")?,
        })
    }
}

/// Interns ids to dense numbers in first-seen order.
#[derive(Default)]
struct Interner {
    index: FxHashMap<Box<str>, u32>,
    ids: Vec<Box<str>>,
}

impl Interner {
    fn intern(&mut self, id: &str) -> Result<u32, LoadError> {
        if let Some(&number) = self.index.get(id) {
            return Ok(number);
        }
        let number = u32::try_from(self.ids.len()).map_err(|_| LoadError::TooLarge)?;
        self.index.insert(id.into(), number);
        self.ids.push(id.into());
        Ok(number)
    }
}

/// How many unparseable rows are logged one by one before the rest are only counted.
const LOGGED_BAD_ROWS: usize = 5;

impl BehaviorStore {
    /// Loads a behaviour CSV file.
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        let file = std::fs::File::open(path).map_err(|source| LoadError::Open {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_reader(std::io::BufReader::with_capacity(1 << 20, file))
    }

    /// Loads behaviour CSV from any reader (header `user_id,item_id,timestamp`, any column order,
    /// extra columns ignored).
    pub fn from_reader(reader: impl Read) -> Result<Self, LoadError> {
        let started = Instant::now();
        let mut csv = csv::ReaderBuilder::new()
            .has_headers(true)
            // Rows with a missing or extra field are counted as bad, not fatal.
            .flexible(true)
            .from_reader(reader);
        let columns = Columns::from_header(csv.byte_headers()?)?;

        let mut users = Interner::default();
        let mut items = Interner::default();
        // (user, item, timestamp) as read; sorted into per-user columns below.
        let mut rows: Vec<(u32, u32, u64)> = Vec::new();
        let mut bad_rows = 0usize;
        let mut record = csv::ByteRecord::new();
        while csv.read_byte_record(&mut record)? {
            match parse_row(&record, &columns) {
                Some((user, item, timestamp)) => {
                    rows.push((users.intern(user)?, items.intern(item)?, timestamp));
                }
                None => {
                    bad_rows += 1;
                    if bad_rows <= LOGGED_BAD_ROWS {
                        let line = record.position().map_or(0, |p| p.line());
                        tracing::warn!(line, "skipping behaviour row that does not parse");
                    }
                }
            }
        }

        // Renumber items in byte order of their ids (see the type's doc).
        let mut by_id: Vec<u32> = (0..items.ids.len() as u32).collect();
        by_id.sort_unstable_by(|&a, &b| {
            items.ids[a as usize]
                .as_bytes()
                .cmp(items.ids[b as usize].as_bytes())
        });
        let mut rank = vec![0u32; by_id.len()];
        for (position, &item) in by_id.iter().enumerate() {
            rank[item as usize] = position as u32;
        }
        let item_ids: Vec<Box<str>> = by_id
            .iter()
            .map(|&item| std::mem::take(&mut items.ids[item as usize]))
            .collect();
        drop(items.index);

        // Counting sort by user, then each user's rows by (timestamp, item).
        let user_count = users.ids.len();
        let mut row_start = vec![0usize; user_count + 1];
        for &(user, _, _) in &rows {
            row_start[user as usize + 1] += 1;
        }
        for u in 0..user_count {
            row_start[u + 1] += row_start[u];
        }
        let mut next = row_start.clone();
        let mut sorted = vec![(0u64, 0u32); rows.len()];
        for (user, item, timestamp) in rows {
            let slot = &mut next[user as usize];
            sorted[*slot] = (timestamp, rank[item as usize]);
            *slot += 1;
        }
        for u in 0..user_count {
            sorted[row_start[u]..row_start[u + 1]].sort_unstable();
        }
        let (timestamps, items): (Vec<u64>, Vec<u32>) = sorted.into_iter().unzip();

        let stats = LoadStats {
            users: user_count,
            items: item_ids.len(),
            rows: timestamps.len(),
            bad_rows,
            seconds: started.elapsed().as_secs_f64(),
        };
        Ok(BehaviorStore {
            user_ids: users.ids,
            user_index: users.index,
            item_ids,
            row_start,
            timestamps,
            items,
            stats,
        })
    }

    /// What the load found.
    pub fn stats(&self) -> &LoadStats {
        &self.stats
    }

    /// Number of users.
    pub fn user_count(&self) -> usize {
        self.user_ids.len()
    }

    /// `history(user, at)` of semantics §1: the user's items with timestamp `<= at`, oldest first,
    /// the last `max_history` of them. Empty for an unknown user.
    pub fn history(&self, user_id: &str, at: u64, max_history: usize) -> History<'_> {
        match self.user_index.get(user_id) {
            Some(&user) => self.history_of(user, at, max_history),
            None => Vec::new(),
        }
    }

    fn history_of(&self, user: u32, at: u64, max_history: usize) -> History<'_> {
        let rows = self.row_start[user as usize]..self.row_start[user as usize + 1];
        let window =
            profile::history_window(&self.timestamps[rows.clone()], at, max_history, |&t| t);
        self.items[rows.start + window.start..rows.start + window.end]
            .iter()
            .map(|&item| &*self.item_ids[item as usize])
            .collect()
    }

    /// A uniform random sample of `count` distinct users other than `exclude` (fewer when there
    /// are not that many). O(count), whatever the number of users.
    pub fn sample_other_users<'a>(
        &'a self,
        rng: &mut impl Rng,
        count: usize,
        exclude: &str,
    ) -> Vec<&'a str> {
        let excluded = self.user_index.get(exclude).copied();
        let pool = self.user_ids.len() - usize::from(excluded.is_some());
        let count = count.min(pool);
        rand::seq::index::sample(rng, pool, count)
            .into_iter()
            .map(|i| {
                // Skip over the excluded user by shifting the indices at or above it.
                let user = match excluded {
                    Some(x) if i >= x as usize => i + 1,
                    _ => i,
                };
                &*self.user_ids[user]
            })
            .collect()
    }
}

/// Parses one row, or `None` when it does not parse: a missing field, an empty or non-UTF-8 id,
/// or a timestamp that is not an integer in 0..=2^53.
fn parse_row<'r>(
    record: &'r csv::ByteRecord,
    columns: &Columns,
) -> Option<(&'r str, &'r str, u64)> {
    let user = std::str::from_utf8(record.get(columns.user)?).ok()?;
    let item = std::str::from_utf8(record.get(columns.item)?).ok()?;
    let timestamp: u64 = std::str::from_utf8(record.get(columns.timestamp)?)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    if user.is_empty() || item.is_empty() || profile::validate_timestamp(timestamp).is_err() {
        return None;
    }
    Some((user, item, timestamp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn store(csv: &str) -> BehaviorStore {
        BehaviorStore::from_reader(csv.as_bytes()).unwrap()
    }

    #[test]
    fn sorts_by_time_then_item_bytes_and_windows() {
        let s = store(
            "user_id,item_id,timestamp\n\
             u,b,20\nu,a,20\nu,Z,20\nu,c,10\nu,d,30\nv,x,5\n",
        );
        assert_eq!(s.history("u", 25, 50), vec!["c", "Z", "a", "b"]);
        assert_eq!(s.history("u", 25, 2), vec!["a", "b"]);
        assert_eq!(s.history("u", 30, 50), vec!["c", "Z", "a", "b", "d"]);
        assert_eq!(s.history("u", 9, 50), Vec::<&str>::new());
        assert_eq!(s.history("v", 5, 50), vec!["x"]);
        assert_eq!(s.history("w", 99, 50), Vec::<&str>::new());
    }

    #[test]
    fn ids_are_opaque_strings() {
        let s = store("user_id,item_id,timestamp\n196,a,1\n0196,b,1\n");
        assert_eq!(s.history("196", 1, 50), vec!["a"]);
        assert_eq!(s.history("0196", 1, 50), vec!["b"]);
        assert_eq!(s.user_count(), 2);
    }

    #[test]
    fn counts_bad_rows_and_ignores_extra_columns() {
        let s = store(
            "rating,timestamp,item_id,user_id\n\
             5,10,i1,u1\n\
             4,notanumber,i2,u1\n\
             3,-5,i3,u1\n\
             2,11\n\
             1,12,,u1\n\
             1,9007199254740993,i4,u1\n\
             0,13,i5,u2\n",
        );
        assert_eq!(s.stats().rows, 2);
        assert_eq!(s.stats().bad_rows, 5);
        assert_eq!(s.stats().users, 2);
        assert_eq!(s.history("u1", 100, 50), vec!["i1"]);
    }

    #[test]
    fn a_missing_column_is_an_error() {
        let err = BehaviorStore::from_reader("user_id,item\nu,i\n".as_bytes()).unwrap_err();
        assert!(matches!(err, LoadError::MissingColumn("item_id")));
    }

    #[test]
    fn samples_distinct_other_users() {
        let mut csv = String::from("user_id,item_id,timestamp\n");
        for u in 0..100 {
            csv.push_str(&format!("user{u},i,1\n"));
        }
        let s = store(&csv);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for _ in 0..200 {
            let sample = s.sample_other_users(&mut rng, 60, "user42");
            assert_eq!(sample.len(), 60);
            assert!(!sample.contains(&"user42"));
            let distinct: std::collections::HashSet<_> = sample.iter().collect();
            assert_eq!(distinct.len(), 60);
        }
        // Every other user is reachable, including the last one past the excluded index.
        let all = s.sample_other_users(&mut rng, 1000, "user42");
        assert_eq!(all.len(), 99);
        assert!(all.contains(&"user99") && all.contains(&"user0"));
        // An unknown target excludes no one.
        assert_eq!(s.sample_other_users(&mut rng, 1000, "nobody").len(), 100);
    }
}
