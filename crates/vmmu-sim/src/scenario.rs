//! The software machine as a scenario backend (`vmmu scenario --backend sim`): every `slot` step
//! is a `set_memory_region` on the real MMU ([`RealMmu`]), every `read`/`write` runs on the named
//! vCPU's own thread (`scenario_vcpu`: a [`HwVcpu`](crate::hw_vcpu::HwVcpu) with its TLB,
//! hardware walk, VM exits and the machine's one retry policy; or the shadow MMU's GVA entry
//! points), and every buffer is a [`SimHost`] buffer, whose real address is the
//! `userspace_addr` the request carries. Version-2 scenarios keep the guest's page tables in a
//! slot of the backend's own below 8 MiB (`guest_tables`).
//!
//! Deterministic: the driver runs one step at a time and waits for it. Between steps every vCPU
//! is outside guest mode, so a memslot update never waits for an idle vCPU thread.

use crate::guest_tables::{GuestTables, TABLES_GPA};
use crate::host::{HostBuffer, HostConfig, SimHost};
use crate::ram::Width as RamWidth;
use crate::real::{RealMmu, RealMmuConfig};
use crate::scenario_dirty::WrittenPages;
use crate::scenario_vcpu::{vcpu_thread, Access, InvlpgRoutine, Job, Mode};
use crate::seam::{AccessKind, Errno, GuestMmu, SlotRequest};
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use vmmu::guest::{GuestCpu, PagingMode};
use vmmu::spte::FormatKind;
use vmmu_scenario::{
    Backend, BackendError, ClearDirtyLogOp, Cr3Op, DirtyLogMode, DirtyLogOp, DirtyLogResult,
    Format, HostReadOp, HostWriteOp, Machine, MapOp, MemDecl, MemId, MemRef, Paging, ReadExit,
    ReadOp, Scenario, ShadowCounters, SlotOp, SlotResult, Start, UnmapOp, Width, WriteExit,
    WriteOp,
};

/// The guest's own MAXPHYADDR (its CPUID), which decides the reserved bits of its page-table
/// entries. Not the scenario's `phys_bits` (the host's, for the MMU's SPTEs): a real guest sees
/// the CPU's value whatever the MMU does, and every value below 52 gives a scenario the same
/// observations (bit 51 reserved; every mappable GPA, below 64 GiB, representable).
const GUEST_MAXPHYADDR: u8 = 46;

/// The slot (a reserved id) that backs the guest page tables of a paging scenario.
const TABLES_SLOT: u32 = 32760;

/// The second slot of a version-2 guest's own memory (a reserved id): the area is two slots as
/// the KVM backend's is (its own 1 MiB, slot 32760, and its 4 MiB page-table pool, slot 32761),
/// so that the backend's setup makes as many memslot swaps as the KVM backend's. Each swap adds
/// 1 to the memslot generation (one address space) and the swap whose generation has its low 19
/// bits zero zaps every shadow page (KVM `kvm_mmu_invalidate_mmio_sptes`), so with one slot the
/// zap came one scenario step later than on KVM (`paging_mmio_gen_wrap_own_slots` in
/// `tests/scenario_paging.rs`).
const TABLES_POOL_SLOT: u32 = 32761;

/// Size of the first slot of a version-2 guest's own memory: 1 MiB, as the KVM backend's own
/// slot; the second ([`TABLES_POOL_SLOT`]) has the rest, 4 MiB as the KVM backend's pool.
const PAGING_OWN_FIRST_SIZE: u64 = 0x10_0000;

/// Size of the backend's own memory in a version-1 scenario under shadow paging: 1 MiB, as the
/// KVM backend's own slot (its guest's code, descriptor tables, stack and identity tables). Under
/// shadow paging KVM's default shadow-page limit is 2% of every slot's pages (at least 64), so
/// the backend's own pages count towards it as a scenario's do.
const IDENTITY_OWN_SIZE: u64 = 0x10_0000;

/// Size of the backend's own memory in a version-2 scenario (guest paging): 5 MiB, as the KVM
/// backend's own slot (1 MiB) and its page-table pool (4 MiB) together. KVM's default
/// shadow-page limit is 2% of every slot's pages (at least 64), so with scenario slots large
/// enough to lift it above 64 the backend's own pages decide when recycling starts
/// (`paging_recycle_limit_large_slot.scn`).
const PAGING_OWN_SIZE: u64 = 0x50_0000;

// Every file the parser accepts fits: beside the code page and the shared page table of the low
// 2 MiB, each of the spaces takes at most five tables of its own (PAE: its root and four page
// directories), and the maps hold at most `MAP_TABLES`.
const _: () = assert!(
    PAGING_OWN_SIZE / 0x1000 - 2 - 5 * vmmu_scenario::SPACES as u64
        >= vmmu_scenario::MAP_TABLES as u64
);

/// The code page of a version-2 guest: the first page of its own memory, mapped at the same
/// guest-virtual address in every space through a page table of the low 2 MiB that all spaces
/// share, as the KVM backend's guest maps its `CODE` page (`GuestTables::with_code_page`).
/// Under shadow paging every access is preceded by a fetch from it, as on the KVM backend.
const PAGING_CODE_GPA: u64 = TABLES_GPA;

/// The page a version-1 guest under shadow paging "fetches its code" from before each access:
/// the last page of its own memory, in the first 2 MiB of guest-physical memory as the KVM
/// backend's code page (`CODE`, 0x5000) is. Under shadow paging the code page needs a shadow
/// mapping as any other page (a direct shadow page for the 2 MiB region, under the shadow page
/// of the first GiB's page directory), which counts towards the shadow-page limit, is recycled
/// with the others, and is mapped again by the next instruction fetch.
const IDENTITY_CODE_GPA: u64 = TABLES_GPA + IDENTITY_OWN_SIZE - 0x1000;

/// Frames the scenario host may hand out (RAM and tables): 2^24 frames = 64 GiB of frame numbers,
/// as much as a scenario's guest-physical space. Buffer pages take frames on first translation
/// ([`HostConfig::lazy_frames`]), so the buffers' sizes are not bounded by this; and only what a
/// scenario touches costs memory: the frame table and the buffers are zeroed pages the OS hands
/// out on first use.
const MAX_FRAMES: u64 = 1 << 24;

/// The software machine backend. The MMU configuration comes from the scenario's `vm` line
/// (after command-line overrides).
#[derive(Clone, Copy, Debug, Default)]
pub struct SimBackend;

/// The software machine with historical KVM bugs re-injected into its MMU (effective with the
/// core's `historical-bugs` feature), to show which scenario observations or backend checks
/// catch them.
#[derive(Clone, Copy, Debug, Default)]
pub struct SimBackendInjected {
    /// The bugs.
    pub bugs: vmmu::bugs::BugSet,
}

impl Backend for SimBackendInjected {
    fn name(&self) -> &str {
        "sim"
    }

    fn start(&self, scenario: &Scenario) -> Result<Start, BackendError> {
        Ok(Start::Run(Box::new(SimMachine::new(scenario, self.bugs)?)))
    }
}

impl Backend for SimBackend {
    fn name(&self) -> &str {
        "sim"
    }

    fn start(&self, scenario: &Scenario) -> Result<Start, BackendError> {
        SimBackendInjected::default().start(scenario)
    }
}

struct VcpuThread {
    jobs: Option<Sender<Job>>,
    handle: Option<JoinHandle<()>>,
}

/// A slot the MMU accepted in address space 0: where guest writes go in host memory.
#[derive(Clone, Copy, Debug)]
struct AcceptedSlot {
    gpa: u64,
    size: u64,
    uaddr: u64,
    readonly: bool,
    /// Dirty logging on.
    dirty_log: bool,
    /// The buffer its `mem=` names: a guest access through the slot must stay inside it.
    mem: Option<MemId>,
}

/// One running scenario.
pub struct SimMachine {
    host: Arc<SimHost>,
    mmu: Arc<RealMmu>,
    buffers: Vec<Option<Arc<HostBuffer>>>,
    vcpus: Vec<VcpuThread>,
    /// The guest's page-table spaces (paging scenarios).
    tables: Option<GuestTables>,
    /// Accepted slots of address space 0 by id (guest accesses use address space 0 only).
    slots: std::collections::BTreeMap<u16, AcceptedSlot>,
    /// The guest's paging mode (accesses name GVAs unless it is off).
    paging: Paging,
    /// The page-table space each vCPU has loaded (guest paging).
    spaces: Vec<u8>,
    /// Where each vCPU fetches its access code from before a guest access, when that costs the
    /// MMU something a scenario can observe (a version-1 guest under shadow paging).
    code_gpa: Option<u64>,
    /// Whether a `dirty-log` clears what it returns (automatic mode) or not (manual).
    dirty_log_mode: DirtyLogMode,
    /// The pages every `dirty-log` must report.
    written: WrittenPages,
}

fn ram_width(w: Width) -> RamWidth {
    match w.bytes() {
        1 => RamWidth::W1,
        2 => RamWidth::W2,
        4 => RamWidth::W4,
        _ => RamWidth::W8,
    }
}

fn failed(e: impl std::fmt::Display) -> BackendError {
    BackendError::Failed(e.to_string())
}

impl SimMachine {
    /// `KVM_GET_DIRTY_LOG` into a bitmap this backend allocates as a VMM allocates its own: the
    /// slot's bitmap words, or KVM's error. A slot of up to 2^31 pages has a 256 MiB bitmap, so
    /// the allocation may fail; that is a backend failure naming the size, not an abort of the
    /// whole process ("memory allocation failed"). KVM's own bitmaps were allocated when the
    /// slot was made (where the MMU answers `ENOMEM`); this one is the VMM's.
    fn dirty_bitmap(
        &self,
        op: &DirtyLogOp,
    ) -> Result<Result<Vec<u64>, vmmu::dirty::DirtyLogError>, BackendError> {
        use vmmu::dirty::DirtyLogError;
        let vm = self.mmu.vm();
        let (as_id, id) = (vmmu::AsId(op.as_id), vmmu::SlotId(op.id));
        // An empty buffer: KVM's checks, then the length the slot's bitmap needs, before any
        // bit is taken (a buffer that is refused loses nothing).
        let needed = match vm.get_dirty_log_into(as_id, id, &mut []) {
            Ok(_) => return Ok(Ok(Vec::new())),
            Err(DirtyLogError::BitmapTooShort { needed, .. }) => needed,
            Err(e) => return Ok(Err(e)),
        };
        let mut words = Vec::new();
        words.try_reserve_exact(needed).map_err(|_| {
            failed(format!(
                "cannot allocate the {} MiB dirty bitmap of slot {} (address space {}): this \
                 process is out of memory",
                (needed as u64 * 8) >> 20,
                op.id,
                op.as_id
            ))
        })?;
        words.resize(needed, 0);
        let n = vm.get_dirty_log_into(as_id, id, &mut words);
        Ok(n.map(|n| {
            words.truncate(n);
            words
        }))
    }

    fn new(sc: &Scenario, bugs: vmmu::bugs::BugSet) -> Result<SimMachine, BackendError> {
        let vm = &sc.vm;
        let host = Arc::new(
            SimHost::new(HostConfig {
                max_frames: MAX_FRAMES,
                // Reads of pages nobody wrote are not writable, as on Linux (a read of a written
                // page in a dirty-logged slot dirties it in KVM).
                track_writes: true,
                // Frames on first touch, as Linux backs the KVM backend's buffers: a scenario's
                // buffers may together be larger than the frame space.
                lazy_frames: true,
                ..HostConfig::new(vm.phys_bits)
            })
            .map_err(failed)?,
        );
        // 4 KiB host pages only, as behind the KVM backend's buffers (plain anonymous mappings,
        // never madvised for transparent huge pages): KVM then maps every gfn with its own 4 KiB
        // leaf, with TDP as with shadow paging, and a page the guest never touched stays
        // unmapped, so its first read after logging starts faults (and dirties it if the host
        // page was written). A 2 MiB host page would let one leaf cover untouched pages.
        host.set_huge_pages(false);
        let format = match vm.format {
            Format::Ept => FormatKind::Ept,
            Format::Npt | Format::Shadow => FormatKind::Npt,
        };
        let mut cfg = RealMmuConfig {
            format,
            phys_bits: vm.phys_bits,
            mmio_caching: vm.mmio_caching,
            vcpus: vm.vcpus as usize,
            generation_base: 0,
            // KVM's default (KVM_X86_QUIRK_SLOT_ZAP_ALL): a delete or move zaps every mapping.
            // No version-1 observation depends on it, but a dirty log does: a page whose
            // mapping went faults on its next read, and a read fault of a written page maps it
            // writable, which dirties it (measured on /dev/kvm).
            slot_zap_all: true,
            bugs,
            // Version 1: the reference KVM (shadow paging) runs the backend's guest on 2 MiB
            // identity pages, accessed and dirty, and so prefetches around every RAM fault as
            // its direct MMU does; the TDP formats do the same to agree with it. (With guest
            // paging its prefetch follows the guest's PTEs, which only the shadow MMU sees.)
            tdp_prefetch: vm.paging == Paging::Off,
            // The reference KVM runs with MMIO caching off and builds no shadow page for an
            // MMIO fault; with caching on it would, and recycle earlier (a dirty log shows it).
            // Every configuration here observes what the reference does.
            shadow_mmio_path_only: true,
            shadow_pages: None,
        };
        cfg.vcpus = cfg.vcpus.max(1);
        let nr_as = u16::from(vm.address_spaces);
        let shadow = vm.format == Format::Shadow;
        let mmu = Arc::new(if shadow {
            RealMmu::shadow(host.clone(), cfg, nr_as).map_err(failed)?
        } else {
            RealMmu::with_address_spaces(host.clone(), cfg, nr_as).map_err(failed)?
        });
        let cpu = GuestCpu {
            mode: match vm.paging {
                Paging::Off => PagingMode::NonPaging,
                Paging::Level4 => PagingMode::Long4,
                Paging::Pae => PagingMode::Pae { pdptrs: [0; 4] },
            },
            cr3: 0,
            cr0_wp: true,
            // The KVM backend's guest runs with EFER = LMA | LME (no NXE), so bit 63 of a guest
            // entry is reserved there; the same CPU here, so that both backends judge any entry
            // alike (format v2's `map` never sets bit 63).
            efer_nx: false,
            maxphyaddr: GUEST_MAXPHYADDR,
            // Scenario tables map 4 KiB and 2 MiB pages only (format v2).
            gbpages: false,
        };
        if vm.dirty_log == DirtyLogMode::Manual {
            mmu.vm().set_dirty_log_mode(vmmu::dirty::DirtyLogMode::Manual);
        }
        let mut vcpus = Vec::new();
        for i in 0..vm.vcpus as usize {
            let state = mmu.create_vcpu(i);
            let mode = match (shadow, vm.paging) {
                (true, Paging::Off) => Mode::Shadow(GuestCpu { mode: PagingMode::Long4, ..cpu }),
                (true, _) => Mode::Shadow(cpu),
                (false, Paging::Off) => Mode::Plain,
                (false, _) => Mode::TdpPaging(cpu),
            };
            let (tx, rx) = channel();
            let (mmu2, host2) = (mmu.clone(), host.clone());
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || vcpu_thread(&mmu2, &host2, state, mode, rx))
                .map_err(failed)?;
            vcpus.push(VcpuThread { jobs: Some(tx), handle: Some(handle) });
        }
        let mut m = SimMachine {
            host,
            mmu,
            buffers: vec![None; sc.mems.len()],
            vcpus,
            tables: None,
            slots: std::collections::BTreeMap::new(),
            paging: vm.paging,
            spaces: vec![0; vm.vcpus as usize],
            code_gpa: None,
            dirty_log_mode: vm.dirty_log,
            written: WrittenPages::default(),
        };
        if vm.paging != Paging::Off {
            m.setup_tables(vm.paging, shadow)?;
        } else if shadow {
            m.setup_identity()?;
        } else {
            // A version-1 guest on a TDP MMU needs no tables of its own, but the KVM backend
            // creates its own slot whatever the MMU: the memslot generation starts one swap on,
            // as there, so that the MMIO-generation wrap zaps at the same step
            // (`version_one_tdp_mmio_gen_wrap_own_slot` in `tests/scenario_paging.rs`).
            m.reserve_tables(IDENTITY_OWN_SIZE)?;
        }
        Ok(m)
    }

    /// Reserves the page-table area (a slot of the backends' own below 8 MiB), builds space 0
    /// and loads it on every vCPU.
    fn setup_tables(&mut self, paging: Paging, shadow: bool) -> Result<(), BackendError> {
        let buf = self.reserve_tables(PAGING_OWN_SIZE)?;
        let start = PAGING_CODE_GPA + 0x1000;
        let mut tables =
            GuestTables::in_area(paging, buf, TABLES_GPA, start, TABLES_GPA + PAGING_OWN_SIZE)
                .with_code_page(PAGING_CODE_GPA);
        let mut writes = Vec::new();
        let root = tables.root(0, &mut writes).map_err(failed)?;
        // The loader's tables, written before any vCPU runs (no vCPU has a root yet).
        tables.apply(&writes).map_err(failed)?;
        self.tables = Some(tables);
        // Under shadow paging the code fetch costs shadow pages and rebuilds zapped paths, as
        // on the reference KVM; a TDP MMU maps the code page once, which nothing observes.
        if shadow {
            self.code_gpa = Some(PAGING_CODE_GPA);
        }
        for v in 0..self.vcpus.len() as u32 {
            self.job(v, |reply| Job::Cr3 { cr3: root, guest: false, reply })?;
        }
        Ok(())
    }

    /// A version-1 scenario under shadow paging: the guest runs in long mode with identity
    /// page tables (2 MiB pages over the 64 GiB scenarios may touch), as the KVM backend's guest
    /// does, and the MMU shadows them. Its own memory is as large as the KVM backend's (1 MiB),
    /// and each access is preceded by a fetch from its code page ([`IDENTITY_CODE_GPA`]), so
    /// that the shadow pages it uses, and the default limit on them, are the KVM backend's: which
    /// pages KVM recycles (and so which reads fault again and dirty a logged page) is the same.
    fn setup_identity(&mut self) -> Result<(), BackendError> {
        let buf = self.reserve_tables(IDENTITY_OWN_SIZE)?;
        let end = IDENTITY_CODE_GPA;
        let mut tables = GuestTables::in_area(Paging::Level4, buf, TABLES_GPA, TABLES_GPA, end);
        let root = tables.identity_2m(vmmu_scenario::ACCESS_LIMIT).map_err(failed)?;
        self.tables = Some(tables);
        self.code_gpa = Some(IDENTITY_CODE_GPA);
        for v in 0..self.vcpus.len() as u32 {
            self.job(v, |reply| Job::Cr3 { cr3: root, guest: false, reply })?;
        }
        Ok(())
    }

    /// The buffer and slots of the page-table area: `size` bytes from [`TABLES_GPA`]. The
    /// version-2 area ([`PAGING_OWN_SIZE`]) is two slots, its first MiB and the rest, as the KVM
    /// backend's own slot and pool are ([`TABLES_POOL_SLOT`]); the version-1 area is one, as the
    /// KVM backend's own slot.
    fn reserve_tables(&mut self, size: u64) -> Result<Arc<HostBuffer>, BackendError> {
        let buf = self.host.add_buffer("__guest_tables", size).map_err(failed)?;
        let pieces: &[(u32, u64, u64)] = if size == PAGING_OWN_SIZE {
            &[
                (TABLES_SLOT, 0, PAGING_OWN_FIRST_SIZE),
                (TABLES_POOL_SLOT, PAGING_OWN_FIRST_SIZE, size - PAGING_OWN_FIRST_SIZE),
            ]
        } else {
            &[(TABLES_SLOT, 0, size)]
        };
        for &(slot, offset, memory_size) in pieces {
            let req = SlotRequest {
                slot,
                flags: 0,
                guest_phys_addr: TABLES_GPA + offset,
                memory_size,
                userspace_addr: buf.hva().raw() + offset,
            };
            self.mmu.set_memory_region(&req).map_err(failed)?;
        }
        Ok(buf)
    }

    /// Sends a job that answers with `Result<T, String>` to vCPU `vcpu` and waits for it.
    fn job<T>(
        &self,
        vcpu: u32,
        make: impl FnOnce(Sender<Result<T, String>>) -> Job,
    ) -> Result<T, BackendError> {
        let t = self
            .vcpus
            .get(vcpu as usize)
            .ok_or_else(|| failed(format!("vCPU {vcpu} does not exist")))?;
        let (reply, rx) = channel();
        t.jobs
            .as_ref()
            .ok_or_else(|| failed("vCPU thread is gone"))?
            .send(make(reply))
            .map_err(|_| failed(format!("vCPU {vcpu}'s thread stopped")))?;
        rx.recv().map_err(|_| failed(format!("vCPU {vcpu}'s thread stopped")))?.map_err(failed)
    }

    /// The guest (vCPU 0) stores page-table entries.
    fn guest_writes(&self, writes: Vec<(u64, u64)>) -> Result<(), BackendError> {
        self.job(0, |reply| Job::TableWrites { writes, reply })
    }

    /// Every vCPU invalidates `pages` pages from `gva` up (the guest's TLB shootdown).
    fn shootdown(&self, gva: u64, pages: u32) -> Result<(), BackendError> {
        for v in 0..self.vcpus.len() as u32 {
            // vCPU 0 invalidates in the routine that made the table writes (no entry between).
            let routine = if v == 0 { InvlpgRoutine::AfterTableWrites } else { InvlpgRoutine::Own };
            self.job(v, |reply| Job::Invlpg { gva, pages, routine, reply })?;
        }
        Ok(())
    }

    fn tables(&mut self) -> Result<&mut GuestTables, BackendError> {
        self.tables.as_mut().ok_or_else(|| failed("a paging step without guest paging"))
    }

    fn buffer(&self, id: MemId) -> Result<&Arc<HostBuffer>, BackendError> {
        self.buffers
            .get(id.0)
            .and_then(Option::as_ref)
            .ok_or_else(|| failed(format!("buffer #{} is used before its `mem` step", id.0)))
    }

    fn on_vcpu(
        &self,
        vcpu: u32,
        addr: u64,
        width: Width,
        write: Option<u64>,
    ) -> Result<Access, BackendError> {
        self.job(vcpu, |reply| Job::Access { addr, width: ram_width(width), write, reply })
    }

    /// The accepted slot (of address space 0) that maps `gpa`, with its id.
    fn slot_at(&self, gpa: u64) -> Option<(u16, &AcceptedSlot)> {
        self.slots.iter().find(|(_, s)| gpa.wrapping_sub(s.gpa) < s.size).map(|(&id, s)| (id, s))
    }

    /// The guest-physical address an access by `vcpu` to `addr` reaches (`None`: it faults).
    fn target(&self, vcpu: u32, addr: u64, kind: AccessKind) -> Option<u64> {
        match (self.paging, self.tables.as_ref()) {
            (Paging::Off, _) => Some(addr),
            (_, Some(t)) => {
                let space = self.spaces.get(vcpu as usize).copied().unwrap_or(0);
                t.user_target(space, addr, kind)
            }
            (_, None) => None,
        }
    }

    /// Refuses a guest access whose slot leads to host memory outside the buffer its `mem=`
    /// names (`scenarios.md`: a slot may reach past the end of its buffer, but an access through
    /// that part is a backend failure), as the KVM backend does before it runs the access: past
    /// its buffer the host address may lie in another buffer (this machine's buffers sit side by
    /// side, the KVM backend's behind guard gaps, so what such an access reached would differ
    /// between them) or in the machine's own memory (its guest page tables). A store through a
    /// read-only slot reaches no host memory (it exits as MMIO), so it passes.
    fn check_backed(&self, gpa: u64, width: Width, kind: AccessKind) -> Result<(), BackendError> {
        let hit = self.slot_at(gpa);
        let Some((id, s)) = hit.filter(|(_, s)| !(kind.is_write() && s.readonly)) else {
            return Ok(());
        };
        let hva = s.uaddr.wrapping_add(gpa - s.gpa);
        let last = hva.wrapping_add(u64::from(width.bytes()) - 1);
        let own = s.mem.and_then(|m| self.buffers.get(m.0)).and_then(Option::as_ref);
        let backed = own.is_some_and(|b| b.contains(vmmu::Hva(hva)) && b.contains(vmmu::Hva(last)));
        if backed {
            Ok(())
        } else {
            Err(failed(format!(
                "guest access at {gpa:#x} goes through slot {id} to host address {hva:#x}, \
                 outside its buffer; scenarios must not access that part of a slot"
            )))
        }
    }

    /// One guest access by `vcpu` at `addr` (a store of `value`, or a load), as the KVM backend's
    /// guest makes it: refused where its slot leads outside every scenario buffer, preceded and
    /// followed by the code fetches that cost the MMU something, and, for a store to RAM of a
    /// writable slot, with the zero page broken first as KVM's write fault does. With guest
    /// paging `addr` is a GVA: the GPA is where the vCPU's tables send a user access (none if
    /// they refuse it: the access faults and touches nothing). A store that reaches RAM through
    /// a logged slot owes its page to the slot's next collection ([`WrittenPages`]).
    fn guest_access(
        &mut self,
        vcpu: u32,
        addr: u64,
        width: Width,
        value: Option<u64>,
    ) -> Result<Access, BackendError> {
        let kind = AccessKind::from_write(value.is_some());
        let gpa = self.target(vcpu, addr, kind);
        if let Some(g) = gpa {
            self.check_backed(g, width, kind)?;
        }
        self.fetch_code(vcpu)?;
        // The writable slot a store goes through, with the gpa it reaches there.
        let store = gpa
            .filter(|_| kind.is_write())
            .and_then(|g| self.slot_at(g).filter(|(_, s)| !s.readonly).map(|(id, s)| (g, id, *s)));
        if let Some((g, _, s)) = store {
            self.first_write(s.uaddr.wrapping_add(g - s.gpa), u64::from(width.bytes()));
        }
        let access = self.on_vcpu(vcpu, addr, width, value)?;
        self.fetch_code_after(vcpu, &access)?;
        if let (Access::Ram(_), Some((g, id, s))) = (&access, store) {
            if s.dirty_log {
                self.written.wrote(id, (g - s.gpa) >> vmmu::types::PAGE_SHIFT);
            }
        }
        Ok(access)
    }

    /// The instruction fetch a guest access starts with, where it costs the MMU anything
    /// ([`SimMachine::code_gpa`]): a read of the vCPU's code page, which is RAM.
    fn fetch_code(&self, vcpu: u32) -> Result<(), BackendError> {
        let Some(addr) = self.code_gpa else {
            return Ok(());
        };
        let width = RamWidth::W8;
        match self.job(vcpu, |reply| Job::Access { addr, width, write: None, reply })? {
            Access::Ram(_) => Ok(()),
            _ => Err(failed(format!("vCPU {vcpu}'s code fetch at {addr:#x} did not reach RAM"))),
        }
    }

    /// The fetch of the instruction after the access (the access code's sync store, in the same
    /// page), unless the access faulted (the guest's #PF handler runs instead, at CPL0, which
    /// the reference KVM emulates). It costs nothing unless the access's own fault recycled
    /// the code page's shadow path (KVM flushes every TLB after zapping), which the fetch then
    /// rebuilds within the same step, before the next step's pages (as KVM's per-step
    /// `mmu_cache_miss` counts show).
    fn fetch_code_after(&self, vcpu: u32, access: &Access) -> Result<(), BackendError> {
        match access {
            Access::PageFault { .. } => Ok(()),
            Access::Ram(_) | Access::Mmio(_) => self.fetch_code(vcpu),
        }
    }

    /// The first write to a host page (by the host, or by the guest through a writable slot)
    /// replaces Linux's shared zero page by a new page, and the MMU notifier invalidates what
    /// mapped the old one (a guest read maps it read-only, through any alias), before the write
    /// lands: so the next guest access of any alias faults and maps the new page, writable
    /// (which dirties it in a logged slot, as on /dev/kvm). Later writes change no mapping.
    fn first_write(&self, hva: u64, len: u64) {
        if self.host.host_wrote(vmmu::Hva(hva), len) {
            let page = hva & !(vmmu::types::PAGE_SIZE - 1);
            let (start, end) = (vmmu::Hva(page), vmmu::Hva(page + vmmu::types::PAGE_SIZE));
            // The host's change (the page replaced) is done: nothing to do between start and end.
            self.mmu.invalidate_hva_range(start, end, &mut || {});
        }
    }

    /// The buffer `at` names, once the access of `width` there is checked to lie inside it and
    /// be naturally aligned (with a message that names the scenario's reference).
    fn host_at(&self, at: &MemRef, width: Width) -> Result<&Arc<HostBuffer>, BackendError> {
        let b = self.buffer(at.mem)?;
        if at.offset.checked_add(width.bytes() as u64).is_none_or(|end| end > b.len()) {
            return Err(failed(format!("{}+{:#x} is outside the buffer", at.name, at.offset)));
        }
        // Host accesses are naturally aligned (the parser's rule; an op built in code must keep
        // it too).
        if at.offset % width.bytes() as u64 != 0 {
            return Err(failed(format!(
                "{}+{:#x} is not aligned to the access width ({} bytes)",
                at.name,
                at.offset,
                width.bytes()
            )));
        }
        Ok(b)
    }
}

impl Machine for SimMachine {
    fn shadow_counters(&self) -> Option<ShadowCounters> {
        let s = self.mmu.vm().shadow_mmu()?.stats.snapshot();
        Some(ShadowCounters {
            mmu_cache_miss: s.mmu_cache_miss,
            mmu_shadow_zapped: s.mmu_shadow_zapped,
            mmu_recycled: s.mmu_recycled,
            mmu_flooded: s.mmu_flooded,
        })
    }

    fn mem(&mut self, id: MemId, decl: &MemDecl) -> Result<(), BackendError> {
        let b = self.host.add_buffer(&decl.name, decl.size).map_err(failed)?;
        if let Some(slot) = self.buffers.get_mut(id.0) {
            *slot = Some(b);
        }
        Ok(())
    }

    fn slot(&mut self, op: &SlotOp) -> Result<SlotResult, BackendError> {
        let userspace_addr = match &op.mem {
            Some(m) => self.buffer(m.mem)?.hva().raw().wrapping_add(m.offset),
            None => 0,
        };
        let mut flags = 0;
        if op.flags.dirty_log {
            flags |= SlotRequest::LOG_DIRTY_PAGES;
        }
        if op.flags.readonly {
            flags |= SlotRequest::READONLY;
        }
        let req = SlotRequest {
            slot: op.kvm_slot(),
            flags,
            guest_phys_addr: op.gpa,
            memory_size: op.size,
            userspace_addr,
        };
        Ok(match self.mmu.set_memory_region(&req) {
            Ok(()) => {
                if op.as_id == 0 {
                    self.written.slot_changed(op.id);
                    if op.size == 0 {
                        self.slots.remove(&op.id);
                    } else {
                        let s = AcceptedSlot {
                            gpa: op.gpa,
                            size: op.size,
                            uaddr: userspace_addr,
                            readonly: op.flags.readonly,
                            dirty_log: op.flags.dirty_log,
                            mem: op.mem.as_ref().map(|m| m.mem),
                        };
                        self.slots.insert(op.id, s);
                    }
                }
                SlotResult::Ok
            }
            Err(e) => SlotResult::Err(Errno::of(&e).to_string()),
        })
    }

    fn read(&mut self, op: &ReadOp, mmio_reply: u64) -> Result<ReadExit, BackendError> {
        Ok(match self.guest_access(op.vcpu, op.gpa, op.width, None)? {
            Access::Ram(value) => ReadExit::None { value },
            Access::Mmio(gpa) => {
                ReadExit::Mmio { gpa, len: op.width.bytes(), value: mmio_reply & op.width.mask() }
            }
            Access::PageFault { gva, error } => ReadExit::PageFault { gva, error },
        })
    }

    fn write(&mut self, op: &WriteOp) -> Result<WriteExit, BackendError> {
        Ok(match self.guest_access(op.vcpu, op.gpa, op.width, Some(op.value))? {
            Access::Ram(_) => WriteExit::None,
            Access::Mmio(gpa) => WriteExit::Mmio { gpa, len: op.width.bytes(), data: op.value },
            Access::PageFault { gva, error } => WriteExit::PageFault { gva, error },
        })
    }

    fn host_write(&mut self, op: &HostWriteOp) -> Result<(), BackendError> {
        let b = self.host_at(&op.at, op.width)?;
        b.write(op.at.offset, ram_width(op.width), op.value).map_err(failed)?;
        let hva = b.hva().raw() + op.at.offset;
        self.first_write(hva, u64::from(op.width.bytes()));
        Ok(())
    }

    fn host_read(&mut self, op: &HostReadOp) -> Result<u64, BackendError> {
        let b = self.host_at(&op.at, op.width)?;
        b.read(op.at.offset, ram_width(op.width)).map_err(failed)
    }

    fn map(&mut self, op: &MapOp) -> Result<(), BackendError> {
        let writes =
            self.tables()?.map(op.space, op.gva, op.gpa, op.size, op.flags).map_err(failed)?;
        self.guest_writes(writes)?;
        self.shootdown(op.gva, 1)
    }

    fn unmap(&mut self, op: &UnmapOp) -> Result<(), BackendError> {
        let tables = self.tables()?;
        // A 2M unmap that clears a link to a page table unmaps every 4K page under it: each is
        // invalidated, as the KVM backend's guest does.
        let pages =
            if tables.links_table(op.space, op.gva, op.size).map_err(failed)? { 512 } else { 1 };
        let writes = tables.unmap(op.space, op.gva, op.size).map_err(failed)?;
        self.guest_writes(writes)?;
        self.shootdown(op.gva, pages)
    }

    fn cr3(&mut self, op: &Cr3Op) -> Result<(), BackendError> {
        let mut writes = Vec::new();
        let root = self.tables()?.root(op.space, &mut writes).map_err(failed)?;
        // A space no step used yet: its tables, fresh pages no MMU shadows, are written as the
        // KVM backend's loader wrote every space before the guest ran (so no other vCPU runs
        // here, as none does on the KVM backend).
        self.tables()?.apply(&writes).map_err(failed)?;
        self.job(op.vcpu, |reply| Job::Cr3 { cr3: root, guest: true, reply })?;
        if let Some(s) = self.spaces.get_mut(op.vcpu as usize) {
            *s = op.space;
        }
        Ok(())
    }

    fn dirty_log(&mut self, op: &DirtyLogOp) -> Result<DirtyLogResult, BackendError> {
        let words = match self.dirty_bitmap(op)? {
            Ok(words) => words,
            Err(e) => return Ok(DirtyLogResult::Err(e.errno().to_string())),
        };
        let pages: Vec<u64> = vmmu::dirty::pages_of(&words).collect();
        if op.as_id == 0 {
            let clears = self.dirty_log_mode == DirtyLogMode::Auto;
            let missing = self.written.collected(op.id, &pages, clears);
            if !missing.is_empty() {
                let hex: Vec<String> = missing.iter().map(|p| format!("{p:#x}")).collect();
                return Err(failed(format!(
                    "lost dirty pages: the guest wrote page(s) {} of slot {} since they were \
                     last collected, but the MMU's dirty log does not report them",
                    hex.join(", "),
                    op.id
                )));
            }
        }
        Ok(DirtyLogResult::Ok(pages))
    }

    fn clear_dirty_log(&mut self, op: &ClearDirtyLogOp) -> Result<SlotResult, BackendError> {
        // Every page of the range, as the scenario step specifies (no bitmap: a huge `count`
        // KVM refuses costs nothing).
        let vm = self.mmu.vm();
        let (as_id, id) = (vmmu::AsId(op.as_id), vmmu::SlotId(op.id));
        Ok(match vm.clear_dirty_log_all(as_id, id, op.first, op.count) {
            Ok(()) => {
                if op.as_id == 0 {
                    self.written.cleared(op.id, op.first, u64::from(op.count));
                }
                SlotResult::Ok
            }
            Err(e) => SlotResult::Err(e.errno().to_string()),
        })
    }
}

impl Drop for SimMachine {
    fn drop(&mut self) {
        for v in &mut self.vcpus {
            v.jobs = None; // the thread's receive fails and it ends
        }
        for v in &mut self.vcpus {
            if let Some(h) = v.handle.take() {
                let _ = h.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{SimBackend, SimMachine};
    use vmmu_scenario::{
        parse, run_collect, DirtyLogResult, Machine, MemId, MemRef, Observation, ReadExit, ReadOp,
        SlotFlags, SlotOp, SlotResult, Width,
    };

    /// On `m`, whose buffer 0 is `a`: slot 1 maps `a`'s first page at 4 GiB, slot 2 (named `a`
    /// too) a page at host address `target` just above; a read through slot 1 must pass. Returns
    /// the error of a read through slot 2.
    fn read_through_a_slot_of_a_at(m: &mut SimMachine, target: u64) -> String {
        let a = m.buffer(MemId(0)).expect("a").hva().raw();
        let slot = |id: u16, gpa: u64, offset: u64| SlotOp {
            id,
            as_id: 0,
            gpa,
            size: 0x1000,
            mem: Some(MemRef { mem: MemId(0), name: "a".into(), offset }),
            flags: SlotFlags::default(),
        };
        let (inside, outside) = (0x1_0000_0000, 0x1_0000_1000);
        assert_eq!(m.slot(&slot(1, inside, 0)).expect("slot"), SlotResult::Ok);
        assert_eq!(
            m.slot(&slot(2, outside, target.wrapping_sub(a))).expect("slot"),
            SlotResult::Ok
        );
        let read =
            |m: &mut SimMachine, gpa: u64| m.read(&ReadOp { vcpu: 0, gpa, width: Width::W8 }, 0);
        assert!(matches!(read(m, inside), Ok(ReadExit::None { value: 0 })));
        read(m, outside).expect_err("not the slot's buffer").to_string()
    }

    /// A slot may reach past the end of its buffer, but a guest access through that part is a
    /// backend failure (scenarios.md), also where the host address it leads to is the
    /// machine's own memory (its guest page tables): the machine refuses it as the KVM backend
    /// refuses a slot into its own memory, rather than letting the guest read or overwrite its
    /// tables (the generated-scenario test once saw a guest store through the unbacked part of a
    /// slot land in them, under NPT and shadow paging, depending on where the buffers lay).
    #[test]
    fn an_access_through_a_slot_into_the_machines_own_memory_fails() {
        let sc = parse("vm format=shadow\nmem a size=4K\n").expect("scenario");
        let mut m = SimMachine::new(&sc, vmmu::bugs::BugSet::NONE).expect("machine");
        m.mem(MemId(0), &sc.mems[0]).expect("mem a");
        let own = m.host.buffer("__guest_tables").expect("the machine's own memory").hva().raw();
        let err = read_through_a_slot_of_a_at(&mut m, own);
        assert!(err.contains("outside its buffer"), "{err}");
    }

    /// A slot whose `mem=` names buffer `a` but whose host range runs into buffer `b` (an offset
    /// past `a`'s end, as a slot longer than its buffer reaches): an access through that part is
    /// a backend failure (`scenarios.md`), not a read of `b`. This machine's buffers lie side by
    /// side and the KVM backend's behind guard gaps, so such a read made up a value the other
    /// backend never saw (hunt 42h F1); the same slot's access inside `a` passes.
    #[test]
    fn an_access_through_a_slot_into_another_buffer_fails() {
        let sc = parse("mem a size=4K\nmem b size=4K\n").expect("scenario");
        let mut m = SimMachine::new(&sc, vmmu::bugs::BugSet::NONE).expect("machine");
        m.mem(MemId(0), &sc.mems[0]).expect("mem a");
        m.mem(MemId(1), &sc.mems[1]).expect("mem b");
        let b = m.buffer(MemId(1)).expect("b").hva().raw();
        let err = read_through_a_slot_of_a_at(&mut m, b);
        assert!(err.contains("outside its buffer"), "{err}");
    }

    /// Every `dirty-log` must report the pages the guest wrote since their last collection: a
    /// dirty log that loses one is a failure of the configuration, not an observation that
    /// `vmmu diff` may excuse as TDP-only (hunt 43s N3). Shown with `dirty-log-no-flush`: the
    /// collection write-protects page 0 without flushing the vCPU's TLB, whose writable entry
    /// takes the second store without a fault, so the MMU reports nothing. (On `format=shadow`
    /// this backend's vCPUs keep no TLB, so the missing flush has nothing to leave behind.)
    #[cfg(feature = "historical-bugs")]
    #[test]
    fn a_dirty_log_that_loses_a_written_page_fails_the_run() {
        for format in ["ept", "npt"] {
            let text = format!(
                "vm format={format}\nmem buf size=8K\n\
                 slot 1 gpa=0x10000000 size=8K mem=buf flags=dirty_log\n\
                 write 0 gpa=0x10000000 size=8 value=0x1\ndirty-log 1\n\
                 write 0 gpa=0x10000000 size=8 value=0x2\ndirty-log 1\n"
            );
            assert_eq!(dirty_logs(&text), vec![vec![0], vec![0]], "format={format}");
            let (collections, msg) = run_without_dirty_log_flush(&text);
            assert_eq!(collections, 1, "format={format}: fails at the second collection");
            assert!(msg.contains("lost dirty pages") && msg.contains("0x0"), "{format}: {msg}");
        }
    }

    /// With `dirty_log=manual`, a `clear-dirty-log` forgets only the pages of its range: a page
    /// written again after an earlier clear of its own range stays owed through a clear of
    /// another range, and a collection that then loses it fails the run (hunt 43s N3's check,
    /// in manual mode). Shown with `dirty-log-no-flush`: the clear of pages 64..128 takes page
    /// 64's write access without flushing the vCPU's TLB, whose writable entry (page 64 is
    /// written last, so no other page's entry has taken its place in the direct-mapped TLB)
    /// takes the next store to page 64 without a fault; the clear of pages 0..64 must not
    /// excuse that page. It does excuse pages 0 and 1 (its first page and one inside it): a
    /// correct MMU, which no longer reports them, passes.
    #[cfg(feature = "historical-bugs")]
    #[test]
    fn a_manual_clear_excuses_only_its_own_pages() {
        for format in ["ept", "npt"] {
            let text = format!(
                "vm format={format} dirty_log=manual\nmem buf size=512K\n\
                 slot 1 gpa=0x10000000 size=512K mem=buf flags=dirty_log\n\
                 write 0 gpa=0x10000000 size=8 value=0x1\n\
                 write 0 gpa=0x10001000 size=8 value=0x1\n\
                 write 0 gpa=0x10040000 size=8 value=0x1\ndirty-log 1\n\
                 clear-dirty-log 1 first=64 count=64\n\
                 write 0 gpa=0x10040000 size=8 value=0x2\n\
                 clear-dirty-log 1 first=0 count=64\ndirty-log 1\n"
            );
            assert_eq!(dirty_logs(&text), vec![vec![0, 1, 0x40], vec![0x40]], "format={format}");
            let (collections, msg) = run_without_dirty_log_flush(&text);
            assert_eq!(collections, 1, "format={format}: fails at the second collection");
            assert!(msg.starts_with("sim backend failed at step"), "{format}: {msg}");
            assert!(
                msg.contains("lost dirty pages: the guest wrote page(s) 0x40 of slot 1"),
                "{msg}"
            );
        }
    }

    /// With `dirty_log=manual`, a `clear-dirty-log` forgets the pages of its range from the
    /// first on: a correct MMU that reports page 0 until it is cleared, and not after, passes.
    #[test]
    fn a_manual_clear_forgets_the_pages_it_cleared() {
        let text = "vm format=ept dirty_log=manual\nmem buf size=8K\n\
                    slot 1 gpa=0x10000000 size=8K mem=buf flags=dirty_log\n\
                    write 0 gpa=0x10000000 size=8 value=0x1\ndirty-log 1\ndirty-log 1\n\
                    clear-dirty-log 1 first=0 count=2\ndirty-log 1\n";
        assert_eq!(dirty_logs(text), vec![vec![0], vec![0], vec![]]);
    }

    /// With `dirty_log=auto` a collection clears what it returns, so the next one owes only
    /// what the guest wrote after it: a correct MMU that reports the written page (page 1 of
    /// the slot) once, and nothing the second time, passes.
    #[test]
    fn an_automatic_collection_owes_only_the_pages_written_since_the_last() {
        let text = "vm format=ept\nmem buf size=8K\n\
                    slot 1 gpa=0x10000000 size=8K mem=buf flags=dirty_log\n\
                    write 0 gpa=0x10001000 size=8 value=0x1\ndirty-log 1\ndirty-log 1\n";
        assert_eq!(dirty_logs(text), vec![vec![1], vec![]]);
    }

    /// A `host-write` or `host-read` built in code at an offset the access width does not divide
    /// (the parser refuses it) is a backend failure, not a misaligned atomic access.
    #[test]
    fn a_misaligned_host_access_built_in_code_is_refused() {
        use vmmu_scenario::{HostReadOp, HostWriteOp};
        let sc = parse("mem a size=4K\n").expect("scenario");
        let mut m = SimMachine::new(&sc, vmmu::bugs::BugSet::NONE).expect("machine");
        m.mem(MemId(0), &sc.mems[0]).expect("mem a");
        let at = |offset: u64| MemRef { mem: MemId(0), name: "a".into(), offset };
        let w = HostWriteOp { at: at(0x7), width: Width::W4, value: 1 };
        let err = m.host_write(&w).expect_err("misaligned").to_string();
        assert!(err.contains("not aligned to the access width (4 bytes)"), "{err}");
        let r = HostReadOp { at: at(0x2), width: Width::W8 };
        assert!(m.host_read(&r).is_err());
        m.host_write(&HostWriteOp { at: at(0x8), width: Width::W8, value: 1 }).expect("aligned");
    }

    /// A version-1 guest under shadow paging costs the shadow MMU what the KVM backend's guest
    /// costs KVM: its own memory is 1 MiB (KVM's default shadow-page limit counts it) and its
    /// code page, fetched before each access, holds a shadow page of its own. So 55 new 2 MiB
    /// regions are what makes the MMU recycle a logged page's shadow page, as on /dev/kvm
    /// (tests/scenarios/shadow_recycle_code_page.scn): the next read of the page faults and
    /// dirties it. Without the code page 56 regions were needed.
    #[test]
    fn shadow_guest_code_page_counts_towards_the_page_limit() {
        let mut text = String::from(
            "vm format=shadow\nmem buf size=1M\n\
             slot 1 gpa=0x10000000 size=4K mem=buf flags=dirty_log\n\
             write 0 gpa=0x10000000 size=8 value=0x1\ndirty-log 1\n",
        );
        let region = |i: u64| 0x4000_0000 + i * 0x20_0000;
        for i in 2..=56u64 {
            text += &format!("slot {i} gpa={:#x} size=4K mem=buf+{:#x}\n", region(i), i * 0x1000);
        }
        for i in 2..=55u64 {
            text += &format!("read 0 gpa={:#x} size=8\n", region(i));
        }
        text += "read 0 gpa=0x10000000 size=8\ndirty-log 1\n";
        text += &format!("read 0 gpa={:#x} size=8\n", region(56));
        text += "read 0 gpa=0x10000000 size=8\ndirty-log 1\n";
        assert_eq!(dirty_logs(&text), vec![vec![0], vec![], vec![0]]);
    }

    /// KVM's shadow MMU prefetches the not-present neighbours of a leaf it maps in a direct
    /// shadow page, in its group of 8, as far as the host maps them writable already: pages 1
    /// and 2 (written by the host) are mapped with page 0, page 3 (never written) ends the run,
    /// so page 7 is not. Once logging write-protects them, reads of 1 and 2 do not fault; the
    /// read of 7 faults, maps it writable and dirties it, as on /dev/kvm
    /// (tests/scenarios/shadow_direct_prefetch.scn). Without prefetch all three were dirtied.
    #[test]
    fn shadow_prefetch_maps_host_written_neighbours() {
        let text = "vm format=shadow\nmem buf size=32K\n\
                    host-write buf+0x1000 size=8 value=0x1\nhost-write buf+0x2000 size=8 value=0x1\n\
                    host-write buf+0x7000 size=8 value=0x1\n\
                    slot 1 gpa=0x10000000 size=32K mem=buf\nread 0 gpa=0x10000000 size=8\n\
                    slot 1 gpa=0x10000000 size=32K mem=buf flags=dirty_log\n\
                    read 0 gpa=0x10001000 size=8\nread 0 gpa=0x10002000 size=8\n\
                    read 0 gpa=0x10007000 size=8\ndirty-log 1\n";
        assert_eq!(dirty_logs(text), vec![vec![7]]);
    }

    /// The pages each `dirty-log` step reported, in order.
    /// Runs `text` with `dirty-log-no-flush` re-injected, which must fail the run: the number
    /// of `dirty-log` observations made before it failed, and the failure's message.
    #[cfg(feature = "historical-bugs")]
    fn run_without_dirty_log_flush(text: &str) -> (usize, String) {
        use vmmu::bugs::{Bug, BugSet};
        let sc = parse(text).expect("scenario");
        let buggy = super::SimBackendInjected { bugs: BugSet::only(Bug::DirtyLogNoFlush) };
        let (seen, err) = run_collect(&buggy, &sc).expect_err("the lost page fails the run");
        let collections = seen.iter().filter(|o| matches!(o, Observation::DirtyLog { .. }));
        (collections.count(), err.to_string())
    }

    fn dirty_logs(text: &str) -> Vec<Vec<u64>> {
        let sc = parse(text).expect("scenario");
        let obs = run_collect(&SimBackend, &sc).expect("run");
        obs.iter()
            .filter_map(|o| match o {
                Observation::DirtyLog { result: DirtyLogResult::Ok(p), .. } => Some(p.clone()),
                _ => None,
            })
            .collect()
    }

    /// Buffers cost frames only for the pages a guest maps, as Linux gives an anonymous
    /// mapping's pages frames on first touch: two 32 GiB buffers (all 2^24 frames of the
    /// scenario host and more) run, as on /dev/kvm (`tests/scenarios/buffers_past_frame_space.scn`).
    #[test]
    fn buffers_larger_than_the_frame_space_run() {
        let text = "vm format=shadow\nmem a size=32G\nmem b size=32G\n\
                    slot 1 gpa=0x100000000 size=32G mem=a\n\
                    slot 2 gpa=0x900000000 size=4K mem=b+0x7ffff000\n\
                    write 0 gpa=0x900000008 size=8 value=0x7\n\
                    write 0 gpa=0x8fffffff8 size=8 value=0x9\n\
                    host-read b+0x7ffff008 size=8\nhost-read a+0x7fffffff8 size=8\n";
        for format in ["ept", "npt", "shadow"] {
            let text = text.replace("format=shadow", &format!("format={format}"));
            let sc = parse(&text).expect("scenario");
            let obs = run_collect(&SimBackend, &sc).expect("runs");
            let values: Vec<u64> = obs
                .iter()
                .filter_map(|o| match o {
                    Observation::HostRead { value, .. } => Some(*value),
                    _ => None,
                })
                .collect();
            assert_eq!(values, [7, 9], "format={format}");
        }
    }

    /// With 4 KiB host pages (as behind the KVM backend's buffers) a TDP MMU maps only the
    /// pages the guest touched: a host-written page of a 4 MiB slot the guest never accessed
    /// faults on its first read after logging starts, and that read fault maps it writable and
    /// dirties it, as on /dev/kvm (tests/scenarios/dirty_log_host_small_pages.scn). With 2 MiB
    /// host pages the guest's write to page 0 mapped the whole block and the read hit.
    #[test]
    fn tdp_maps_untouched_pages_of_a_block_on_their_own_fault() {
        for format in ["ept", "npt", "shadow"] {
            let text = format!(
                "vm format={format}\nmem big size=4M\nhost-write big+0x3000 size=8 value=0x1\n\
                 slot 1 gpa=0x40000000 size=4M mem=big\n\
                 write 0 gpa=0x40000000 size=8 value=0x2\n\
                 slot 1 gpa=0x40000000 size=4M mem=big flags=dirty_log\n\
                 read 0 gpa=0x40003000 size=8\nread 0 gpa=0x40004000 size=8\ndirty-log 1\n"
            );
            assert_eq!(dirty_logs(&text), vec![vec![3]], "format={format}");
        }
    }
}
