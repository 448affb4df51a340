//! Catcher of `no-flush-on-table-unlink`: the hardware's paging-structure caches keep the
//! entries that link tables, so a table may be freed only after every CPU was flushed. The vCPU
//! here runs on a model of a PDE cache (as the software machine's hardware does), emptied when
//! its entry work says to flush its TLB.

use super::Harm;
use crate::common::{region, vm_with, RAM_HVA};
use std::collections::HashMap;
use vmmu::bugs::BugSet;
use vmmu::fault::FaultOutcome;
use vmmu::tdp::{hw_walk, hw_walk_leaf_table, HwWalk};
use vmmu::testing::TestHost;
use vmmu::vcpu::Vcpu;
use vmmu::vm::Vm;
use vmmu::{Access, AsId, FaultAccess, Gfn, Gpa, Level, Pfn};

/// What a read ended as.
#[derive(Clone, PartialEq, Eq, Debug)]
enum Read {
    Ram(Pfn),
    Mmio,
    Failed(String),
    /// Twenty exits and no end (the same fault again and again).
    NoProgress,
}

/// A vCPU and its PDE cache: 2 MiB region -> level-1 table.
struct PdeCachingVcpu {
    v: Vcpu<TestHost>,
    pde_cache: HashMap<u64, Pfn>,
}

impl PdeCachingVcpu {
    fn enter(&mut self) {
        loop {
            if self.v.service_requests().expect("a root").flush_tlb {
                self.pde_cache.clear();
            }
            if self.v.enter_guest_mode().is_ok() {
                return;
            }
        }
    }

    fn read(&mut self, vm: &Vm<TestHost>, gfn: u64) -> Read {
        let mmu = vm.core();
        let fmt = mmu.config().format;
        let host: &TestHost = mmu.host();
        for _ in 0..20 {
            self.enter();
            let root = self.v.root().map(|r| (r.pfn(), r.level())).expect("a root");
            let walk = match self.pde_cache.get(&(gfn >> 9)) {
                // SAFETY: in guest mode (the table read section is open). The test host never
                // unmaps a frame: one freed under the cache stays readable (and is counted as a
                // use after free), so even the bug this catches cannot make this read unsound.
                Some(&t) => unsafe { hw_walk(&fmt, host, t, Level::L4K, Gfn(gfn), Access::NONE) },
                None => {
                    // SAFETY: in guest mode, from the vCPU's current root.
                    let (w, t) = unsafe {
                        hw_walk_leaf_table(&fmt, host, root.0, root.1, Gfn(gfn), Access::NONE)
                    };
                    if let Some(t) = t {
                        self.pde_cache.insert(gfn >> 9, t);
                    }
                    w
                }
            };
            self.v.exit_guest_mode();
            let gpa = Gpa(gfn << 12);
            let o = match walk {
                HwWalk::Translated { pfn, .. } => return Read::Ram(pfn),
                HwWalk::Violation { .. } => self.v.handle_ept_violation(gpa, FaultAccess::READ),
                HwWalk::Misconfig { .. } => self.v.handle_ept_misconfig(gpa),
                HwWalk::Broken { dump } => return Read::Failed(format!("broken walk {dump:?}")),
            };
            match o {
                Ok(FaultOutcome::Emulate { .. }) => return Read::Mmio,
                Ok(_) => {}
                Err(e) => return Read::Failed(e.to_string()),
            }
        }
        Read::NoProgress
    }
}

/// Gfn X has no slot: a read installs its MMIO SPTE (level-1 table T), and the next read's walk
/// puts T in the vCPU's PDE cache. A zap of X's 2 MiB unlinks T, which holds nothing present,
/// and frees it after the grace period; an MMIO fault on Y, in the next 2 MiB at the same index,
/// reuses T's frame for Y's table. Then a slot makes X RAM and the vCPU reads X.
///
/// Harm: with no flush for the unlink, the PDE cache still sends X's walks to T, now Y's table:
/// X exits as an MMIO misconfiguration on every try and never reaches its RAM.
pub fn catch_no_flush_on_table_unlink(bugs: BugSet) -> Option<Harm> {
    const X: u64 = 0x1_0000;
    const Y: u64 = X + 512;
    let (vm, host) = vm_with(super::ept(bugs));
    let mut v = PdeCachingVcpu { v: vm.create_vcpu().unwrap(), pde_cache: HashMap::new() };
    assert_eq!(v.read(&vm, X), Read::Mmio, "setup: X has no slot");
    assert_eq!(v.read(&vm, X), Read::Mmio, "setup: X's MMIO SPTE");
    assert!(v.pde_cache.contains_key(&(X >> 9)), "setup: the walk cached X's table");
    let base = X & !511;
    vm.zap_gfn_range_for_tests(AsId(0), Gfn(base), Gfn(base + 512));
    assert_eq!(v.read(&vm, Y), Read::Mmio, "setup: Y has no slot");
    vm.set_memory_region(&region(0, X << 12, 0x1000, RAM_HVA + 0x7000, 0)).unwrap();
    let seen = v.read(&vm, X);
    let want = Read::Ram(Pfn((RAM_HVA >> 12) + 7));
    (seen != want || host.use_after_free() != 0).then(|| Harm {
        gpa: X << 12,
        expected: format!("{want:?}: the slot at X was created before the read"),
        seen: format!(
            "{seen:?} ({} reads of freed table frames): the PDE cache kept the unlinked table",
            host.use_after_free()
        ),
    })
}
