//! Group 5: demand faults over host memory that is already populated: each fault is an EPT
//! violation (write) on a gfn nothing maps yet, resolved by the slow path (memslot lookup, host
//! translation, table allocation as needed, leaf install) to `Fixed`.
//!
//! The host buffer (256 MiB) is written once before any fault, so no fault pays for host page
//! allocation. Several slots alias it to give each thread a large, disjoint guest range: for
//! 4 KiB faults the slots start 4 KiB off the 2 MiB congruence (the host cannot back a 2 MiB
//! leaf), for 2 MiB faults they are congruent and every fault maps one 2 MiB leaf. Between rounds
//! the slots are deleted (zapped) and created again, outside the timed part. With 2 threads each
//! vCPU thread is pinned to its own CPU and faults its own slots; the rate is per thread.

use crate::table::{Row, Unit};
use crate::timing::{cpus, pin};
use crate::{region, set, BenchError, Options};
use std::sync::{Arc, Barrier};
use std::time::Instant;
use vmmu::fault::FaultOutcome;
use vmmu::{FaultAccess, Gpa};
use vmmu_sim::host::{HostBuffer, SimHost};

const G: &str = "faults";
const BUF: u64 = 256 << 20;
const TARGET: f64 = 10.0;

/// One configuration's result: faults per second per thread, in millions.
fn demand(
    host: &Arc<SimHost>,
    buf: &HostBuffer,
    huge: bool,
    threads: usize,
    slots_per_thread: u32,
    rounds: usize,
) -> Result<f64, BenchError> {
    let vm = crate::vm(host, true, threads, false)?;
    let (size, hva, step) = if huge {
        (BUF, buf.hva().raw(), 2u64 << 20)
    } else {
        (BUF - (2 << 20), buf.hva().raw() + 4096, 4096)
    };
    let nslots = slots_per_thread * threads as u32;
    let gpa_of = |slot: u32| (u64::from(slot) + 1) << 32;
    let create = |vm: &vmmu::vm::Vm<SimHost>| -> Result<(), BenchError> {
        for s in 0..nslots {
            set(vm, &region(s, 0, gpa_of(s), size, hva))?;
        }
        Ok(())
    };
    let mut per_thread = vec![(0u64, 0f64); threads];
    create(&vm)?;
    let mut vcpus = Vec::new();
    for _ in 0..threads {
        vcpus.push(vm.create_vcpu()?);
    }
    for round in 0..rounds {
        if round > 0 {
            for s in 0..nslots {
                set(&vm, &region(s, 0, gpa_of(s), 0, 0))?;
            }
            vm.reclaim();
            create(&vm)?;
        }
        let barrier = Barrier::new(threads);
        let results: Vec<Result<(u64, f64), String>> = std::thread::scope(|sc| {
            let handles: Vec<_> = vcpus
                .iter_mut()
                .enumerate()
                .map(|(t, v)| {
                    let barrier = &barrier;
                    sc.spawn(move || {
                        if threads > 1 && cpus() >= threads {
                            pin(t)?;
                        }
                        v.service_requests().map_err(|e| e.to_string())?;
                        barrier.wait();
                        let t0 = Instant::now();
                        let mut n = 0u64;
                        let mut retries = 0u32;
                        for k in 0..slots_per_thread {
                            let base = gpa_of(t as u32 * slots_per_thread + k);
                            let mut off = 0;
                            while off < size {
                                match v.handle_ept_violation(Gpa(base + off), FaultAccess::WRITE) {
                                    Ok(FaultOutcome::Fixed) => n += 1,
                                    // Fault again, as the vCPU would (counted once it is fixed).
                                    Ok(FaultOutcome::Retry(_)) if retries < 16 => {
                                        retries += 1;
                                        continue;
                                    }
                                    other => return Err(format!("round {round}, fault at {:#x}: {other:?} after {n} faults; {:?}", base + off, v.stats)),
                                }
                                off += step;
                                retries = 0;
                            }
                        }
                        Ok((n, t0.elapsed().as_secs_f64()))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err("fault thread panicked".into())))
                .collect()
        });
        for (t, r) in results.into_iter().enumerate() {
            let (n, secs) = r.map_err(BenchError::Harness)?;
            per_thread[t].0 += n;
            per_thread[t].1 += secs;
        }
    }
    let rates: Vec<f64> = per_thread.iter().map(|(n, s)| *n as f64 / s / 1e6).collect();
    Ok(rates.iter().sum::<f64>() / rates.len() as f64)
}

/// The group's rows.
pub fn run(opts: &Options) -> Result<Vec<Row>, BenchError> {
    let host = crate::sim_host(1 << 20)?;
    let buf = host.add_buffer("ram", BUF)?;
    buf.fill_words(|o| o);
    let rounds = opts.n(2, 8);
    let mut rows = Vec::new();
    for (huge, label, slots) in [(false, "4 KiB", 1), (true, "2 MiB", 32)] {
        let one = demand(&host, &buf, huge, 1, slots, rounds)?;
        rows.push(
            Row::new(G, format!("demand faults {label}, 1 thread"), Unit::MPerS, one)
                .ratio(one / TARGET, "x target")
                .target(">= 10 M/s per thread", one >= TARGET),
        );
        let two = demand(&host, &buf, huge, 2, slots, rounds)?;
        rows.push(
            Row::new(G, format!("demand faults {label}, 2 threads (per thread)"), Unit::MPerS, two)
                .ratio(two / one, "x 1 thread")
                .target(">= 10 M/s per thread", two >= TARGET),
        );
    }
    Ok(rows)
}
