//! Host memory for a replay: the recording VMM's `uaddr` ranges mapped onto [`SimHost`] buffers.
//!
//! A `uaddr` is an identity only: slots whose `[uaddr, uaddr + size)` ranges overlap share host
//! memory (QEMU re-creates RAM slots over one buffer after every split; the BIOS ROM's last
//! 128 KiB is mapped at `0xe0000` and at `0xfffe0000`). So each maximal union of overlapping ranges
//! becomes one buffer and every `uaddr` keeps its offset in its union: aliases stay aliases. A
//! union of 2 MiB or more also keeps its position modulo 2 MiB (the buffer starts at the 2 MiB
//! boundary below the union's start), so huge pages map exactly where they would have on the
//! recording host.

use super::parse::{EventKind, SlotEvent, Trace, GUEST_PHYS_BITS};
use crate::host::{frame_space, HostBuffer, HostConfig, HostError, SimHost, SIZE_2M};
use std::sync::Arc;
use vmmu::memslot::KVM_MEM_MAX_NR_PAGES;
use vmmu::types::PAGE_SIZE;

/// Frames kept for the MMU's page tables on top of the buffers: at least this many, and
/// [`TABLE_FRAMES_PER_EVENT`] more per event of the trace ([`table_frames`]).
const TABLE_FRAMES_MIN: u64 = 1 << 16;
/// Page tables one event may make the MMU keep: a recorded access, or one of the replay's own
/// probes around a slot request, in a region no table covers yet takes up to one table per
/// level below the root (4 with a 5-level root), and TDP tables holding MMIO SPTEs stay (KVM
/// keeps them too; the recording host just had the memory). A slot request is probed at its
/// first, middle and last page, read through its aliases and around it: 16 pages' worth.
const TABLE_FRAMES_PER_EVENT: u64 = 16;

/// Frames the replay's host keeps for MMU page tables for `trace`: [`TABLE_FRAMES_MIN`], and
/// [`TABLE_FRAMES_PER_EVENT`] more per event. Frames cost nothing until used (the frame table
/// is zeroed memory the system hands out on first touch), so the budget follows the trace's
/// length rather than a fixed number that a long recording with MMIO all over the address
/// space outgrows.
fn table_frames(trace: &Trace) -> u64 {
    let events = trace.events.len() as u64;
    TABLE_FRAMES_MIN.saturating_add(events.saturating_mul(TABLE_FRAMES_PER_EVENT))
}

/// Why a trace's memory could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The host refused (a union of `uaddr` ranges it cannot map: past the user address space).
    #[error("host memory for the trace's slots: {0}")]
    Host(#[from] HostError),
}

/// One union of overlapping `uaddr` ranges and its buffer.
#[derive(Debug)]
struct Union {
    /// First recorded `uaddr` of the union.
    start: u64,
    /// End (exclusive).
    end: u64,
    /// The recorded `uaddr` that the buffer's first byte stands for.
    base: u64,
    buffer: Arc<HostBuffer>,
}

/// The replay's host and the `uaddr` -> host address map.
#[derive(Debug)]
pub struct TraceMemory {
    host: Arc<SimHost>,
    unions: Vec<Union>,
    lazy: bool,
}

/// The highest user address limit of any x86-64 host (`TASK_SIZE_MAX` with 5-level paging): a
/// recorded `uaddr` range that ends past it was refused by `access_ok` on every host.
pub const ANY_HOST_USER_LIMIT: u64 = (1 << 56) - 4096;

/// Whether KVM could accept a slot request with this `uaddr` and `size` on some host (page
/// aligned, at most `KVM_MEM_MAX_NR_PAGES` pages, inside [`ANY_HOST_USER_LIMIT`]); the end of
/// its range if so.
fn acceptable_range(uaddr: u64, size: u64) -> Option<u64> {
    let aligned = (uaddr | size) % PAGE_SIZE == 0;
    let end = uaddr.checked_add(size).filter(|&e| e <= ANY_HOST_USER_LIMIT)?;
    (aligned && size / PAGE_SIZE <= KVM_MEM_MAX_NR_PAGES).then_some(end)
}

/// Whether some x86-64 host's KVM could accept slot request `s` by its shape: its `uaddr`
/// range ([`ANY_HOST_USER_LIMIT`], alignment, `KVM_MEM_MAX_NR_PAGES`) and a guest-physical
/// range below 2^52 (no host has more). Deletes qualify.
pub fn acceptable_somewhere(s: &SlotEvent) -> bool {
    s.size == 0
        || (acceptable_range(s.uaddr, s.size).is_some()
            && s.gpa.checked_add(s.size).is_some_and(|end| end <= 1 << GUEST_PHYS_BITS))
}

/// The `uaddr` a replay passes for a delete (`size` 0) whose recorded `uaddr` no union holds:
/// one naming another address than its slot's, which KVM checks for its shape only (page
/// aligned, inside the host's user address space) and otherwise ignores. A page-aligned one up to
/// [`ANY_HOST_USER_LIMIT`] succeeded on its recording host (one with 5-level paging above 2^47),
/// so it becomes an address every x86-64 host accepts, the last page below the 4-level
/// `TASK_SIZE_MAX`, when it is above that; anything else goes as recorded, to be refused as KVM
/// refuses it on every host.
pub fn delete_uaddr(uaddr: u64) -> u64 {
    const LAST_4_LEVEL_PAGE: u64 = vmmu::memslot::TASK_SIZE_MAX - PAGE_SIZE;
    if uaddr % PAGE_SIZE == 0 && uaddr <= ANY_HOST_USER_LIMIT {
        uaddr.min(LAST_4_LEVEL_PAGE)
    } else {
        uaddr
    }
}

/// The maximal unions of overlapping `[uaddr, uaddr + size)` ranges of the trace's non-delete
/// slot requests, sorted. Requests KVM refuses whatever the host (`acceptable_range`: 2^31
/// pages or more, misaligned, a range that wraps or leaves every user address space) get no
/// memory: their recorded `uaddr` goes to the MMU as it is, which refuses them, naming the line,
/// instead of the whole replay failing to allocate their size.
pub fn uaddr_unions(trace: &Trace) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = trace
        .events
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::Slot(s) if s.size > 0 => Some((s.uaddr, acceptable_range(s.uaddr, s.size)?)),
            _ => None,
        })
        .collect();
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in ranges {
        match out.last_mut() {
            Some(last) if s < last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

impl TraceMemory {
    /// A host with one buffer per union of the trace's `uaddr` ranges.
    pub fn new(trace: &Trace, phys_bits: u8) -> Result<TraceMemory, MemoryError> {
        let plan: Vec<(u64, u64, u64)> = uaddr_unions(trace)
            .into_iter()
            .map(|(start, end)| {
                let align = if end - start >= SIZE_2M { SIZE_2M } else { PAGE_SIZE };
                (start, end, start & !(align - 1))
            })
            .collect();
        let pages: u64 = plan
            .iter()
            .map(|(_, end, base)| (end - base).div_ceil(PAGE_SIZE) + SIZE_2M / PAGE_SIZE)
            .sum();
        // Past the frame space (a VM of more than 1 TiB: the recording KVM took its slots; or
        // more memory than `phys_bits` addresses: a 70 GiB VM on a 36-bit host), the buffers
        // give their pages frames on first translation, as Linux backs a VMM's anonymous
        // memory: a replay touches a few thousand pages, whatever the slots' sizes. Host pages
        // are all 4 KiB then.
        let frame_space = frame_space(phys_bits);
        let tables = table_frames(trace);
        let lazy = pages > frame_space.saturating_sub(tables + crate::host::LOW_TABLE_FRAMES);
        let host = Arc::new(SimHost::new(HostConfig {
            max_frames: if lazy { frame_space } else { pages + tables },
            lazy_frames: lazy,
            ..HostConfig::new(phys_bits)
        })?);
        let mut unions = Vec::with_capacity(plan.len());
        for (i, (start, end, base)) in plan.into_iter().enumerate() {
            let buffer = host.add_buffer(&format!("uaddr{i}@{start:#x}"), end - base)?;
            unions.push(Union { start, end, base, buffer });
        }
        Ok(TraceMemory { host, unions, lazy })
    }

    /// The host.
    pub fn host(&self) -> &Arc<SimHost> {
        &self.host
    }

    /// Number of buffers (unions).
    pub fn buffers(&self) -> usize {
        self.unions.len()
    }

    /// Whether the buffers' pages get frames on first translation (more than the frame space).
    pub fn frames_on_demand(&self) -> bool {
        self.lazy
    }

    /// Total bytes of the buffers.
    pub fn bytes(&self) -> u64 {
        self.unions.iter().map(|u| u.buffer.len()).sum()
    }

    /// The replay's host address for a recorded `uaddr`, if some union holds it.
    pub fn hva(&self, uaddr: u64) -> Option<u64> {
        let u = self.unions.iter().find(|u| (u.start..u.end).contains(&uaddr))?;
        Some(u.buffer.hva().0 + (uaddr - u.base))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::parse::{Event, SlotEvent};
    use vmmu::host::{HostAccess, HostMemory};
    use vmmu::types::Hva;

    fn slot(gpa: u64, size: u64, uaddr: u64) -> Event {
        Event {
            line: 0,
            t_us: 0,
            kind: EventKind::Slot(SlotEvent {
                as_id: 0,
                id: 0,
                dirty_log: false,
                readonly: false,
                gpa,
                size,
                uaddr,
            }),
        }
    }

    fn trace(events: Vec<Event>) -> Trace {
        Trace { source: String::new(), events, summary: None }
    }

    #[test]
    fn overlapping_ranges_share_a_buffer_and_keep_offsets() {
        let t = trace(vec![
            slot(0, 0x40_0000, 0x7f00_0020_0000),
            slot(0, 0, 0x7f00_0020_0000),
            slot(0xc0000, 0x1000, 0x7f00_0022_0000),
            slot(0xfffc0000, 0x40000, 0x7f10_0000_0000),
            slot(0xe0000, 0x20000, 0x7f10_0002_0000),
        ]);
        assert_eq!(
            uaddr_unions(&t),
            vec![(0x7f00_0020_0000, 0x7f00_0060_0000), (0x7f10_0000_0000, 0x7f10_0004_0000)]
        );
        let m = TraceMemory::new(&t, 46).expect("memory");
        assert_eq!(m.buffers(), 2);
        let ram = m.hva(0x7f00_0020_0000).expect("ram");
        assert_eq!(m.hva(0x7f00_0022_0000), Some(ram + 0x2_0000));
        assert_eq!(ram % SIZE_2M, 0x7f00_0020_0000 % SIZE_2M, "2 MiB position kept");
        let rom = m.hva(0x7f10_0000_0000).expect("rom");
        assert_eq!(m.hva(0x7f10_0002_0000), Some(rom + 0x2_0000));
        assert_eq!(m.hva(0x7f10_0004_0000), None);
    }

    #[test]
    fn requests_no_kvm_accepts_get_no_memory() {
        let max = KVM_MEM_MAX_NR_PAGES * PAGE_SIZE;
        let t = trace(vec![
            slot(0, 0x1000, 0x7f00_0000_0000),
            slot(0, max + PAGE_SIZE, 0x1000), // more pages than one slot may have
            slot(0, 0x1000, 0xffff_8000_0000_0000), // a kernel address
            slot(0, 0x1000, 0x7f00_1000_0800), // misaligned
            slot(0, 0x1800, 0x7f00_2000_0000), // a size of one and a half pages
            slot(0, 0x2000, ANY_HOST_USER_LIMIT - 0x1000), // past every user address space
        ]);
        assert_eq!(uaddr_unions(&t), vec![(0x7f00_0000_0000, 0x7f00_0000_1000)]);
        // The largest KVM accepts, ending at the highest user limit (5-level paging), does.
        let t = trace(vec![slot(0, max, ANY_HOST_USER_LIMIT - max)]);
        assert_eq!(uaddr_unions(&t), vec![(ANY_HOST_USER_LIMIT - max, ANY_HOST_USER_LIMIT)]);
    }

    #[test]
    fn a_vm_with_more_than_64_gib_of_ram_gets_its_memory() {
        // QEMU pc-i440fx `-m 70G`, as recorded: one RAM block, 3 GiB below the PCI hole and
        // 67 GiB from 4 GiB up (adjacent `uaddr` ranges, two unions), 70 GiB of backing memory.
        let ram = 0x7f87_dfe0_0000;
        let t = trace(vec![
            slot(0, 0xc000_0000, ram),
            slot(0x1_0000_0000, 0x10_c000_0000, ram + 0xc000_0000),
            slot(0xfffc_0000, 0x4_0000, 0x7f99_6500_0000),
        ]);
        let m = TraceMemory::new(&t, 46).expect("a 70 GiB VM's memory");
        assert!(!m.frames_on_demand(), "frames given up front, 2 MiB blocks where aligned");
        assert_eq!(m.buffers(), 3);
        let base = m.hva(ram + 0xc000_0000).expect("high RAM");
        let top = base + 0x10_c000_0000 - PAGE_SIZE;
        assert_eq!(m.hva(ram + 0x11_8000_0000 - PAGE_SIZE), Some(top));
        let low = m.hva(ram).expect("low RAM");
        for hva in [low, base, top, m.hva(0x7f99_6500_0000).expect("rom")] {
            let page = m.host().translate(Hva(hva), HostAccess::Write).expect("backed");
            assert!(m.host().ram_page(page.pfn).is_some(), "{hva:#x} has a frame");
        }
    }
    #[test]
    fn a_vm_with_more_than_1_tib_of_ram_gets_its_memory_page_by_page() {
        // QEMU pc-i440fx `-m 1100G` on an AMD host, as recorded: 3 GiB below the PCI hole and
        // the rest from 1 TiB up (above the HyperTransport hole), 1100 GiB of backing memory,
        // more than the machine's frame space: the pages get frames as they are translated.
        let ram = 0x7e55_bfe0_0000;
        let t = trace(vec![
            slot(0, 0xc000_0000, ram),
            slot(0x100_0000_0000, 0x112_4000_0000, ram + 0xc000_0000),
            slot(0xfffc_0000, 0x4_0000, 0x7e55_b980_0000),
        ]);
        let m = TraceMemory::new(&t, 46).expect("an 1100 GiB VM's memory");
        assert!(m.frames_on_demand());
        assert_eq!(m.buffers(), 3);
        let low = m.hva(ram).expect("low RAM");
        let high = m.hva(ram + 0xc000_0000).expect("high RAM");
        let top = m.hva(ram + 0x113_0000_0000 - PAGE_SIZE).expect("top of RAM");
        assert_eq!(top, high + 0x112_4000_0000 - PAGE_SIZE, "offsets kept");
        for hva in [low, top, m.hva(0x7e55_b980_0000).expect("rom")] {
            let page = m.host().translate(Hva(hva), HostAccess::Write).expect("backed");
            assert!(m.host().ram_page(page.pfn).is_some(), "{hva:#x} has a frame");
        }
        let (a, b) = (Hva(high + 0x40_0000_0000), Hva(top - 0x1000_0000));
        let pa = m.host().translate(a, HostAccess::Write).expect("backed").pfn;
        assert_eq!(
            m.host().translate(a, HostAccess::Read).expect("again").pfn,
            pa,
            "a page keeps its frame"
        );
        assert_ne!(m.host().translate(b, HostAccess::Write).expect("backed").pfn, pa);
    }

    #[test]
    fn a_vm_with_more_ram_than_a_small_maxphyaddr_addresses_gets_its_memory_page_by_page() {
        // The `-m 70G` VM replayed with `--phys-bits 36`: 70 GiB of backing memory, more than
        // the 64 GiB of frames a 36-bit host has (the frame table's cap is far above), so the
        // pages get frames as they are translated. The host refused to be made before: "out of
        // host frames: 17563648 more needed, 15985664 left".
        let ram = 0x7f87_dfe0_0000;
        let t = trace(vec![
            slot(0, 0xc000_0000, ram),
            slot(0x1_0000_0000, 0x10_c000_0000, ram + 0xc000_0000),
            slot(0xfffc_0000, 0x4_0000, 0x7f99_6500_0000),
        ]);
        let m = TraceMemory::new(&t, 36).expect("a 70 GiB VM's memory on a 36-bit host");
        assert!(m.frames_on_demand());
        let top = m.hva(ram + 0x11_8000_0000 - PAGE_SIZE).expect("top of RAM");
        for hva in [m.hva(ram).expect("low RAM"), top] {
            let page = m.host().translate(Hva(hva), HostAccess::Write).expect("backed");
            assert!(m.host().ram_page(page.pfn).is_some(), "{hva:#x} has a frame");
        }
        // With a frame per page the same VM gets its frames up front.
        assert!(!TraceMemory::new(&t, 37).expect("37 bits: 128 GiB of frames").frames_on_demand());
    }

    #[test]
    fn a_union_past_the_user_address_space_is_refused() {
        // 33 requests of the most pages one slot may have, each overlapping the next: one union
        // of about 264 TiB of `uaddr` range, which no mapping of the replay's can hold.
        let size = KVM_MEM_MAX_NR_PAGES * PAGE_SIZE;
        let t =
            trace((0..33).map(|i| slot(0, size, 0x1000_0000 + i * (size - PAGE_SIZE))).collect());
        let e = TraceMemory::new(&t, 52).expect_err("unmappable");
        assert!(e.to_string().starts_with("host memory for the trace's slots: "), "{e}");
    }

    /// A delete's `uaddr` that only a 5-level host has becomes the last 4-level user page; one
    /// every host accepts stays as recorded, and so does one no host accepts (misaligned, or
    /// past every user address space), which KVM refuses.
    #[test]
    fn a_deletes_uaddr_keeps_the_shape_its_recording_host_accepted() {
        let last = vmmu::memslot::TASK_SIZE_MAX - PAGE_SIZE;
        assert_eq!(delete_uaddr(0), 0);
        assert_eq!(delete_uaddr(0x7f00_0000_0000), 0x7f00_0000_0000);
        assert_eq!(delete_uaddr(last), last);
        assert_eq!(delete_uaddr(1 << 47), last);
        assert_eq!(delete_uaddr(ANY_HOST_USER_LIMIT), last);
        assert_eq!(delete_uaddr(ANY_HOST_USER_LIMIT + PAGE_SIZE), ANY_HOST_USER_LIMIT + PAGE_SIZE);
        assert_eq!(delete_uaddr((1 << 47) + 8), (1 << 47) + 8);
    }
}
