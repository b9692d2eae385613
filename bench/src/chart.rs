//! The chart of an end-to-end run: messages per second and epoch latency, epoch by epoch, as an
//! SVG file (two panels sharing the time axis); and, in the same style, the grouped bar chart of
//! `bench-recs` (each engine's HR@10 and NDCG@10).
//!
//! Plotters' SVG backend writes text as `<text>` elements for the viewer to render, so the chart
//! needs no font files; text sizes are only estimated for the layout.

use std::path::Path;

use plotters::prelude::*;

use crate::e2e::EpochStat;

/// The series of the chart, x in ms since the first epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Messages per second of every epoch from the first reported to the last (its messages
    /// over the epoch length), 0 for the epochs the dataflow did not report: it reports only
    /// epochs in which something happened, so an epoch missing between two reported ones read
    /// nothing.
    pub msgs_per_s: Vec<(f64, f64)>,
    /// The same rate averaged over the last second (or over the epochs so far, during the first
    /// second), which is what the eye wants from the spiky per-epoch rate.
    pub msgs_per_s_1s: Vec<(f64, f64)>,
    /// Milliseconds from each reported epoch's end to its Redis acknowledgement.
    pub latency_ms: Vec<(f64, f64)>,
}

impl Series {
    /// The series of `epochs`, as reported with epochs of `epoch_ms`.
    pub fn new(epochs: &[EpochStat], epoch_ms: u64) -> Self {
        let epoch_ms = epoch_ms.max(1);
        let first = epochs.first().map_or(0, |e| e.epoch);
        let x = |epoch: u64| epoch.saturating_sub(first) as f64;
        // (epoch start, messages) for every epoch, the idle ones filled in.
        let mut slots: Vec<(u64, u64)> = Vec::new();
        for (i, e) in epochs.iter().enumerate() {
            if i > 0 {
                let mut idle = epochs[i - 1].epoch + epoch_ms;
                while idle < e.epoch {
                    slots.push((idle, 0));
                    idle += epoch_ms;
                }
            }
            slots.push((e.epoch, e.counters.messages));
        }
        let per_second = |messages: u64, slots: usize| {
            messages as f64 * 1000.0 / (epoch_ms as f64 * slots.max(1) as f64)
        };
        let window = (1000 / epoch_ms).max(1) as usize;
        Series {
            msgs_per_s: slots
                .iter()
                .map(|&(epoch, messages)| (x(epoch), per_second(messages, 1)))
                .collect(),
            msgs_per_s_1s: (0..slots.len())
                .map(|i| {
                    let from = (i + 1).saturating_sub(window);
                    let messages = slots[from..=i].iter().map(|s| s.1).sum();
                    (x(slots[i].0), per_second(messages, i + 1 - from))
                })
                .collect(),
            latency_ms: epochs
                .iter()
                .map(|e| (x(e.epoch), e.counters.latency_ms as f64))
                .collect(),
        }
    }
}

/// Largest value of a series, for the y range (at least 1, so an empty or flat-zero series
/// still has an axis).
fn top(points: &[(f64, f64)]) -> f64 {
    points.iter().map(|p| p.1).fold(1.0, f64::max)
}

/// A legend sample: a short horizontal line.
fn sample(style: ShapeStyle) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style)
}

/// Writes the chart of `epochs` to `path` as SVG: messages per second on top (per epoch, over
/// the last second, and the run's end-to-end average), epoch latency below.
pub fn write_chart(
    path: &Path,
    title: &str,
    epochs: &[EpochStat],
    epoch_ms: u64,
    e2e_msgs_per_s: f64,
) -> anyhow::Result<()> {
    let series = Series::new(epochs, epoch_ms);
    let x_end = series.msgs_per_s.last().map_or(0.0, |p| p.0) + epoch_ms as f64;
    let root = SVGBackend::new(path, (1100, 760)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    let (upper, lower) = root.split_vertically(370);
    let label_x = |x: &f64| format!("{x:.0}");
    let label_y = |y: &f64| format!("{y:.0}");

    // Headroom above the highest point for the legend.
    let rate_top = top(&series.msgs_per_s).max(e2e_msgs_per_s) * 1.35;
    let mut rate = ChartBuilder::on(&upper)
        .caption("messages per second", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..x_end, 0.0..rate_top)?;
    rate.configure_mesh()
        .x_desc("time since the first epoch (ms)")
        .y_desc("messages/s")
        .x_label_formatter(&label_x)
        .y_label_formatter(&label_y)
        .draw()?;
    let light_blue = RGBColor(150, 180, 235).stroke_width(1);
    rate.draw_series(LineSeries::new(
        series.msgs_per_s.iter().copied(),
        light_blue,
    ))?
    .label(format!("per epoch ({epoch_ms} ms; 0 = idle epoch)"))
    .legend(sample(light_blue));
    let blue = BLUE.stroke_width(2);
    rate.draw_series(LineSeries::new(series.msgs_per_s_1s.iter().copied(), blue))?
        .label("over the last second")
        .legend(sample(blue));
    let black = BLACK.stroke_width(1);
    rate.draw_series(DashedLineSeries::new(
        [(0.0, e2e_msgs_per_s), (x_end, e2e_msgs_per_s)],
        6,
        4,
        black,
    ))?
    .label(format!(
        "end to end, first read to last ack: {e2e_msgs_per_s:.0} msg/s"
    ))
    .legend(sample(black));
    rate.configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;

    let latency_top = top(&series.latency_ms) * 1.1;
    let mut latency = ChartBuilder::on(&lower)
        .caption(
            "epoch latency: epoch end to Redis acknowledgement (ms), reported epochs",
            ("sans-serif", 16),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..x_end, 0.0..latency_top)?;
    latency
        .configure_mesh()
        .x_desc("time since the first epoch (ms)")
        .y_desc("latency (ms)")
        .x_label_formatter(&label_x)
        .y_label_formatter(&label_y)
        .draw()?;
    latency.draw_series(LineSeries::new(
        series.latency_ms.iter().copied(),
        RGBColor(235, 150, 150).stroke_width(1),
    ))?;
    latency.draw_series(
        series
            .latency_ms
            .iter()
            .map(|&point| Circle::new(point, 2, RED.filled())),
    )?;
    root.present()?;
    Ok(())
}

/// One series of a bar chart: its name and one value per group.
#[derive(Debug, Clone, PartialEq)]
pub struct BarSeries {
    pub name: String,
    pub values: Vec<f64>,
}

/// The bars' colours, series by series, in the line chart's blues and reds.
const BAR_COLOURS: [RGBColor; 4] = [
    RGBColor(40, 90, 200),
    RGBColor(235, 150, 150),
    RGBColor(150, 180, 235),
    RGBColor(120, 120, 120),
];

/// Writes a grouped bar chart to `path` as SVG, in the style of [`write_chart`]: one group per
/// entry of `groups` (e.g. a metric), one bar per series in each, its value written above it.
pub fn write_bar_chart(
    path: &Path,
    title: &str,
    y_desc: &str,
    groups: &[&str],
    series: &[BarSeries],
) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1100, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    let top = series
        .iter()
        .flat_map(|s| s.values.iter().copied())
        .fold(0.0, f64::max);
    // Headroom for the value labels and the legend; at least some height for an all-zero chart.
    let y_top = if top > 0.0 { top * 1.35 } else { 1.0 };
    let x_end = groups.len().max(1) as f64;
    let mut chart = ChartBuilder::on(&root)
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..x_end, 0.0..y_top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc(y_desc)
        .y_label_formatter(&|y: &f64| format!("{y:.2}"))
        .draw()?;
    // Each group spans one unit of x: bars side by side in its middle 80%.
    let bar_width = 0.8 / series.len().max(1) as f64;
    for (index, one) in series.iter().enumerate() {
        let colour = BAR_COLOURS[index % BAR_COLOURS.len()];
        let left = |group: usize| group as f64 + 0.1 + index as f64 * bar_width;
        chart
            .draw_series(one.values.iter().enumerate().map(|(group, &value)| {
                Rectangle::new(
                    [(left(group), 0.0), (left(group) + bar_width * 0.9, value)],
                    colour.filled(),
                )
            }))?
            .label(one.name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 20, y + 5)], colour.filled()));
        chart.draw_series(one.values.iter().enumerate().map(|(group, &value)| {
            Text::new(
                format!("{value:.4}"),
                (left(group) + bar_width * 0.2, value + y_top * 0.04),
                ("sans-serif", 14),
            )
        }))?;
    }
    chart.draw_series(groups.iter().enumerate().map(|(group, name)| {
        Text::new(
            name.to_string(),
            (group as f64 + 0.45, -y_top * 0.03),
            ("sans-serif", 16),
        )
    }))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::e2e::tests::epoch;

    fn run() -> Vec<EpochStat> {
        vec![
            epoch(1_000_100, 4000, 12),
            epoch(1_000_200, 4200, 30),
            epoch(1_000_400, 3900, 25),
        ]
    }

    #[test]
    fn series_start_at_the_first_epoch_and_fill_idle_epochs_with_zero() {
        let s = Series::new(&run(), 100);
        assert_eq!(
            s.msgs_per_s,
            vec![
                (0.0, 40_000.0),
                (100.0, 42_000.0),
                (200.0, 0.0),
                (300.0, 39_000.0)
            ]
        );
        assert_eq!(
            s.latency_ms,
            vec![(0.0, 12.0), (100.0, 30.0), (300.0, 25.0)]
        );
        assert_eq!(Series::new(&[], 100).msgs_per_s, vec![]);
    }

    #[test]
    fn the_one_second_rate_averages_the_last_second_of_epochs() {
        // Epochs of 500 ms: the window is 2 epochs.
        let epochs = [epoch(0, 1000, 1), epoch(500, 3000, 1), epoch(1500, 500, 1)];
        let s = Series::new(&epochs, 500);
        assert_eq!(
            s.msgs_per_s_1s,
            vec![
                // The first epoch alone: 1000 in 0.5 s.
                (0.0, 2000.0),
                (500.0, 4000.0),
                // The idle epoch at 1000 ms and the one before it.
                (1000.0, 3000.0),
                (1500.0, 500.0)
            ]
        );
    }

    #[test]
    fn writes_an_svg_with_both_panels_and_their_labels() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e2e.svg");
        write_chart(&path, "bench: 12100 messages, -w 2", &run(), 100, 40_333.0).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
        assert!(svg.trim_end().ends_with("</svg>"));
        for text in [
            "bench: 12100 messages, -w 2",
            "messages per second",
            "per epoch (100 ms; 0 = idle epoch)",
            "over the last second",
            "end to end, first read to last ack: 40333 msg/s",
            "epoch latency",
            "latency (ms)",
            "time since the first epoch (ms)",
        ] {
            assert!(svg.contains(text), "{text:?} missing");
        }
        // The series: lines (polylines, also used for axes and dashes) and latency dots.
        assert!(svg.matches("<polyline").count() >= 4, "{svg}");
        assert_eq!(svg.matches("<circle").count(), 3, "{svg}");
    }

    #[test]
    fn a_bar_chart_has_a_bar_and_a_value_per_series_and_group() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bars.svg");
        let series = [
            BarSeries {
                name: "streamrec".into(),
                values: vec![0.25, 0.125],
            },
            BarSeries {
                name: "popularity".into(),
                values: vec![0.1, 0.05],
            },
        ];
        write_bar_chart(
            &path,
            "recs: 2000 users",
            "share of users",
            &["HR@10", "NDCG@10"],
            &series,
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.trim_end().ends_with("</svg>"));
        for text in [
            "recs: 2000 users",
            "share of users",
            "HR@10",
            "NDCG@10",
            "streamrec",
            "popularity",
            "0.2500",
            "0.1250",
            "0.1000",
            "0.0500",
        ] {
            assert!(svg.contains(text), "{text:?} missing");
        }
        // Four bars and two legend samples, filled with the series' colours.
        assert_eq!(svg.matches("fill=\"#285AC8\"").count(), 3, "{svg}");
        assert_eq!(svg.matches("fill=\"#EB9696\"").count(), 3, "{svg}");
    }

    #[test]
    fn an_empty_run_still_gives_a_chart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.svg");
        write_chart(&path, "empty", &[], 100, 0.0).unwrap();
        assert!(std::fs::read_to_string(&path).unwrap().contains("</svg>"));
    }
}
