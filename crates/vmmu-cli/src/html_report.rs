//! `--report FILE.html`: a self-contained HTML page (inline CSS and SVG; no script, no font, no
//! image, no link to anything outside the file) that a browser opens offline.
//!
//! The page is built from sections ([`Page`]'s methods, in order): headings and notes, key/value
//! tables (the run's configuration), plain tables, a timeline ([`Page::timeline`]: vCPU
//! throughput, MMIO exits by path and memslot updates per interval, on one time axis), latency
//! histograms ([`Page::histogram`]) and bar charts ([`Page::bars`]). Every piece of text goes
//! through [`esc`]; numbers are formatted by this module. The SVG elements carry `class` and
//! `data-*` attributes naming what they show (`data-series="accesses"`, `class="bucket"`), so
//! tests can check the structure without a browser.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use vmmu_sim::timeline::{LatencyHistogram, Rates, Timeline};

/// HTML-escapes `s` for text and attribute values (double- or single-quoted).
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            // Control characters (a NUL from a trace's free text) are not HTML text.
            c if c.is_control() && !matches!(c, '\n' | '\t') => o.push('\u{fffd}'),
            c => o.push(c),
        }
    }
    o
}

/// A number for people: 3 significant digits with k/M/G suffixes.
fn human(v: f64) -> String {
    let a = v.abs();
    if !v.is_finite() {
        "n/a".into()
    } else if a >= 1e9 {
        format!("{:.3}G", v / 1e9)
    } else if a >= 1e6 {
        format!("{:.3}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Nanoseconds for people.
fn ns(v: u64) -> String {
    let v = v as f64;
    if v >= 1e9 {
        format!("{:.2} s", v / 1e9)
    } else if v >= 1e6 {
        format!("{:.2} ms", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1} us", v / 1e3)
    } else {
        format!("{v:.0} ns")
    }
}

const CSS: &str = "body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1000px}\
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ccc}\
h3{font-size:1em}table{border-collapse:collapse;margin:.5em 0}\
td,th{border:1px solid #ccc;padding:2px 8px;text-align:left;font-size:.9em}\
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}\
.pass{color:#070;font-weight:bold}.fail{color:#b00;font-weight:bold}\
svg{background:#fff;border:1px solid #ddd;margin:.5em 0}\
svg text{font-size:11px;fill:#333}.axis{stroke:#888;stroke-width:1}\
.grid{stroke:#eee;stroke-width:1}.note{color:#555;font-size:.9em}\
.legend span{display:inline-block;margin-right:1.2em;font-size:.9em}\
.legend i{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:middle}";

/// The series of a timeline and their colours.
const SERIES: [(&str, &str, &str); 5] = [
    ("accesses", "vCPU accesses/s", "#1f77b4"),
    ("mmio_spte_hit", "MMIO SPTE hits/s (fast path)", "#2ca02c"),
    ("mmio_cache_hit", "per-vCPU MMIO cache hits/s", "#ff7f0e"),
    ("mmio_slow_path", "slow-path MMIO/s", "#d62728"),
    ("violation", "violation exits/s", "#9467bd"),
];

/// Plot geometry (SVG user units).
const W: f64 = 900.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;

/// One HTML page under construction.
#[derive(Debug)]
pub struct Page {
    body: String,
}

impl Page {
    /// A page titled `title`.
    pub fn new(title: &str) -> Page {
        let mut body = String::new();
        let _ = writeln!(body, "<h1>{}</h1>", esc(title));
        Page { body }
    }

    /// A section heading.
    pub fn h2(&mut self, s: &str) {
        let _ = writeln!(self.body, "<h2>{}</h2>", esc(s));
    }

    /// A sub-heading.
    pub fn h3(&mut self, s: &str) {
        let _ = writeln!(self.body, "<h3>{}</h3>", esc(s));
    }

    /// A paragraph of text.
    pub fn note(&mut self, s: &str) {
        let _ = writeln!(self.body, "<p class=\"note\">{}</p>", esc(s));
    }

    /// A verdict line, green or red.
    pub fn verdict(&mut self, passed: bool, s: &str) {
        let class = if passed { "pass" } else { "fail" };
        let _ = writeln!(self.body, "<p class=\"{class}\">{}</p>", esc(s));
    }

    /// A key/value table (`class="config"`): the run's configuration.
    pub fn config(&mut self, pairs: &[(&str, String)]) {
        self.body.push_str("<table class=\"config\">\n");
        for (k, v) in pairs {
            let _ = writeln!(self.body, "<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(v));
        }
        self.body.push_str("</table>\n");
    }

    /// A table with a header row; cells that parse as numbers are right-aligned.
    pub fn table(&mut self, class: &str, head: &[&str], rows: &[Vec<String>]) {
        let _ = writeln!(self.body, "<table class=\"{}\">", esc(class));
        self.body.push_str("<tr>");
        for h in head {
            let _ = write!(self.body, "<th>{}</th>", esc(h));
        }
        self.body.push_str("</tr>\n");
        for r in rows {
            self.body.push_str("<tr>");
            for c in r {
                let num = c.trim_end_matches(['%', 'x', ' ']).parse::<f64>().is_ok();
                let class = if num { " class=\"num\"" } else { "" };
                let _ = write!(self.body, "<td{class}>{}</td>", esc(c));
            }
            self.body.push_str("</tr>\n");
        }
        self.body.push_str("</table>\n");
    }

    /// The timeline: three panels on one time axis (vCPU throughput; MMIO exits by path and
    /// violation exits; memslot updates per interval), each series a polyline with
    /// `data-series`, each update bar a rect with `class="update"`.
    pub fn timeline(&mut self, t: &Timeline) {
        let rates = t.rates();
        if rates.is_empty() {
            self.note("No timeline: the run was too short for two samples.");
            return;
        }
        let t_max = rates.iter().map(|r| r.t_s + r.dt_s / 2.0).fold(0.0, f64::max).max(1e-6);
        let panel_h = 150.0;
        let gap = 30.0;
        let top = 15.0;
        let h = top + 3.0 * panel_h + 2.0 * gap + 35.0;
        let x = |s: f64| LEFT + (W - LEFT - RIGHT) * (s / t_max);
        let mut svg = String::new();
        let _ = writeln!(
            svg,
            "<svg class=\"timeline\" width=\"{W}\" \
             height=\"{h}\" viewBox=\"0 0 {W} {h}\" role=\"img\">"
        );
        let _ = writeln!(
            svg,
            "<title>Timeline ({}): vCPU throughput, MMIO exits by path, memslot updates</title>",
            esc(&t.clock)
        );
        let panels: [(&str, &[usize]); 2] =
            [("vCPU accesses/s", &[0]), ("exits/s by MMIO path", &[1, 2, 3, 4])];
        for (p, (label, series)) in panels.iter().enumerate() {
            let y0 = top + p as f64 * (panel_h + gap);
            let max = rates
                .iter()
                .flat_map(|r| series.iter().map(move |&i| value(r, i)))
                .fold(0.0, f64::max)
                .max(1.0);
            axes(&mut svg, y0, panel_h, max, label);
            for &i in series.iter() {
                let (name, _, colour) = SERIES[i];
                let pts: Vec<String> = rates
                    .iter()
                    .map(|r| {
                        let y = y0 + panel_h - panel_h * value(r, i) / max;
                        format!("{:.1},{:.1}", x(r.t_s), y)
                    })
                    .collect();
                let _ = writeln!(
                    svg,
                    "<polyline class=\"series\" data-series=\"{name}\" fill=\"none\" \
                     stroke=\"{colour}\" stroke-width=\"1.5\" points=\"{}\"/>",
                    pts.join(" ")
                );
            }
        }
        // Panel 3: memslot updates per interval, as bars.
        let y0 = top + 2.0 * (panel_h + gap);
        let max = rates.iter().map(|r| r.updates).max().unwrap_or(0).max(1) as f64;
        axes(&mut svg, y0, panel_h, max, "memslot updates per interval");
        for r in rates.iter().filter(|r| r.updates > 0) {
            let bh = panel_h * r.updates as f64 / max;
            let x0 = x(r.t_s - r.dt_s / 2.0);
            let bw = (x(r.t_s + r.dt_s / 2.0) - x0).max(1.0);
            let _ = writeln!(
                svg,
                "<rect class=\"update\" data-t-s=\"{:.3}\" data-count=\"{}\" x=\"{x0:.1}\" \
                 y=\"{:.1}\" width=\"{bw:.1}\" height=\"{bh:.1}\" fill=\"#555\"><title>{:.3} s: \
                 {} updates</title></rect>",
                r.t_s,
                r.updates,
                y0 + panel_h - bh,
                r.t_s,
                r.updates
            );
        }
        // The time axis.
        let ybase = top + 3.0 * panel_h + 2.0 * gap;
        for k in 0..=5 {
            let s = t_max * f64::from(k) / 5.0;
            let _ = writeln!(
                svg,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{s:.2} s</text>",
                x(s),
                ybase + 15.0
            );
        }
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            (LEFT + W - RIGHT) / 2.0,
            ybase + 30.0,
            esc(&t.clock)
        );
        svg.push_str("</svg>\n");
        self.body.push_str("<div class=\"legend\">");
        for (_, label, colour) in SERIES {
            let _ = write!(self.body, "<span><i style=\"background:{colour}\"></i>{label}</span>");
        }
        self.body.push_str("<span><i style=\"background:#555\"></i>memslot updates</span></div>\n");
        self.body.push_str(&svg);
        let total = |f: fn(&Rates) -> f64| rates.iter().map(|r| f(r) * r.dt_s).sum::<f64>();
        self.note(&format!(
            "{} samples, at most one every {} ms ({}; a replay samples only at events); in \
             total {} accesses, {} memslot updates, {} MMIO SPTE hits, {} cache hits, {} \
             slow-path MMIO exits.",
            t.samples.len(),
            human(t.interval_us as f64 / 1e3),
            t.clock,
            human(total(|r| r.accesses)),
            rates.iter().map(|r| r.updates).sum::<u64>(),
            human(total(|r| r.mmio_spte_hit)),
            human(total(|r| r.mmio_cache_hit)),
            human(total(|r| r.mmio_slow_path)),
        ));
    }

    /// A latency histogram (`class="histogram"`, one `rect class="bucket"` per bucket).
    pub fn histogram(&mut self, name: &str, h: &LatencyHistogram) {
        let _ = writeln!(self.body, "<h3>{}</h3>", esc(name));
        if h.count == 0 {
            self.note("Nothing recorded.");
            return;
        }
        let n = h.buckets.len().max(1) as f64;
        let ph = 160.0;
        let top = 15.0;
        let height = top + ph + 45.0;
        let bw = (W - LEFT - RIGHT) / n;
        let max = h.buckets.iter().map(|b| b.count).max().unwrap_or(1).max(1) as f64;
        let mut svg = String::new();
        let _ = writeln!(
            svg,
            "<svg class=\"histogram\" data-name=\"{}\" \
             width=\"{W}\" height=\"{height}\" viewBox=\"0 0 {W} {height}\" role=\"img\">",
            esc(name)
        );
        let _ = writeln!(svg, "<title>{}</title>", esc(name));
        axes(&mut svg, top, ph, max, "count");
        for (i, b) in h.buckets.iter().enumerate() {
            let x0 = LEFT + i as f64 * bw;
            let bh = ph * b.count as f64 / max;
            let _ = writeln!(
                svg,
                "<rect class=\"bucket\" data-low-ns=\"{}\" data-high-ns=\"{}\" data-count=\"{}\" \
                 x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"#1f77b4\">\
                 <title>{} .. {}: {}</title></rect>",
                b.low_ns,
                b.high_ns,
                b.count,
                x0 + 1.0,
                top + ph - bh,
                (bw - 2.0).max(1.0),
                ns(b.low_ns),
                ns(b.high_ns),
                b.count
            );
            if h.buckets.len() <= 16 || i % 2 == 0 {
                let _ = writeln!(
                    svg,
                    "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">&lt;={}</text>",
                    x0 + bw / 2.0,
                    top + ph + 15.0,
                    esc(&ns(b.high_ns))
                );
            }
        }
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">latency (bucket upper bound)\
             </text>",
            (LEFT + W - RIGHT) / 2.0,
            top + ph + 35.0
        );
        svg.push_str("</svg>\n");
        self.body.push_str(&svg);
        self.note(&format!(
            "{} samples; p50 {}, p99 {}, max {}.",
            h.count,
            ns(h.p50_ns),
            ns(h.p99_ns),
            ns(h.max_ns)
        ));
    }

    /// A horizontal bar chart (`class="bars"`): one `rect class="bar"` per item, and a thinner
    /// `rect class="p99"` where the item has a 99th percentile.
    pub fn bars(&mut self, name: &str, unit: &str, items: &[(String, f64, Option<f64>)]) {
        let _ = writeln!(self.body, "<h3>{}</h3>", esc(name));
        let items: Vec<_> = items.iter().filter(|i| i.1.is_finite()).collect();
        if items.is_empty() {
            self.note("Nothing measured.");
            return;
        }
        let row = 22.0;
        let label_w = 420.0;
        let height = items.len() as f64 * row + 10.0;
        let max = items
            .iter()
            .map(|i| i.2.unwrap_or(i.1).max(i.1))
            .fold(0.0, f64::max)
            .max(f64::MIN_POSITIVE);
        let span = W - label_w - 110.0;
        let mut svg = String::new();
        let _ = writeln!(
            svg,
            "<svg class=\"bars\" data-name=\"{}\" \
             width=\"{W}\" height=\"{height}\" viewBox=\"0 0 {W} {height}\" role=\"img\">",
            esc(name)
        );
        let _ = writeln!(svg, "<title>{}</title>", esc(name));
        for (k, (label, v, p99)) in items.iter().enumerate() {
            let y = 5.0 + k as f64 * row;
            let _ = writeln!(
                svg,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
                label_w - 5.0,
                y + 14.0,
                esc(label)
            );
            if let Some(p) = p99 {
                let _ = writeln!(
                    svg,
                    "<rect class=\"p99\" x=\"{label_w}\" y=\"{:.1}\" width=\"{:.1}\" height=\"4\" \
                     fill=\"#d62728\"><title>p99 {}</title></rect>",
                    y + 15.0,
                    span * p / max,
                    human(*p)
                );
            }
            let _ = writeln!(
                svg,
                "<rect class=\"bar\" data-value=\"{v}\" x=\"{label_w}\" y=\"{:.1}\" \
                 width=\"{:.1}\" height=\"12\" fill=\"#1f77b4\"/>",
                y + 2.0,
                (span * v / max).max(0.5)
            );
            let _ = writeln!(
                svg,
                "<text x=\"{:.1}\" y=\"{:.1}\">{} {}{}</text>",
                label_w + span * p99.unwrap_or(*v).max(*v) / max + 5.0,
                y + 14.0,
                human(*v),
                esc(unit),
                p99.map_or(String::new(), |p| format!(" (p99 {})", human(p)))
            );
        }
        svg.push_str("</svg>\n");
        self.body.push_str(&svg);
    }

    /// The whole document.
    pub fn finish(&self, title: &str) -> String {
        format!(
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
             <title>{}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{}\
             <p class=\"note\">Written by vmmu {}; a self-contained file: no scripts, no \
             external resources.</p>\n</body>\n</html>\n",
            esc(title),
            self.body,
            env!("CARGO_PKG_VERSION")
        )
    }
}

/// A series' value in `r` (index into [`SERIES`]).
fn value(r: &Rates, i: usize) -> f64 {
    match i {
        0 => r.accesses,
        1 => r.mmio_spte_hit,
        2 => r.mmio_cache_hit,
        3 => r.mmio_slow_path,
        _ => r.violation,
    }
}

/// A panel's axes at `y0`, `h` high, with 0..`max` on the left and a label.
fn axes(svg: &mut String, y0: f64, h: f64, max: f64, label: &str) {
    for k in 0..=4 {
        let y = y0 + h - h * f64::from(k) / 4.0;
        let _ = writeln!(
            svg,
            "<line class=\"grid\" x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            W - RIGHT,
            LEFT - 5.0,
            y + 4.0,
            human(max * f64::from(k) / 4.0)
        );
    }
    let _ = writeln!(
        svg,
        "<line class=\"axis\" x1=\"{LEFT}\" x2=\"{LEFT}\" y1=\"{y0:.1}\" y2=\"{:.1}\"/>\
         <line class=\"axis\" x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\"/>\
         <text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
        y0 + h,
        W - RIGHT,
        y0 + h,
        y0 + h,
        LEFT + 5.0,
        y0 + 10.0,
        esc(label)
    );
}

/// Where a report goes: the path is checked when the command starts (so a bad path fails before
/// the run, as a bad argument) and the file written when it ends.
#[derive(Debug)]
pub struct ReportFile {
    path: PathBuf,
}

impl ReportFile {
    /// Checks, before the run, that `path` can be written: opened for appending (created if
    /// missing, and then removed again), so that a run that fails or is interrupted (Ctrl-C)
    /// leaves neither an empty file nor a truncated earlier report. The error names the flag,
    /// the path and why.
    pub fn create(path: &Path) -> Result<ReportFile, String> {
        let existed = std::fs::symlink_metadata(path).is_ok();
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| format!("--report {}: cannot create the file: {e}", path.display()))?;
        if !existed {
            let _ = std::fs::remove_file(path);
        }
        Ok(ReportFile { path: path.to_path_buf() })
    }

    /// Writes the page (creating or truncating the file now).
    pub fn write(self, html: &str) -> Result<(), String> {
        use std::io::Write;
        let shown = self.path.display();
        let mut file = std::fs::File::create(&self.path)
            .map_err(|e| format!("--report {shown}: cannot create the file: {e}"))?;
        file.write_all(html.as_bytes())
            .and_then(|()| file.flush())
            .map_err(|e| format!("--report {shown}: cannot write the report: {e}"))
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmmu_sim::seam::MmuExits;
    use vmmu_sim::timeline::Sample;

    #[test]
    fn escaping_covers_markup_and_quotes() {
        assert_eq!(esc("<a href='x'>&\"</a>"), "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;");
        let mut p = Page::new("<script>");
        p.config(&[("k<", "v\"><img src=x>".into())]);
        let html = p.finish("t&");
        assert!(!html.contains("<script>") && !html.contains("<img"), "{html}");
        assert!(html.contains("&lt;script&gt;") && html.contains("<title>t&amp;</title>"));
        assert_eq!(esc("a\u{0}b\u{1b}[2J\tc"), "a\u{fffd}b\u{fffd}[2J\tc");
    }

    #[test]
    fn timeline_has_every_series_and_update_bars() {
        let s = |t_us, accesses, updates, hit| Sample {
            t_us,
            accesses,
            updates,
            exits: MmuExits { mmio_spte_hit: hit, mmio_slow_path: hit / 2, ..MmuExits::default() },
        };
        let t = Timeline {
            clock: "wall time".into(),
            interval_us: 50_000,
            samples: vec![s(0, 0, 0, 0), s(50_000, 100, 2, 10), s(100_000, 250, 2, 30)],
            ..Timeline::default()
        };
        let mut p = Page::new("t");
        p.timeline(&t);
        let html = p.finish("t");
        for (name, _, _) in SERIES {
            assert!(html.contains(&format!("data-series=\"{name}\"")), "{name}");
        }
        assert_eq!(html.matches("class=\"update\"").count(), 1);
        let mut p = Page::new("t");
        p.histogram("h", &LatencyHistogram::of_samples(&[100, 200, 5000]));
        p.bars("b", "ns", &[("x".into(), 3.0, Some(5.0)), ("nan".into(), f64::NAN, None)]);
        let html = p.finish("t");
        assert!(html.matches("class=\"bucket\"").count() >= 2);
        assert_eq!(html.matches("class=\"bar\"").count(), 1);
    }
}
