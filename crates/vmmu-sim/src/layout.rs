//! The default machine's guest-physical layout and host buffers, as data.
//!
//! | region    | slot | GPA                  | backing                 | guest use                  |
//! |-----------|------|----------------------|-------------------------|----------------------------|
//! | shared    | 1    | 16 MiB, 2 MiB        | buffer `shared`         | words owned round-robin    |
//! | private_a | 2    | 32 MiB, sized to fit | buffer `private_a`      | even vCPUs' private areas  |
//! | private_b | 3    | after private_a      | buffer `private_b`      | odd vCPUs' private areas   |
//! | rom       | 4    | after private_b      | buffer `rom`, read-only | reads; writes exit         |
//! | device    | none | 0xd000_0000, 8 KiB   | [`RegisterDevice`]      | register reads/writes; the second page's ID register is a second MMIO page for guest paging |
//! | bar       | 10   | 0xc000_0000 or 0xc080_0000, 2 MiB | `bar0` or `bar1` | mapped, moved, unmapped  |
//! |           |      | (or slid to 0xbff0_0000, half over its first position) |  | overlapping moves |
//! | dimm      | 11   | 4 GiB, 4 MiB         | buffer `dimm`           | hot-plugged and removed    |
//!
//! Everything lies at or above 8 MiB and below 64 GiB (the scenario format reserves the rest),
//! RAM regions are 2 MiB aligned so huge pages can map them.
//!
//! Data patterns: every 8-byte word of every buffer starts as [`pattern_word`]`(tag, offset)` with
//! the buffer's own tag, so a word read through a wrong translation shows a wrong value. The BAR
//! and DIMM buffers, and ROM, keep their pattern for the whole run (vCPUs only read them, except
//! the last page of each BAR buffer, [`BarLayout::scratch_offset`], which takes writes).
//!
//! [`RegisterDevice`]: crate::bus::RegisterDevice

use crate::host::{HostBuffer, HostError, SimHost, SIZE_2M};
use crate::seam::SlotRequest;
use std::sync::Arc;
use vmmu::types::{Gpa, PAGE_SIZE};

/// Bytes of private RAM per vCPU.
pub const PRIVATE_PER_VCPU: u64 = 64 << 10;
/// Bytes of the shared region that vCPUs use (the first words of the `shared` buffer).
pub const SHARED_USED: u64 = 64 << 10;

/// The initial value of the 8-byte word at byte `offset` of the buffer tagged `tag`.
/// Distinct across buffers (tag in bits 40..56) and offsets (word index in bits 0..40); the top
/// byte 0xa5 tells patterns from values vCPUs write to shared memory.
#[inline]
pub const fn pattern_word(tag: u64, offset: u64) -> u64 {
    (0xa5 << 56) | ((tag & 0xffff) << 40) | ((offset >> 3) & 0xff_ffff_ffff)
}

/// The value vCPU `owner` stores in its shared word `word` (its `seq`-th write there): the owner
/// and word are recoverable, so a reader can tell a value that belongs to the word from one that
/// does not. Top byte 0x5a, never a pattern.
#[inline]
pub const fn shared_value(owner: usize, word: u64, seq: u32) -> u64 {
    (0x5a << 56) | ((owner as u64 & 0xff) << 48) | ((word & 0xffff) << 32) | seq as u64
}

/// A RAM region behind one memslot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamRegion {
    /// Region and buffer name.
    pub name: &'static str,
    /// The slot id (address space 0).
    pub slot: u16,
    /// First guest-physical address.
    pub gpa: Gpa,
    /// Bytes.
    pub size: u64,
    /// Whether the slot is read-only for the guest (`KVM_MEM_READONLY`).
    pub readonly: bool,
}

impl RamRegion {
    /// Whether `gpa` is in the region.
    pub fn contains(&self, gpa: Gpa) -> bool {
        gpa.0.wrapping_sub(self.gpa.0) < self.size
    }
}

/// The BAR: one slot that the device manager maps at one of two GPAs, backed by one of two
/// buffers, or unmaps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BarLayout {
    /// The slot id.
    pub slot: u16,
    /// Bytes (a multiple of 2 MiB).
    pub size: u64,
    /// The two guest-physical positions (where vCPUs access it).
    pub positions: [Gpa; 2],
    /// Where the device manager slides it from position 0 by an overlapping move: half a BAR
    /// below, so the first half of position 0 is RAM both before and after the move (with
    /// another host address), and the scratch page at position 0 is outside it.
    pub slide: Gpa,
    /// The two backing buffers' names.
    pub buffers: [&'static str; 2],
}

impl BarLayout {
    /// The offset of the BAR's scratch page (its last page): the only part vCPUs write.
    pub const fn scratch_offset(&self) -> u64 {
        self.size - PAGE_SIZE
    }
}

/// The default machine's layout for `vcpus` vCPUs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineLayout {
    /// Number of vCPUs.
    pub vcpus: usize,
    /// Shared RAM.
    pub shared: RamRegion,
    /// Private RAM: even vCPUs in `[0]`, odd ones in `[1]`.
    pub private: [RamRegion; 2],
    /// The read-only ROM.
    pub rom: RamRegion,
    /// The device window (no slot).
    pub device: Gpa,
    /// Bytes of the device window.
    pub device_size: u64,
    /// The BAR.
    pub bar: BarLayout,
    /// The hot-plugged DIMM (its slot exists only part of the time).
    pub dimm: RamRegion,
}

impl MachineLayout {
    /// The layout for `vcpus` vCPUs (1..=256).
    pub fn new(vcpus: usize) -> MachineLayout {
        let vcpus = vcpus.clamp(1, 256);
        let per_region = (vcpus.div_ceil(2) as u64 * PRIVATE_PER_VCPU).next_multiple_of(SIZE_2M);
        let a = Gpa(32 << 20);
        let b = Gpa(a.0 + per_region + SIZE_2M);
        let rom = Gpa(b.0 + per_region + SIZE_2M);
        MachineLayout {
            vcpus,
            shared: RamRegion {
                name: "shared",
                slot: 1,
                gpa: Gpa(16 << 20),
                size: SIZE_2M,
                readonly: false,
            },
            private: [
                RamRegion { name: "private_a", slot: 2, gpa: a, size: per_region, readonly: false },
                RamRegion { name: "private_b", slot: 3, gpa: b, size: per_region, readonly: false },
            ],
            rom: RamRegion { name: "rom", slot: 4, gpa: rom, size: 256 << 10, readonly: true },
            device: Gpa(0xd000_0000),
            device_size: 2 * PAGE_SIZE,
            bar: BarLayout {
                slot: 10,
                size: SIZE_2M,
                positions: [Gpa(0xc000_0000), Gpa(0xc080_0000)],
                slide: Gpa(0xc000_0000 - SIZE_2M / 2),
                buffers: ["bar0", "bar1"],
            },
            dimm: RamRegion {
                name: "dimm",
                slot: 11,
                gpa: Gpa(1 << 32),
                size: 4 << 20,
                readonly: false,
            },
        }
    }

    /// The slots that exist for the whole run, in creation order.
    pub fn static_regions(&self) -> [&RamRegion; 4] {
        [&self.shared, &self.private[0], &self.private[1], &self.rom]
    }

    /// vCPU `vcpu`'s private area: its region and the offset of the area in it.
    pub fn private_area(&self, vcpu: usize) -> (&RamRegion, u64) {
        (&self.private[vcpu % 2], (vcpu / 2) as u64 * PRIVATE_PER_VCPU)
    }

    /// The owner of shared word `word` (words are dealt round-robin).
    pub fn shared_owner(&self, word: u64) -> usize {
        (word % self.vcpus as u64) as usize
    }

    /// Every buffer the layout needs: (name, size).
    pub fn buffers(&self) -> Vec<(&'static str, u64)> {
        let mut v: Vec<_> = self.static_regions().iter().map(|r| (r.name, r.size)).collect();
        v.extend(self.bar.buffers.iter().map(|b| (*b, self.bar.size)));
        v.push((self.dimm.name, self.dimm.size));
        v
    }

    /// Creates the buffers on `host` and fills them with their patterns.
    pub fn build(&self, host: &Arc<SimHost>) -> Result<MachineMemory, HostError> {
        let mut buffers = Vec::new();
        for (name, size) in self.buffers() {
            let b = host.add_buffer(name, size)?;
            let tag = tag_of(&b);
            b.fill_words(|off| pattern_word(tag, off));
            buffers.push(b);
        }
        Ok(MachineMemory { layout: self.clone(), host: host.clone(), buffers })
    }
}

/// The pattern tag of a buffer: its creation index plus one.
pub fn tag_of(b: &HostBuffer) -> u64 {
    b.index() as u64 + 1
}

/// The layout's buffers, created on a host.
#[derive(Debug, Clone)]
pub struct MachineMemory {
    layout: MachineLayout,
    host: Arc<SimHost>,
    buffers: Vec<Arc<HostBuffer>>,
}

impl MachineMemory {
    /// The layout.
    pub fn layout(&self) -> &MachineLayout {
        &self.layout
    }
    /// The host.
    pub fn host(&self) -> &Arc<SimHost> {
        &self.host
    }
    /// The buffer named `name`.
    pub fn buffer(&self, name: &str) -> Option<&Arc<HostBuffer>> {
        self.buffers.iter().find(|b| b.name() == name)
    }
    /// Every buffer of the layout.
    pub fn buffers(&self) -> &[Arc<HostBuffer>] {
        &self.buffers
    }
    /// The request that maps `region` with buffer `buffer` at `gpa`.
    pub fn request(
        &self,
        slot: u16,
        gpa: Gpa,
        buffer: &str,
        size: u64,
        readonly: bool,
    ) -> Option<SlotRequest> {
        let b = self.buffer(buffer)?;
        Some(SlotRequest {
            slot: u32::from(slot),
            flags: if readonly { SlotRequest::READONLY } else { 0 },
            guest_phys_addr: gpa.0,
            memory_size: size,
            userspace_addr: b.hva().0,
        })
    }
    /// The requests creating the static slots, in order.
    pub fn static_requests(&self) -> Vec<SlotRequest> {
        self.layout
            .static_regions()
            .iter()
            .filter_map(|r| self.request(r.slot, r.gpa, r.name, r.size, r.readonly))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::HostConfig;
    use crate::ram::Width;

    #[test]
    fn regions_do_not_overlap_and_fit_the_rules() {
        for vcpus in [1, 2, 7, 256] {
            let l = MachineLayout::new(vcpus);
            let mut ranges: Vec<(u64, u64)> =
                l.static_regions().iter().map(|r| (r.gpa.0, r.size)).collect();
            ranges.extend(l.bar.positions.iter().map(|p| (p.0, l.bar.size)));
            ranges.push((l.dimm.gpa.0, l.dimm.size));
            ranges.push((l.device.0, l.device_size));
            ranges.sort();
            for w in ranges.windows(2) {
                assert!(w[0].0 + w[0].1 <= w[1].0, "{vcpus} vCPUs: {w:?} overlap");
            }
            for (gpa, size) in &ranges {
                assert!(*gpa >= 8 << 20 && gpa + size <= 64 << 30);
            }
            // The slide overlaps position 0 (by half) and nothing else.
            let slide = (l.bar.slide.0, l.bar.slide.0 + l.bar.size);
            for (gpa, size) in &ranges {
                let overlaps = *gpa < slide.1 && slide.0 < gpa + size;
                assert_eq!(overlaps, *gpa == l.bar.positions[0].0, "{gpa:#x} vs the slide");
            }
            assert_eq!(l.bar.positions[0].0 - l.bar.slide.0, l.bar.size / 2);
            for v in 0..vcpus {
                let (r, off) = l.private_area(v);
                assert!(off + PRIVATE_PER_VCPU <= r.size, "vCPU {v}'s area fits its region");
            }
        }
    }

    #[test]
    fn patterns_are_distinct_and_filled() {
        assert_ne!(pattern_word(1, 0), pattern_word(2, 0));
        assert_ne!(pattern_word(1, 8), pattern_word(1, 16));
        assert_ne!(pattern_word(1, 8) >> 56, shared_value(0, 1, 0) >> 56);
        let host = Arc::new(SimHost::new(HostConfig::new(40)).expect("host"));
        let mem = MachineLayout::new(2).build(&host).expect("build");
        let bar1 = mem.buffer("bar1").expect("bar1");
        assert_eq!(bar1.read(0x1238, Width::W8), Ok(pattern_word(tag_of(bar1), 0x1238)));
        let reqs = mem.static_requests();
        assert_eq!(reqs.len(), 4);
        assert_eq!(reqs[3].flags, SlotRequest::READONLY);
        assert_eq!(reqs[0].userspace_addr, mem.buffer("shared").expect("shared").hva().0);
    }
}
