//! One MMIO access resolved five ways (issue 8, row group 1), on the core's test host:
//!
//! - `fast_path`: EPT misconfiguration on an installed MMIO SPTE; one gfn more than the per-vCPU
//!   cache holds, 16 KiB apart (all in one entry of the direct-mapped cache), cycled, so that
//!   cache always misses and every call takes the lockless walk (answered by the vCPU's
//!   leaf-table cache, inside a table read section);
//! - `fast_path_type_stable`: the same on a test host that declares its table memory
//!   type-stable, so the leaf-table cache hit takes no read section;
//! - `cache_hit`: the same gfn again (per-vCPU MMIO info cache);
//! - `slow_path_caching_off`: EPT violation on a gfn with no slot, in a VM without MMIO SPTEs;
//! - `btreemap_baseline`: what Rust VMMs do per MMIO exit, a `BTreeMap` range lookup behind an
//!   `RwLock` over 64 device ranges.
//!
//! `cargo bench -p vmmu --bench mmio_path`. `vmmu bench` measures the same on the software
//! machine's host and prints the ratios.

use criterion::{criterion_group, criterion_main, Criterion};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::RwLock;
use std::time::Duration;
use vmmu::fault::{EmulateSource, FaultOutcome};
use vmmu::memslot::UserspaceMemoryRegion;
use vmmu::spte::FormatKind;
use vmmu::sync::Arc;
use vmmu::testing::TestHost;
use vmmu::vcpu::Vcpu;
use vmmu::vm::{Vm, VmConfig};
use vmmu::{FaultAccess, Gpa};

const A: Gpa = Gpa(0x1_0000_0000);
const B: Gpa = Gpa(0x1_0000_1000);
/// MMIO gfns of the fast-path rows: one more than the per-vCPU cache holds, 16 KiB apart.
const CYCLE: usize = vmmu::vcpu::mmio_cache::ENTRIES + 1;

fn cycle_gpa(i: usize) -> Gpa {
    Gpa(A.0 + i as u64 * 0x4000)
}

fn vcpu(caching: bool) -> (Vm<TestHost>, Vcpu<TestHost>) {
    vcpu_on(caching, TestHost::new(64))
}

fn vcpu_on(caching: bool, host: TestHost) -> (Vm<TestHost>, Vcpu<TestHost>) {
    let mut c = VmConfig::new(FormatKind::Ept, 46).expect("config");
    c.mmio_caching = caching;
    c.max_vcpus = 1;
    let vm = Vm::new(c, Arc::new(host)).expect("vm");
    for i in 0..10u64 {
        let r = UserspaceMemoryRegion {
            slot: i as u32,
            flags: 0,
            guest_phys_addr: i << 28,
            memory_size: 2 << 20,
            userspace_addr: 0x1000_0000_0000 + (i << 21),
        };
        vm.set_memory_region(&r).expect("slot");
    }
    let mut v = vm.create_vcpu().expect("vcpu");
    v.service_requests().expect("root");
    for g in [A, B].into_iter().chain((0..CYCLE).map(cycle_gpa)) {
        v.handle_ept_violation(g, FaultAccess::READ).expect("install");
    }
    (vm, v)
}

/// Times the fast path on `v`, cycling [`CYCLE`] gfns, after checking that each call takes it.
fn fast_path(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    v: &mut Vcpu<TestHost>,
) {
    let mut i = 0;
    for _ in 0..2 * CYCLE {
        i = (i + 1) % CYCLE;
        assert_eq!(source(v.handle_ept_misconfig(cycle_gpa(i))), Some(EmulateSource::MmioSpteHit));
    }
    g.bench_function(name, |b| {
        b.iter(|| {
            i = (i + 1) % CYCLE;
            black_box(v.handle_ept_misconfig(black_box(cycle_gpa(i))))
        })
    });
}

fn source(o: Result<FaultOutcome, vmmu::fault::FaultError>) -> Option<EmulateSource> {
    match o {
        Ok(FaultOutcome::Emulate { source, .. }) => Some(source),
        _ => None,
    }
}

fn mmio(c: &mut Criterion) {
    let mut g = c.benchmark_group("mmio");
    let (_vm, mut on) = vcpu(true);
    fast_path(&mut g, "fast_path", &mut on);
    let (_vm_stable, mut stable) = vcpu_on(true, TestHost::new_type_stable(64));
    fast_path(&mut g, "fast_path_type_stable", &mut stable);
    let mut flip = false;
    on.handle_ept_misconfig(A).expect("fill");
    assert_eq!(source(on.handle_ept_misconfig(A)), Some(EmulateSource::VcpuCacheHit));
    g.bench_function("cache_hit", |b| b.iter(|| black_box(on.handle_ept_misconfig(black_box(A)))));
    let (_vm2, mut off) = vcpu(false);
    assert_eq!(
        source(off.handle_ept_violation(A, FaultAccess::READ)),
        Some(EmulateSource::SlowPathMmio)
    );
    g.bench_function("slow_path_caching_off", |b| {
        b.iter(|| {
            flip = !flip;
            black_box(
                off.handle_ept_violation(black_box(if flip { A } else { B }), FaultAccess::READ),
            )
        })
    });
    let bus: RwLock<BTreeMap<u64, (u64, u32)>> =
        RwLock::new((0..64u32).map(|i| (A.0 + u64::from(i) * 0x10000, (0x1000, i))).collect());
    let (p, q) = (A.0 + 10 * 0x10000 + 8, A.0 + 50 * 0x10000 + 8);
    g.bench_function("btreemap_baseline", |b| {
        b.iter(|| {
            flip = !flip;
            let addr = black_box(if flip { p } else { q });
            let m = bus.read().expect("bus lock");
            black_box(
                m.range(..=addr)
                    .next_back()
                    .filter(|(base, (len, _))| addr - **base < *len)
                    .map(|(_, d)| d.1),
            )
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    targets = mmio
}
criterion_main!(benches);
