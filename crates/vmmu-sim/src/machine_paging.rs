//! Guest paging on the default machine (`vmmu run --format shadow`, or `--guest-paging` with the
//! TDP formats; issue 14 points 1-2): every vCPU runs two guest processes (page-table spaces of
//! its own) and makes its accesses through guest-virtual addresses.
//!
//! - The mix's guest-physical address `P` is reached through the GVA `base(vcpu) + P`: in space
//!   0 mapped with a 4 KiB page on first use (a guest store of the PTE), in space 1 through 1 GiB
//!   pages mapped from the start (the guest's CPUID has them, `GuestCpu::gbpages`), which the
//!   shadow MMU shadows with direct pages and the two-dimensional walk ends at level 3.
//! - A remap GVA `R` maps a page of the vCPU's private RAM in one space and the device page in
//!   the other; now and then the vCPU remaps `R` in the current space from RAM to MMIO or back
//!   (store, then INVLPG) and accesses it at once: the 2011 case (MMIO, then RAM, through one
//!   GVA), and, across CR3 switches, a GVA-keyed MMIO cache entry that must not survive.
//! - Every space maps one private page at the alias `A`, writable at every level, and reaches
//!   the same last-level table from `A + 1 GiB` through a PDPT entry that denies writes. Now and
//!   then the vCPU writes the page through `A`, reads it back through the read-only path, and
//!   writes it there, which must be a guest page fault with error code 0x7: the two paths'
//!   shadow pages of that table must differ in their role's access (KVM b1bd5cba3306).
//! - Now and then it unmaps the GVA `U`, which it maps nowhere else, and reads it: the access
//!   must be a guest page fault with error code 0x4 (not present, user).
//! - Now and then it switches spaces with MOV CR3, accessing `R` just before and just after.
//!   `R`'s device page differs between the spaces (the window's register page in space 0, its
//!   second ID page in space 1), so that a GVA-keyed MMIO cache entry surviving the switch
//!   (KVM's 2026 fix) would emulate the access at the other space's page.
//! - Now and then, as an OS prepares a process before running it, it remaps `R` in the space it
//!   is not running, with user-mode stores through its own linear map (the tables lie in
//!   guest-physical memory like the rest), no INVLPG, then switches to that space and accesses
//!   `R`. Under shadow paging those tables are shadowed under a previous root, so the stores
//!   must exit as writes to write-protected pages; they are emulated and reported, and the
//!   shadow must drop the old entry (KVM keeps write-protected shadow pages in sync, and a CR3
//!   switch to a cached root re-reads nothing).
//! - INVLPG shootdowns: every space of every vCPU maps the shared GVA `S` through one shared
//!   last-level table (its page-directory entry links the same page `T`). vCPU 0 now and then
//!   remaps `S` between a page of shared RAM and the device page (a store into `T`, INVLPG on
//!   itself) and publishes the change ([`Shootdown`]); every vCPU invalidates `S` when it sees a
//!   newer change (the other half of the shootdown), and its accesses to `S` may see any
//!   target from the last change it invalidated for up to the newest: never an older one.
//!
//! The oracle knows every expectation exactly: a vCPU changes only its own tables, invalidates
//! what it changed, and the GPA behind each GVA is the one it mapped, judged against the memslot
//! history as any other access (`oracle`).
//!
//! With `format=shadow` the hardware walks the shadow tables (`walk_gva`), #PF exits go to the
//! shadow MMU, and a guest store to a shadowed table is emulated and reported with
//! `track_write`; with EPT/NPT the simulated hardware walks the guest tables itself, each table
//! load a guest-physical access through the second-level tables (a two-dimensional walk).
//! Tables live in a slot of their own, 8 MiB to 16 MiB, split between the vCPUs. Every vCPU has
//! a GVA-keyed TLB ([`GvaTlb`]) filled by its hardware walks (shadow walks, or combined
//! translations of the two-dimensional walk), emptied by the MMU's flush requests (polled before
//! every access), by a new root, and by its own INVLPG (that page) and MOV CR3 (everything).

use crate::guest_tables::GuestTables;
use crate::host::{HostBuffer, SimHost};
use crate::hw_vcpu::{AccessError, Data, HwVcpu, Outcome};
use crate::layout::MachineLayout;
use crate::mix::{GuestAccess, MixKind};
use crate::oracle::Observed;
use crate::ram::Width;
use crate::seam::{AccessKind, GuestMmu, SlotRequest};
use crate::tlb::TlbStats;
use rustc_hash::{FxHashMap, FxHashSet};
use std::cell::RefCell;
use std::sync::Arc;
use vmmu::fault::{EmulateSource, FaultOutcome, PfErr};
use vmmu::guest::pte::{P, PS, RW, US};
use vmmu::guest::{GpteWriteError, GuestCpu, GuestPteMemory, WalkError};
use vmmu::tdp::HwWalk;
use vmmu::{FaultAccess, Gpa, Gva, Hva};
use vmmu_scenario::{MapFlags, PageSize, Paging};

/// The shared GVA `S` (below every vCPU's own range).
pub const SHARED_GVA: u64 = 0x0000_3000_0000_0000;
/// The shared last-level table `T` (the last page of the table area).
pub const SHARED_TABLE: u64 = TABLES_GPA + TABLES_SIZE - 0x1000;

/// The shootdowns of `S` (module doc): the targets `S` has mapped, in order (index = change
/// number), and the number of the latest change.
#[derive(Debug)]
pub struct Shootdown {
    /// The latest change announced (before its store into `T`).
    published: std::sync::atomic::AtomicU64,
    /// The latest change stored into `T` (what the other vCPUs invalidate for).
    completed: std::sync::atomic::AtomicU64,
    history: std::sync::Mutex<Vec<u64>>,
}

impl Shootdown {
    /// `S` starts mapping guest-physical page `first`.
    pub fn new(first: u64) -> Self {
        Shootdown {
            published: std::sync::atomic::AtomicU64::new(0),
            completed: std::sync::atomic::AtomicU64::new(0),
            history: std::sync::Mutex::new(vec![first]),
        }
    }

    /// The latest change announced: a walk of `T` may have read it (the upper bound of what an
    /// access to `S` may see).
    pub fn now(&self) -> u64 {
        self.published.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The latest change whose store into `T` is done (the other vCPUs' INVLPG follows it).
    pub fn completed(&self) -> u64 {
        self.completed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The targets of changes `from..=to`.
    pub fn targets(&self, from: u64, to: u64) -> Vec<u64> {
        let h = self.history.lock().unwrap_or_else(|e| e.into_inner());
        h.get(from as usize..=(to as usize).min(h.len().saturating_sub(1)))
            .map(<[u64]>::to_vec)
            .unwrap_or_default()
    }

    /// The entry of `S` in `T`, as a value: `gpa` mapped present, writable, user.
    pub fn pte(gpa: u64) -> u64 {
        gpa | P | RW | US
    }

    /// Where `S`'s entry lies in `T`.
    pub fn pte_gpa() -> u64 {
        SHARED_TABLE + 8 * ((SHARED_GVA >> 12) & 511)
    }

    fn publish(&self, gpa: u64) {
        let mut h = self.history.lock().unwrap_or_else(|e| e.into_inner());
        h.push(gpa);
        // Before the store into `T` (the initiator publishes first): a reader that loads `seq`
        // after its access covers every value it could have read.
        self.published.store(h.len() as u64 - 1, std::sync::atomic::Ordering::SeqCst);
    }

    fn complete(&self, change: u64) {
        self.completed.store(change, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The slot of the guest page tables.
pub const TABLES_SLOT: u32 = 12;
/// Guest-physical start of the table area (free in the default layout).
pub const TABLES_GPA: u64 = 8 << 20;
/// Its size.
pub const TABLES_SIZE: u64 = 8 << 20;
/// The most vCPUs a run with guest paging takes: each vCPU's tables get `1/vcpus` of the area,
/// and a vCPU's two spaces need 34 pages over a run (measured: 33 fail, stress paths included);
/// 48 vCPUs leave each 42. With 64 the area filled up and accesses failed as oracle violations.
pub const MAX_VCPUS: usize = 48;
/// GVAs of vCPU `i` start at `GVA_BASE + (i << 40)`.
const GVA_BASE: u64 = 0x0000_4000_0000_0000;
/// The remap GVA's offset in a vCPU's GVA range (above every linear GVA: GPAs are below 64 GiB).
const REMAP_OFFSET: u64 = 1 << 39;
/// The guest-physical addresses the linear GVAs cover (the machine's layout stays below).
const LINEAR_GPAS: u64 = 64 << 30;
/// The offset of the alias GVAs `A` (writable path) and `A + 1 GiB` (read-only path) in a
/// vCPU's GVA range: two GiB above `R`.
const ALIAS_OFFSET: u64 = REMAP_OFFSET + (2 << 30);
/// The space whose linear GVAs are 1 GiB pages, mapped from the start (space 0 maps 4 KiB pages
/// on first use).
const HUGE_SPACE: usize = 1;

/// The slot request of the table area.
pub fn tables_slot(buf: &HostBuffer) -> SlotRequest {
    SlotRequest {
        slot: TABLES_SLOT,
        flags: 0,
        guest_phys_addr: TABLES_GPA,
        memory_size: TABLES_SIZE,
        userspace_addr: buf.hva().raw(),
    }
}

/// A vCPU's TLB of guest-virtual pages: page -> (frame, rights). Under shadow paging it caches
/// what the shadow walk found; with EPT/NPT it caches combined translations (guest walk, then
/// second-level walk), so it must be emptied whenever the second-level TLB is
/// ([`GvaTlb::follow`]). Under shadow paging it is the vCPU's only TLB, and its counters
/// ([`GvaTlb::stats`], kept by [`shadow_access`] and [`GvaTlb::flush`]) are what the run
/// reports for the vCPU's TLB.
///
/// Keyed with FxHash (`rustc_hash`), not the standard SipHash: every access of a paging run looks
/// its page up here, and page numbers need no protection against chosen collisions.
#[derive(Default, Debug)]
pub struct GvaTlb(FxHashMap<u64, (vmmu::Pfn, vmmu::Access)>, u64, TlbStats);

impl GvaTlb {
    /// Empties the TLB if the vCPU's second-level TLB was flushed since the last call
    /// (`flushes` is its flush count): a combined translation must not outlive its GPA part.
    pub fn follow(&mut self, flushes: u64) {
        if flushes != self.1 {
            self.1 = flushes;
            self.0.clear();
        }
    }

    /// The entry for `gva`'s page if it allows `need`.
    pub fn lookup(&self, gva: u64, need: vmmu::Access) -> Option<vmmu::Pfn> {
        self.0.get(&(gva & !0xfff)).filter(|(_, p)| p.contains(need)).map(|(pfn, _)| *pfn)
    }

    /// Caches `gva`'s page.
    pub fn insert(&mut self, gva: u64, pfn: vmmu::Pfn, perms: vmmu::Access) {
        self.0.insert(gva & !0xfff, (pfn, perms));
    }

    /// Drops every entry.
    pub fn flush(&mut self) {
        self.2.flushes += 1;
        self.0.clear();
    }

    /// Hits, misses and inserts of the shadow walks ([`shadow_access`]), and flushes.
    pub fn stats(&self) -> TlbStats {
        self.2
    }

    /// Drops the entry of `gva`'s page.
    pub fn invlpg(&mut self, gva: u64) {
        self.0.remove(&(gva & !0xfff));
    }
}

/// What `R` maps in a space.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Target {
    Ram,
    Device,
}

impl Target {
    /// The other target: a remap of `R` goes from one to the other.
    const fn other(self) -> Target {
        match self {
            Target::Ram => Target::Device,
            Target::Device => Target::Ram,
        }
    }
}

/// What a vCPU does after a paging event (`VcpuPaging::between_batches`).
pub enum PagingEvent {
    /// Nothing happened.
    None,
    /// Access `R` (this access, judged as usual, at this GVA).
    Access(GuestAccess, u64),
    /// Access `R` (judged as usual), then call [`VcpuPaging::switch_then_access`]: a process
    /// that touches `R` just before the switch to the other, which touches it at once.
    AccessThenSwitch(GuestAccess, u64),
    /// Read this GVA, which is unmapped: it must fault.
    Unmapped(u64),
    /// Write through the alias `A` at this GVA (this access, judged as usual), read the word
    /// back through its read-only alias at the second GVA (judged as usual: the value just
    /// written), then write it there: a guest page fault with error code 0x7 (present, write,
    /// user). The read links the read-only path's shadow to the last-level table's shadow page,
    /// which must not be the writable path's.
    Alias(GuestAccess, u64, u64),
}

/// Counters of the paging layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PagingCounters {
    /// PTE stores (maps, remaps, unmaps).
    pub pte_stores: u64,
    /// Remaps of `R`.
    pub remaps: u64,
    /// MOV CR3.
    pub cr3_loads: u64,
    /// Accesses to `U` while unmapped (expected guest page faults).
    pub unmapped_reads: u64,
    /// Remaps of `R` in the space the vCPU was not running, followed by a switch to it.
    pub other_space_edits: u64,
    /// Writes through the read-only alias (each must be a guest page fault, error code 0x7).
    pub read_only_alias_writes: u64,
    /// Of the guest's stores into its tables through its own mappings (those edits), how many
    /// exited as writes to a write-protected table and were emulated (the others found the
    /// table not shadowed, and stored).
    pub emulated_table_stores: u64,
    /// Of those stores, how many exited so and were not emulated: the hypervisor unprotected
    /// the table (`Vcpu::unprotect_gfn`, its shadow pages zapped) and the store, run again,
    /// went through untrapped (one exit in four is handled so).
    pub unprotected_table_stores: u64,
    /// Shootdowns a vCPU followed with a flush of its whole TLB (a CR4.PGE toggle, as Linux's
    /// global flush without INVPCID; under shadow paging `Vcpu::flush_guest_tlb`) instead of
    /// INVLPG.
    pub whole_tlb_flushes: u64,
}

impl PagingCounters {
    /// Adds `o`'s counts to these.
    pub fn add(&mut self, o: &PagingCounters) {
        self.pte_stores += o.pte_stores;
        self.remaps += o.remaps;
        self.cr3_loads += o.cr3_loads;
        self.unmapped_reads += o.unmapped_reads;
        self.other_space_edits += o.other_space_edits;
        self.read_only_alias_writes += o.read_only_alias_writes;
        self.emulated_table_stores += o.emulated_table_stores;
        self.unprotected_table_stores += o.unprotected_table_stores;
        self.whole_tlb_flushes += o.whole_tlb_flushes;
    }
}

/// One vCPU's guest paging.
pub struct VcpuPaging {
    tables: GuestTables,
    buf: Arc<HostBuffer>,
    roots: [u64; 2],
    space: usize,
    /// The linear GVA pages space 0 maps (the huge space maps them all from the start).
    mapped: FxHashSet<u64>,
    target: [Target; 2],
    base: u64,
    ram_page: GuestAccess,
    /// The device page `R` maps in space 0 (the register page) and in space 1 (the second ID
    /// page): two different MMIO pages behind one GVA, so a GVA-keyed MMIO cache entry that
    /// survived a CR3 switch would answer for the wrong one.
    device_pages: [GuestAccess; 2],
    rng: fastrand::Rng,
    shadow: bool,
    cpu: GuestCpu,
    /// The GVA-keyed TLB (shadow paging).
    pub tlb: GvaTlb,
    /// The last shootdown of `S` this vCPU invalidated.
    acked: u64,
    /// Counters.
    pub counters: PagingCounters,
}

impl VcpuPaging {
    /// The paging state of vCPU `index` of `vcpus`, with its tables in its share of `buf`.
    pub fn new(
        buf: Arc<HostBuffer>,
        layout: &MachineLayout,
        index: usize,
        vcpus: usize,
        seed: u64,
        shadow: bool,
    ) -> Result<Self, String> {
        // The last page is the shared table `T`.
        let share = ((TABLES_SIZE - 0x1000) / vcpus.max(1) as u64) & !0xfff;
        let start = TABLES_GPA + share * index as u64;
        let mut tables =
            GuestTables::in_area(Paging::Level4, buf.clone(), TABLES_GPA, start, start + share);
        let mut writes = Vec::new();
        let roots = [
            tables.root(0, &mut writes).map_err(|e| e.to_string())?,
            tables.root(1, &mut writes).map_err(|e| e.to_string())?,
        ];
        tables.apply(&writes).map_err(|e| e.to_string())?;
        let (region, off) = layout.private_area(index);
        let ram_page = GuestAccess {
            kind: MixKind::PrivateRead,
            gpa: Gpa(region.gpa.0 + off),
            width: crate::ram::Width::W8,
            value: 0,
        };
        let device_page = GuestAccess {
            kind: MixKind::DeviceRead,
            gpa: layout.device,
            width: crate::ram::Width::W4,
            value: 0,
        };
        let cpu = GuestCpu { gbpages: true, ..GuestCpu::long4(roots[0], 46) };
        let mut p = VcpuPaging {
            tables,
            buf,
            roots,
            space: 0,
            mapped: FxHashSet::default(),
            target: [Target::Ram, Target::Device],
            base: GVA_BASE + ((index as u64) << 40),
            ram_page,
            device_pages: [
                device_page,
                GuestAccess {
                    gpa: Gpa(layout.device.0 + crate::bus::RegisterDevice::SECOND_ID_OFFSET),
                    ..device_page
                },
            ],
            rng: fastrand::Rng::with_seed(seed ^ 0x9a61_0000 ^ index as u64),
            shadow,
            cpu,
            tlb: GvaTlb::default(),
            acked: 0,
            counters: PagingCounters::default(),
        };
        // The linear GVAs of the huge space: one PDPT of 1 GiB leaves (present, writable, user).
        for gpa in (0..LINEAR_GPAS).step_by(1 << 30) {
            let leaf = gpa | P | RW | US | PS;
            let w = p.tables.set_entry(HUGE_SPACE as u8, p.base + gpa, 3, leaf);
            p.tables.apply(&w.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        }
        // The alias: A maps the private page, writable at every level; A + 1 GiB reaches the
        // same last-level table through a page directory of its own whose PDPT entry is
        // read-only (the other levels grant writes), so a write there must fault. Shadow pages
        // of that table reached through the two paths must differ in their role's access
        // (KVM b1bd5cba3306).
        for space in 0..2u8 {
            let (a, ro) = (p.base + ALIAS_OFFSET, p.base + ALIAS_OFFSET + (1 << 30));
            let w = p.tables.map(
                space,
                a,
                p.ram_page.gpa.0 & !0xfff,
                PageSize::Size4K,
                MapFlags::default(),
            );
            p.tables.apply(&w.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
            let entry = |p: &VcpuPaging, gva, level| match p.tables.entry(space, gva, level) {
                Ok(Some(e)) => Ok(e & vmmu::guest::pte::addr_mask(52)),
                Ok(None) => Err(format!("the alias has no level-{level} entry at {gva:#x}")),
                Err(e) => Err(e.to_string()),
            };
            let pt = entry(&p, a, 2)?;
            let w = p.tables.set_entry(space, ro, 2, pt | P | RW | US);
            p.tables.apply(&w.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
            let pd = entry(&p, ro, 3)?;
            let w = p.tables.set_entry(space, ro, 3, pd | P | US);
            p.tables.apply(&w.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        }
        // R in both spaces, and S through the shared table, from the start.
        for space in 0..2 {
            let w = p.map_writes(space, p.remap_gva(), p.target_gpa(space))?;
            p.tables.apply(&w).map_err(|e| e.to_string())?;
            let link = SHARED_TABLE | P | RW | US;
            let w =
                p.tables.set_entry(space as u8, SHARED_GVA, 2, link).map_err(|e| e.to_string())?;
            p.tables.apply(&w).map_err(|e| e.to_string())?;
        }
        Ok(p)
    }

    /// The guest CPU state for a vCPU starting in space 0.
    pub fn cpu(&self) -> GuestCpu {
        self.cpu
    }

    fn remap_gva(&self) -> u64 {
        self.base + REMAP_OFFSET
    }

    fn unmapped_gva(&self) -> u64 {
        self.base + REMAP_OFFSET + 0x1000
    }

    /// The page `R` maps in `space` now.
    fn target_gpa(&self, space: usize) -> u64 {
        self.target_access(space).gpa.0 & !0xfff
    }

    /// The access to `R` in `space` as the oracle judges it (its target there now).
    fn target_access(&self, space: usize) -> GuestAccess {
        match self.target[space] {
            Target::Ram => self.ram_page,
            Target::Device => self.device_pages[space],
        }
    }

    fn map_writes(&mut self, space: usize, gva: u64, gpa: u64) -> Result<Vec<(u64, u64)>, String> {
        self.tables
            .map(space as u8, gva, gpa, PageSize::Size4K, MapFlags::default())
            .map_err(|e| e.to_string())
    }

    /// The guest's stores of `writes` (and, under shadow paging, their report to the MMU).
    fn store<M: GuestMmu>(&mut self, hw: &mut HwVcpu<'_, M>, writes: &[(u64, u64)]) {
        for &(gpa, v) in writes {
            self.counters.pte_stores += 1;
            let _ = self.write_and_report(hw, gpa, v);
        }
    }

    /// One store of `v` into the guest's tables at `gpa` as the hypervisor's emulator makes it:
    /// written to guest memory, then (under shadow paging) reported to the MMU, which leaves
    /// guest mode for it (KVM `kvm_mmu_track_write`).
    fn write_and_report<M: GuestMmu>(
        &self,
        hw: &mut HwVcpu<'_, M>,
        gpa: u64,
        v: u64,
    ) -> Result<(), String> {
        // In bounds: the tables allocate from the area the buffer backs.
        let _ = self.buf.write(gpa - TABLES_GPA, Width::W8, v);
        match hw.mmu().shadow_vcpu(hw.state()) {
            Some(vcpu) => vcpu.track_write(Gpa(gpa), 8).map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }

    /// A flush of the guest's whole TLB (a CR4.PGE toggle): the GVA TLB emptied and, under
    /// shadow paging, the MMU told (`Vcpu::flush_guest_tlb`, which clears the GVA part of the
    /// MMIO cache).
    fn flush_whole_tlb<M: GuestMmu>(&mut self, hw: &mut HwVcpu<'_, M>) {
        self.tlb.flush();
        self.counters.whole_tlb_flushes += 1;
        if let Some(vcpu) = hw.mmu().shadow_vcpu(hw.state()) {
            vcpu.exit_guest_mode();
            let _ = vcpu.flush_guest_tlb();
        }
    }

    fn invlpg<M: GuestMmu>(&mut self, hw: &mut HwVcpu<'_, M>, gva: u64) {
        self.tlb.invlpg(gva);
        if let Some(vcpu) = hw.mmu().shadow_vcpu(hw.state()) {
            vcpu.exit_guest_mode();
            let _ = vcpu.invlpg(Gva(gva));
        }
    }

    /// The guest's stores of `writes` into its own tables as an OS makes them: user-mode
    /// stores through its linear map of guest-physical memory in the current space. Under
    /// shadow paging each goes through the shadow walk; one into a table the MMU shadows must
    /// exit as a write to a write-protected page, and is then emulated here and reported
    /// (`track_write`), as KVM's emulator does; one into a table nothing shadows stores. With
    /// EPT/NPT the store is the guest's own ([`Self::store`]): the second level does not
    /// protect guest tables.
    fn store_through_linear_map<M: GuestMmu>(
        &mut self,
        hw: &mut HwVcpu<'_, M>,
        writes: &[(u64, u64)],
        attempt: &mut dyn FnMut() -> bool,
    ) -> Result<(), String> {
        if !self.shadow {
            self.store(hw, writes);
            return Ok(());
        }
        let host = hw.host();
        for &(gpa, v) in writes {
            self.counters.pte_stores += 1;
            let gva = self.linear_gva(hw, gpa)?;
            let store = RamOp::Store(v);
            let mut outcome =
                shadow_access_or_wp(hw, host, &mut self.tlb, gva, Width::W8, store, &mut *attempt);
            // One time in four the hypervisor unprotects the table instead of emulating (KVM
            // `kvm_mmu_unprotect_gfn_and_retry`, as its emulator does for an instruction that
            // does not write page tables) and the store runs again: it goes through untrapped
            // and unreported, unless a walk shadowed the table again meanwhile.
            if matches!(outcome, Err(at) if at.raw() == gpa) && self.rng.u32(0..4) == 0 {
                if let Some(vcpu) = hw.mmu().shadow_vcpu(hw.state()) {
                    vcpu.unprotect_gfn(Gpa(gpa).gfn()).map_err(|e| e.to_string())?;
                }
                outcome = shadow_access_or_wp(
                    hw,
                    host,
                    &mut self.tlb,
                    gva,
                    Width::W8,
                    store,
                    &mut *attempt,
                );
                if matches!(outcome, Ok(ShadowAccess::Ram { .. })) {
                    self.counters.unprotected_table_stores += 1;
                }
            }
            match outcome {
                Ok(ShadowAccess::Ram { .. }) => {}
                Err(at) if at.raw() == gpa => {
                    self.counters.emulated_table_stores += 1;
                    self.write_and_report(hw, gpa, v)?;
                }
                Err(at) => {
                    return Err(format!("store to {gpa:#x} exited as write-protected at {at}"))
                }
                Ok(ShadowAccess::Mmio(at)) => {
                    return Err(format!(
                        "store into the guest table at {gpa:#x} exited as MMIO at {at}"
                    ))
                }
                Ok(ShadowAccess::PageFault(e)) => {
                    return Err(format!(
                        "store into the guest table at {gpa:#x}: guest page fault {e:#x}"
                    ))
                }
                Ok(ShadowAccess::Error(e)) => return Err(e),
            }
        }
        Ok(())
    }

    /// MOV CR3 to the other space.
    fn switch_space<M: GuestMmu>(&mut self, hw: &mut HwVcpu<'_, M>) -> Result<(), String> {
        self.space ^= 1;
        self.counters.cr3_loads += 1;
        self.cpu.cr3 = self.roots[self.space];
        // MOV CR3 flushes the (non-global) TLB.
        self.tlb.flush();
        if let Some(vcpu) = hw.mmu().shadow_vcpu(hw.state()) {
            vcpu.exit_guest_mode();
            vcpu.load_cr3(self.roots[self.space]).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// The second half of [`PagingEvent::AccessThenSwitch`]: MOV CR3 to the other space, and
    /// the access to `R` there to judge, with its GVA. `R` maps different pages in the two
    /// spaces (RAM, or a device page of each space's own), so a translation or a GVA-keyed MMIO
    /// cache entry that survived the switch would answer for the wrong one.
    pub fn switch_then_access<M: GuestMmu>(
        &mut self,
        hw: &mut HwVcpu<'_, M>,
    ) -> Result<(GuestAccess, u64), String> {
        self.switch_space(hw)?;
        Ok((self.r_access(), self.r_gva()))
    }

    /// What the vCPU does between batches: at most one paging event, a CR3 switch (an access
    /// to `R` before and after), a remap of `R` (then an access to it), an unmap of `U` (then a read of
    /// it, which must fault), or, as an OS prepares a process before it runs it, a remap of `R`
    /// in the space it is not running, made with stores through its own mappings and no INVLPG,
    /// then a switch to that space and an access to `R` (MOV CR3 flushes the TLB; under shadow
    /// paging the shadow of that space, kept as a previous root, must have dropped the old
    /// entry when the guest stored into the table). `attempt` is the retry policy of those
    /// stores' accesses ([`shadow_access`]). Returns the access to judge with its GVA, or the
    /// GVA of `U`.
    pub fn between_batches<M: GuestMmu>(
        &mut self,
        hw: &mut HwVcpu<'_, M>,
        attempt: &mut dyn FnMut() -> bool,
    ) -> Result<PagingEvent, String> {
        match self.rng.u32(0..16) {
            0..=1 => Ok(PagingEvent::AccessThenSwitch(self.r_access(), self.r_gva())),
            8 => {
                let other = self.space ^ 1;
                self.target[other] = self.target[other].other();
                let w = self.map_writes(other, self.remap_gva(), self.target_gpa(other))?;
                self.store_through_linear_map(hw, &w, attempt)?;
                self.counters.other_space_edits += 1;
                self.switch_space(hw)?;
                Ok(PagingEvent::Access(self.r_access(), self.r_gva()))
            }
            2..=5 => {
                let s = self.space;
                self.target[s] = self.target[s].other();
                let w = self.map_writes(s, self.remap_gva(), self.target_gpa(s))?;
                self.store(hw, &w);
                self.invlpg(hw, self.remap_gva());
                self.counters.remaps += 1;
                Ok(PagingEvent::Access(self.r_access(), self.r_gva()))
            }
            9 => {
                let value = self.rng.u64(..);
                let a = GuestAccess { kind: MixKind::PrivateWrite, value, ..self.ram_page };
                let off = a.gpa.0 & 0xfff;
                let gva = self.base + ALIAS_OFFSET + off;
                self.counters.read_only_alias_writes += 1;
                Ok(PagingEvent::Alias(a, gva, gva + (1 << 30)))
            }
            6..=7 => {
                let s = self.space;
                let w = self.tables.unmap(s as u8, self.unmapped_gva(), PageSize::Size4K);
                let w = w.map_err(|e| e.to_string())?;
                self.store(hw, &w);
                self.invlpg(hw, self.unmapped_gva());
                self.counters.unmapped_reads += 1;
                Ok(PagingEvent::Unmapped(self.unmapped_gva()))
            }
            _ => Ok(PagingEvent::None),
        }
    }

    /// vCPU 0's half of a shootdown: remap `S` (a store into the shared table, INVLPG on
    /// itself) from shared RAM to a device page, to the other device page, back to RAM, then
    /// publish the change. Returns whether it did one now.
    pub fn initiate_shootdown<M: GuestMmu>(
        &mut self,
        hw: &mut HwVcpu<'_, M>,
        sd: &Shootdown,
        shared_ram: u64,
    ) -> bool {
        if self.rng.u32(0..8) != 0 {
            return false;
        }
        let now = sd.targets(sd.now(), sd.now()).first().copied().unwrap_or(shared_ram);
        // RAM, then one device page, then the other, then RAM again: the move from one device
        // page to the other is the one a GVA-keyed MMIO cache entry that outlived the
        // invalidation would answer wrongly (with the first page, once the MMU has an MMIO SPTE
        // for `S` again).
        let device = |i: usize| self.device_pages[i].gpa.0 & !0xfff;
        let next = match now {
            n if n == shared_ram => device(0),
            n if n == device(0) => device(1),
            _ => shared_ram,
        };
        // Published before the store: any value a walker reads from `T` is then in the history
        // up to the latest change it loads after its access.
        sd.publish(next);
        self.store(hw, &[(Shootdown::pte_gpa(), Shootdown::pte(next))]);
        self.invlpg(hw, SHARED_GVA);
        self.acked = sd.now();
        // The store is done: the other vCPUs' INVLPG may follow.
        sd.complete(self.acked);
        true
    }

    /// Every vCPU's half: invalidate `S` if a newer change was published (INVLPG, or a flush of
    /// the whole TLB). Returns the change the vCPU has now invalidated up to.
    pub fn follow_shootdowns<M: GuestMmu>(
        &mut self,
        hw: &mut HwVcpu<'_, M>,
        sd: &Shootdown,
    ) -> u64 {
        let now = sd.completed();
        if now > self.acked {
            // One in four as Linux does when a flush covers many pages: the whole TLB.
            if self.rng.u32(0..4) == 0 {
                self.flush_whole_tlb(hw);
            } else {
                self.invlpg(hw, SHARED_GVA);
            }
            self.acked = now;
        }
        self.acked
    }

    /// Whether to access `S` after this batch.
    pub fn wants_shared_access(&mut self) -> bool {
        self.rng.u32(0..4) == 0
    }

    /// The access to `R` as the oracle judges it (its target in the current space).
    fn r_access(&self) -> GuestAccess {
        self.target_access(self.space)
    }

    /// The GVA of `R`'s access (the target's offset within the page).
    fn r_gva(&self) -> u64 {
        self.remap_gva() + (self.r_access().gpa.0 & 0xfff)
    }

    /// The GVA an access of the mix to `a.gpa` uses (mapping the page first if the current
    /// space lacks it).
    pub fn gva_for<M: GuestMmu>(
        &mut self,
        hw: &mut HwVcpu<'_, M>,
        a: &GuestAccess,
    ) -> Result<u64, String> {
        self.linear_gva(hw, a.gpa.0)
    }

    /// The GVA of guest-physical `gpa` in the current space's linear map (mapping its page
    /// first if the space lacks it).
    fn linear_gva<M: GuestMmu>(&mut self, hw: &mut HwVcpu<'_, M>, gpa: u64) -> Result<u64, String> {
        let page = gpa & !0xfff;
        let gva_page = self.base + page;
        if self.space != HUGE_SPACE && self.mapped.insert(gva_page) {
            let w = self.map_writes(self.space, gva_page, page)?;
            self.store(hw, &w);
        }
        Ok(gva_page + (gpa & 0xfff))
    }

    /// Resolves `gva` for `a` (not under shadow paging: the two-dimensional walk): the GPA.
    pub fn walk_tdp<M: GuestMmu>(
        &self,
        hw: &mut HwVcpu<'_, M>,
        gva: u64,
        kind: AccessKind,
    ) -> Result<(Gpa, vmmu::Access), Observed> {
        let cell = RefCell::new(hw);
        let mem = TwoDimensional { hw: &cell };
        let access = FaultAccess { write: kind.is_write(), exec: false, user: true };
        loop {
            return match vmmu::guest::walk(&self.cpu, &mem, Gva(gva), access) {
                Ok(w) => Ok((w.gpa, w.pte_access)),
                Err(WalkError::PageFault(pf)) => {
                    Err(Observed::GuestPageFault { error: pf.error_code.0 })
                }
                // Another vCPU kept rewriting the gPTEs under the A/D update: the hardware
                // walks again.
                Err(WalkError::Contended(_)) => continue,
                Err(e) => Err(Observed::Error(e.to_string())),
            };
        }
    }

    /// Whether the vCPU runs on the shadow MMU.
    pub fn is_shadow(&self) -> bool {
        self.shadow
    }
}

/// Guest tables read through the second-level tables.
struct TwoDimensional<'c, 'h, 'a, M: GuestMmu> {
    hw: &'c RefCell<&'h mut HwVcpu<'a, M>>,
}

impl<M: GuestMmu> GuestPteMemory for TwoDimensional<'_, '_, '_, M> {
    fn read_gpte(&self, gpa: Gpa) -> Option<u64> {
        match self.hw.borrow_mut().load_store(gpa, Width::W8, None) {
            Data::Ram { value, .. } => Some(value),
            _ => None,
        }
    }

    fn cmpxchg_gpte(&self, gpa: Gpa, old: u64, new: u64) -> Result<bool, GpteWriteError> {
        // The A/D update of the hardware walk: a locked read-modify-write, so the second-level
        // translation is a write (a write-protected leaf, in a dirty-logged slot say, faults
        // and the fault logs the table page, as on hardware), then an atomic compare-exchange
        // on the host word it leads to (the shared table `T` is written by vCPU 0 while the
        // others walk it).
        let mut hw = self.hw.borrow_mut();
        if gpa.raw() % 8 != 0 {
            return Err(GpteWriteError::Unreadable);
        }
        let entry = match hw.access(gpa, AccessKind::Write) {
            Outcome::Ram(e) => e,
            // The walker read the gPTE from RAM just before: a write that exits as MMIO is a
            // write to a read-only slot (the MMU emulates it as `ReadOnlyWrite`), and the walk
            // goes on without the A/D update, as KVM's (`pte_writable` false); a slot gone
            // meanwhile skips it too.
            Outcome::Error(AccessError::ReadOnlyForWrite { .. }) | Outcome::Mmio => {
                return Err(GpteWriteError::NotWritable)
            }
            Outcome::Error(_) => return Err(GpteWriteError::Unreadable),
        };
        let page = hw.host().ram_page(entry.pfn).ok_or(GpteWriteError::Unreadable)?;
        let hva = Hva(page.as_ptr() as u64 + gpa.page_offset());
        // A host word the host cannot update is not a read-only table: KVM's
        // `__try_cmpxchg_user` fails with -EFAULT there and the walk faults.
        vmmu::host::GuestMemory::cmpxchg_u64(hw.host(), hva, old, new)
            .map_err(|_| GpteWriteError::Unreadable)
    }
}

/// What a shadow-paging access ended as.
pub enum ShadowAccess {
    /// RAM at this host address; the value loaded or stored.
    Ram {
        /// The host address accessed.
        hva: Hva,
        /// The value read or written.
        value: u64,
    },
    /// Emulated at this GPA (the bus decides).
    Mmio(Gpa),
    /// A guest page fault with this error code.
    PageFault(u64),
    /// The MMU failed.
    Error(String),
}

/// The rights a user-mode access of `kind` needs of a translation (a store: write too).
pub(crate) const fn user_need(kind: AccessKind) -> vmmu::Access {
    match kind {
        AccessKind::Write => vmmu::Access::WRITE.union(vmmu::Access::USER),
        AccessKind::Read => vmmu::Access::USER,
    }
}

/// One access through the shadow tables, as the hardware and the hypervisor do it: walk by
/// GVA, exit on a fault, handle it, until RAM, MMIO or a guest page fault. A store into a guest
/// table the MMU write-protects is an error here: only the guest's own edits of its tables
/// make one ([`VcpuPaging`], which emulates it).
pub fn shadow_access<M: GuestMmu>(
    hw: &mut HwVcpu<'_, M>,
    host: &SimHost,
    tlb: &mut GvaTlb,
    gva: u64,
    width: Width,
    op: RamOp,
    attempt: impl FnMut() -> bool,
) -> ShadowAccess {
    shadow_access_or_wp(hw, host, tlb, gva, width, op, attempt).unwrap_or_else(|gpa| {
        ShadowAccess::Error(format!("unexpected write-protection exit at {gpa}"))
    })
}

/// [`shadow_access`], with a store into a write-protected guest table as `Err` with its GPA
/// (for the caller to emulate and report, as KVM's emulator does).
fn shadow_access_or_wp<M: GuestMmu>(
    hw: &mut HwVcpu<'_, M>,
    host: &SimHost,
    tlb: &mut GvaTlb,
    gva: u64,
    width: Width,
    op: RamOp,
    mut attempt: impl FnMut() -> bool,
) -> Result<ShadowAccess, Gpa> {
    let mmu = hw.mmu();
    let Some(v) = mmu.shadow_vcpu(hw.state()) else {
        return Ok(ShadowAccess::Error("not a shadow-paging MMU".into()));
    };
    // The CPU raises #GP before any walk for an address its mode cannot form: not canonical
    // (4-level), or above 4 GiB (no paging, PAE). The shadow root's walk would ignore the high
    // bits and reach another page.
    let formable = v.guest_cpu().is_none_or(|c| vmmu::guest::gva_reachable(c.mode, vmmu::Gva(gva)));
    if !formable {
        return Ok(ShadowAccess::Error(format!(
            "#GP: the guest's paging mode cannot form the address {gva:#x}"
        )));
    }
    let need = user_need(AccessKind::from_write(op.is_write()));
    let mut budget = crate::hw_vcpu::RetryBudget::default();
    let mut first = true;
    loop {
        // The machine's one retry policy (`hw_vcpu`): retries while a memslot update is in
        // flight are excused (and yield); the others count towards the livelock limit.
        let counts = attempt();
        if !core::mem::take(&mut first)
            && budget.retried(counts, crate::hw_vcpu::RETRY_LIMIT).is_err()
        {
            return Ok(ShadowAccess::Error(format!("access to {gva:#x} did not complete")));
        }
        // The "IPI": pending requests make the vCPU leave guest mode and service them, and a
        // flush (asked for now or during any earlier entry, e.g. after an MMIO exit) empties
        // its TLB; then it is in guest mode again.
        if hw.poll() {
            tlb.flush();
        }
        let Some(v) = mmu.shadow_vcpu(hw.state()) else {
            return Ok(ShadowAccess::Error("not a shadow-paging MMU".into()));
        };
        if !v.in_guest_mode() {
            continue;
        }
        let page = gva & !0xfff;
        let walk = match tlb.0.get(&page) {
            Some(&(pfn, perms)) if perms.contains(need) => {
                tlb.2.hits += 1;
                HwWalk::Translated { pfn, level: vmmu::Level::L4K, perms }
            }
            _ => {
                tlb.2.misses += 1;
                let walk = v.walk_gva(Gva(gva), need);
                if let HwWalk::Translated { pfn, perms, .. } = walk {
                    tlb.2.inserts += 1;
                    tlb.0.insert(page, (pfn, perms));
                }
                walk
            }
        };
        let err = match finish_shadow_walk(host, walk, gva, width, op) {
            Ok(ShadowWalkStep::Ram { hva, value }) => return Ok(ShadowAccess::Ram { hva, value }),
            Ok(ShadowWalkStep::Fault(err)) => err,
            Err(e) => return Ok(ShadowAccess::Error(e)),
        };
        v.exit_guest_mode();
        match v.handle_page_fault(Gva(gva), err) {
            Err(e) => return Ok(ShadowAccess::Error(e.to_string())),
            Ok(FaultOutcome::Fixed | FaultOutcome::Spurious) => {}
            Ok(FaultOutcome::Retry(_)) => hw.count_retry(),
            Ok(FaultOutcome::GuestPageFault { error_code, .. }) => {
                return Ok(ShadowAccess::PageFault(error_code.0))
            }
            Ok(FaultOutcome::Emulate { gpa, source: EmulateSource::WriteProtected, .. }) => {
                return Err(gpa)
            }
            Ok(FaultOutcome::Emulate { gpa, .. }) => return Ok(ShadowAccess::Mmio(gpa)),
        }
    }
}

/// Where one access's walk of the shadow tables (or its TLB hit) leads before any fault
/// handling.
pub(crate) enum ShadowWalkStep {
    /// Done in RAM at this host address: the value loaded or stored.
    Ram {
        /// The host address accessed.
        hva: Hva,
        /// The value read or written.
        value: u64,
    },
    /// The walk faulted: the error code the page-fault exit reports.
    Fault(PfErr),
}

/// What a user-mode access through the shadow does with RAM once it is translated.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RamOp {
    /// Load.
    Load,
    /// Store this value.
    Store(u64),
    /// Translate as an access of this kind and touch no RAM: how a replay classifies a
    /// recorded access, which must never be performed on RAM it was not meant for (a write needs
    /// write permission and faults with a write fault's error code).
    Classify(AccessKind),
}

impl RamOp {
    /// `Store(v)` for `Some(v)`, else `Load`.
    pub const fn from_store(store: Option<u64>) -> RamOp {
        match store {
            Some(v) => RamOp::Store(v),
            None => RamOp::Load,
        }
    }

    /// Whether the access writes.
    pub const fn is_write(self) -> bool {
        matches!(self, RamOp::Store(_) | RamOp::Classify(AccessKind::Write))
    }
}

/// Completes a user-mode access of `width` at `gva` whose shadow walk is `walk`: a translation
/// is the RAM access itself (the store or load done here, or nothing for [`RamOp::Classify`],
/// which reports value 0); a violation or a misconfiguration becomes the page-fault error code
/// the hypervisor handles (KVM: a reserved-bit fault is an MMIO SPTE). Shared by the machine,
/// the scenario backend and the replay.
pub(crate) fn finish_shadow_walk(
    host: &SimHost,
    walk: HwWalk,
    gva: u64,
    width: Width,
    op: RamOp,
) -> Result<ShadowWalkStep, String> {
    let mut err = PfErr::USER | if op.is_write() { PfErr::WRITE } else { 0 };
    match walk {
        HwWalk::Translated { pfn, .. } => {
            let store = match op {
                RamOp::Classify(_) => {
                    let page = host.ram_page(pfn).ok_or_else(|| format!("{pfn:?} is not RAM"))?;
                    let hva = Hva(page.as_ptr() as u64 + (gva & 0xfff));
                    return Ok(ShadowWalkStep::Ram { hva, value: 0 });
                }
                RamOp::Load => None,
                RamOp::Store(v) => Some(v),
            };
            if gva % width.bytes() != 0 {
                return Err(format!("{gva:#x} is not aligned for a {width:?} access"));
            }
            let (hva, value) =
                host.ram_access(pfn, gva & 0xfff, width, store).map_err(|e| e.to_string())?;
            return Ok(ShadowWalkStep::Ram { hva, value });
        }
        HwWalk::Violation { present, .. } => {
            if present {
                err |= PfErr::PRESENT;
            }
        }
        HwWalk::Misconfig { .. } => err |= PfErr::RSVD | PfErr::PRESENT,
        HwWalk::Broken { dump } => return Err(format!("broken shadow walk {dump:?}")),
    }
    Ok(ShadowWalkStep::Fault(PfErr(err)))
}

#[cfg(test)]
mod tables_in_a_read_only_slot {
    use super::*;
    use crate::host::HostConfig;
    use crate::real::{RealMmu, RealMmuConfig};
    use vmmu::spte::FormatKind;

    /// A guest whose page tables lie in a read-only memslot, with their accessed bits clear: the
    /// hardware's A/D update cannot be written there. KVM's walker skips the update
    /// (`pte_writable` false, `FNAME(update_accessed_dirty_bits)`) and the access completes; the
    /// scenario backend's two-dimensional walk does the same (its `cmpxchg_gpte` maps the
    /// read-only write's MMIO exit to `GpteWriteError::NotWritable`).
    #[test]
    fn a_read_through_tables_in_a_read_only_slot_is_not_a_page_fault() {
        for format in [FormatKind::Ept, FormatKind::Npt] {
            let host = Arc::new(SimHost::new(HostConfig::new(46)).expect("host"));
            let tables = host.add_buffer("tables", 0x4000).expect("tables");
            let data = host.add_buffer("data", 0x1000).expect("data");
            let cfg = RealMmuConfig {
                format,
                phys_bits: 46,
                mmio_caching: true,
                vcpus: 1,
                generation_base: 0,
                slot_zap_all: true,
                bugs: vmmu::bugs::BugSet::NONE,
                tdp_prefetch: false,
                shadow_mmio_path_only: false,
                shadow_pages: None,
            };
            let mmu = RealMmu::new(host.clone(), cfg).expect("mmu");
            // PML4 at T, PDPT at T+0x1000, PD at T+0x2000, PT at T+0x3000; gva 0 -> D.
            const T: u64 = 0x100_0000;
            const D: u64 = 0x200_0000;
            for (off, v) in [
                (0x0, (T + 0x1000) | P | RW | US),
                (0x1000, (T + 0x2000) | P | RW | US),
                (0x2000, (T + 0x3000) | P | RW | US),
                (0x3000, D | P | RW | US),
            ] {
                tables.write(off, Width::W8, v).expect("table");
            }
            data.write(0, Width::W8, 0x1234).expect("data");
            let ro = SlotRequest {
                slot: 1,
                flags: SlotRequest::READONLY,
                guest_phys_addr: T,
                memory_size: 0x4000,
                userspace_addr: tables.hva().raw(),
            };
            let rw = SlotRequest {
                slot: 2,
                flags: 0,
                guest_phys_addr: D,
                memory_size: 0x1000,
                userspace_addr: data.hva().raw(),
            };
            mmu.set_memory_region(&ro).expect("ro slot");
            mmu.set_memory_region(&rw).expect("rw slot");
            let mut hw = HwVcpu::new(&mmu, &host, 0, 8);
            hw.enter_guest();
            let cell = RefCell::new(&mut hw);
            let mem = TwoDimensional { hw: &cell };
            let cpu = GuestCpu::long4(T, 46);
            let access = FaultAccess { write: false, exec: false, user: true };
            let r = vmmu::guest::walk(&cpu, &mem, Gva(0x10), access);
            assert!(
                matches!(r, Ok(ref w) if w.gpa == Gpa(D + 0x10)),
                "{format:?}: the walk must translate (KVM skips the A/D update in read-only \
                 memory), got {r:?}"
            );
        }
    }
}
