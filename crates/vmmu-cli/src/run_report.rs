//! `vmmu run`'s report as text (one line per group, the oracle's verdict last) and as JSON (the
//! report's serde form, pretty-printed). Keys and line shapes are the command's interface: add,
//! never rename.

use core::fmt;
use vmmu_sim::report::{format_name, mmu_name, Percentiles, Report};
use vmmu_sim::MmuCounters;

/// The report rendered as text by its [`Display`](fmt::Display).
#[derive(Clone, Copy, Debug)]
pub struct Text<'a>(pub &'a Report);

/// Who set the shadow page limit of a run: the VMM (`--shadow-pages`, with its default when the
/// flag is not given), or KVM's default for the memslots (`--shadow-pages auto`).
pub fn shadow_limit_origin(set: bool) -> String {
    if set {
        format!("set by the VMM: --shadow-pages, {} by default", vmmu_sim::DEFAULT_SHADOW_PAGES)
    } else {
        "KVM's default for the memslots".into()
    }
}

/// The report as pretty JSON.
pub fn to_json(r: &Report) -> String {
    // Serialising plain structs of numbers, strings and maps with string keys cannot fail.
    serde_json::to_string_pretty(r).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

/// A latency line's percentiles: only those the samples can tell apart from the largest (p99
/// from 100 samples, p90 from 10), so that one slow update among a dozen is not called "p99".
fn latency(p: &Percentiles) -> String {
    let mut line = format!("p50 {:.1} us", us(p.p50));
    if p.samples >= 10 {
        line += &format!(" p90 {:.1} us", us(p.p90));
    }
    if p.samples >= 100 {
        line += &format!(" p99 {:.1} us", us(p.p99));
    }
    line + &format!(" max {:.1} us ({} samples)", us(p.max), p.samples)
}

/// The SPTE format as the config line names it: shadow SPTEs are x86 page-table entries, the
/// layout NPT uses too, and plain "npt" read as AMD NPT being in use under `--format shadow`.
fn spte_format(mmu: vmmu::vm::MmuKind, format: vmmu::spte::FormatKind) -> String {
    match mmu {
        vmmu::vm::MmuKind::Shadow => format!("x86 page-table entries (as {})", format_name(format)),
        vmmu::vm::MmuKind::Tdp => format_name(format).to_string(),
    }
}

impl fmt::Display for Text<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.0;
        let c = &r.config;
        let m = &c.mmio_caching;
        writeln!(
            f,
            "config: mmu {}{} format {} phys_bits {} vcpus {} seed {}; mmio caching requested {} effective {} ({}); reader fences {}",
            mmu_name(c.mmu),
            if c.guest_paging { " (guest paging)" } else { "" },
            spte_format(c.mmu, c.format),
            c.phys_bits,
            c.vcpus,
            c.seed,
            if m.requested { "on" } else { "off" },
            if m.effective { "on" } else { "off" },
            m.reason,
            c.reader_fences.name()
        )?;
        if let Some(p) = c.shadow_pages {
            writeln!(f, "shadow page limit: {} ({})", p.limit, shadow_limit_origin(p.set))?;
        }
        writeln!(f, "ran {:.2} s, {} accesses", r.elapsed_seconds, r.total_accesses())?;
        for v in &r.vcpus {
            writeln!(
                f,
                "  vcpu {}: {} accesses ({:.0}/s), ram {}, device {}, userspace exits {}, retries {}, gave way {}, errors {}",
                v.index, v.accesses, v.accesses_per_sec, v.ram, v.mmio_device, v.mmio_userspace, v.retries, v.gave_way, v.errors
            )?;
        }
        let e = &r.exits;
        writeln!(
            f,
            "exits: violation {}, misconfig/RSVD {}, mmio spte hit {}, mmio cache hit {}, slow-path mmio {}, read-only write {}, device {}, userspace {}",
            e.mmu.violation, e.mmu.misconfig, e.mmu.mmio_spte_hit, e.mmu.mmio_cache_hit, e.mmu.mmio_slow_path, e.readonly_write, e.mmio_device, e.mmio_userspace
        )?;
        let mm = &r.mmu;
        write!(
            f,
            "mmu: mmio sptes created {}, range zaps {}, zap_all_fast {}, retries {}, tlb flush requests {}",
            mm.mmio_sptes_created, mm.zaps, mm.zap_all_fast, mm.retries, mm.tlb_flush_requests
        )?;
        for (k, v) in mm.extra.iter().flat_map(MmuCounters::named) {
            write!(f, ", {k} {v}")?;
        }
        writeln!(f)?;
        let s = &r.memslots;
        writeln!(
            f,
            "memslots: {} updates ({} refused as expected), latency {}; generation {}, wraps {}",
            s.updates,
            s.refused,
            latency(&s.latency_ns),
            s.generation,
            s.generation_wraps
        )?;
        if s.host_invalidations > 0 {
            writeln!(f, "host invalidations: {}", s.host_invalidations)?;
        }
        let t = &s.wrap_trap;
        if t.sprung {
            writeln!(
                f,
                "wrap trap: armed at generation {}, sprung (generation {}) after {} dummy swaps, {} ms into the run",
                t.armed_at, t.sprung_at, t.swaps, t.sprung_after_ms
            )?;
        } else if t.requested {
            let armed = if t.armed {
                format!("armed at generation {}", t.armed_at)
            } else {
                "never armed".to_string()
            };
            writeln!(
                f,
                "wrap trap: {armed}, NOT sprung: the run ended after {} dummy swaps, before the \
                 wrapping swap (about 2^19 swaps are needed: a longer --seconds, and no --churn)",
                t.swaps
            )?;
        }
        let t = &r.tlb;
        writeln!(
            f,
            "tlb: hits {}, misses {}, flushes {}, inserts {} ({} from leaves over 4 KiB)",
            t.hits, t.misses, t.flushes, t.inserts, t.inserts_huge
        )?;
        let tb = &r.tables;
        writeln!(
            f,
            "table pages: allocated {}, freed {}, live {}, high water {}",
            tb.allocated, tb.freed, tb.live, tb.high_water
        )?;
        if let Some(g) = &r.guest_paging {
            writeln!(
                f,
                "guest paging: {} PTE stores, {} remaps, {} unmapped reads, {} CR3 loads, {} edits of the other space (then a switch to it), {} table stores emulated as write-protected, {} unprotected and run again, {} writes through a read-only alias, {} shootdowns followed by a flush of the whole TLB",
                g.pte_stores, g.remaps, g.unmapped_reads, g.cr3_loads, g.other_space_edits, g.emulated_table_stores, g.unprotected_table_stores, g.read_only_alias_writes, g.whole_tlb_flushes
            )?;
        }
        if let Some(d) = &r.dirty_log {
            writeln!(
                f,
                "dirty log ({}): {} collections, {} pages reported, {} write windows checked, {} unverifiable",
                d.mode, d.collections, d.pages_reported, d.windows_checked, d.unverifiable
            )?;
            if d.migrations > 0 {
                writeln!(
                    f,
                    "  {} migrations: logging turned on and off on the live slots",
                    d.migrations
                )?;
            }
        }
        let o = &r.oracle;
        if o.violations == 0 {
            write!(f, "oracle: OK, {} outcomes checked, 0 violations", o.checked)
        } else {
            write!(
                f,
                "oracle: FAILED, {} violations in {} outcomes checked",
                o.violations, o.checked
            )?;
            for v in &o.first_violations {
                write!(f, "\n  {v}")?;
            }
            if o.violations > o.first_violations.len() as u64 {
                write!(f, "\n  ... and {} more", o.violations - o.first_violations.len() as u64)?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmmu_sim::oracle::Violation;
    use vmmu_sim::seam::MmuStats;

    #[test]
    fn text_names_the_verdict_and_violations() {
        let mut r = Report::default();
        assert!(Text(&r).to_string().contains("oracle: OK"));
        r.oracle.push(Violation {
            vcpu: Some(0),
            gpa: Some("0x1000".into()),
            what: "read".into(),
            expected: "MMIO exit".into(),
            seen: "RAM".into(),
        });
        let s = Text(&r).to_string();
        assert!(s.contains("oracle: FAILED, 1 violations"), "{s}");
        assert!(s.contains("vCPU 0 gpa 0x1000 read: expected MMIO exit, saw RAM"), "{s}");
    }

    /// The guest paging line appears with guest paging only, and counts the events the oracle
    /// judged (remaps, faults through a read-only alias, stores emulated as write-protected).
    #[test]
    fn the_guest_paging_line_counts_the_guests_table_events() {
        let mut r = Report::default();
        assert!(!Text(&r).to_string().contains("guest paging:"));
        r.guest_paging = Some(vmmu_sim::machine_paging::PagingCounters {
            other_space_edits: 7,
            emulated_table_stores: 6,
            unprotected_table_stores: 3,
            read_only_alias_writes: 5,
            whole_tlb_flushes: 4,
            ..Default::default()
        });
        let text = Text(&r).to_string();
        assert!(text.contains("7 edits of the other space (then a switch to it), 6 table stores emulated as write-protected, 3 unprotected and run again, 5 writes through a read-only alias, 4 shootdowns followed by a flush of the whole TLB"), "{text}");
        assert!(to_json(&r).contains("\"read_only_alias_writes\": 5"), "{}", to_json(&r));
    }

    /// A latency line names only the percentiles its samples tell apart from the largest: a
    /// dozen updates (the default run) give p50 and p90, not a "p99" that is one slow update.
    #[test]
    fn latency_lines_drop_percentiles_that_few_samples_cannot_give() {
        let p = |samples| Percentiles { p50: 1000, p90: 2000, p99: 3000, max: 4000, samples };
        assert_eq!(latency(&p(5)), "p50 1.0 us max 4.0 us (5 samples)");
        assert_eq!(latency(&p(12)), "p50 1.0 us p90 2.0 us max 4.0 us (12 samples)");
        assert_eq!(latency(&p(100)), "p50 1.0 us p90 2.0 us p99 3.0 us max 4.0 us (100 samples)");
    }

    /// The MMIO SPTE exit is an EPT misconfiguration only under EPT; under NPT it is a #NPF and
    /// under shadow paging a #PF, both with RSVD set: the text names both, as the README and
    /// the replay's `mmio paths` line do (it read `misconfig` under every format).
    #[test]
    fn the_mmio_spte_exit_is_named_for_every_format() {
        let text = Text(&Report::default()).to_string();
        assert!(text.contains("exits: violation 0, misconfig/RSVD 0,"), "{text}");
        // Shadow SPTEs are x86 page-table entries: not "format npt" alone.
        let mut shadow = Report::default();
        shadow.config.mmu = vmmu::vm::MmuKind::Shadow;
        shadow.config.format = vmmu::spte::FormatKind::Npt;
        let s = Text(&shadow).to_string();
        assert!(s.contains("mmu shadow format x86 page-table entries (as npt) phys_bits"), "{s}");
        // And `zaps` counts TDP range zap calls (0 under shadow paging), not SPTEs.
        assert!(text.contains("mmu: mmio sptes created 0, range zaps 0,"), "{text}");
    }

    #[test]
    fn text_and_json_show_the_mmu_counters_by_name() {
        let counters = Some(MmuCounters { stale_gen_misses: 2, ..MmuCounters::default() });
        let s = MmuStats { counters, ..MmuStats::default() };
        let mut r = Report::default();
        r.fill_mmu(&s);
        let text = Text(&r).to_string();
        assert!(text.contains("format ept") && text.contains(", stale_gen_misses 2,"), "{text}");
        let v: serde_json::Value = serde_json::from_str(&to_json(&r)).expect("json");
        assert_eq!(v["mmu"]["extra"]["stale_gen_misses"], 2);
        assert_eq!(v["config"]["format"], "ept");
        assert!(v.get("oracle").is_some() && v["memslots"]["latency_ns"].get("p99").is_some());
    }
}
