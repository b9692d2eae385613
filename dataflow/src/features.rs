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

/// The features of the CSV, in file order, and how many rows were skipped.
#[derive(Debug, Default)]
pub struct LoadedFeatures {
    pub dim: usize,
    pub items: Vec<FeatureEvent>,
    pub bad_rows: usize,
}

/// Loads an item features CSV.
pub fn load_item_features(path: &Path) -> Result<LoadedFeatures, FeaturesError> {
    let read_error = |source| FeaturesError::Read {
        path: path.display().to_string(),
        source,
    };
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(path)
        .map_err(read_error)?;
    let header = reader.headers().map_err(read_error)?.clone();
    let dim = header.len().saturating_sub(1);
    let well_formed = header.get(0) == Some("item_id")
        && dim >= 1
        && header
            .iter()
            .skip(1)
            .enumerate()
            .all(|(j, name)| name == format!("f{j}"));
    if !well_formed {
        return Err(FeaturesError::Header(
            header.iter().collect::<Vec<_>>().join(","),
        ));
    }
    let mut loaded = LoadedFeatures {
        dim,
        ..Default::default()
    };
    let mut values = Vec::with_capacity(dim);
    for (row, record) in reader.records().enumerate() {
        let parsed = record.ok().and_then(|record| {
            let item_id = record.get(0).filter(|id| !id.is_empty())?.to_owned();
            if record.len() != dim + 1 {
                return None;
            }
            values.clear();
            for field in record.iter().skip(1) {
                values.push(field.trim().parse::<f32>().ok()?);
            }
            Some(FeatureEvent {
                item_id,
                features: Some(FeatureVector::new(&values)?),
                position: (CSV_PARTITION, row as i64),
            })
        });
        match parsed {
            Some(event) => loaded.items.push(event),
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
    }
    Ok(loaded)
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
        let ids: Vec<&str> = loaded.items.iter().map(|e| e.item_id.as_str()).collect();
        assert_eq!(ids, vec!["a", "e"]);
        let e = loaded.items[1].features.as_ref().unwrap();
        assert_eq!(e.values().collect::<Vec<_>>(), vec![-0.5, 0.25]);
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
        assert!(loaded.items.len() > 1000);
    }
}
