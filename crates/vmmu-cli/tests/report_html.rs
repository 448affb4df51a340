//! `--report FILE.html` of `vmmu run`, `vmmu replay` and `vmmu bench` (quick modes): the file
//! is a well-formed, self-contained page (balanced tags, no script, no URL, no external
//! resource) with a timeline of every series, latency histograms and the configuration table.
//! A path that cannot be created is a usage error (exit 2) before anything runs.
mod common;
use common::{repo, vmmu};

use std::path::PathBuf;

fn out_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmmu-report-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join(name)
}

/// Runs `args` with `--report` and returns the page.
fn page(name: &str, args: &[&str]) -> String {
    let path = out_path(name);
    let _ = std::fs::remove_file(&path);
    let p = path.to_str().expect("utf-8 temp path");
    let mut all = args.to_vec();
    all.extend(["--report", p]);
    let out = vmmu(&all);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{all:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("report written to"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{p}: {e}"))
}

/// Elements that have no closing tag in HTML.
const VOID: [&str; 4] = ["meta", "br", "hr", "img"];

/// Every opening tag is closed in order (or self-closing / void), attributes are quoted, and
/// text holds no raw `<` or `>`: well-formed enough for a browser and for XML tools on the SVG.
fn check_well_formed(html: &str) {
    let body = html.strip_prefix("<!DOCTYPE html>\n").expect("starts with <!DOCTYPE html>");
    assert!(html.trim_end().ends_with("</html>"));
    let mut stack: Vec<String> = Vec::new();
    let mut rest = body;
    while let Some(open) = rest.find('<') {
        assert!(!rest[..open].contains('>'), "raw '>' in text before {:.80}", &rest[open..]);
        let close = rest[open..].find('>').map(|c| open + c).expect("unclosed tag");
        let tag = &rest[open + 1..close];
        assert!(!tag.contains('<'), "'<' inside a tag: {tag:.80}");
        assert_eq!(tag.matches('"').count() % 2, 0, "unbalanced quotes: {tag:.120}");
        let name: String =
            tag.trim_start_matches('/').chars().take_while(|c| c.is_ascii_alphanumeric()).collect();
        if let Some(closing) = tag.strip_prefix('/') {
            let top = stack.pop().unwrap_or_else(|| panic!("</{closing}> without an opening"));
            assert_eq!(top, name, "</{name}> closes <{top}>");
        } else if !tag.ends_with('/') && !VOID.contains(&name.as_str()) {
            stack.push(name);
        }
        rest = &rest[close + 1..];
    }
    assert!(stack.is_empty(), "left open: {stack:?}");
}

fn check_self_contained(html: &str) {
    let lower = html.to_ascii_lowercase();
    for bad in ["http", "<script", "src=", "href=", "url(", "@import", "<link", "<iframe"] {
        assert!(!lower.contains(bad), "the report must be self-contained: found {bad:?}");
    }
}

fn check_timeline(html: &str) {
    let start = html.find("<svg class=\"timeline\"").expect("a timeline <svg>");
    let svg = &html[start..start + html[start..].find("</svg>").expect("closed svg")];
    for s in ["accesses", "mmio_spte_hit", "mmio_cache_hit", "mmio_slow_path", "violation"] {
        let at = svg.find(&format!("data-series=\"{s}\"")).unwrap_or_else(|| panic!("series {s}"));
        let points = &svg[at..];
        let points = &points[points.find("points=\"").expect("points") + 8..];
        let points = &points[..points.find('"').expect("end of points")];
        assert!(points.split(' ').count() >= 2, "series {s} has fewer than 2 points");
    }
    assert!(svg.contains("class=\"update\""), "no memslot update bars in the timeline");
}

fn histograms(html: &str) -> usize {
    html.matches("<svg class=\"histogram\"").count()
}

fn check_config(html: &str, keys: &[&str]) {
    let start = html.find("<table class=\"config\">").expect("a config table");
    let table = &html[start..start + html[start..].find("</table>").expect("closed table")];
    for k in keys {
        assert!(table.contains(&format!("<th>{k}</th>")), "config table lacks {k}");
    }
}

#[test]
fn run_report_has_timeline_histograms_and_config() {
    let html = page("run.html", &["run", "--seconds", "1.3", "--vcpus", "2"]);
    check_well_formed(&html);
    check_self_contained(&html);
    check_timeline(&html);
    assert_eq!(histograms(&html), 2, "memslot update and MMIO handling histograms");
    assert!(html.contains("data-name=\"memslot update latency (set_memory_region)\""));
    assert!(html.matches("class=\"bucket\"").count() >= 2);
    check_config(&html, &["--seconds", "--vcpus", "--format", "--mmio-caching", "--updates"]);
    assert!(html.contains("<th>MMIO caching effective</th>"));
    assert!(html.contains("class=\"pass\""));
}

#[test]
fn replay_report_has_a_timeline_per_configuration() {
    let trace = repo("tests/traces/seabios-kvm.small.trace.jsonl");
    let html = page("replay.html", &["replay", "--no-kvm", "--format", "ept", &trace]);
    check_well_formed(&html);
    check_self_contained(&html);
    check_timeline(&html);
    // ept with caching on and off: two timelines, each with two histograms.
    assert_eq!(html.matches("<svg class=\"timeline\"").count(), 2);
    assert_eq!(histograms(&html), 4);
    check_config(&html, &["traces", "--format", "--mmio-caching", "--no-kvm"]);
    assert!(html.contains("sim-ept-on") && html.contains("sim-ept-off"));
}

#[test]
fn bench_report_has_the_churn_timeline_rows_and_config() {
    let html =
        page("bench.html", &["bench", "--smoke", "--no-kvm", "--only", "mmio", "--only", "churn"]);
    check_well_formed(&html);
    check_self_contained(&html);
    check_timeline(&html);
    assert!(histograms(&html) >= 1, "the churn update latency histogram");
    check_config(&html, &["--quick", "--only", "--no-kvm", "CPUs"]);
    assert!(html.contains("<svg class=\"bars\""), "bar charts of the rows");
    assert!(html.contains("MMIO handling latency by path"));
}

#[test]
fn an_unwritable_report_path_is_a_usage_error_before_the_run() {
    let bad = "/nonexistent-dir-for-vmmu/x.html";
    for args in [
        vec!["run", "--seconds", "60", "--report", bad],
        vec!["bench", "--smoke", "--report", bad],
        vec!["replay", "--no-kvm", "--report", bad, "whatever.jsonl"],
    ] {
        let t = std::time::Instant::now();
        let out = vmmu(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--report") && err.contains(bad), "{err}");
        assert!(t.elapsed().as_secs() < 20, "{args:?} ran before failing");
    }
}
