//! Reading a Prometheus text exposition in tests, strictly: the binaries' `/metrics` must be
//! text a Prometheus server takes, not just contain the numbers a test looks for.

use std::collections::BTreeMap;

/// The samples of a Prometheus text exposition, by name with labels as written (e.g.
/// `x_total{topic="t",partition="0"}`). Fails unless every sample belongs to a family declared
/// by a `# TYPE` line before it, with a suffix its type allows, and has a numeric value; and the
/// text ends with `# EOF` (OpenMetrics).
pub fn parse_exposition(text: &str) -> BTreeMap<String, f64> {
    let mut families: BTreeMap<&str, &str> = BTreeMap::new();
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if let Some(declared) = line.strip_prefix("# TYPE ") {
            let (name, kind) = declared.split_once(' ').unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(
                families.insert(name, kind).is_none(),
                "declared twice: {line}"
            );
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("not a number: {line}"));
        let name = series.split('{').next().unwrap();
        if let Some(labels) = series.strip_prefix(name) {
            assert!(
                labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')),
                "{line}"
            );
        }
        let typed = families.iter().any(|(family, kind)| {
            let suffixes: &[&str] = match *kind {
                "counter" => &["_total", "_created"],
                "histogram" => &["_bucket", "_sum", "_count", "_created"],
                _ => &[""],
            };
            suffixes
                .iter()
                .any(|suffix| name.strip_suffix(suffix) == Some(family))
        });
        assert!(typed, "no # TYPE family before {line}");
        assert!(
            samples.insert(series.to_owned(), value).is_none(),
            "twice: {line}"
        );
    }
    assert_eq!(text.lines().last(), Some("# EOF"), "{text}");
    samples
}
