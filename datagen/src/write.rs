//! CSV writers for the behaviour file (semantics §1) and the item-features file (§3).
//!
//! They write bytes directly instead of going through the `csv` crate: generated ids are
//! `[0-9A-Z]` only, so no field ever needs quoting, and skipping per-field machinery keeps the
//! 5M-row file fast to write. Tests read the output back with `csv` to prove it parses.

use std::io::{self, BufWriter, Write};

use crate::{feature_units, Dataset, FEATURE_UNITS};

/// Buffer size for both writers; large enough that the 185 MB full file costs few syscalls.
const BUF_BYTES: usize = 1 << 16;

/// Writes `user_id,item_id,timestamp` and one line per row, in the data set's row order (user by
/// user, shuffled within a user). Buffers internally, so `out` may be a bare `File`.
pub fn write_behavior_csv<W: Write>(dataset: &Dataset, out: W) -> io::Result<()> {
    let mut w = BufWriter::with_capacity(BUF_BYTES, out);
    w.write_all(b"user_id,item_id,timestamp\n")?;
    for r in &dataset.rows {
        w.write_all(dataset.users[r.user as usize].as_bytes())?;
        w.write_all(b",")?;
        w.write_all(dataset.items[r.item as usize].as_bytes())?;
        writeln!(w, ",{}", r.timestamp)?;
    }
    w.flush()
}

/// Writes `item_id,f0,...,f{D-1}` and one line per item that occurs in the behaviour rows,
/// sorted by item id, values with exactly 4 decimals (they are generated on that grid, so
/// nothing is lost). Buffers internally, so `out` may be a bare `File`.
pub fn write_item_features_csv<W: Write>(dataset: &Dataset, out: W) -> io::Result<()> {
    let mut w = BufWriter::with_capacity(BUF_BYTES, out);
    w.write_all(b"item_id")?;
    for i in 0..dataset.dim {
        write!(w, ",f{i}")?;
    }
    w.write_all(b"\n")?;
    let mut units = Vec::with_capacity(dataset.dim);
    for item in dataset.used_items() {
        w.write_all(dataset.items[item as usize].as_bytes())?;
        feature_units(dataset.seed, dataset.dim, item as usize, &mut units);
        for &u in &units {
            write_units(&mut w, u)?;
        }
        w.write_all(b"\n")?;
    }
    w.flush()
}

/// Writes `,` and `u / 10000` with 4 decimals from the integer, which is exact and avoids float
/// formatting; it prints the same text as `{:.4}` of the f32 that `Dataset::features` returns.
fn write_units<W: Write>(w: &mut W, u: i32) -> io::Result<()> {
    let sign = if u < 0 { "-" } else { "" };
    let a = u.unsigned_abs();
    let unit = FEATURE_UNITS.unsigned_abs();
    write!(w, ",{sign}{}.{:04}", a / unit, a % unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_format_like_float_with_four_decimals() {
        for u in [
            -10_000, -9_999, -1_234, -1, 0, 1, 5, 999, 1_000, 9_999, 10_000,
        ] {
            let mut buf = Vec::new();
            write_units(&mut buf, u).expect("writing to a Vec cannot fail");
            let f = u as f32 / FEATURE_UNITS as f32;
            assert_eq!(String::from_utf8(buf).expect("ascii"), format!(",{f:.4}"));
        }
    }
}
