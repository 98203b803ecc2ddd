//! The comparison's results as Markdown tables (for BENCHMARKS.md) and an SVG chart of
//! latency relative to Centralised.

use std::fmt::Write as _;

use super::compare::{Measurement, Report};
use super::workload::Workload;

/// A workload at one size.
type Dataset = (Workload, usize);

fn find<'a>(
    report: &'a Report,
    system: &str,
    sites: usize,
    (workload, size): Dataset,
    query: usize,
) -> Option<&'a Measurement> {
    report.measurements.iter().find(|m| {
        m.system == system
            && m.sites == sites
            && m.workload == workload
            && m.size == size
            && m.query == query
    })
}

fn has_series(report: &Report, system: &str, sites: usize, (workload, size): Dataset) -> bool {
    report
        .measurements
        .iter()
        .any(|m| m.system == system && m.sites == sites && m.workload == workload && m.size == size)
}

fn cell(m: Option<&Measurement>) -> String {
    match m {
        Some(m) if m.error.is_none() => format!("{:.1} / {:.1}", m.median_ms, m.p95_ms),
        Some(m) => format!("error: {}", m.error.as_deref().unwrap_or_default()),
        None => "–".into(),
    }
}

fn bytes(n: usize) -> String {
    match n {
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / f64::from(1 << 20)),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// The datasets (by workload, then size) and site counts present, ascending.
fn axes(report: &Report) -> (Vec<Dataset>, Vec<usize>) {
    let mut datasets: Vec<Dataset> = report
        .measurements
        .iter()
        .map(|m| (m.workload, m.size))
        .collect();
    datasets
        .sort_by_key(|&(workload, size)| (Workload::ALL.iter().position(|w| *w == workload), size));
    datasets.dedup();
    let mut sites: Vec<usize> = report
        .measurements
        .iter()
        .filter(|m| m.sites > 0)
        .map(|m| m.sites)
        .collect();
    sites.sort_unstable();
    sites.dedup();
    (datasets, sites)
}

/// Markdown: per size, latency (median / p95 ms) per query and system; then data moved
/// and peak memory; then the tiny query and throughput.
pub fn markdown(report: &Report) -> String {
    let (datasets, sites) = axes(report);
    let mut out = String::new();
    if let Some(rate) = report.link_mbit {
        let _ = writeln!(
            out,
            "\nTally and Row shipping reach every site over an emulated link of {rate} Mbit/s each way (a rate-limiting proxy per site); Centralised reads local files."
        );
    }
    if report.dial_in {
        let _ = writeln!(
            out,
            "\nTally's sites dial the gateway's port for trusts (outbound-only nodes) instead of being dialed."
        );
    }
    for &dataset in &datasets {
        let (workload, size) = dataset;
        let name = workload.dataset(size);
        let _ = writeln!(out, "\n### {name}: latency, median / p95 ms\n");
        let mut header = "| query | Centralised |".to_string();
        let mut rule = "|---|---|".to_string();
        let with_duckdb = has_series(report, "DuckDB", 0, dataset);
        if with_duckdb {
            header.push_str(" DuckDB |");
            rule.push_str("---|");
        }
        for &n in &sites {
            let _ = write!(header, " Tally ×{n} | ratio |");
            rule.push_str("---|---|");
            if has_series(report, "Row shipping", n, dataset) {
                let _ = write!(header, " Row shipping ×{n} |");
                rule.push_str("---|");
            }
        }
        let _ = writeln!(out, "{header}\n{rule}");
        for (query, (title, _)) in workload.queries().iter().enumerate() {
            let central = find(report, "Centralised", 0, dataset, query);
            let mut line = format!("| {title} | {} |", cell(central));
            if with_duckdb {
                let _ = write!(
                    line,
                    " {} |",
                    cell(find(report, "DuckDB", 0, dataset, query))
                );
            }
            for &n in &sites {
                let tally = find(report, "Tally", n, dataset, query);
                let ratio = match (tally, central) {
                    (Some(t), Some(c)) if t.error.is_none() && c.error.is_none() => {
                        format!("{:.2}×", t.median_ms / c.median_ms)
                    }
                    _ => "–".into(),
                };
                let _ = write!(line, " {} | {ratio} |", cell(tally));
                if let Some(rows) = find(report, "Row shipping", n, dataset, query) {
                    let _ = write!(line, " {} |", cell(Some(rows)));
                }
            }
            let _ = writeln!(out, "{line}");
        }
        let _ = writeln!(
            out,
            "\n### {name}: moved from the sites per query (rows, bytes) and peak memory of the gateway process\n"
        );
        let _ = writeln!(
            out,
            "| query | system | sites | rows moved | bytes moved | peak RSS MiB |\n|---|---|---|---|---|---|"
        );
        for (query, (title, _)) in workload.queries().iter().enumerate() {
            for m in report
                .measurements
                .iter()
                .filter(|m| (m.workload, m.size) == dataset && m.query == query && m.sites > 0)
            {
                let _ = writeln!(
                    out,
                    "| {title} | {} | {} | {} | {} | {:.0} |",
                    m.system,
                    m.sites,
                    m.rows_moved,
                    bytes(m.bytes_moved),
                    m.peak_rss_mib
                );
            }
            for system in ["Centralised", "DuckDB"] {
                if let Some(c) = find(report, system, 0, dataset, query) {
                    let _ = writeln!(
                        out,
                        "| {title} | {system} (everything in one process) | – | – | – | {:.0} |",
                        c.peak_rss_mib
                    );
                }
            }
        }
    }
    if let Some(o) = &report.overhead {
        let _ = writeln!(
            out,
            "\n### Gateway overhead and throughput ({} sites, demo-sized data)\n\n| measurement | result |\n|---|---|\n| tiny query end to end (`{}`) | median {:.2} ms, p95 {:.2} ms |\n| {} concurrent clients for {:.0} s | {:.0} queries/s, {} errors |",
            o.sites,
            o.sql,
            o.median_ms,
            o.p95_ms,
            o.clients,
            o.seconds,
            o.queries_per_second,
            o.errors
        );
        if let Some(adbc) = &o.adbc {
            let _ = writeln!(
                out,
                "| the same through the Python ADBC driver ({} runs) | median {:.2} ms, p95 {:.2} ms |\n| {} ADBC client processes for {:.0} s | {:.0} queries/s, {} errors |",
                adbc.runs,
                adbc.median_ms,
                adbc.p95_ms,
                o.clients,
                o.seconds,
                adbc.queries_per_second,
                adbc.errors
            );
        }
    }
    out
}

/// An SVG bar chart: per query, median latency relative to Centralised (log scale) for each
/// Tally site count and Row shipping, at the largest size measured of each workload.
pub fn svg(report: &Report) -> String {
    let (datasets, sites) = axes(report);
    // The largest size of each workload (datasets are sorted by workload, then size).
    let largest: Vec<Dataset> = datasets
        .iter()
        .enumerate()
        .filter(|&(i, (workload, _))| datasets.get(i + 1).is_none_or(|next| next.0 != *workload))
        .map(|(_, dataset)| *dataset)
        .collect();
    if largest.is_empty() {
        return String::new();
    }
    let groups: Vec<(Dataset, usize)> = largest
        .iter()
        .flat_map(|&dataset| (0..dataset.0.queries().len()).map(move |query| (dataset, query)))
        .collect();
    let caption = largest
        .iter()
        .map(|&(workload, size)| workload.dataset(size))
        .collect::<Vec<_>>()
        .join("; ")
        + &report
            .link_mbit
            .map(|rate| format!("; sites over an emulated {rate} Mbit/s link each"))
            .unwrap_or_default();
    let mut series: Vec<(String, &str, usize)> = sites
        .iter()
        .map(|&n| (format!("Tally, {n} sites"), "Tally", n))
        .collect();
    for &n in &sites {
        if report
            .measurements
            .iter()
            .any(|m| m.system == "Row shipping" && m.sites == n)
        {
            series.push((format!("Row shipping, {n} sites"), "Row shipping", n));
        }
    }
    if report.measurements.iter().any(|m| m.system == "DuckDB") {
        series.push(("DuckDB".into(), "DuckDB", 0));
    }
    // Tally in blues, Row shipping in warm colours, DuckDB in grey.
    let colours = [
        "#1f6fb2", "#4f9fd8", "#9cc9ee", "#c0392b", "#e67e22", "#f1c40f",
    ];
    let colour = |index: usize, system: &str| {
        if system == "DuckDB" {
            "#7f8c8d"
        } else {
            colours[index % colours.len()]
        }
    };
    let (width, height, left, top, bottom) = (980.0, 460.0, 70.0, 80.0, 60.0);
    let plot_h = height - top - bottom;
    // Up to 10×, or up to 100× when a bar (Row shipping over a slow link) is taller.
    let tallest = groups
        .iter()
        .flat_map(|&(dataset, query)| {
            let central = find(report, "Centralised", 0, dataset, query);
            series.iter().filter_map(move |(_, system, n)| {
                let m = find(report, system, *n, dataset, query)?;
                Some(m.median_ms / central?.median_ms)
            })
        })
        .filter(|r| r.is_finite())
        .fold(0.0f64, f64::max);
    let top_ratio = if tallest > 10.0 { 100.0 } else { 10.0 };
    let (lo, hi) = (0.5f64.log10(), f64::log10(top_ratio));
    let y =
        |ratio: f64| top + plot_h * (1.0 - (ratio.clamp(0.5, top_ratio).log10() - lo) / (hi - lo));
    let group_w = (width - left - 20.0) / groups.len() as f64;
    let bar_w = (group_w - 12.0) / series.len().max(1) as f64;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">
<rect width="100%" height="100%" fill="white"/>
<text x="{left}" y="22" font-size="15" font-weight="bold">Median latency relative to Centralised (log scale; lower is better; dashed: 1.25×)</text>
<text x="{left}" y="38" font-size="12">{caption}</text>
"#
    );
    let ticks = [0.5, 1.0, 1.25, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0];
    for tick in ticks.into_iter().filter(|&t| t <= top_ratio) {
        let ty = y(tick);
        let (stroke, dash) = if tick == 1.25 {
            ("#c0392b", r#" stroke-dasharray="5,3""#)
        } else {
            ("#ddd", "")
        };
        let _ = writeln!(
            svg,
            r#"<line x1="{left}" x2="{}" y1="{ty:.1}" y2="{ty:.1}" stroke="{stroke}"{dash}/><text x="{}" y="{:.1}" text-anchor="end">{tick}×</text>"#,
            width - 20.0,
            left - 6.0,
            ty + 4.0
        );
    }
    for (group, &(dataset, query)) in groups.iter().enumerate() {
        let gx = left + group_w * group as f64 + 6.0;
        let Some(central) = find(report, "Centralised", 0, dataset, query) else {
            continue;
        };
        for (index, (_, system, n)) in series.iter().enumerate() {
            let Some(m) = find(report, system, *n, dataset, query) else {
                continue;
            };
            if m.error.is_some() || central.error.is_some() {
                continue;
            }
            let ratio = m.median_ms / central.median_ms;
            let (x, top_y) = (gx + bar_w * index as f64, y(ratio));
            let _ = writeln!(
                svg,
                r#"<rect x="{x:.1}" y="{top_y:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{ratio:.2}×</title></rect>"#,
                bar_w - 1.0,
                (y(0.5) - top_y).max(0.0),
                colour(index, system)
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="12">{}</text>"#,
            gx + group_w / 2.0 - 6.0,
            height - bottom + 18.0,
            dataset.0.query_name(query)
        );
    }
    for (index, (label, system, _)) in series.iter().enumerate() {
        let lx = left + 130.0 * index as f64;
        let _ = writeln!(
            svg,
            r#"<rect x="{lx}" y="48" width="12" height="12" fill="{}"/><text x="{}" y="58">{label}</text>"#,
            colour(index, system),
            lx + 16.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}
