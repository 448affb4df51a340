//! Random sequences of public calls, as an embedder makes them: VM configurations at their
//! edges, memslot creates/moves/deletes/flag changes (good and bad), vCPU creation and drops in
//! any order (also after the VM handle is gone), faults at any address with any access, shadow
//! guest paging states (valid or not), INVLPG, write tracking, dirty-log get/clear with odd
//! ranges, host invalidations, zaps and shadow page limits. Checked: nothing panics or hangs,
//! every memslot answer (and errno) is KVM's (a small reference model), `gfn_to_hva` and every
//! translation agree with the model's memslots, and a dirty log in auto mode holds every page
//! written since the last GET and only pages accessed since.
#![cfg(not(loom))]

use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use vmmu::dirty::{DirtyLogError, DirtyLogMode};
use vmmu::fault::{FaultError, FaultOutcome, PfErr};
use vmmu::guest::{GuestCpu, PagingMode};
use vmmu::memslot::{UserspaceMemoryRegion, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY};
use vmmu::spte::FormatKind;
use vmmu::tdp::HwWalk;
use vmmu::testing::TestHost;
use vmmu::vcpu::{FaultAddr, Vcpu};
use vmmu::vm::{MmuKind, Vm, VmConfig};
use vmmu::{Access, AsId, Gfn, Gpa, Gva, Hva, Level, Pfn, SlotId};

/// Host RAM the test host maps (identity hva -> pfn); slots may also point outside it.
const RAM_HVA: u64 = 0x4000_0000;
const RAM_SIZE: u64 = 8 << 20;
const TASK_SIZE_MAX: u64 = (1 << 47) - 4096;

#[derive(Clone, Debug)]
struct Cfg {
    format: u8,
    phys_bits: u8,
    shadow: bool,
    caching: bool,
    nr_as: u16,
    max_vcpus: usize,
    five: bool,
    zap_all: bool,
    gen_base: u64,
    max_pages: Option<usize>,
    prefetch: bool,
    path_only: bool,
    big_host_pages: bool,
    /// L1TF host with this L1D width (`HostCpu::with_l1tf`), and the SEV C-bit of format 2.
    l1tf: Option<u8>,
    c_bit: u8,
}

#[derive(Clone, Debug)]
enum Op {
    Region {
        slot: u32,
        flags: u32,
        gpa: u64,
        size: u64,
        hva: u64,
    },
    CreateVcpu,
    DropVcpu(usize),
    SetAsId(usize, u16),
    Access {
        vcpu: usize,
        addr: u64,
        err: u64,
    },
    /// An access to page `page` (modulo its size) of the `k`-th slot of the model (if any).
    AccessSlot {
        vcpu: usize,
        k: usize,
        page: u64,
        err: u64,
    },
    GuestCpu {
        vcpu: usize,
        mode: u8,
        cr3: u64,
        wp: bool,
        nx: bool,
        maxphyaddr: u8,
    },
    LoadCr3(usize, u64),
    Invlpg(usize, u64),
    TrackWrite(usize, u64, u32),
    /// The guest writes `value` at byte `off` (8-aligned) of page `page` of the `k`-th slot (a
    /// page-table entry, usually), and a shadow vCPU reports it as an emulated write.
    GuestWrite {
        vcpu: usize,
        k: usize,
        page: u64,
        off: u64,
        value: u64,
    },
    Nested(usize, bool),
    Pageless(usize),
    GetLog(u16, u16),
    /// GET of the `k`-th logging slot of the model (if any).
    GetLogSlot(usize),
    ClearLog {
        as_id: u16,
        id: u16,
        first: u64,
        count: u32,
        words: Option<usize>,
    },
    Mode(bool),
    Invalidate {
        start: u64,
        end: u64,
        /// An access (vcpu, slot k, page) while the invalidation is in flight.
        access_in_between: Option<(usize, usize, u64)>,
    },
    ZapAll,
    NrMmuPages(usize),
    Shrink(usize),
    Reclaim,
    GfnToHva(u16, u64),
    DropVm,
}

fn cfg() -> impl Strategy<Value = Cfg> {
    (
        (0u8..4, prop_oneof![30 => 36u8..=52, 1 => Just(0u8), 1 => 53u8..=64], any::<bool>()),
        (
            any::<bool>(),
            prop_oneof![12 => Just(1u16), 12 => Just(2u16), 1 => Just(0u16), 1 => Just(3u16)],
        ),
        (prop_oneof![12 => 1usize..4, 1 => Just(0usize)], any::<bool>(), any::<bool>()),
        prop_oneof![6 => Just(0u64), 6 => Just((1 << 19) - 6), 3 => Just((1 << 62) - 6), 1 => Just(u64::MAX - 8)],
        prop_oneof![4 => Just(None), 1 => Just(Some(0usize)), 2 => Just(Some(64)), 2 => Just(Some(usize::MAX))],
        (any::<bool>(), any::<bool>(), any::<bool>()),
        (
            prop_oneof![4 => Just(None), 1 => Just(Some(0u8)), 2 => (36u8..=52).prop_map(Some), 1 => any::<u8>().prop_map(Some)],
            prop_oneof![Just(0u8), Just(47), Just(51), Just(52), any::<u8>()],
        ),
    )
        .prop_map(
            |(
                (format, phys_bits, shadow),
                (caching, nr_as),
                (max_vcpus, five, zap_all),
                gen_base,
                max_pages,
                (prefetch, path_only, big_host_pages),
                (l1tf, c_bit),
            )| Cfg {
                format,
                phys_bits,
                shadow,
                caching,
                nr_as,
                max_vcpus,
                five,
                zap_all,
                gen_base,
                max_pages,
                prefetch,
                path_only,
                big_host_pages,
                l1tf,
                c_bit,
            },
        )
}

/// A guest-physical address near the interesting places, maybe unaligned.
fn gpa() -> impl Strategy<Value = u64> {
    let base = prop_oneof![
        Just(0u64),
        Just(0x10_0000),
        Just(0xfff0_0000),
        Just(1 << 36),
        Just(1 << 39),
        Just(1 << 46),
        Just(1 << 48),
        Just(1 << 52),
        Just(1 << 63),
    ];
    (base, -3i64..8, prop_oneof![8 => Just(0u64), 1 => 1u64..4096])
        .prop_map(|(b, p, off)| b.wrapping_add_signed(p * 4096).wrapping_add(off))
}

/// A guest page-table entry: mostly one pointing into the setup slot (0x10_0000..0x11_0000) with
/// random flags (P, RW, US, PWT, PCD, A, D, PS, G, NX, reserved bits), sometimes anything.
fn gpte() -> impl Strategy<Value = u64> {
    let flags = prop_oneof![
        4 => Just(0x7u64),
        2 => Just(0x67),
        2 => Just(0xe7),
        1 => Just(0x5),
        1 => Just(0x1 | (1 << 63)),
        1 => Just(0x7 | (1 << 51)),
        1 => 0u64..0x1000,
    ];
    prop_oneof![
        8 => (0u64..16, flags).prop_map(|(p, f)| (0x10_0000 + p * 0x1000) | f),
        1 => (0u64..8, Just(0xe7u64)).prop_map(|(p, f)| (p << 21) | f),
        1 => any::<u64>(),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let slot = (
        prop_oneof![4 => Just(0u32), 2 => Just(1), 1 => 2u32..4],
        prop_oneof![
            6 => 0u32..4,
            1 => Just(32763u32),
            1 => Just(32764),
            1 => Just(32767),
            1 => Just(0xffff),
        ],
    )
        .prop_map(|(a, id)| (a << 16) | id);
    let flags = prop_oneof![
        4 => Just(0u32),
        3 => Just(KVM_MEM_LOG_DIRTY_PAGES),
        2 => Just(KVM_MEM_READONLY),
        1 => Just(KVM_MEM_READONLY | KVM_MEM_LOG_DIRTY_PAGES),
        1 => any::<u32>(),
    ];
    let size = prop_oneof![
        3 => Just(0u64),
        4 => (1u64..5).prop_map(|p| p * 4096),
        2 => Just(2 << 20),
        1 => Just((2 << 20) + 4096),
        1 => Just(1 << 44),
        1 => Just(4095),
        1 => Just(!0xfff),
    ];
    let hva = prop_oneof![
        8 => (0u64..8).prop_map(|p| RAM_HVA + p * 4096),
        2 => Just(RAM_HVA + RAM_SIZE - 4096),
        1 => Just(RAM_HVA + RAM_SIZE),
        1 => Just(TASK_SIZE_MAX - 4096),
        1 => Just(TASK_SIZE_MAX),
        1 => Just(RAM_HVA + 1),
        1 => Just(!0xfff),
    ];
    let vcpu = 0usize..4;
    let addr = prop_oneof![3 => gpa(), 1 => any::<u64>()];
    let err = prop_oneof![
        4 => Just(0u64),
        4 => Just(PfErr::WRITE),
        2 => Just(PfErr::RSVD),
        1 => Just(PfErr::FETCH),
        1 => Just(PfErr::USER | PfErr::WRITE | PfErr::PRESENT),
        1 => any::<u64>(),
    ];
    let first = prop_oneof![4 => Just(0u64), 2 => Just(64), 1 => Just(1), 1 => Just(!63), 1 => Just(1 << 32)];
    let count = prop_oneof![Just(0u32), Just(1), Just(64), Just(512), Just(513), Just(u32::MAX)];
    prop_oneof![
        12 => (slot, flags, gpa(), size, hva)
            .prop_map(|(slot, flags, gpa, size, hva)| Op::Region { slot, flags, gpa, size, hva }),
        3 => Just(Op::CreateVcpu),
        1 => vcpu.clone().prop_map(Op::DropVcpu),
        1 => (vcpu.clone(), 0u16..3).prop_map(|(v, a)| Op::SetAsId(v, a)),
        8 => (vcpu.clone(), addr.clone(), err.clone()).prop_map(|(vcpu, addr, err)| Op::Access { vcpu, addr, err }),
        16 => (vcpu.clone(), prop_oneof![3 => Just(0usize), 1 => 0usize..4], 0u64..1024, err).prop_map(|(vcpu, k, page, err)| Op::AccessSlot { vcpu, k, page, err }),
        2 => (vcpu.clone(), 0u8..4, prop_oneof![Just(0x10_0000u64), any::<u64>()], any::<bool>(), any::<bool>(), prop_oneof![Just(36u8), Just(52), any::<u8>()])
            .prop_map(|(vcpu, mode, cr3, wp, nx, maxphyaddr)| Op::GuestCpu { vcpu, mode, cr3, wp, nx, maxphyaddr }),
        1 => (vcpu.clone(), prop_oneof![Just(0x10_0000u64), any::<u64>()]).prop_map(|(v, c)| Op::LoadCr3(v, c)),
        1 => (vcpu.clone(), addr.clone()).prop_map(|(v, a)| Op::Invlpg(v, a)),
        1 => (vcpu.clone(), addr.clone(), prop_oneof![Just(8u32), Just(1), Just(0), any::<u32>()]).prop_map(|(v, a, b)| Op::TrackWrite(v, a, b)),
        1 => (vcpu.clone(), any::<bool>()).prop_map(|(v, n)| Op::Nested(v, n)),
        6 => (vcpu.clone(), prop_oneof![3 => Just(0usize), 1 => 0usize..4], 0u64..16, prop_oneof![Just(0u64), Just(8), Just(0xff8), 0u64..512], gpte())
            .prop_map(|(vcpu, k, page, off, value)| Op::GuestWrite { vcpu, k, page, off: off & 0xff8, value }),
        1 => vcpu.clone().prop_map(Op::Pageless),
        1 => (0u16..3, prop_oneof![4 => 0u16..4, 1 => Just(32764u16), 1 => Just(u16::MAX)]).prop_map(|(a, i)| Op::GetLog(a, i)),
        3 => (prop_oneof![3 => Just(0u16), 1 => 1u16..3], 0u16..4, first, count, prop_oneof![Just(None), (0usize..12).prop_map(Some)])
            .prop_map(|(as_id, id, first, count, words)| Op::ClearLog { as_id, id, first, count, words }),
        6 => (0usize..4).prop_map(Op::GetLogSlot),
        1 => any::<bool>().prop_map(Op::Mode),
        2 => (prop_oneof![Just(0u64), Just(RAM_HVA), Just(RAM_HVA + 0x1800), any::<u64>()], prop_oneof![Just(u64::MAX), Just(RAM_HVA + 0x2000), Just(0), any::<u64>()], prop_oneof![Just(None), (vcpu.clone(), 0usize..4, 0u64..64).prop_map(Some)])
            .prop_map(|(start, end, access_in_between)| Op::Invalidate { start, end, access_in_between }),
        1 => Just(Op::ZapAll),
        1 => prop_oneof![Just(0usize), Just(64), Just(70), Just(usize::MAX)].prop_map(Op::NrMmuPages),
        1 => prop_oneof![Just(0usize), Just(1), Just(usize::MAX)].prop_map(Op::Shrink),
        1 => Just(Op::Reclaim),
        2 => (0u16..3, prop_oneof![gpa().prop_map(|g| g >> 12), any::<u64>()]).prop_map(|(a, g)| Op::GfnToHva(a, g)),
        1 => Just(Op::DropVm),
    ]
}

#[derive(Clone, Copy, Debug)]
struct MSlot {
    base: u64,
    npages: u64,
    hva: u64,
    flags: u32,
}

/// Per logging slot: pages (slot-relative) written and accessed since the last GET in auto mode,
/// or `None` when the exact bounds are unknown (manual mode, a CLEAR, a guest with page tables).
#[derive(Default, Clone, Debug)]
struct LogModel {
    written: BTreeSet<u64>,
    accessed: BTreeSet<u64>,
    exact: bool,
}

struct Model {
    nr_as: u16,
    max_gfn: u64,
    slots: BTreeMap<(u16, u16), MSlot>,
    logs: BTreeMap<(u16, u16), LogModel>,
    manual: bool,
}

impl Model {
    /// KVM's rules in KVM's order: the errno, or the change.
    fn apply(&mut self, r: &UserspaceMemoryRegion) -> Result<&'static str, &'static str> {
        let (a, id) = ((r.slot >> 16) as u16, r.slot as u16);
        let (gpa, size, hva, flags) = (r.guest_phys_addr, r.memory_size, r.userspace_addr, r.flags);
        if flags & !3 != 0 || id >= 32764 || size % 4096 != 0 || gpa % 4096 != 0 || hva % 4096 != 0
        {
            return Err("EINVAL");
        }
        if size > TASK_SIZE_MAX || hva > TASK_SIZE_MAX - size || a >= self.nr_as {
            return Err("EINVAL");
        }
        if gpa.checked_add(size).is_none() || size / 4096 > (1 << 31) - 1 {
            return Err("EINVAL");
        }
        let (npages, base) = (size / 4096, gpa / 4096);
        let old = self.slots.get(&(a, id)).copied();
        if npages == 0 {
            return match self.slots.remove(&(a, id)) {
                Some(_) => {
                    self.logs.remove(&(a, id));
                    Ok("delete")
                }
                None => Err("EINVAL"),
            };
        }
        let change = match old {
            None => "create",
            Some(o) => {
                if hva != o.hva || npages != o.npages || (flags ^ o.flags) & 2 != 0 {
                    return Err("EINVAL");
                }
                if base != o.base {
                    "move"
                } else if flags != o.flags {
                    "flags"
                } else {
                    return Ok("noop");
                }
            }
        };
        if change != "flags" {
            let overlap = self.slots.iter().any(|(&(sa, sid), s)| {
                sa == a && sid != id && s.base < base + npages && base < s.base + s.npages
            });
            if overlap {
                return Err("EEXIST");
            }
            if base + npages - 1 > self.max_gfn {
                return Err("EINVAL");
            }
        }
        let was_logging = old.is_some_and(|o| o.flags & 1 != 0);
        if flags & 1 == 0 {
            self.logs.remove(&(a, id));
        } else if !was_logging {
            self.logs.insert((a, id), LogModel { exact: !self.manual, ..Default::default() });
        }
        self.slots.insert((a, id), MSlot { base, npages, hva, flags });
        Ok(change)
    }

    fn find(&self, a: u16, gfn: u64) -> Option<((u16, u16), MSlot)> {
        self.slots
            .iter()
            .find(|(&(sa, _), s)| sa == a && s.base <= gfn && gfn - s.base < s.npages)
            .map(|(&k, &s)| (k, s))
    }

    fn host_mapped(hva: u64) -> bool {
        (RAM_HVA..RAM_HVA + RAM_SIZE).contains(&hva)
    }

    fn touch(&mut self, a: u16, gfn: u64, write: bool) {
        if let Some((key, s)) = self.find(a, gfn) {
            if let Some(l) = self.logs.get_mut(&key) {
                l.accessed.insert(gfn - s.base);
                if write && s.flags & KVM_MEM_READONLY == 0 {
                    l.written.insert(gfn - s.base);
                }
            }
        }
    }

    fn inexact(&mut self) {
        self.logs.values_mut().for_each(|l| l.exact = false);
    }
}

fn build(c: &Cfg) -> Option<(Vm<TestHost>, Arc<TestHost>, VmConfig)> {
    let format = match c.format {
        0 => FormatKind::Ept,
        1 => FormatKind::Npt,
        2 => FormatKind::NptSev { c_bit: c.c_bit },
        _ => FormatKind::NptSev { c_bit: 51 },
    };
    let mut cfg = match c.shadow {
        true => VmConfig::shadow(c.phys_bits),
        false => VmConfig::new(format, c.phys_bits),
    }
    .ok()?;
    if let Some(cache_bits) = c.l1tf {
        cfg.host_cpu = cfg.host_cpu.with_l1tf(cache_bits).ok()?;
    }
    cfg.format = if c.shadow && c.format == 3 { format } else { cfg.format };
    cfg.mmio_caching = c.caching;
    cfg.nr_address_spaces = c.nr_as;
    cfg.max_vcpus = c.max_vcpus;
    if c.five {
        cfg.root_level = Level::L5;
    }
    cfg.slot_zap_all = c.zap_all;
    cfg.generation_base = c.gen_base;
    cfg.shadow_max_pages = c.max_pages;
    cfg.tdp_prefetch = c.prefetch;
    cfg.shadow_mmio_path_only = c.path_only;
    let host = Arc::new(TestHost::new(256));
    let level = if c.big_host_pages { Level::L2M } else { Level::L4K };
    host.map(RAM_HVA, RAM_SIZE, RAM_HVA >> 12, level, true);
    let vm = Vm::new(cfg, host.clone()).ok()?;
    Some((vm, host, cfg))
}

/// What one access ended as.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Seen {
    Ram(Pfn),
    Emulate(u64),
    GuestPf,
    Error(FaultError),
    Unfinished,
}

/// Runs one access (by gpa on TDP, by gva on shadow) like the machine does, bounded.
fn run_access(v: &mut Vcpu<TestHost>, shadow: bool, addr: u64, err: u64, tries: usize) -> Seen {
    let write = err & PfErr::WRITE != 0;
    let need = if write { Access::WRITE } else { Access::NONE };
    let mut first_err = Some(err);
    for _ in 0..tries {
        if v.service_requests().is_err() {
            return Seen::Unfinished;
        }
        let walk = match v.enter_guest() {
            Ok(g) if shadow => g.walk_gva(Gva(addr), need),
            Ok(g) => g.walk(Gpa(addr), need),
            Err(_) => continue,
        };
        // The first exit carries the random error code; later ones what the walk says.
        let e = match walk {
            HwWalk::Translated { pfn, .. } => return Seen::Ram(pfn),
            HwWalk::Violation { present, .. } => {
                (if write { PfErr::WRITE } else { 0 }) | if present { PfErr::PRESENT } else { 0 }
            }
            HwWalk::Misconfig { .. } => PfErr::RSVD | if write { PfErr::WRITE } else { 0 },
            HwWalk::Broken { dump } => panic!("broken walk at {addr:#x}: {dump:?}"),
        };
        let e = first_err.take().unwrap_or(e);
        let r = if shadow {
            v.handle_page_fault(Gva(addr), PfErr(e))
        } else if v.format().is_ept() {
            if e & PfErr::RSVD != 0 {
                v.handle_ept_misconfig(Gpa(addr))
            } else {
                let a = vmmu::FaultAccess {
                    write: e & PfErr::WRITE != 0,
                    exec: e & PfErr::FETCH != 0,
                    user: e & PfErr::USER != 0,
                };
                v.handle_ept_violation(Gpa(addr), a)
            }
        } else {
            v.handle_npf(Gpa(addr), PfErr(e))
        };
        match r {
            Ok(FaultOutcome::Emulate { gpa, .. }) => return Seen::Emulate(gpa.raw()),
            Ok(FaultOutcome::GuestPageFault { .. }) => return Seen::GuestPf,
            Ok(_) => {}
            Err(e) => return Seen::Error(e),
        }
    }
    Seen::Unfinished
}

fn mode_of(mode: u8, cr3: u64) -> PagingMode {
    match mode {
        0 => PagingMode::NonPaging,
        1 => PagingMode::Long4,
        2 => PagingMode::Pae { pdptrs: [cr3 | 1, 0, u64::MAX, 1] },
        _ => PagingMode::Pae { pdptrs: [0; 4] },
    }
}

fn check(c: Cfg, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let Some((vm, host, vcfg)) = build(&c) else { return Ok(()) };
    let shadow = vm.mmu_kind() == MmuKind::Shadow;
    let max_gpa_bits = if shadow { 52 } else { vcfg.host_cpu.phys_bits() };
    let mut model = Model {
        nr_as: c.nr_as,
        max_gfn: (1u64 << (max_gpa_bits - 12)) - 1,
        slots: BTreeMap::new(),
        logs: BTreeMap::new(),
        manual: false,
    };
    let mut vm = Some(vm);
    let mut vcpus: Vec<Vcpu<TestHost>> = Vec::new();
    // A vCPU whose guest has page tables (or a nested walk) makes dirty bounds inexact.
    let mut paging = false;
    if let Some(v) = vm.as_ref().and_then(|vm| vm.create_vcpu().ok()) {
        vcpus.push(v);
    }
    for op in ops {
        let op = match op {
            Op::AccessSlot { vcpu, k, page, err } => {
                let a = vcpus.get(vcpu % vcpus.len().max(1)).map_or(0, |v| v.as_id().0);
                // Logging slots first: their bitmaps are checked.
                let mut mine: Vec<MSlot> =
                    model.slots.iter().filter(|(&(sa, _), _)| sa == a).map(|(_, &s)| s).collect();
                mine.sort_by_key(|s| s.flags & KVM_MEM_LOG_DIRTY_PAGES == 0);
                let Some(s) = mine.get(k % mine.len().max(1)) else { continue };
                Op::Access { vcpu, addr: (s.base + page % s.npages) << 12 | (page & 0xff8), err }
            }
            Op::GetLogSlot(k) => {
                let logging: Vec<(u16, u16)> = model.logs.keys().copied().collect();
                let Some(&(a, id)) = logging.get(k % logging.len().max(1)) else { continue };
                Op::GetLog(a, id)
            }
            op => op,
        };
        let vcpu_at = |i: usize, n: usize| i % n.max(1);
        let n_vcpus = vcpus.len();
        match op {
            Op::Region { slot, flags, gpa, size, hva } => {
                let Some(vm) = vm.as_ref() else { continue };
                let r = UserspaceMemoryRegion::new(slot, flags, gpa, size, hva);
                let got = vm.set_memory_region(&r).map(|c| format!("{c:?}")).map_err(|e| e.errno());
                let want = model.apply(&r);
                match (&got, want) {
                    (Ok(g), Ok(w)) => prop_assert_eq!(
                        g.to_lowercase().replace("flagsonly", "flags"),
                        w,
                        "{:?}",
                        r
                    ),
                    (Err(g), Err(w)) => prop_assert_eq!(*g, w, "{:?}", r),
                    // ENOMEM for a bitmap the host cannot give is KVM's too.
                    (Err("ENOMEM"), _) => {}
                    _ => prop_assert!(false, "{r:?}: got {got:?}, model {want:?}"),
                }
                if got.is_err() && want.is_ok() {
                    // Undo the model (only ENOMEM reaches here): rebuild it is too costly.
                    return Ok(());
                }
            }
            Op::CreateVcpu => {
                if let Some(vm) = vm.as_ref() {
                    if let Ok(v) = vm.create_vcpu() {
                        vcpus.push(v);
                    }
                }
            }
            Op::DropVcpu(i) => {
                if !vcpus.is_empty() {
                    vcpus.remove(vcpu_at(i, vcpus.len()));
                }
            }
            Op::SetAsId(i, a) => {
                if let Some(v) = vcpus.get_mut(vcpu_at(i, n_vcpus)) {
                    let r = v.set_as_id(AsId(a));
                    prop_assert_eq!(r.is_ok(), a < c.nr_as);
                }
            }
            Op::Access { vcpu, addr, err } => {
                let Some(v) = vcpus.get_mut(vcpu_at(vcpu, n_vcpus)) else { continue };
                let a = v.as_id().0;
                let write = err & PfErr::WRITE != 0;
                let seen = run_access(v, shadow, addr, err, 50);
                let nonpaging =
                    !shadow || v.guest_cpu().is_some_and(|g| g.mode == PagingMode::NonPaging);
                if shadow && nonpaging && addr >> 32 != 0 {
                    // Out of a non-paging guest's reach: #GP, whatever maps the low bits.
                    let gp =
                        matches!(seen, Seen::Error(FaultError::NonCanonical(g)) if g.raw() == addr);
                    prop_assert!(gp, "{:#x}: {:?}", addr, seen);
                } else if nonpaging && !paging {
                    let gfn = addr >> 12;
                    let slot = model.find(a, gfn);
                    if let Some((_, s)) = slot {
                        let hva = s.hva + ((gfn - s.base) << 12);
                        match seen {
                            Seen::Ram(pfn) => prop_assert_eq!(pfn, Pfn(hva >> 12), "{:#x}", addr),
                            Seen::Emulate(g) => {
                                prop_assert!(
                                    write && s.flags & KVM_MEM_READONLY != 0,
                                    "{addr:#x} is RAM {s:?}, emulated {g:#x}"
                                );
                                prop_assert_eq!(g, addr);
                            }
                            Seen::Error(e) => prop_assert!(
                                !Model::host_mapped(hva)
                                    && matches!(e, FaultError::HostFault { gpa, .. } if gpa.raw() == addr),
                                "{addr:#x}: {e:?} on RAM at {hva:#x}"
                            ),
                            Seen::GuestPf | Seen::Unfinished => {}
                        }
                        if matches!(seen, Seen::Ram(_)) {
                            model.touch(a, gfn, write);
                        } else {
                            // A fault may have mapped it (then the retry budget ran out).
                            model.touch(a, gfn, false);
                        }
                    } else {
                        match seen {
                            Seen::Ram(pfn) => {
                                prop_assert!(false, "{addr:#x}: no slot, mapped {pfn:?}")
                            }
                            Seen::Emulate(g) => prop_assert_eq!(g, addr),
                            Seen::Error(e) => prop_assert!(false, "{addr:#x}: no slot, {e:?}"),
                            Seen::GuestPf | Seen::Unfinished => {}
                        }
                    }
                } else {
                    model.inexact();
                    if let Seen::Ram(pfn) = seen {
                        // Whatever the guest's tables say, a frame is one of a slot's pages.
                        let of_a_slot = model.slots.iter().any(|(&(sa, _), s)| {
                            sa == a && (s.hva >> 12..(s.hva >> 12) + s.npages).contains(&pfn.raw())
                        });
                        prop_assert!(of_a_slot, "{addr:#x} mapped {pfn:?}, no slot's page");
                    }
                }
            }
            Op::GuestCpu { vcpu, mode, cr3, wp, nx, maxphyaddr } => {
                let Some(v) = vcpus.get_mut(vcpu_at(vcpu, n_vcpus)) else { continue };
                let cpu = GuestCpu {
                    mode: mode_of(mode, cr3),
                    cr3,
                    cr0_wp: wp,
                    efer_nx: nx,
                    maxphyaddr,
                    // The tables here are random: 1 GiB leaves where the other bits allow.
                    gbpages: maxphyaddr % 2 == 0,
                };
                let r = v.set_guest_cpu(cpu);
                prop_assert_eq!(r.is_ok(), shadow);
                if mode != 0 && shadow {
                    paging = true;
                    model.inexact();
                }
            }
            Op::LoadCr3(i, cr3) => {
                if let Some(v) = vcpus.get_mut(vcpu_at(i, n_vcpus)) {
                    let r = v.load_cr3(cr3);
                    // MOV CR3 fails only for a TDP vCPU, a CR3 past MAXPHYADDR (#GP) or a bad
                    // PAE PDPTE (#GP).
                    let legal = v.guest_cpu().is_some_and(|g| {
                        cr3.checked_shr(u32::from(g.maxphyaddr)).unwrap_or(0) == 0
                    });
                    prop_assert!(
                        r.is_ok()
                            || !shadow
                            || !legal
                            || v.guest_cpu()
                                .is_some_and(|g| matches!(g.mode, PagingMode::Pae { .. })),
                        "{r:?}"
                    );
                }
            }
            Op::Invlpg(i, gva) => {
                if let Some(v) = vcpus.get_mut(vcpu_at(i, n_vcpus)) {
                    prop_assert_eq!(v.invlpg(Gva(gva)).is_ok(), shadow);
                }
            }
            Op::GuestWrite { vcpu, k, page, off, value } => {
                let a = vcpus.get(vcpu_at(vcpu, n_vcpus)).map_or(0, |v| v.as_id().0);
                let mine: Vec<MSlot> =
                    model.slots.iter().filter(|(&(sa, _), _)| sa == a).map(|(_, &s)| s).collect();
                let Some(s) = mine.get(k % mine.len().max(1)) else { continue };
                let page = page % s.npages;
                let hva = s.hva + page * 4096 + off;
                if !Model::host_mapped(hva) || s.flags & KVM_MEM_READONLY != 0 {
                    continue;
                }
                host.write_u64(hva, value);
                let gpa = ((s.base + page) << 12) + off;
                // A write the guest made: dirty in a logged slot, in the model as in KVM (the
                // emulator marks it); here no MMU path saw it, so bounds are inexact.
                model.inexact();
                if let Some(v) = vcpus.get_mut(vcpu_at(vcpu, n_vcpus)) {
                    prop_assert_eq!(v.track_write(Gpa(gpa), 8).is_ok(), shadow);
                }
            }
            Op::TrackWrite(i, gpa, bytes) => {
                // The emulated write marks its page dirty in a logged slot (as KVM's emulator
                // does); the model does not follow which pages, so bounds are inexact.
                if shadow {
                    model.inexact();
                }
                if let Some(v) = vcpus.get_mut(vcpu_at(i, n_vcpus)) {
                    prop_assert_eq!(v.track_write(Gpa(gpa), bytes).is_ok(), shadow);
                }
            }
            Op::Nested(i, n) => {
                if let Some(v) = vcpus.get_mut(vcpu_at(i, n_vcpus)) {
                    let addr = if n { FaultAddr::NestedGpa } else { FaultAddr::Gva };
                    prop_assert_eq!(v.set_fault_addr(addr).is_ok(), shadow);
                    if n {
                        paging = true;
                        model.inexact();
                    }
                }
            }
            Op::Pageless(i) => {
                if let Some(v) = vcpus.get_mut(vcpu_at(i, n_vcpus)) {
                    prop_assert_eq!(v.load_pageless_root().is_ok(), !shadow);
                }
            }
            Op::GetLog(a, id) => {
                let Some(vm) = vm.as_ref() else { continue };
                let got = vm.get_dirty_log(AsId(a), SlotId(id));
                let key = (a, id);
                match (&got, model.slots.get(&key), model.logs.get_mut(&key)) {
                    (Err(e), _, _) if a >= c.nr_as || id >= 32764 => {
                        prop_assert_eq!(e.errno(), "EINVAL")
                    }
                    (Ok(bits), Some(s), Some(l)) => {
                        prop_assert_eq!(bits.len() as u64, s.npages.div_ceil(64));
                        let pages: BTreeSet<u64> = vmmu::dirty::pages_of(bits).collect();
                        prop_assert!(pages.iter().all(|&p| p < s.npages));
                        if l.exact && !model.manual {
                            prop_assert!(
                                l.written.is_subset(&pages),
                                "written {:?} not in log {:?}",
                                l.written,
                                pages
                            );
                            prop_assert!(
                                pages.is_subset(&l.accessed),
                                "log {:?} beyond accessed {:?}",
                                pages,
                                l.accessed
                            );
                        }
                        if !model.manual {
                            *l = LogModel { exact: true, ..Default::default() };
                        }
                    }
                    (Err(DirtyLogError::NoLog { .. }), _, None) => {}
                    _ => prop_assert!(false, "get_dirty_log({a}, {id}) = {got:?}"),
                }
            }
            Op::ClearLog { as_id, id, first, count, words } => {
                let Some(vm) = vm.as_ref() else { continue };
                let r = match words {
                    Some(n) => vm.clear_dirty_log(
                        AsId(as_id),
                        SlotId(id),
                        first,
                        count,
                        &vec![u64::MAX; n],
                    ),
                    None => vm.clear_dirty_log_all(AsId(as_id), SlotId(id), first, count),
                };
                let logs = model.logs.contains_key(&(as_id, id));
                let want = if as_id >= c.nr_as || id >= 32764 || first % 64 != 0 {
                    Err("EINVAL")
                } else if !logs {
                    Err("ENOENT")
                } else {
                    let n = model.slots[&(as_id, id)].npages;
                    let count = u64::from(count);
                    if first > n || count > n - first || (count < n - first && count % 64 != 0) {
                        Err("EINVAL")
                    } else if words.is_some_and(|w| (w as u64) < count.div_ceil(64)) {
                        Err("EFAULT")
                    } else {
                        Ok(())
                    }
                };
                prop_assert_eq!(r.map_err(|e| e.errno()), want);
                if let Some(l) = model.logs.get_mut(&(as_id, id)) {
                    l.exact = false;
                }
            }
            Op::Mode(manual) => {
                let Some(vm) = vm.as_ref() else { continue };
                vm.set_dirty_log_mode(if manual {
                    DirtyLogMode::Manual
                } else {
                    DirtyLogMode::Auto
                });
                model.manual = manual;
                model.inexact();
            }
            Op::Invalidate { start, end, access_in_between } => {
                let Some(vm) = vm.as_ref() else { continue };
                let inv = vm.invalidate_hva_range_begin(Hva(start), Hva(end));
                if let Some((i, k, page)) = access_in_between {
                    if let Some(v) = vcpus.get_mut(vcpu_at(i, n_vcpus)) {
                        let a = v.as_id().0;
                        let mine: Vec<MSlot> = model
                            .slots
                            .iter()
                            .filter(|(&(sa, _), _)| sa == a)
                            .map(|(_, &s)| s)
                            .collect();
                        if let Some(s) = mine.get(k % mine.len().max(1)) {
                            let page = page % s.npages;
                            let gpa = (s.base + page) << 12;
                            let hva = s.hva + (page << 12);
                            let seen = run_access(v, shadow, gpa, 0, 3);
                            let nonpaging = !shadow
                                || v.guest_cpu().is_some_and(|g| g.mode == PagingMode::NonPaging);
                            // A page being invalidated is not mapped until the end.
                            if nonpaging && start < hva + 4096 && hva < end {
                                prop_assert!(
                                    !matches!(seen, Seen::Ram(_)),
                                    "{gpa:#x} (hva {hva:#x}) mapped during [{start:#x}, {end:#x})"
                                );
                            }
                            model.inexact();
                        }
                    }
                }
                inv.end();
            }
            Op::ZapAll => {
                if let Some(vm) = vm.as_ref() {
                    vm.zap_all_fast();
                }
            }
            Op::NrMmuPages(n) => {
                if let Some(vm) = vm.as_ref() {
                    let r = vm.set_nr_mmu_pages(n);
                    assert_eq!(r.is_err(), n < 64, "KVM refuses fewer than 64 pages, only those");
                }
            }
            Op::Shrink(n) => {
                if let Some(vm) = vm.as_ref() {
                    vm.shrink_shadow_pages(n);
                }
            }
            Op::Reclaim => {
                if let Some(vm) = vm.as_ref() {
                    vm.reclaim();
                }
            }
            Op::GfnToHva(a, gfn) => {
                let Some(vm) = vm.as_ref() else { continue };
                let got = vm.gfn_to_hva(AsId(a), Gfn(gfn));
                let want = model.find(a, gfn).map(|(_, s)| Hva(s.hva + ((gfn - s.base) << 12)));
                prop_assert_eq!(got, want, "as {} gfn {:#x}", a, gfn);
            }
            Op::DropVm => {
                vm = None;
            }
            Op::AccessSlot { .. } | Op::GetLogSlot(_) => unreachable!("resolved above"),
        }
    }
    // vCPUs outlive the handle, then go in creation order; the host must see no use after free.
    drop(vm);
    drop(vcpus);
    prop_assert_eq!(host.use_after_free(), 0);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, max_shrink_iters: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_api_sequences(
        c in cfg(),
        logged in any::<bool>(),
        ops in prop::collection::vec(op(), 1..64),
    ) {
        // Half the cases start with 64 KiB of logged RAM below 4 GiB, where most accesses go.
        let setup = Op::Region {
            slot: 0,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            gpa: 0x10_0000,
            size: 0x1_0000,
            hva: RAM_HVA,
        };
        check(c, logged.then_some(setup).into_iter().chain(ops).collect())?;
    }
}
