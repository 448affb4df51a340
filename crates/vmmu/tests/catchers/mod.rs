//! One catcher per re-injectable historical bug (`vmmu::bugs::Bug`, issue 11 points 4 and 5).
//!
//! A catcher runs one deterministic scenario on a VM built with the given [`BugSet`] and reports
//! the wrong observation a guest ACCESS made ([`Harm`]: which gpa, what the right answer was, what
//! the access saw), or `None` when every access was right. `tests/bugs_caught.rs` runs each
//! catcher with no bug (must give `None`) and with its bug (must give `Some`).
//!
//! Two bugs cannot cause harm in this design (the reasons are in their docs in `src/bugs.rs`):
//! `cache-while-in-progress` and `no-stale-root-check`. For them this module has an
//! [`Catcher::Invariant`] test instead: it reports the broken invariant the KVM fix introduced,
//! and is labelled as an invariant test, not a catcher.
//!
//! Interleavings are made deterministic in one of two ways, never with timing:
//! - a [`Window`]: the memslot update runs with hooks that do what the VM's own hooks do (zap on
//!   delete/move, zap all on an MMIO-generation wrap) and, at a named point of the protocol, let
//!   a vCPU make an access (as another thread could at that instant);
//! - a vCPU thread driven by commands over channels, which the updater waits for only through the
//!   MMU's own protocol (request acknowledgements).
#![allow(dead_code)] // each test crate uses some of it

mod psc;
mod shadow;

use crate::common::{access, park_once_at, region, update_published, vm_with, Seen, RAM_HVA};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use vmmu::bugs::{Bug, BugSet};
use vmmu::fault::{EmulateSource, FaultError, FaultOutcome};
use vmmu::memslot::{MemslotChange, UserspaceMemoryRegion};
use vmmu::spte::FormatKind;
use vmmu::tdp::{hw_walk, HwWalk};
use vmmu::testing::TestHost;
use vmmu::vcpu::Vcpu;
use vmmu::vm::{UpdateProbe, Vm, VmConfig};
use vmmu::{Access, AsId, FaultAccess, Generation, Gfn, Gpa, Level, Pfn};

/// A wrong observation made by a guest access.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Harm {
    /// The guest-physical address accessed.
    pub gpa: u64,
    /// What a correct MMU answers there.
    pub expected: String,
    /// What the access saw.
    pub seen: String,
}

/// A broken invariant (for the bugs that cannot cause harm in this design).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Broken {
    /// The invariant the KVM fix introduced.
    pub invariant: &'static str,
    /// What the test saw instead.
    pub seen: String,
}

impl std::fmt::Display for Harm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "gpa {:#x}: expected {}; seen {}", self.gpa, self.expected, self.seen)
    }
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invariant broken: {}; seen {}", self.invariant, self.seen)
    }
}

/// How a bug is checked.
#[derive(Clone, Copy)]
pub enum Catcher {
    /// A catcher: the bug makes an access see something wrong.
    Harm(fn(BugSet) -> Option<Harm>),
    /// An invariant test, not a catcher: the bug breaks the invariant, but no access in this
    /// design can observe it (why: the bug's doc in `src/bugs.rs`, "No harm in this design").
    Invariant(fn(BugSet) -> Option<Broken>),
}

/// The check for `bug`. Exhaustive: a new bug without a check does not compile.
pub fn catcher(bug: Bug) -> Catcher {
    match bug {
        Bug::NoSecondIncrement | Bug::WrapHookAfterPublish => {
            Catcher::Harm(catch_wrap_hook_vs_prewrap_spte)
        }
        Bug::CacheWhileInProgress => Catcher::Invariant(invariant_no_cache_fill_while_in_progress),
        Bug::VcpuCacheWithoutGen | Bug::MmioSpteIgnoresGen => {
            Catcher::Harm(catch_stale_mmio_after_create)
        }
        Bug::StickyCachingDisable => Catcher::Harm(catch_sticky_caching_disable),
        Bug::ZappedSpteIsMisconfig => Catcher::Harm(catch_zapped_spte_is_misconfig),
        Bug::NoStaleRootCheck => Catcher::Invariant(invariant_obsolete_root_gains_no_mapping),
        Bug::InvalidSlotAsMmio => Catcher::Harm(catch_invalid_slot_as_mmio),
        Bug::NoTlbFlushOnZap => Catcher::Harm(catch_no_tlb_flush_on_zap),
        Bug::MmioOverPresentSpte => Catcher::Harm(catch_mmio_over_present_spte),
        Bug::GvaCacheSurvivesRootSwitch => {
            Catcher::Harm(shadow::catch_gva_cache_survives_root_switch)
        }
        Bug::ShadowTableLeftWritable | Bug::TrackWriteKeepsSpte => {
            Catcher::Harm(shadow::catch_stale_shadow_after_table_write)
        }
        Bug::DirtyLogNoFlush => Catcher::Harm(catch_dirty_log_no_flush),
        Bug::LeafCacheIgnoresEpoch => Catcher::Harm(shadow::catch_leaf_cache_ignores_epoch),
        Bug::NoFlushOnTableUnlink => Catcher::Harm(psc::catch_no_flush_on_table_unlink),
        Bug::RoleAccessLastLevel => Catcher::Harm(shadow::catch_role_access_last_level),
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// An EPT VM (46-bit host, one address space) with `bugs`.
fn ept(bugs: BugSet) -> VmConfig {
    let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
    cfg.bugs = bugs;
    cfg
}

/// The frame of host RAM page `page` (the test host maps `RAM_HVA` identically).
fn ram(page: u64) -> Pfn {
    Pfn((RAM_HVA >> 12) + page)
}

/// What one attempt of an access ended as: a translation, or the outcome of the fault it exited
/// on (not retried: a window lets a vCPU make exactly one attempt).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Step {
    Ram(Pfn),
    Fault(FaultOutcome),
}

/// One attempt of a read of `gpa` by an EPT vCPU: service requests, enter guest mode, walk like
/// the hardware, and on a fault exit and handle it once.
pub fn step(v: &mut Vcpu<TestHost>, gpa: u64) -> Result<Step, FaultError> {
    let walk = loop {
        v.service_requests().expect("a root");
        if let Ok(g) = v.enter_guest() {
            break g.walk(Gpa(gpa), Access::NONE);
        }
    };
    match walk {
        HwWalk::Translated { pfn, .. } => Ok(Step::Ram(pfn)),
        HwWalk::Violation { .. } => {
            v.handle_ept_violation(Gpa(gpa), FaultAccess::READ).map(Step::Fault)
        }
        HwWalk::Misconfig { .. } => v.handle_ept_misconfig(Gpa(gpa)).map(Step::Fault),
        HwWalk::Broken { dump } => panic!("broken walk of {gpa:#x}: {dump:?}"),
    }
}

/// A point of the memslot protocol where a [`Window`] lets a vCPU act.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Point {
    /// KVM `kvm_arch_memslots_updated`: the swap's new set is published and the old set's readers
    /// are drained; the final generation is not stored yet (with the correct protocol). Comes
    /// before the MMU's MMIO-generation wrap check.
    Updated { new_gen: Generation },
    /// Delete/move: the invalid copy of the slot is published and the MMU has zapped what mapped
    /// it (KVM `kvm_arch_flush_shadow_memslot` has returned); the second swap has not begun.
    Flushed,
}

/// `KVM_SET_USER_MEMORY_REGION` on `vm` calling `at` at each [`Point`] of the update (the VM's
/// own hooks run as always: `Vm::set_memory_region_probed`), a deterministic stand-in for a vCPU
/// thread running at that instant. Single-threaded use only.
pub fn update_with_window(
    vm: &Vm<TestHost>,
    r: &UserspaceMemoryRegion,
    at: impl FnMut(Point),
) -> MemslotChange {
    let at = RefCell::new(at);
    vm.set_memory_region_probed(r, &|p| {
        let point = match p {
            UpdateProbe::Flushed => Point::Flushed,
            UpdateProbe::Updated { new_gen } => Point::Updated { new_gen },
            UpdateProbe::MmioWrapZapped => return,
        };
        (at.borrow_mut())(point)
    })
    .unwrap()
}

// ---------------------------------------------------------------------------------------------
// no-second-increment, wrap-hook-after-publish
// ---------------------------------------------------------------------------------------------

/// The MMIO-generation wrap zap must be done before the post-wrap generation is visible
/// (152482580a1b), and the final generation must not be visible while the update is in progress
/// (ee3d1570b586).
///
/// The generation starts at 2^19 - 1, so the next update's final generation, 2^19, has MMIO bits
/// 0: the MMU zaps everything. An MMIO SPTE for X with generation bits 0 stands for one made
/// 2^19 updates earlier (written through the test hook; making it for real takes half a million
/// updates). The update creates RAM over X; a vCPU accesses X at `kvm_arch_memslots_updated`.
///
/// Harm: the access is emulated as MMIO from the pre-wrap SPTE although the set it reads has RAM
/// at X and shows no update in progress. The correct protocol shows the in-progress generation
/// there, so the SPTE misses and the access reaches RAM.
pub fn catch_wrap_hook_vs_prewrap_spte(bugs: BugSet) -> Option<Harm> {
    const X: u64 = 0x70_0000;
    let mut cfg = ept(bugs);
    cfg.generation_base = (1 << 19) - 1;
    let (vm, _h) = vm_with(cfg);
    let mut v = vm.create_vcpu().unwrap();
    let (seen, _) = access(&mut v, X, false).unwrap();
    assert_eq!(seen, Seen::Mmio(EmulateSource::SlowPathMmio), "setup: X is MMIO");
    {
        let root = v.root().unwrap().clone();
        let codec = vm.core().config().codec;
        // SAFETY: written at once, before any zap can free the page.
        let e =
            unsafe { vm.tdp().expect("a TDP VM").entry_for_tests(&root, Gfn(X >> 12), Level::L4K) }
                .expect("setup: table");
        e.store(codec.make(Gfn(X >> 12), Generation::from_raw(0), Access::ALL), Ordering::SeqCst);
    }
    let mut in_window = None;
    update_with_window(&vm, &region(0, X, 0x1000, RAM_HVA, 0), |p| {
        if let Point::Updated { .. } = p {
            let gen = vm.memslots().generation(AsId(0)).unwrap();
            in_window = Some((gen, step(&mut v, X)));
        }
    });
    let (gen, got) = in_window.expect("the update ran its hook");
    if let Ok(Step::Fault(FaultOutcome::Emulate { source, .. })) = got {
        return Some(Harm {
            gpa: X,
            expected: format!(
                "RAM {:?} (the set the vCPU reads has the new slot at X) or a retry",
                ram(0)
            ),
            seen: format!("emulated as MMIO ({source:?}) under generation {gen:?}"),
        });
    }
    let (seen, _) = access(&mut v, X, false).unwrap();
    (seen != Seen::Ram(ram(0))).then(|| Harm {
        gpa: X,
        expected: format!("RAM {:?} after the create returned", ram(0)),
        seen: format!("{seen:?}"),
    })
}

// ---------------------------------------------------------------------------------------------
// cache-while-in-progress (invariant test, not a catcher)
// ---------------------------------------------------------------------------------------------

/// INVARIANT TEST (ddfd1730fd82): the per-vCPU MMIO cache is never filled while an update is in
/// progress. An MMIO access to X is made at `kvm_arch_memslots_updated` of an unrelated create.
/// No access can observe the bug here (`src/bugs.rs`): what is checked is the cache's tag.
pub fn invariant_no_cache_fill_while_in_progress(bugs: BugSet) -> Option<Broken> {
    const X: u64 = 0x70_0000;
    let (vm, _h) = vm_with(ept(bugs));
    let mut v = vm.create_vcpu().unwrap();
    let mut in_window = None;
    update_with_window(&vm, &region(0, 0x10_0000, 0x1000, RAM_HVA, 0), |p| {
        if let Point::Updated { .. } = p {
            let o = step(&mut v, X);
            in_window = Some((o, v.mmio_cache().generation()));
        }
    });
    let (o, cached) = in_window.expect("the update ran its hook");
    assert!(matches!(o, Ok(Step::Fault(FaultOutcome::Emulate { .. }))), "X is MMIO: {o:?}");
    let (seen, _) = access(&mut v, X, false).unwrap();
    assert!(matches!(seen, Seen::Mmio(_)), "X is still MMIO: {seen:?}");
    cached.filter(|g| g.in_progress()).map(|g| Broken {
        invariant: "the per-vCPU MMIO cache is never filled while a memslot update is in progress",
        seen: format!("an entry for gpa {X:#x} tagged with generation {g:?}"),
    })
}

// ---------------------------------------------------------------------------------------------
// vcpu-cache-without-gen, mmio-spte-ignores-gen
// ---------------------------------------------------------------------------------------------

/// An access to an MMIO gfn (which installs an MMIO SPTE and fills the per-vCPU cache), a second
/// one (a cache hit), then a create over it (which zaps nothing: only the generation protects),
/// then the same access.
///
/// Harm: after the create returned, the access is emulated as MMIO through the per-vCPU cache
/// (56f17dd3fbc4) or the MMIO SPTE (f8f559422b6c) instead of reaching the new slot's RAM.
pub fn catch_stale_mmio_after_create(bugs: BugSet) -> Option<Harm> {
    const X: u64 = 0x50_0000;
    let (vm, _h) = vm_with(ept(bugs));
    let mut v = vm.create_vcpu().unwrap();
    access(&mut v, X, false).unwrap();
    access(&mut v, X, false).unwrap();
    vm.set_memory_region(&region(3, X, 0x1000, RAM_HVA, 0)).unwrap();
    let (seen, _) = access(&mut v, X, false).unwrap();
    (seen != Seen::Ram(ram(0))).then(|| Harm {
        gpa: X,
        expected: format!("RAM {:?} of the slot created before the access began", ram(0)),
        seen: format!("{seen:?}"),
    })
}

// ---------------------------------------------------------------------------------------------
// sticky-caching-disable
// ---------------------------------------------------------------------------------------------

/// EPT on a host with MAXPHYADDR 52: the NPT default masks at load disable MMIO caching (no
/// reserved PA bit), and the EPT masks set next need none, so caching must be on again
/// (c3e0c8c2e8b1).
///
/// Harm: the second access to an MMIO gpa takes an EPT violation and the slow path again (no MMIO
/// SPTE was ever installed) instead of the cheap misconfiguration exit KVM's caching gives.
pub fn catch_sticky_caching_disable(bugs: BugSet) -> Option<Harm> {
    const X: u64 = 0x1_0000_0000;
    let mut cfg = VmConfig::new(FormatKind::Ept, 52).unwrap();
    cfg.bugs = bugs;
    let (vm, _h) = vm_with(cfg);
    let mut v = vm.create_vcpu().unwrap();
    let (first, _) = access(&mut v, X, false).unwrap();
    assert_eq!(first, Seen::Mmio(EmulateSource::SlowPathMmio), "X is MMIO");
    let (second, faults) = access(&mut v, X, false).unwrap();
    (second == Seen::Mmio(EmulateSource::SlowPathMmio)).then(|| Harm {
        gpa: X,
        expected: "an MMIO SPTE hit (misconfig exit, fast path): caching is possible with EPT"
            .to_string(),
        seen: format!(
            "{second:?} after {faults:?}; MMIO SPTEs installed: {}; caching off: {:?}",
            v.stats.pf_mmio_spte_created,
            vm.mmio_caching().reason()
        ),
    })
}

// ---------------------------------------------------------------------------------------------
// zapped-spte-is-misconfig
// ---------------------------------------------------------------------------------------------

/// A vCPU takes a misconfiguration exit on the MMIO SPTE of X; before its handler runs, the VMM
/// deletes an unrelated slot, and the zap-all quirk (KVM_X86_QUIRK_SLOT_ZAP_ALL) zaps every root.
/// The handler's lockless walk then finds the entry zapped.
///
/// Harm: the access ends the vCPU's run with a misconfiguration error (KVM: -EINVAL from
/// KVM_RUN) for an ordinary MMIO gpa, instead of a retry and then MMIO emulation (ce88decffd17).
pub fn catch_zapped_spte_is_misconfig(bugs: BugSet) -> Option<Harm> {
    const X: u64 = 0x70_0000;
    const Y: u64 = 0x70_1000;
    let mut cfg = ept(bugs);
    cfg.slot_zap_all = true;
    let (vm, _h) = vm_with(cfg);
    vm.set_memory_region(&region(1, 0x10_0000, 0x1000, RAM_HVA, 0)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    access(&mut v, X, false).unwrap();
    // The per-vCPU cache moves to Y, so an exit on X needs the walk.
    access(&mut v, Y, false).unwrap();
    v.service_requests().unwrap();
    let walk = v.enter_guest().unwrap().walk(Gpa(X), Access::NONE);
    assert!(matches!(walk, HwWalk::Misconfig { .. }), "setup: {walk:?}");
    vm.set_memory_region(&region(1, 0, 0, 0, 0)).unwrap();
    match v.handle_ept_misconfig(Gpa(X)) {
        Err(e) => {
            return Some(Harm {
                gpa: X,
                expected: "a retry, then MMIO emulation (X has no slot before or after)"
                    .to_string(),
                seen: format!("the exit failed the vCPU's run: {e}"),
            })
        }
        Ok(FaultOutcome::Retry(_) | FaultOutcome::Emulate { .. }) => {}
        Ok(o) => panic!("unexpected outcome {o:?}"),
    }
    let (seen, _) = access(&mut v, X, false).unwrap();
    (!matches!(seen, Seen::Mmio(_))).then(|| Harm {
        gpa: X,
        expected: "MMIO emulation".to_string(),
        seen: format!("{seen:?}"),
    })
}

// ---------------------------------------------------------------------------------------------
// no-stale-root-check (invariant test, not a catcher)
// ---------------------------------------------------------------------------------------------

/// INVARIANT TEST (a955cad84cda, 18c841e1f411): a fault on a root that `zap_all_fast` obsoleted,
/// by a vCPU that has not serviced its request yet, retries and installs nothing, so the
/// obsoleted root maps nothing after `zap_all_fast` returned; the same for a root without a page
/// while the request is pending. No access can observe the bug here (`src/bugs.rs`).
pub fn invariant_obsolete_root_gains_no_mapping(bugs: BugSet) -> Option<Broken> {
    const S: u64 = 0x10_0000;
    let invariant = "a fault retries on a root that zap_all_fast obsoleted, installing nothing";
    let (vm, _h) = vm_with(ept(bugs));
    vm.set_memory_region(&region(0, S, 0x1000, RAM_HVA, 0)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    v.service_requests().unwrap();
    let root = v.root().unwrap().clone();
    vm.zap_all_fast();
    assert!(root.is_obsolete());
    let o = v.handle_ept_violation(Gpa(S), FaultAccess::READ).unwrap();
    let fmt = vm.core().config().format;
    // SAFETY: single-threaded; the vCPU keeps `root`, and nothing frees its pages during the walk.
    let w = unsafe {
        hw_walk(&fmt, &**vm.core().host(), root.pfn(), root.level(), Gfn(S >> 12), Access::NONE)
    };
    if let HwWalk::Translated { pfn, .. } = w {
        return Some(Broken {
            invariant,
            seen: format!("the fault ended as {o:?} and the obsoleted root maps {S:#x} to {pfn:?}"),
        });
    }
    // A root without a page (KVM's special roots): obsolete while the request is pending.
    let mut v2 = vm.create_vcpu().unwrap();
    v2.service_requests().unwrap();
    v2.load_pageless_root().unwrap();
    vm.zap_all_fast();
    let o = v2.handle_ept_violation(Gpa(S), FaultAccess::READ).unwrap();
    (!matches!(o, FaultOutcome::Retry(_))).then(|| Broken {
        invariant,
        seen: format!("a fault on a root without a page, reload pending, ended as {o:?}"),
    })
}

// ---------------------------------------------------------------------------------------------
// invalid-slot-as-mmio
// ---------------------------------------------------------------------------------------------

/// A MOVE of a 4-page slot by 2 pages: its new range overlaps its old one (KVM allows a slot to
/// overlap its own old range), so gpa X is RAM before the move (page 2 of the slot) and after it
/// (page 0). A vCPU accesses X after the invalid copy was published and zapped, before the slot
/// is installed at its new place.
///
/// Harm: the access is emulated as MMIO: neither the old state nor the new one (e0c378684b65 makes
/// it retry until the move is done).
pub fn catch_invalid_slot_as_mmio(bugs: BugSet) -> Option<Harm> {
    const BASE: u64 = 0x10_0000;
    const X: u64 = BASE + 0x2008;
    let (vm, _h) = vm_with(ept(bugs));
    vm.set_memory_region(&region(0, BASE, 0x4000, RAM_HVA, 0)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    let (seen, _) = access(&mut v, X, false).unwrap();
    assert_eq!(seen, Seen::Ram(ram(2)), "setup: X is page 2 of the slot");
    let mut in_window = None;
    let change = update_with_window(&vm, &region(0, BASE + 0x2000, 0x4000, RAM_HVA, 0), |p| {
        if p == Point::Flushed {
            in_window = Some(step(&mut v, X));
        }
    });
    assert_eq!(change, MemslotChange::Move);
    let got = in_window.expect("the move flushed");
    if let Ok(Step::Fault(FaultOutcome::Emulate { source, .. })) = got {
        return Some(Harm {
            gpa: X,
            expected: format!(
                "RAM ({:?} before the move, {:?} after it) or a retry while it is in flux",
                ram(2),
                ram(0)
            ),
            seen: format!("emulated as MMIO ({source:?}) during the move"),
        });
    }
    let (seen, _) = access(&mut v, X, false).unwrap();
    (seen != Seen::Ram(ram(0))).then(|| Harm {
        gpa: X,
        expected: format!("RAM {:?} after the move returned", ram(0)),
        seen: format!("{seen:?}"),
    })
}

// ---------------------------------------------------------------------------------------------
// no-tlb-flush-on-zap
// ---------------------------------------------------------------------------------------------

enum Cmd {
    Read(u64),
    Stop,
}

/// A read by a vCPU in guest mode with a TLB (gfn -> frame), as the hardware does it; on a fault
/// it exits, handles it and enters again.
fn tlb_read(v: &mut Vcpu<TestHost>, tlb: &mut HashMap<u64, Pfn>, gpa: u64) -> Seen {
    for _ in 0..100 {
        if let Some(pfn) = tlb.get(&(gpa >> 12)) {
            return Seen::Ram(*pfn);
        }
        let o = match v.walk(Gpa(gpa), Access::NONE) {
            HwWalk::Translated { pfn, .. } => {
                tlb.insert(gpa >> 12, pfn);
                return Seen::Ram(pfn);
            }
            HwWalk::Violation { .. } => {
                v.exit_guest_mode();
                v.handle_ept_violation(Gpa(gpa), FaultAccess::READ).unwrap()
            }
            HwWalk::Misconfig { .. } => {
                v.exit_guest_mode();
                v.handle_ept_misconfig(Gpa(gpa)).unwrap()
            }
            HwWalk::Broken { dump } => panic!("broken walk {dump:?}"),
        };
        enter(v, tlb);
        if let FaultOutcome::Emulate { source, .. } = o {
            return Seen::Mmio(source);
        }
    }
    panic!("read of {gpa:#x} did not complete");
}

/// Services requests (a TLB flush empties `tlb`) until the vCPU is in guest mode.
fn enter(v: &mut Vcpu<TestHost>, tlb: &mut HashMap<u64, Pfn>) {
    loop {
        if v.service_requests().unwrap().flush_tlb {
            tlb.clear();
        }
        if v.enter_guest_mode().is_ok() {
            return;
        }
    }
}

/// A vCPU thread reads X (its TLB caches the slot's frame), then the VMM deletes the slot, then
/// the vCPU reads X again. The vCPU leaves guest mode between commands (a VM exit keeps the TLB;
/// only a flush empties it), so the delete's waits always complete.
///
/// Harm: the read that began after the delete returned gets the deleted slot's frame from the TLB
/// (the zap removed the leaf but nobody flushed), instead of MMIO emulation.
pub fn catch_no_tlb_flush_on_zap(bugs: BugSet) -> Option<Harm> {
    const X: u64 = 0x10_0000;
    let (vm, _h) = vm_with(ept(bugs));
    vm.set_memory_region(&region(0, X, 0x1000, RAM_HVA + 0x5000, 0)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    let (cmd_tx, cmd_rx) = mpsc::channel::<Cmd>();
    let (seen_tx, seen_rx) = mpsc::channel::<Seen>();
    let t = std::thread::spawn(move || {
        let mut tlb = HashMap::new();
        loop {
            enter(&mut v, &mut tlb);
            match cmd_rx.try_recv() {
                Ok(Cmd::Read(gpa)) => seen_tx.send(tlb_read(&mut v, &mut tlb, gpa)).unwrap(),
                Ok(Cmd::Stop) | Err(mpsc::TryRecvError::Disconnected) => {
                    v.exit_guest_mode();
                    return;
                }
                Err(mpsc::TryRecvError::Empty) => std::thread::yield_now(),
            }
            v.exit_guest_mode();
        }
    });
    cmd_tx.send(Cmd::Read(X)).unwrap();
    let before = seen_rx.recv().unwrap();
    assert_eq!(before, Seen::Ram(ram(5)), "setup: X is RAM");
    vm.set_memory_region(&region(0, X, 0, 0, 0)).unwrap();
    cmd_tx.send(Cmd::Read(X)).unwrap();
    let after = seen_rx.recv().unwrap();
    cmd_tx.send(Cmd::Stop).unwrap();
    t.join().unwrap();
    (after != Seen::Mmio(EmulateSource::SlowPathMmio)).then(|| Harm {
        gpa: X,
        expected: "MMIO emulation: the slot was deleted before the read began".to_string(),
        seen: format!("{after:?}: the deleted slot's frame, from the vCPU's TLB"),
    })
}

// ---------------------------------------------------------------------------------------------
// mmio-over-present-spte
// ---------------------------------------------------------------------------------------------

/// Issue 11 defect 1, the interleaving KVM's aad885e77496 closes. vCPU A reads X while no slot
/// covers it; its fault decides "MMIO" from that memslot set and is parked (a preemption point,
/// `vmmu::testing::preempt`) before it installs. Meanwhile the VMM creates a slot at X (the
/// create publishes its set, then waits for A's read section) and vCPU B reads X: RAM, which B's
/// TLB caches. A then installs its decision. After the create returns, the VMM deletes the slot
/// and B reads X again.
///
/// Harm: B reads the deleted slot's frame from its TLB, because A's MMIO SPTE replaced B's leaf
/// without a flush, and the delete found nothing present to flush.
pub fn catch_mmio_over_present_spte(bugs: BugSet) -> Option<Harm> {
    use vmmu::host::PreemptPoint;
    const X: u64 = 0x10_0000;
    let (vm, _h) = vm_with(ept(bugs));
    let mut a = vm.create_vcpu().unwrap();
    let mut b = vm.create_vcpu().unwrap();
    let (decided_tx, decided_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let thread_a = std::thread::spawn(move || {
        // Parks A once, at its first fault's decision.
        park_once_at(PreemptPoint::FaultDecided, decided_tx, go_rx);
        let mut tlb = HashMap::new();
        enter(&mut a, &mut tlb);
        let seen = tlb_read(&mut a, &mut tlb, X);
        a.exit_guest_mode();
        vmmu::testing::preempt::on_this_thread(None);
        seen
    });
    decided_rx.recv().unwrap();
    // The create's set is published (with its in-progress generation) before it waits for A.
    let updater = update_published(&vm, region(0, X, 0x1000, RAM_HVA + 0x5000, 0));
    let mut tlb_b = HashMap::new();
    enter(&mut b, &mut tlb_b);
    let first = tlb_read(&mut b, &mut tlb_b, X);
    b.exit_guest_mode();
    assert_eq!(first, Seen::Ram(ram(5)), "setup: B maps the new slot");
    go_tx.send(()).unwrap();
    let seen_a = thread_a.join().unwrap();
    updater.join().unwrap();
    vm.set_memory_region(&region(0, X, 0, 0, 0)).unwrap();
    enter(&mut b, &mut tlb_b);
    let after = tlb_read(&mut b, &mut tlb_b, X);
    b.exit_guest_mode();
    (after != Seen::Mmio(EmulateSource::SlowPathMmio)).then(|| Harm {
        gpa: X,
        expected: "MMIO emulation: the slot was deleted before the read began".to_string(),
        seen: format!(
            "{after:?}: the deleted slot's frame, from B's TLB (A's parked fault saw {seen_a:?})"
        ),
    })
}

// ---------------------------------------------------------------------------------------------
// dirty-log-no-flush
// ---------------------------------------------------------------------------------------------

/// A write by a vCPU with a TLB that caches the write right: it hits the TLB when the cached
/// translation allows it, else walks and faults like the hardware. Returns whether it faulted.
fn tlb_write(v: &mut Vcpu<TestHost>, tlb: &mut HashMap<u64, (Pfn, bool)>, gpa: u64) -> bool {
    let mut faulted = false;
    for _ in 0..100 {
        if v.service_requests().unwrap().flush_tlb {
            tlb.clear();
        }
        if tlb.get(&(gpa >> 12)).is_some_and(|&(_, w)| w) {
            return faulted;
        }
        let walk = match v.enter_guest() {
            Ok(g) => g.walk(Gpa(gpa), Access::WRITE),
            Err(_) => continue,
        };
        match walk {
            HwWalk::Translated { pfn, perms, .. } => {
                tlb.insert(gpa >> 12, (pfn, perms.contains(Access::WRITE)));
                return faulted;
            }
            HwWalk::Violation { .. } => {
                faulted = true;
                v.handle_ept_violation(Gpa(gpa), FaultAccess::WRITE).unwrap();
            }
            other => panic!("unexpected walk {other:?}"),
        }
    }
    panic!("write to {gpa:#x} did not complete");
}

/// A vCPU writes page 3 of a dirty-logged slot (its TLB caches the writable translation); the
/// VMM collects the log (KVM_GET_DIRTY_LOG, auto mode: page 3 is taken and write-protected);
/// the vCPU writes page 3 again; the VMM collects again.
///
/// Harm: the second write went through the stale writable TLB entry (no flush after the
/// re-protect), did not fault, and is in no collection: a lost dirty page.
pub fn catch_dirty_log_no_flush(bugs: BugSet) -> Option<Harm> {
    const X: u64 = 0x10_0000;
    let log = vmmu::memslot::KVM_MEM_LOG_DIRTY_PAGES;
    let (vm, _h) = vm_with(ept(bugs));
    vm.set_memory_region(&region(1, X, 0x10000, RAM_HVA, log)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    let mut tlb = HashMap::new();
    let get = || {
        let b = vm.get_dirty_log(AsId(0), vmmu::SlotId(1)).unwrap();
        vmmu::dirty::pages_of(&b).collect::<Vec<_>>()
    };
    tlb_write(&mut v, &mut tlb, X + 0x3000);
    assert_eq!(get(), [3], "setup: the first write is logged");
    tlb_write(&mut v, &mut tlb, X + 0x3008);
    let second = get();
    (second != [3]).then(|| Harm {
        gpa: X + 0x3008,
        expected: "the write after the collection is in the next collection (page 3)".into(),
        seen: format!("next collection {second:?}: the write went through a stale TLB entry"),
    })
}
