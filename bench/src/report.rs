//! `aio-bench report`: SVG plots of the JSON records the subcommands
//! print (one object per line, `"bench"` naming the subcommand).
//!
//! * `fdscale.svg`: ns per ping-pong iteration against idle fds, log-log,
//!   one line per loop;
//! * `timers-<period>.svg`: the lateness distribution of each timer source
//!   at that period (x: lateness, log; y: fraction of samples at or below).

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;
use serde_json::Value;

use crate::Result;

/// The quantiles a `timers` record carries in `cdf_ns`.
pub const CDF_QUANTILES: [f64; 11] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0,
];

/// `[[q, lateness_ns], ...]` for [`CDF_QUANTILES`] of sorted `samples`.
pub fn cdf(sorted: &[i64]) -> Vec<(f64, i64)> {
    if sorted.is_empty() {
        return Vec::new();
    }
    CDF_QUANTILES
        .iter()
        .map(|&q| (q, crate::nearest_rank(sorted, q)))
        .collect()
}

fn plot_err(e: impl std::fmt::Display) -> crate::Error {
    format!("plotting: {e}").into()
}

type Series = BTreeMap<String, Vec<(f64, f64)>>;

/// The y axis of a chart (x is always logarithmic).
#[derive(Clone, Copy, PartialEq, Eq)]
enum YAxis {
    /// Logarithmic, labelled in ns/µs/ms.
    LogNs,
    /// A percentage, 0 to 100.
    Percent,
}

/// A number of ns as a short label: `700ns`, `12us`, `1.5ms`.
fn ns_label(v: f64) -> String {
    if v >= 1e6 {
        format!("{}ms", trim(v / 1e6))
    } else if v >= 1e3 {
        format!("{}us", trim(v / 1e3))
    } else {
        format!("{}ns", trim(v))
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.1}");
    s.strip_suffix(".0").map_or(s.clone(), str::to_string)
}

/// Draws one line chart (log x) with a legend.
fn line_chart(
    path: &Path,
    title: &str,
    (x_desc, x_ns): (&str, bool),
    (y_desc, y): (&str, YAxis),
    series: &Series,
) -> Result<()> {
    let pts = || series.values().flatten();
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts() {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        return Err(format!("{}: no data to plot", path.display()).into());
    }
    // Log axes need positive, non-degenerate ranges.
    let (x0, x1) = (x0.max(1e-3) / 1.5, x1.max(x0.max(1e-3) * 2.0) * 1.5);
    let (y0, y1) = (y0.max(1.0) / 1.5, y1.max(y0.max(1.0) * 2.0) * 1.5);
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let x_fmt = |v: &f64| if x_ns { ns_label(*v) } else { trim(*v) };
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(72);
    match y {
        YAxis::LogNs => {
            let mut chart = builder
                .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())
                .map_err(plot_err)?;
            chart
                .configure_mesh()
                .x_desc(x_desc)
                .y_desc(y_desc)
                .x_label_formatter(&x_fmt)
                .y_label_formatter(&|v| ns_label(*v))
                .draw()
                .map_err(plot_err)?;
            draw_series(&mut chart, series, SeriesLabelPosition::UpperLeft)?;
        }
        YAxis::Percent => {
            let mut chart = builder
                .build_cartesian_2d((x0..x1).log_scale(), 0f64..100f64)
                .map_err(plot_err)?;
            chart
                .configure_mesh()
                .x_desc(x_desc)
                .y_desc(y_desc)
                .x_label_formatter(&x_fmt)
                .draw()
                .map_err(plot_err)?;
            draw_series(&mut chart, series, SeriesLabelPosition::LowerRight)?;
        }
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

/// The lines, their points and the legend.
fn draw_series<'a, X, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    series: &Series,
    legend: SeriesLabelPosition,
) -> Result<()>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    for (i, (label, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(plot_err)?
            .label(label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(plot_err)?;
    }
    chart
        .configure_series_labels()
        .position(legend)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)?;
    Ok(())
}

/// Writes `fdscale.svg` from the `fdscale` records; returns the files
/// written (none if there are no such records).
///
/// # Errors
///
/// When the file cannot be written.
pub fn plot_fdscale(records: &[Value], dir: &Path) -> Result<Vec<String>> {
    let mut series = Series::new();
    for r in records.iter().filter(|r| r["bench"] == "fdscale") {
        if let (Some(b), Some(n), Some(ns)) = (
            r["backend"].as_str(),
            r["idle_fds"].as_f64(),
            r["ns_per_iter"].as_f64(),
        ) {
            series.entry(b.to_string()).or_default().push((n, ns));
        }
    }
    if series.is_empty() {
        return Ok(Vec::new());
    }
    for pts in series.values_mut() {
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    let name = "fdscale.svg";
    line_chart(
        &dir.join(name),
        "fd scaling: one active eventfd among N idle fds",
        ("idle fds", false),
        ("time per ping-pong iteration", YAxis::LogNs),
        &series,
    )?;
    Ok(vec![name.to_string()])
}

/// Writes one `timers-<period>.svg` per period from the `timers` records
/// (their `cdf_ns`); returns the files written.
///
/// # Errors
///
/// When a file cannot be written.
pub fn plot_timers(records: &[Value], dir: &Path) -> Result<Vec<String>> {
    let mut by_period: BTreeMap<i64, Series> = BTreeMap::new();
    for r in records.iter().filter(|r| r["bench"] == "timers") {
        let (Some(b), Some(p), Some(cdf)) = (
            r["backend"].as_str(),
            r["period_ns"].as_i64(),
            r["cdf_ns"].as_array(),
        ) else {
            continue;
        };
        let pts: Vec<(f64, f64)> = cdf
            .iter()
            .filter_map(|qv| {
                let q = qv.get(0)?.as_f64()?;
                let v = qv.get(1)?.as_f64()?;
                // Lateness on a log axis: clamp to 100 ns (early fires are
                // counted separately in the table).
                Some((v.max(100.0), q * 100.0))
            })
            .collect();
        by_period.entry(p).or_default().insert(b.to_string(), pts);
    }
    let mut out = Vec::new();
    for (period, series) in &by_period {
        let label = human_period(*period);
        let name = format!("timers-{label}.svg");
        line_chart(
            &dir.join(&name),
            &format!("timer lateness, {label} one-shot timers"),
            ("lateness", true),
            ("% of samples at or below", YAxis::Percent),
            series,
        )?;
        out.push(name);
    }
    Ok(out)
}

/// `100us`, `1ms`, `10ms`.
fn human_period(ns: i64) -> String {
    if ns % 1_000_000 == 0 {
        format!("{}ms", ns / 1_000_000)
    } else if ns % 1_000 == 0 {
        format!("{}us", ns / 1_000)
    } else {
        format!("{ns}ns")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn plots_name_every_series_and_skip_missing_benches() {
        let dir = tempfile::tempdir().unwrap();
        let mut recs = Vec::new();
        for (b, base) in [("epoll", 700.0), ("ppoll", 900.0)] {
            for n in [1, 16, 256] {
                recs.push(json!({"bench":"fdscale","backend":b,"idle_fds":n,
                    "ns_per_iter": base * if b == "ppoll" { n as f64 } else { 1.0 }}));
            }
        }
        recs.push(
            json!({"bench":"timers","backend":"epoll","period_ns":100000,
            "cdf_ns":[[0.5, 3000], [0.99, 9000], [1.0, 20000]]}),
        );
        let files = plot_fdscale(&recs, dir.path()).unwrap();
        assert_eq!(files, ["fdscale.svg"]);
        let svg = std::fs::read_to_string(dir.path().join("fdscale.svg")).unwrap();
        assert!(
            svg.contains("epoll") && svg.contains("ppoll"),
            "legend missing"
        );
        assert_eq!(
            plot_timers(&recs, dir.path()).unwrap(),
            ["timers-100us.svg"]
        );
        assert!(plot_fdscale(&[], dir.path()).unwrap().is_empty());
    }

    #[test]
    fn cdf_takes_nearest_ranks() {
        let v: Vec<i64> = (1..=1000).collect();
        let c = cdf(&v);
        assert_eq!(c[4], (0.5, 500));
        assert_eq!(c[10], (1.0, 1000));
        assert!(cdf(&[]).is_empty());
    }
}
