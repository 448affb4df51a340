//! The benchmark table: one [`Row`] per measurement, each with a ratio to what it is compared
//! with and, where the issue sets one, a target and whether the run met it. Printed as text
//! ([`Table::to_text`]) or JSON ([`Table::to_json`], stable keys).
//!
//! A row that could not be measured (no `/dev/kvm`) has no value and a `note` saying why; it is
//! still printed, as `n/a (reason)`.

use serde::Serialize;

/// The unit of a row's value (and p99).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    /// Nanoseconds.
    Ns,
    /// Microseconds.
    Us,
    /// Seconds.
    S,
    /// Millions per second.
    MPerS,
    /// Percent.
    Percent,
}

impl Unit {
    fn suffix(self) -> &'static str {
        match self {
            Unit::Ns => "ns",
            Unit::Us => "us",
            Unit::S => "s",
            Unit::MPerS => "M/s",
            Unit::Percent => "%",
        }
    }
}

/// One measurement.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Row {
    /// The row group (`mmio`, `shadow`, `lookup`, `memslot`, `kvm`, `faults`, `churn`).
    pub group: &'static str,
    /// What was measured.
    pub name: String,
    /// The median (or the single value), in `unit`; `None` when not measured.
    pub value: Option<f64>,
    /// The 99th percentile, where the row has a distribution.
    pub p99: Option<f64>,
    /// The unit of `value` and `p99`.
    pub unit: Unit,
    /// The ratio to `ratio_of`, measured in this run.
    pub ratio: Option<f64>,
    /// What the ratio compares with (e.g. `x BTreeMap baseline`).
    pub ratio_of: String,
    /// The target, in words, if it sets one for this row.
    pub target: Option<String>,
    /// Whether this run met the target.
    pub met: Option<bool>,
    /// Why the row has no value, or a remark.
    pub note: Option<String>,
}

impl Row {
    /// A row with a value.
    pub fn new(group: &'static str, name: impl Into<String>, unit: Unit, value: f64) -> Row {
        Row {
            group,
            name: name.into(),
            value: Some(value),
            p99: None,
            unit,
            ratio: None,
            ratio_of: String::new(),
            target: None,
            met: None,
            note: None,
        }
    }

    /// A row that could not be measured, and why.
    pub fn na(group: &'static str, name: impl Into<String>, unit: Unit, why: &str) -> Row {
        Row { value: None, note: Some(why.to_string()), ..Row::new(group, name, unit, 0.0) }
    }

    /// Adds the 99th percentile.
    pub fn p99(mut self, p99: f64) -> Row {
        self.p99 = Some(p99);
        self
    }

    /// Adds the ratio to `of` (e.g. `"x at 10 slots"`); a non-finite ratio is left out.
    pub fn ratio(mut self, ratio: f64, of: impl Into<String>) -> Row {
        self.ratio = ratio.is_finite().then_some(ratio);
        self.ratio_of = of.into();
        self
    }

    /// Adds a target and whether it was met (unknown for a row that was not measured).
    pub fn target(self, target: impl Into<String>, met: bool) -> Row {
        self.target_met(target, Some(met))
    }

    /// Adds a target and whether it was met, `None` if that is not known (say, a ratio to a
    /// side that did not run). A row without a value never met or missed its target.
    pub fn target_met(mut self, target: impl Into<String>, met: Option<bool>) -> Row {
        self.target = Some(target.into());
        self.met = met.filter(|_| self.value.is_some());
        self
    }

    /// Adds a remark.
    pub fn note(mut self, note: impl Into<String>) -> Row {
        self.note = Some(note.into());
        self
    }
}

/// The run's context, printed above the table.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RunInfo {
    /// `--quick`.
    pub quick: bool,
    /// CPUs available to the process.
    pub cpus: usize,
    /// The 1-minute load average when the run started (Linux), if known.
    pub load_before: Option<f64>,
    /// Wall time of the whole run, seconds.
    pub elapsed_s: f64,
    /// Where threads were pinned, and anything else a reader needs to interpret the numbers.
    pub notes: Vec<String>,
    /// The churn group's first vmmu run (zap the slot, back to back), sampled every 20 ms over
    /// its three phases, with every update timed (for `--report`; not part of the JSON).
    #[serde(skip)]
    pub churn_timeline: Option<vmmu_sim::timeline::Timeline>,
}

/// All rows of one run.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Table {
    /// The run's context.
    pub info: RunInfo,
    /// The rows, in print order.
    pub rows: Vec<Row>,
}

fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 0.1 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

impl Table {
    /// The table as JSON (keys: `info`, `rows[].{group,name,value,p99,unit,ratio,ratio_of,target,met,note}`).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// The table as aligned text (also valid Markdown).
    pub fn to_text(&self) -> String {
        let head = ["group", "benchmark", "median", "p99", "ratio", "target", "met", "note"];
        let mut lines: Vec<[String; 8]> = Vec::new();
        for r in &self.rows {
            let u = r.unit.suffix();
            let value = match r.value {
                Some(v) => format!("{} {u}", fmt_num(v)),
                None => format!("n/a ({})", r.note.as_deref().unwrap_or("not measured")),
            };
            let p99 = r.p99.map_or(String::new(), |p| format!("{} {u}", fmt_num(p)));
            let ratio = match r.ratio {
                Some(x) => format!("{}{}", fmt_num(x), r.ratio_of),
                None if r.ratio_of.is_empty() => "-".into(),
                // Not `n/ax KVM`: the suffix belongs to a number.
                None => "n/a".into(),
            };
            let met = match r.met {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "",
            };
            lines.push([
                r.group.to_string(),
                r.name.clone(),
                value,
                p99,
                ratio,
                r.target.clone().unwrap_or_default(),
                met.to_string(),
                if r.value.is_some() { r.note.clone().unwrap_or_default() } else { String::new() },
            ]);
        }
        let mut w = head.map(|h| h.len());
        for l in &lines {
            for (i, c) in l.iter().enumerate() {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let row = |cells: &[String]| {
            let mut s = String::from("|");
            for (i, c) in cells.iter().enumerate() {
                let pad = w[i] - c.chars().count();
                s.push(' ');
                s.push_str(c);
                s.push_str(&" ".repeat(pad));
                s.push_str(" |");
            }
            s.push('\n');
            s
        };
        let mut out = String::new();
        out.push_str(&row(&head.map(String::from)));
        out.push_str(&row(&w.map(|n| "-".repeat(n))));
        for l in &lines {
            out.push_str(&row(l));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_has_one_line_per_row_and_na_rows_say_why() {
        let t = Table {
            info: RunInfo::default(),
            rows: vec![
                Row::new("mmio", "fast", Unit::Ns, 12.345)
                    .ratio(0.4, "x base")
                    .target("<= 25 ns", true),
                Row::na("kvm", "create", Unit::Us, "no /dev/kvm").ratio(f64::NAN, "x KVM"),
            ],
        };
        let s = t.to_text();
        assert_eq!(s.lines().count(), 4);
        assert!(s.contains("12.3 ns") && s.contains("0.40x base") && s.contains("yes"));
        assert!(s.contains("n/a (no /dev/kvm)") && !s.contains("n/ax KVM"));
        let j: serde_json::Value = serde_json::from_str(&t.to_json()).unwrap();
        assert_eq!(j["rows"][1]["value"], serde_json::Value::Null);
        assert_eq!(j["rows"][0]["unit"], "ns");
    }
}
