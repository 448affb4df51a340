//! The guest page tables of a replay under the shadow MMU, and of the selftests there.
//!
//! A trace carries guest-physical addresses only. Under shadow paging the MMU maps what the
//! guest's own page tables map, so the replay's vCPU runs in long mode with an identity map when
//! the trace reaches at or above 4 GiB (below, it runs without paging: [`super::engine`]):
//! every 1 GiB region the trace touches (any slot of address space 0, deleted ones included,
//! and any recorded MMIO access, up to the shadow MMU's 2^52 whatever the host's MAXPHYADDR) is
//! mapped to itself with a 1 GiB page, user and writable, accessed and dirty (so no walk writes
//! the tables; the guest's CPUID has 1 GiB pages). A PML4 and one PDPT per 512 GiB are all the
//! tables, so any trace a 4-level guest can address fits (at most 2^17 regions). The KVM half's
//! guest and version-1 scenarios on `format=shadow` run on identity maps too (of 2 MiB pages,
//! over less space). A region at or above 2^47 has no canonical
//! user address of the same value under 4-level paging: it is mapped at a free region below
//! 2^47 instead ([`IdentityTables::gva`] says where).
//!
//! Invariants: the tables live in KVM's internal identity-page-table slot
//! ([`InternalSlot::IdentityPageTable`], an id above every id a trace can name), in a 1 GiB region the trace never touches (or, when every region below MAXPHYADDR is
//! touched, in a gap between the trace's slot requests and accesses, which the identity map then
//! covers like the rest of its region); nothing the trace does reaches them, and the replay's
//! own accesses never go there (they stay in the trace's slots and accessed ranges).

use super::engine::first_middle_last;
use super::parse::{EventKind, Trace};
use crate::host::{HostBuffer, SimHost};
use crate::ram::Width;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use vmmu::guest::pte::{A, D, P, PS, RW, US};
use vmmu::guest::{GuestCpu, PagingMode};
use vmmu::memslot::region::KVM_MEM_MAX_NR_PAGES;
use vmmu::memslot::{InternalMemoryRegion, InternalSlot};
use vmmu::AsId;

const GIB: u64 = 1 << 30;
const MIB2: u64 = 2 << 20;
const PAGE: u64 = 4096;
/// The guest's MAXPHYADDR: the shadow MMU accepts slots up to 2^52 whatever the host's
/// MAXPHYADDR (KVM's `kvm_mmu_max_gfn` without TDP, facts §5.3), so the guest must reach that
/// far (a TDP replay of the same trace refuses a slot above the host's MAXPHYADDR instead).
pub const GUEST_PHYS_BITS: u8 = 52;
/// A guest without paging reaches guest-physical addresses below this; above, it needs the
/// identity tables.
pub const NONPAGING_LIMIT: u64 = 1 << 32;
/// An intermediate entry: present, writable, user, accessed.
const TABLE: u64 = P | RW | US | A;

/// Why the identity tables could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Every 1 GiB region below MAXPHYADDR is used by the trace, and no gap between its slots
    /// and accesses holds the tables either.
    #[error(
        "no room below 2^{phys_bits} is free of the trace's slots and accesses: the shadow \
         replay has nowhere to put its guest page tables (a larger --phys-bits may help)"
    )]
    NoRoom {
        /// The host MAXPHYADDR.
        phys_bits: u8,
    },
    /// The trace touches more 1 GiB regions than a 4-level guest has user addresses for
    /// (2^17, less one for the tables).
    #[error(
        "the trace touches more than {0} distinct GiB of guest-physical space, more than the \
         128 TiB a 4-level guest addresses; the shadow replay cannot map it"
    )]
    TooLarge(usize),
    /// Host memory for the tables.
    #[error("host memory for the replay's page tables: {0}")]
    Host(String),
}

/// The replay's identity map, built in host memory, and the slot that must hold it.
pub struct IdentityTables {
    /// The internal slot request that puts the tables where CR3 points.
    pub region: InternalMemoryRegion,
    /// CR3: the PML4's guest-physical address.
    pub cr3: u64,
    /// Every mapped region (1 GiB indices): guest-physical region -> guest-virtual region
    /// (itself below 2^47).
    mapped: BTreeMap<u64, u64>,
    /// The host buffer (kept alive with the replay).
    _buf: Arc<HostBuffer>,
}

/// Most regions the tables map: the 1 GiB regions of a 4-level guest's user half, one of
/// which holds the tables when the trace leaves one free.
const MAX_REGIONS: usize = ((1u64 << 47) / GIB) as usize - 1;

/// The guest-physical byte ranges `[start, end)` below `2^phys_bits` that `trace` reaches in
/// address space 0: those of every recorded MMIO access and of every slot request KVM could
/// accept by its shape (page-aligned, at most `KVM_MEM_MAX_NR_PAGES` pages, below
/// `2^phys_bits`). A request it refuses maps nothing (the run fails on the refusal anyway), and
/// a damaged one may name ranges no table could cover; the replay still probes the first,
/// middle and last page of a refused request whose start is page-aligned (they must read as
/// MMIO), so those pages are reached too.
fn reached(trace: &Trace, phys_bits: u8) -> Vec<(u64, u64)> {
    let limit = 1u64 << phys_bits.min(63);
    let mut ranges = Vec::new();
    let mut add = |start: u64, len: u64| {
        if let Some(end) = start.checked_add(len).filter(|&end| len > 0 && end <= limit) {
            ranges.push((start, end));
        }
    };
    for e in &trace.events {
        match e.kind {
            EventKind::Slot(s) if s.as_id == 0 => {
                if s.gpa % PAGE == 0 && s.size % PAGE == 0 && s.size / PAGE <= KVM_MEM_MAX_NR_PAGES
                {
                    add(s.gpa, s.size);
                } else {
                    // The pages the replay probes before the request all the same.
                    for p in first_middle_last(s.gpa, s.size).into_iter().flatten() {
                        add(p, PAGE);
                    }
                }
            }
            EventKind::Mmio(m) => add(m.gpa, m.len.max(1)),
            _ => {}
        }
    }
    ranges
}

/// The 1 GiB regions (by index) of the ranges a trace reaches ([`reached`]).
fn touched(ranges: &[(u64, u64)]) -> Result<BTreeSet<u64>, IdentityError> {
    let mut set = BTreeSet::new();
    for &(start, end) in ranges {
        for r in start / GIB..=(end - 1) / GIB {
            set.insert(r);
            if set.len() > MAX_REGIONS {
                return Err(IdentityError::TooLarge(set.len()));
            }
        }
    }
    Ok(set)
}

/// The lowest page-aligned guest-physical address below `2^phys_bits` where `size` bytes reach
/// none of the `ranges` a trace reaches ([`reached`]): the tables' home when every 1 GiB region
/// is touched (a trace with a slot or an access in each GiB of a small MAXPHYADDR). The home's
/// region is then identity-mapped like the others; the replay's accesses never go there all
/// the same.
fn free_gap(ranges: &[(u64, u64)], phys_bits: u8, size: u64) -> Option<u64> {
    let limit = 1u64 << phys_bits.min(63);
    let mut ranges = ranges.to_vec();
    ranges.sort_unstable();
    let mut start = 0u64;
    let below = ranges.into_iter().filter(|&(a, _)| a < limit);
    for (a, b) in below.chain([(limit, limit)]) {
        if a >= start && a - start >= size {
            return Some(start);
        }
        start = start.max(b.next_multiple_of(PAGE));
    }
    None
}

impl IdentityTables {
    /// Builds the tables for `trace` in a new buffer of `host`, for a host of `phys_bits`: they
    /// map what the trace reaches below 2^[`GUEST_PHYS_BITS`] and live below 2^`phys_bits`.
    pub fn build(
        trace: &Trace,
        host: &SimHost,
        phys_bits: u8,
    ) -> Result<IdentityTables, IdentityError> {
        Self::for_ranges(&reached(trace, GUEST_PHYS_BITS), host, phys_bits)
    }

    /// Builds tables that map the guest-physical byte ranges `[start, end)` of `ranges` (below
    /// 2^[`GUEST_PHYS_BITS`]), in a new buffer of `host`, to live below 2^`phys_bits` in the
    /// internal identity-page-table slot at an address none of `ranges` reaches (module
    /// invariants): how the selftests under the shadow MMU reach their memory above 4 GiB, as
    /// KVM's selftest library maps its guest's.
    pub fn for_ranges(
        ranges: &[(u64, u64)],
        host: &SimHost,
        phys_bits: u8,
    ) -> Result<IdentityTables, IdentityError> {
        let regions = touched(ranges)?;
        let limit = 1u64 << phys_bits.min(63);
        let free_region = (0..limit / GIB).find(|i| !regions.contains(i));
        // Guest-virtual region of each touched region: itself when canonical, else a free one.
        let canonical = (1u64 << 47) / GIB;
        let home_region = free_region.unwrap_or(u64::MAX);
        let mut free = (0..canonical).filter(|i| !regions.contains(i) && *i != home_region);
        let mut gva_region = BTreeMap::new();
        for &r in &regions {
            let v = if r < canonical {
                r
            } else {
                free.next().ok_or(IdentityError::NoRoom { phys_bits })?
            };
            gva_region.insert(r, v);
        }
        let pdpts: BTreeSet<u64> = gva_region.values().map(|v| v / 512).collect();
        let pages = 1 + pdpts.len();
        let size = (pages as u64 * PAGE).next_multiple_of(MIB2);
        // A GiB of their own, or else a gap in a touched one (mapped like the rest of it).
        let base = match free_region {
            Some(r) => r * GIB,
            None => free_gap(ranges, phys_bits, size).ok_or(IdentityError::NoRoom { phys_bits })?,
        };
        let buf = host
            .add_buffer("__replay_identity_tables", size)
            .map_err(|e| IdentityError::Host(e.to_string()))?;
        let write = |gpa: u64, value: u64| {
            buf.write(gpa - base, Width::W8, value).map_err(|e| IdentityError::Host(e.to_string()))
        };
        // Page 0: the PML4; then one page per PDPT, whose entries are the 1 GiB pages.
        let mut next = base + PAGE;
        let mut pdpt_at = BTreeMap::new();
        for &p in &pdpts {
            write(base + 8 * p, next | TABLE)?;
            pdpt_at.insert(p, next);
            next += PAGE;
        }
        for (&r, &v) in &gva_region {
            write(pdpt_at[&(v / 512)] + 8 * (v % 512), (r * GIB) | P | RW | US | A | D | PS)?;
        }
        let region = InternalMemoryRegion {
            as_id: AsId(0),
            slot: InternalSlot::IdentityPageTable,
            guest_phys_addr: base,
            memory_size: size,
            userspace_addr: buf.hva().raw(),
        };
        Ok(IdentityTables { region, cr3: base, mapped: gva_region, _buf: buf })
    }

    /// The guest-virtual address that maps guest-physical `gpa` (`gpa` itself below 2^47), or
    /// `None` when the tables map nothing there: a region the trace does not reach, or an
    /// address at or above 2^52, which no x86 guest reaches (as a guest-virtual address it is
    /// not canonical, and a 4-level walk would drop its high bits and read low memory).
    pub fn gva(&self, gpa: u64) -> Option<u64> {
        self.mapped.get(&(gpa / GIB)).map(|v| v * GIB + gpa % GIB)
    }

    /// The CPU state of a guest on these tables: long mode, CR3 at the PML4, 1 GiB pages (the
    /// identity map's), and MAXPHYADDR [`GUEST_PHYS_BITS`], so the guest reaches every slot the
    /// shadow MMU accepts, above the host's MAXPHYADDR too. The caller loads CR3.
    pub fn guest_cpu(&self) -> GuestCpu {
        GuestCpu {
            mode: PagingMode::Long4,
            cr3: self.cr3,
            gbpages: true,
            ..nonpaging_cpu(GUEST_PHYS_BITS)
        }
    }
}

/// The CPU state of a guest without paging (GVA = GPA, below 4 GiB) on a host of MAXPHYADDR
/// `phys_bits`: how a guest below 4 GiB runs where no identity tables are needed.
pub fn nonpaging_cpu(phys_bits: u8) -> GuestCpu {
    GuestCpu {
        mode: PagingMode::NonPaging,
        cr3: 0,
        cr0_wp: true,
        efer_nx: true,
        maxphyaddr: phys_bits,
        gbpages: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::HostConfig;
    use crate::replay::parse::parse;

    const HEADER: &str = "{\"vmmu_trace\":1,\"source\":\"test\"}\n";

    fn slot(id: u16, gpa: &str, size: &str) -> String {
        format!("{{\"t\":0.000000,\"op\":\"slot\",\"as\":0,\"id\":{id},\"flags\":[],\"gpa\":\"{gpa}\",\"size\":\"{size}\",\"uaddr\":\"0x7f0000000000\"}}\n")
    }

    #[test]
    fn tables_go_to_the_first_untouched_gib_in_the_internal_slot() {
        let text = format!(
            "{HEADER}{}{}",
            slot(0, "0x0", "0x40000000"),
            slot(32763, "0x40000000", "0x1000")
        );
        let trace = parse(&text).expect("trace");
        let host = SimHost::new(HostConfig::new(46)).expect("host");
        let t = IdentityTables::build(&trace, &host, 46).expect("tables");
        assert_eq!(t.cr3, 2 * GIB, "GiB 0 and 1 are the trace's");
        assert_eq!(t.region.slot, InternalSlot::IdentityPageTable);
        assert_eq!(t.region.as_request().slot, 32766);
        assert_eq!(t.region.guest_phys_addr, t.cr3);
        assert_eq!(t.region.memory_size, MIB2);
    }

    #[test]
    fn regions_above_2_pow_47_are_mapped_at_a_free_canonical_region() {
        let text =
            format!("{HEADER}{}{}", slot(0, "0x0", "0x1000"), slot(1, "0xf000000000000", "0x4000"));
        let trace = parse(&text).expect("trace");
        let host = SimHost::new(HostConfig::new(52)).expect("host");
        let t = IdentityTables::build(&trace, &host, 52).expect("tables");
        assert_eq!(t.cr3, GIB, "GiB 0 is the trace's");
        assert_eq!(t.gva(0x1234), Some(0x1234));
        assert_eq!(t.gva(0xf000000001234), Some(2 * GIB + 0x1234), "GiB 1 holds the tables");
        assert_eq!(t.gva(GIB), None, "the tables' own GiB is not mapped");
        assert_eq!(t.gva(1 << 52), None, "no guest reaches 2^52 (it aliased 0)");
    }

    #[test]
    fn ranges_kvm_refuses_by_shape_map_nothing_and_cost_nothing() {
        // A damaged request (found by the input mutations: it took 22 GB): 2^64 - 1 bytes.
        let text = format!(
            "{HEADER}{}{}{}",
            slot(0, "0x0", "0x1000"),
            slot(1, "0x2000000", "0xffffffffffffffff"),
            slot(2, "0x40000000000", "0x1000")
        );
        let trace = parse(&text).expect("trace");
        let host = SimHost::new(HostConfig::new(46)).expect("host");
        let t = IdentityTables::build(&trace, &host, 46).expect("tables");
        assert_eq!(t.cr3, GIB);
        // 4 TiB is above MAXPHYADDR 36: nothing there either.
        assert_eq!(touched(&reached(&trace, 36)).expect("regions"), BTreeSet::from([0]));
    }

    #[test]
    fn more_than_128_tib_is_refused_with_a_reason() {
        // 17 slots of the most pages one slot may have (8 TiB each), 16 TiB apart.
        let slots: Vec<String> = (0..17u16)
            .map(|i| slot(i, &format!("{:#x}", u64::from(i) << 44), "0x7fffffff000"))
            .collect();
        let trace = parse(&format!("{HEADER}{}", slots.concat())).expect("trace");
        let e = touched(&reached(&trace, 52)).expect_err("refused");
        assert!(matches!(e, IdentityError::TooLarge(_)), "{e}");
    }

    #[test]
    fn slots_of_the_most_pages_are_mapped_with_1_gib_pages() {
        // Two slots of 2^31 - 1 pages (KVM accepts each): about 16 TiB, which the tables with 2
        // MiB pages refused (16384 page directories).
        let text = format!(
            "{HEADER}{}{}",
            slot(0, "0x0", "0x7fffffff000"),
            slot(1, "0x100000000000", "0x7fffffff000")
        );
        let trace = parse(&text).expect("trace");
        let host = SimHost::new(HostConfig::new(46)).expect("host");
        let t = IdentityTables::build(&trace, &host, 46).expect("tables");
        assert_eq!(t.region.memory_size, MIB2, "a PML4 and two PDPTs");
        assert_eq!(t.gva(0x1000_0000_1234), Some(0x1000_0000_1234));
        assert_eq!(t.gva(0x7ff_ffff_e000), Some(0x7ff_ffff_e000));
        // The PDPT entry of GiB 5 is a 1 GiB page of itself.
        let read = |off: u64| t._buf.read(off, Width::W8).expect("in the buffer");
        let pdpt = read(0) & !0xfff & ((1 << 52) - 1);
        let e = read(pdpt - t.cr3 + 8 * 5);
        assert_eq!(e, (5 * GIB) | P | RW | US | A | D | PS);
    }

    #[test]
    fn a_trace_over_the_whole_space_is_refused_with_a_reason() {
        // 2^36 bytes: 64 GiB, all of it in one slot.
        let text = format!("{HEADER}{}", slot(0, "0x0", "0x1000000000"));
        let trace = parse(&text).expect("trace");
        let host = SimHost::new(HostConfig::new(36)).expect("host");
        let e = IdentityTables::build(&trace, &host, 36).err().expect("refused");
        assert!(matches!(e, IdentityError::NoRoom { phys_bits: 36 }), "{e}");
    }

    #[test]
    fn with_every_gib_touched_the_tables_go_to_a_gap_between_slots_and_accesses() {
        // A 2 MiB slot at the start of each of the 64 GiB of a 36-bit host (aliases of one
        // buffer), and an MMIO access right after the first: a valid trace the TDP replays pass.
        // The tables had nowhere to go (NoRoom) although almost every GiB is empty.
        let slots: Vec<String> = (0..64u16)
            .map(|i| slot(i, &format!("{:#x}", u64::from(i) * GIB), "0x200000"))
            .collect();
        let mmio = "{\"t\":0.000000,\"op\":\"mmio\",\"dir\":\"read\",\"gpa\":\"0x200ff8\",\"len\":8,\"value\":\"0x0\",\"exit\":\"user\"}\n";
        let trace = parse(&format!("{HEADER}{}{mmio}", slots.concat())).expect("trace");
        let host = SimHost::new(HostConfig::new(36)).expect("host");
        let t = IdentityTables::build(&trace, &host, 36).expect("tables");
        assert_eq!(t.cr3, 0x201000, "the first page after the slot and the access");
        assert_eq!(t.region.slot, InternalSlot::IdentityPageTable);
        let end = t.cr3 + t.region.memory_size;
        assert!(end <= GIB, "{end:#x}");
    }

    #[test]
    fn pages_probed_in_a_refused_request_are_mapped() {
        // A request KVM refuses by its shape (a size of no whole pages): the replay still probes
        // its first page, which must read as MMIO, so the guest must map it (it page-faulted).
        let text =
            format!("{HEADER}{}{}", slot(0, "0x0", "0x1000"), slot(1, "0x100000000", "0x1001"));
        let trace = parse(&text).expect("trace");
        assert_eq!(touched(&reached(&trace, 46)).expect("regions"), BTreeSet::from([0, 4]));
    }
}
