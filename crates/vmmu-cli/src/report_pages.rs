//! The HTML pages of `vmmu run`, `vmmu replay` and `vmmu bench` (`--report FILE.html`), built
//! with [`crate::html_report::Page`] from the reports the commands already print.

use crate::html_report::Page;
use vmmu_bench::table::{Row, Table};
use vmmu_sim::replay::TraceReport;
use vmmu_sim::report::{format_name, mmu_name, Report};

fn on_off(b: bool) -> String {
    if b { "on" } else { "off" }.into()
}

/// `vmmu run`: for each run (one, or two with `--compare-caching`), its verdict, configuration,
/// counters, timeline and latency histograms. `flags` are the command's options as given.
pub fn run_page(flags: &[(&str, String)], runs: &[(&str, &Report)]) -> String {
    let title = "vmmu run";
    let mut p = Page::new(title);
    p.h2("Command");
    p.config(flags);
    for (name, r) in runs {
        if runs.len() > 1 {
            p.h2(&format!("Run: {name}"));
        }
        let passed = r.oracle.violations == 0 && r.vcpus.iter().all(|v| v.errors == 0);
        p.verdict(
            passed,
            &format!(
                "oracle: {}, {} outcomes checked, {} violations",
                if passed { "OK" } else { "FAILED" },
                r.oracle.checked,
                r.oracle.violations
            ),
        );
        for v in &r.oracle.first_violations {
            p.note(&v.to_string());
        }
        let trap = &r.memslots.wrap_trap;
        if trap.missed() {
            // The run fails (exit 1) without an oracle violation: it did not test its trap.
            p.verdict(
                false,
                &format!(
                    "wrap trap: NOT sprung after {} dummy swaps: the run did not test it",
                    trap.swaps
                ),
            );
        }
        let c = &r.config;
        p.h2("Configuration");
        p.config(&[
            ("mmu", mmu_name(c.mmu).into()),
            ("guest paging", on_off(c.guest_paging)),
            ("format", format_name(c.format).into()),
            ("phys_bits", c.phys_bits.to_string()),
            ("vcpus", c.vcpus.to_string()),
            ("seed", c.seed.to_string()),
            ("MMIO caching requested", on_off(c.mmio_caching.requested)),
            ("MMIO caching effective", on_off(c.mmio_caching.effective)),
            ("MMIO caching reason", c.mmio_caching.reason.clone()),
            ("ran (s)", format!("{:.2}", r.elapsed_seconds)),
        ]);
        p.h2("Timeline");
        match &r.timeline {
            Some(t) => p.timeline(t),
            None => p.note("This run recorded no timeline."),
        }
        p.h2("Latency");
        if let Some(t) = &r.timeline {
            p.histogram("memslot update latency (set_memory_region)", &t.update_latency);
            p.histogram(
                "MMIO handling latency (access to MMIO outcome: walk, exit, MMU, device or exit \
                 to userspace)",
                &t.mmio_latency,
            );
        }
        p.h2("Counters");
        let rows: Vec<Vec<String>> = r
            .vcpus
            .iter()
            .map(|v| {
                vec![
                    v.index.to_string(),
                    v.accesses.to_string(),
                    format!("{:.0}", v.accesses_per_sec),
                    v.ram.to_string(),
                    v.mmio_device.to_string(),
                    v.mmio_userspace.to_string(),
                    v.retries.to_string(),
                    v.gave_way.to_string(),
                    v.errors.to_string(),
                ]
            })
            .collect();
        p.table(
            "vcpus",
            &[
                "vCPU",
                "accesses",
                "per s",
                "RAM",
                "device",
                "userspace exits",
                "retries",
                "gave way",
                "errors",
            ],
            &rows,
        );
        let e = &r.exits;
        let m = &r.memslots;
        p.table(
            "totals",
            &["counter", "value"],
            &[
                vec!["violation exits".into(), e.mmu.violation.to_string()],
                vec!["misconfig/RSVD exits".into(), e.mmu.misconfig.to_string()],
                vec!["MMIO SPTE hits".into(), e.mmu.mmio_spte_hit.to_string()],
                vec!["per-vCPU MMIO cache hits".into(), e.mmu.mmio_cache_hit.to_string()],
                vec!["slow-path MMIO".into(), e.mmu.mmio_slow_path.to_string()],
                vec!["read-only writes".into(), e.readonly_write.to_string()],
                vec!["MMIO SPTEs created".into(), r.mmu.mmio_sptes_created.to_string()],
                vec!["range zaps".into(), r.mmu.zaps.to_string()],
                vec!["zap_all_fast".into(), r.mmu.zap_all_fast.to_string()],
                vec!["memslot updates".into(), m.updates.to_string()],
                vec!["of those refused as expected".into(), m.refused.to_string()],
                vec!["final generation".into(), m.generation.to_string()],
                vec!["generation wraps".into(), m.generation_wraps.to_string()],
            ],
        );
    }
    p.finish(title)
}

/// `vmmu replay`: per trace, its verdict and warnings, the KVM half, and per machine
/// configuration its counters, timeline (recorded time) and latency histograms.
pub fn replay_page(flags: &[(&str, String)], traces: &[TraceReport]) -> String {
    let title = "vmmu replay";
    let mut p = Page::new(title);
    p.h2("Command");
    p.config(flags);
    for t in traces {
        p.h2(&format!("Trace {}", t.file));
        p.verdict(t.passed, t.verdict.word());
        let events: Vec<String> = t.events.iter().map(|(k, v)| format!("{k} {v}")).collect();
        p.config(&[
            ("file", t.file.clone()),
            ("source", t.source.clone()),
            ("events", events.join(", ")),
            ("vCPU threads recorded", t.summary_count(t.vcpu_threads)),
            ("lost events", t.summary_count(t.lost_events)),
        ]);
        for w in &t.warnings {
            p.note(&format!("warning: {w}"));
        }
        for e in &t.run_errors {
            p.note(&format!("FAIL: {e}"));
        }
        let k = &t.kvm;
        let kvm = match (&k.skipped, &k.error) {
            (Some(why), _) => format!("skipped: {why}"),
            (None, Some(e)) => format!("failed: {e}"),
            (None, None) => format!(
                "slots {} applied, {} refused; MMIO {} checked, {} MMIO exits, {} not MMIO, {} \
                 raced the slot request before them",
                k.slots_applied,
                k.slots_refused,
                k.mmio_checked,
                k.mmio_exits,
                k.mmio_not_mmio,
                k.mmio_raced
            ),
        };
        p.note(&format!("/dev/kvm: {kvm}"));
        let raced = t.runs.iter().map(|r| r.mmio.raced_slot_request).max().unwrap_or(0);
        if raced > 0 {
            p.note(&format!(
                "{raced} recorded MMIO accesses reached RAM inside the range of the slot request \
                 just before them: another vCPU's, while that request was in flight (counted as \
                 raced, not misclassified)"
            ));
        }
        let rows: Vec<Vec<String>> = t
            .runs
            .iter()
            .map(|r| {
                vec![
                    format!("sim-{}", r.config),
                    r.verdict(t.lost()).label().into(),
                    r.slots.applied.to_string(),
                    r.slots.refused.to_string(),
                    r.mmio.classified_mmio.to_string(),
                    r.mmio.misclassified.to_string(),
                    r.mmio_paths.mmio_spte_hit.to_string(),
                    r.mmio_paths.vcpu_cache_hit.to_string(),
                    r.mmio_paths.slow_path.to_string(),
                    r.oracle.violations.to_string(),
                ]
            })
            .collect();
        p.table(
            "runs",
            &[
                "configuration",
                "verdict",
                "slots applied",
                "refused",
                "MMIO classified",
                "misclassified",
                "SPTE hits",
                "cache hits",
                "slow path",
                "violations",
            ],
            &rows,
        );
        for r in &t.runs {
            p.h3(&format!(
                "sim-{}: MMIO caching {} ({})",
                r.config,
                on_off(r.mmio_caching_effective),
                r.mmio_caching_reason
            ));
            if let Some(g) = &r.guest {
                p.note(&format!("Guest: {g}."));
            }
            match &r.timeline {
                Some(tl) => {
                    p.timeline(tl);
                    p.histogram(
                        &format!("sim-{}: memslot update latency", r.config),
                        &tl.update_latency,
                    );
                    p.histogram(
                        &format!(
                            "sim-{}: MMIO handling latency (recorded MMIO accesses)",
                            r.config
                        ),
                        &tl.mmio_latency,
                    );
                }
                None => p.note("This run recorded no timeline."),
            }
        }
    }
    p.finish(title)
}

fn bar_items(rows: &[&Row]) -> Vec<(String, f64, Option<f64>)> {
    rows.iter().map(|r| (r.name.clone(), r.value.unwrap_or(f64::NAN), r.p99)).collect()
}

/// `vmmu bench`: the run's context, every row, bar charts per group, and the churn group's
/// timeline with its update latency histogram.
pub fn bench_page(flags: &[(&str, String)], t: &Table) -> String {
    let title = "vmmu bench";
    let mut p = Page::new(title);
    p.h2("Configuration");
    let i = &t.info;
    let mut pairs: Vec<(&str, String)> = flags.to_vec();
    pairs.push(("CPUs", i.cpus.to_string()));
    pairs.push(("load average before", i.load_before.map_or("unknown".into(), |l| l.to_string())));
    pairs.push(("took (s)", format!("{:.1}", i.elapsed_s)));
    p.config(&pairs);
    for n in &i.notes {
        p.note(n);
    }
    p.h2("Timeline: vCPU throughput while a 2 MiB slot churns (vmmu)");
    match &i.churn_timeline {
        Some(tl) => {
            p.note(
                "Three phases: undisturbed, slot created/moved/deleted back to back, control \
                 (the other CPU only spins).",
            );
            p.timeline(tl);
            p.h2("Latency");
            p.histogram("memslot update latency during churn", &tl.update_latency);
        }
        None => p.note("No churn timeline: the churn group did not run (--only)."),
    }
    let groups: Vec<&str> = {
        let mut g: Vec<&str> = t.rows.iter().map(|r| r.group).collect();
        g.dedup();
        g
    };
    for g in groups {
        let rows: Vec<&Row> = t.rows.iter().filter(|r| r.group == g).collect();
        let unit = rows.first().map_or(String::new(), |r| format!("{:?}", r.unit).to_lowercase());
        let name = match g {
            "mmio" => "MMIO handling latency by path (median per call, p99 over batches)".into(),
            _ => format!("group {g}"),
        };
        p.h2(&name);
        let same_unit = rows.iter().all(|r| r.unit == rows[0].unit);
        if same_unit {
            p.bars(&name, &unit, &bar_items(&rows));
        }
        let body: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                vec![
                    r.name.clone(),
                    r.value.map_or("n/a".into(), |v| format!("{v:.3}")),
                    r.p99.map_or(String::new(), |v| format!("{v:.3}")),
                    format!("{:?}", r.unit).to_lowercase(),
                    r.ratio.map_or(String::new(), |v| format!("{v:.2}")),
                    r.ratio_of.clone(),
                    r.target.clone().unwrap_or_default(),
                    r.met.map_or(String::new(), |m| if m { "yes" } else { "no" }.into()),
                    r.note.clone().unwrap_or_default(),
                ]
            })
            .collect();
        p.table(
            "rows",
            &["row", "value", "p99", "unit", "ratio", "ratio of", "target", "met", "note"],
            &body,
        );
    }
    p.finish(title)
}
