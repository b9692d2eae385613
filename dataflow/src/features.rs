//! The item features CSV (semantics §3): header `item_id,f0,...,f{D-1}`, D taken from the
//! header. Rows that do not parse are counted and skipped, never fatal.

use std::path::Path;

use crate::model::{FeatureEvent, FeatureVector};

/// Partition number given to rows of the CSV, so their read positions never clash with a
/// topic's.
pub const CSV_PARTITION: i32 = -1;

/// Why the features file could not be used at all.
#[derive(Debug, thiserror::Error)]
pub enum FeaturesError {
    #[error("cannot read item features {path}: {source}")]
    Read { path: String, source: csv::Error },
    #[error("item features header must be item_id,f0,...,f{{D-1}} with D >= 1, got {0:?}")]
    Header(String),
}

/// The features of the CSV and how many rows were skipped. The rows are dealt out in
/// `shares`, row `i` (counting the rows that parse) to share `i` mod the number of shares, each
/// share in file order.
#[derive(Debug, Default)]
pub struct LoadedFeatures {
    pub dim: usize,
    pub shares: Vec<Vec<FeatureEvent>>,
    pub bad_rows: usize,
}

impl LoadedFeatures {
    /// Every row that parsed, over all shares.
    pub fn len(&self) -> usize {
        self.shares.iter().map(Vec::len).sum()
    }

    /// Whether no row parsed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Loads an item features CSV in one share: [`LoadedFeatures::shares`] holds one vector, every
/// row in file order.
pub fn load_item_features(path: &Path) -> Result<LoadedFeatures, FeaturesError> {
    FeaturesFile::open(path)?.load_in_shares(1)
}

/// An item features CSV whose header is read and checked, so that D is known and a bad file is
/// refused at once; [`FeaturesFile::load_in_shares`] reads the rows.
#[derive(Debug)]
pub struct FeaturesFile {
    path: String,
    dim: usize,
    /// The file's length, to size the shares before they fill.
    file_bytes: u64,
    reader: csv::Reader<std::io::BufReader<std::fs::File>>,
}

impl FeaturesFile {
    /// Opens the CSV and checks its header (`item_id,f0,...,f{D-1}`, D >= 1).
    pub fn open(path: &Path) -> Result<Self, FeaturesError> {
        let read_error = |source| FeaturesError::Read {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::File::open(path).map_err(|e| read_error(e.into()))?;
        let file_bytes = file.metadata().map_or(0, |m| m.len());
        let mut reader = csv::ReaderBuilder::new()
            .flexible(true)
            .from_reader(std::io::BufReader::with_capacity(1 << 20, file));
        let header = reader.byte_headers().map_err(read_error)?;
        let dim = header.len().saturating_sub(1);
        let well_formed = header.get(0) == Some(&b"item_id"[..])
            && dim >= 1
            && header
                .iter()
                .skip(1)
                .enumerate()
                .all(|(j, name)| name == format!("f{j}").as_bytes());
        if !well_formed {
            return Err(FeaturesError::Header(
                header
                    .iter()
                    .map(String::from_utf8_lossy)
                    .collect::<Vec<_>>()
                    .join(","),
            ));
        }
        Ok(FeaturesFile {
            path: path.display().to_string(),
            dim,
            file_bytes,
            reader,
        })
    }

    /// D, the number of features of each item.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Reads the rows, dealing them out in `shares` (at least one), so that each worker takes
    /// its share as it is: splitting a loaded file afterwards cost a second vector of every
    /// row.
    ///
    /// Fields are read as bytes into one reused record, so the only allocations are those of
    /// the rows kept: a row's id and its values.
    pub fn load_in_shares(mut self, shares: usize) -> Result<LoadedFeatures, FeaturesError> {
        let path = self.path;
        let read_error = |source| FeaturesError::Read {
            path: path.clone(),
            source,
        };
        let shares = shares.max(1);
        let mut loaded = LoadedFeatures {
            dim: self.dim,
            shares: (0..shares).map(|_| Vec::new()).collect(),
            bad_rows: 0,
        };
        let header_bytes = self.reader.position().byte();
        let mut record = csv::ByteRecord::new();
        let mut values = Vec::with_capacity(self.dim);
        let mut kept = 0;
        let mut row = 0;
        while self
            .reader
            .read_byte_record(&mut record)
            .map_err(read_error)?
        {
            if row == 0 {
                // Room for the rows the file holds if they are as long as the first, so the
                // vectors are not grown (and copied) as they fill.
                let row_bytes = self
                    .reader
                    .position()
                    .byte()
                    .saturating_sub(header_bytes)
                    .max(1);
                let rows = (self.file_bytes.saturating_sub(header_bytes) / row_bytes) as usize + 1;
                for share in &mut loaded.shares {
                    share.reserve(rows.div_ceil(shares) + rows / 16);
                }
            }
            match parse_row(&record, self.dim, &mut values, row) {
                Some(event) => {
                    loaded.shares[kept % shares].push(event);
                    kept += 1;
                }
                None => {
                    loaded.bad_rows += 1;
                    if loaded.bad_rows <= 5 {
                        tracing::warn!(
                            row = row + 2,
                            "skipping item features row that does not parse"
                        );
                    }
                }
            }
            row += 1;
        }
        Ok(loaded)
    }
}

/// The feature event of data row number `row` (from 0), or `None` if it does not parse: an
/// empty id, a field count other than D + 1, or a value that is not a float within
/// [`profile::MAX_FEATURE_MAGNITUDE`].
fn parse_row(
    record: &csv::ByteRecord,
    dim: usize,
    values: &mut Vec<f32>,
    row: usize,
) -> Option<FeatureEvent> {
    if record.len() != dim + 1 {
        return None;
    }
    let item_id = record.get(0).filter(|id| !id.is_empty())?;
    let item_id = std::str::from_utf8(item_id).ok()?;
    values.clear();
    for field in record.iter().skip(1) {
        values.push(parse_feature(field)?);
    }
    Some(FeatureEvent {
        item_id: item_id.to_owned(),
        features: Some(FeatureVector::new(values)?),
        position: (CSV_PARTITION, row as i64),
    })
}

/// Parses one feature value exactly as `str::trim` then `f32::from_str` would, bit for bit.
///
/// Most values are plain decimals such as `-0.4904`, which take a fast path: with the digits
/// read as an integer `m` below 2^24 and at most 10 of them after the point, both `m` and
/// `10^fraction_digits` are exact f32s, so one correctly rounded division gives the correctly
/// rounded value, as the standard parser's own fast path does (Clinger's). Anything else
/// (spaces, an exponent, more digits, `inf`) goes to the standard parser. The features file
/// was half float parsing and UTF-8 checks of its fields (docs/performance.md, 2026-12-06,
/// start-up).
fn parse_feature(field: &[u8]) -> Option<f32> {
    /// `10^i` for the fraction digits the fast path takes.
    const POWERS: [f32; 11] = [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10];
    let (negative, digits) = match field.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, field),
    };
    let mut mantissa: u32 = 0;
    let mut fraction_digits: Option<usize> = None;
    let mut any_digit = false;
    for &byte in digits {
        match byte {
            b'0'..=b'9' => {
                mantissa = mantissa * 10 + u32::from(byte - b'0');
                any_digit = true;
                if let Some(count) = &mut fraction_digits {
                    *count += 1;
                }
                if mantissa > 1 << 24 {
                    return parse_feature_slowly(field);
                }
            }
            b'.' if fraction_digits.is_none() && any_digit => fraction_digits = Some(0),
            _ => return parse_feature_slowly(field),
        }
    }
    let fraction_digits = fraction_digits.unwrap_or(0);
    if !any_digit || fraction_digits == 0 && digits.last() == Some(&b'.') {
        return parse_feature_slowly(field);
    }
    let Some(power) = POWERS.get(fraction_digits) else {
        return parse_feature_slowly(field);
    };
    let magnitude = mantissa as f32 / power;
    Some(if negative { -magnitude } else { magnitude })
}

/// The standard parser, for what [`parse_feature`]'s fast path does not take.
fn parse_feature_slowly(field: &[u8]) -> Option<f32> {
    std::str::from_utf8(field).ok()?.trim().parse::<f32>().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<LoadedFeatures, FeaturesError> {
        let path = std::env::temp_dir().join(format!(
            "streamrec-features-{}-{}.csv",
            std::process::id(),
            text.len()
        ));
        std::fs::write(&path, text).unwrap();
        let loaded = load_item_features(&path);
        std::fs::remove_file(path).unwrap();
        loaded
    }

    #[test]
    fn reads_dimension_and_rows_and_skips_bad_ones() {
        let loaded =
            load("item_id,f0,f1\na,1,2\nb,x,2\nc,1\n,1,2\nd,1e9,0\ne,-0.5,0.25\n").unwrap();
        assert_eq!(loaded.dim, 2);
        assert_eq!(loaded.bad_rows, 4);
        let ids: Vec<&str> = loaded.shares[0]
            .iter()
            .map(|e| e.item_id.as_str())
            .collect();
        assert_eq!(ids, vec!["a", "e"]);
        let e = loaded.shares[0][1].features.as_ref().unwrap();
        assert_eq!(e.values().collect::<Vec<_>>(), vec![-0.5, 0.25]);
    }

    #[test]
    fn rows_that_parse_are_dealt_out_in_turn_each_share_in_file_order() {
        let text = "item_id,f0\na,1\nb,x\nc,2\nd,3\ne,4\n";
        let path = std::env::temp_dir().join(format!(
            "streamrec-features-shares-{}.csv",
            std::process::id()
        ));
        std::fs::write(&path, text).unwrap();
        let loaded = FeaturesFile::open(&path)
            .unwrap()
            .load_in_shares(3)
            .unwrap();
        std::fs::remove_file(path).unwrap();
        let shares: Vec<Vec<(&str, i64)>> = loaded
            .shares
            .iter()
            .map(|share| {
                share
                    .iter()
                    .map(|e| (e.item_id.as_str(), e.position.1))
                    .collect()
            })
            .collect();
        // "b" does not parse: it is skipped and counted, and keeps its row number.
        assert_eq!(
            shares,
            vec![vec![("a", 0), ("e", 4)], vec![("c", 2)], vec![("d", 3)]]
        );
        assert_eq!((loaded.len(), loaded.bad_rows), (4, 1));
    }

    #[test]
    fn feature_values_parse_as_the_standard_parser_does_bit_for_bit() {
        use rand::{Rng, SeedableRng};
        let standard = |text: &str| text.trim().parse::<f32>().ok().map(f32::to_bits);
        let ours = |text: &str| parse_feature(text.as_bytes()).map(f32::to_bits);
        let fixed = [
            "0",
            "-0",
            "0.0",
            "-0.0",
            "1",
            "-1",
            "0.5",
            "-0.4904",
            "1.0000",
            "16777216",
            "16777217",
            "-16777215",
            "0.16777216",
            "1.6777217",
            "0.0000000001",
            "0.00000000001",
            "123456.7",
            "9999999.9",
            "3.4028235e38",
            "1e9",
            "1E-3",
            " 0.5",
            "0.5 ",
            "+0.5",
            ".5",
            "5.",
            "-",
            ".",
            "-.",
            "",
            "1..2",
            "1.2.3",
            "0x10",
            "inf",
            "-inf",
            "NaN",
            "1_000",
            "١",
            "0.1234567890",
            "00000.25",
            "-000",
        ];
        for text in fixed {
            assert_eq!(ours(text), standard(text), "{text:?}");
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for _ in 0..200_000 {
            let value: f32 = f32::from_bits(rng.random());
            let decimals = rng.random_range(0..12);
            let scaled = value / 10f32.powi(rng.random_range(0..30));
            for text in [
                format!("{value}"),
                format!("{scaled}"),
                format!("{scaled:.decimals$}"),
                format!("{:.decimals$}", rng.random_range(-100_000.0f64..100_000.0)),
                format!("{}", rng.random_range(-99_999_999i64..99_999_999)),
            ] {
                assert_eq!(ours(&text), standard(&text), "{text:?}");
            }
        }
    }

    #[test]
    fn a_bad_header_is_an_error() {
        assert!(matches!(
            load("id,f0\na,1\n"),
            Err(FeaturesError::Header(_))
        ));
        assert!(matches!(
            load("item_id\na\n"),
            Err(FeaturesError::Header(_))
        ));
        assert!(matches!(
            load("item_id,f1\na,1\n"),
            Err(FeaturesError::Header(_))
        ));
    }

    #[test]
    fn the_committed_sample_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/item_features.csv");
        let loaded = load_item_features(&path).unwrap();
        assert_eq!(loaded.dim, 32);
        assert_eq!(loaded.bad_rows, 0);
        assert!(loaded.len() > 1000);
    }
}
