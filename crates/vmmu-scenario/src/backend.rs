//! What a backend implements, and the one driver that runs a scenario on it.
//!
//! A [`Backend`] turns a parsed [`Scenario`] into a running [`Machine`] (or declines with a
//! reason: a skipped scenario). The driver [`run`] then walks the steps in order, calls the
//! machine once per step with typed arguments, and builds the [`Observation`]s itself: step
//! numbering, which steps are observed and the current `mmio-reply` value live here, so every
//! backend's stream has the same shape and `diff` can compare them line by line.
//!
//! A machine method returns `Err` only for a problem of the backend itself (the guest stopped,
//! the host refused something the scenario did not ask for); what KVM's rules say about a
//! request is an `Ok` observation. The driver stops at the first error and names the step.

use crate::observation::{DirtyLogResult, Observation, ReadExit, SlotResult, WriteExit};
use crate::step::{
    ClearDirtyLogOp, Cr3Op, DirtyLogOp, HostReadOp, HostWriteOp, MapOp, MemDecl, MemId, Op, ReadOp,
    Scenario, SlotOp, Step, UnmapOp, WriteOp,
};
use core::ops::ControlFlow;

/// A backend could not do what a step needed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The backend cannot run at all here (no usable `/dev/kvm`, not built yet, ...).
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// Something went wrong while running.
    #[error("{0}")]
    Failed(String),
    /// Something went wrong while running, with the underlying error.
    #[error(transparent)]
    Other(Box<dyn std::error::Error + Send + Sync>),
}

/// A scenario that stopped: the step it stopped at, and why.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The backend could not start the scenario.
    #[error("{backend} backend could not start: {source}")]
    Start {
        /// The backend's name.
        backend: String,
        /// Why.
        #[source]
        source: BackendError,
    },
    /// A step failed inside the backend.
    #[error("{backend} backend failed at step {step} (line {line}, `{keyword}`): {source}")]
    Step {
        /// The backend's name.
        backend: String,
        /// The step number.
        step: u32,
        /// Its line in the file.
        line: u32,
        /// The step's keyword.
        keyword: &'static str,
        /// Why.
        #[source]
        source: BackendError,
    },
}

impl RunError {
    /// The message without the backend's name, for a report that names the backend already
    /// (`vmmu diff`'s `FAILED FILE: CONFIG: ...`).
    pub fn unnamed(&self) -> String {
        match self {
            RunError::Start { source, .. } => format!("could not start: {source}"),
            RunError::Step { step, line, keyword, source, .. } => {
                format!("failed at step {step} (line {line}, `{keyword}`): {source}")
            }
        }
    }
}

/// What [`Backend::start`] gives back.
pub enum Start {
    /// Run the scenario on this machine.
    Run(Box<dyn Machine>),
    /// This backend cannot honour the scenario as written; the reason is printed as
    /// `{"skipped":"REASON"}` and nothing runs.
    Skip(String),
}

/// A kind of machine that can run scenarios (the simulated MMU under some configuration, real
/// `/dev/kvm`, ...).
pub trait Backend {
    /// A short name for messages (`sim`, `kvm`).
    fn name(&self) -> &str;

    /// Builds a fresh machine for `scenario` (its [`Scenario::vm`] is the effective
    /// configuration, overrides applied), or declines it with [`Start::Skip`].
    fn start(&self, scenario: &Scenario) -> Result<Start, BackendError>;
}

/// The shadow MMU's counters that KVM exports as VM statistics (`KVM_GET_STATS_FD`), cumulative
/// since the machine started. They are not observations (scenarios.md does not define them, and
/// a backend's own guest code and tables move them), but where two backends' counters part, the
/// two MMUs built or zapped different shadow pages: the place to look for an observation that
/// differs (a dirty log shows which leaves exist).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShadowCounters {
    /// Shadow pages created (`mmu_cache_miss`).
    pub mmu_cache_miss: u64,
    /// Shadow pages zapped (`mmu_shadow_zapped`).
    pub mmu_shadow_zapped: u64,
    /// Shadow pages zapped over the page limit (`mmu_recycled`).
    pub mmu_recycled: u64,
    /// Shadow pages zapped for write flooding (`mmu_flooded`).
    pub mmu_flooded: u64,
}

impl core::fmt::Display for ShadowCounters {
    /// `mmu_cache_miss=N mmu_shadow_zapped=N mmu_recycled=N mmu_flooded=N`.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "mmu_cache_miss={} mmu_shadow_zapped={} mmu_recycled={} mmu_flooded={}",
            self.mmu_cache_miss, self.mmu_shadow_zapped, self.mmu_recycled, self.mmu_flooded
        )
    }
}

/// A machine running one scenario. The driver calls one method per step, in file order.
pub trait Machine {
    /// The shadow MMU's counters now, where the machine has a shadow MMU and can read them
    /// (`None` otherwise: a TDP MMU, or a kernel without `KVM_GET_STATS_FD`).
    fn shadow_counters(&self) -> Option<ShadowCounters> {
        None
    }

    /// `mem`: make the zero-filled buffer `id` of `decl.size` bytes (whole pages).
    fn mem(&mut self, id: MemId, decl: &MemDecl) -> Result<(), BackendError>;

    /// `slot`: issue the request exactly as written; KVM's verdict is the result.
    fn slot(&mut self, op: &SlotOp) -> Result<SlotResult, BackendError>;

    /// `read`: one guest load; an MMIO read receives `mmio_reply` truncated to its length.
    fn read(&mut self, op: &ReadOp, mmio_reply: u64) -> Result<ReadExit, BackendError>;

    /// `write`: one guest store.
    fn write(&mut self, op: &WriteOp) -> Result<WriteExit, BackendError>;

    /// `host-write`: store into a buffer, little-endian, bypassing the guest.
    fn host_write(&mut self, op: &HostWriteOp) -> Result<(), BackendError>;

    /// `host-read`: load from a buffer, little-endian, bypassing the guest.
    fn host_read(&mut self, op: &HostReadOp) -> Result<u64, BackendError>;

    /// `dirty-log`: `KVM_GET_DIRTY_LOG`; the pages set, or KVM's errno.
    fn dirty_log(&mut self, op: &DirtyLogOp) -> Result<DirtyLogResult, BackendError>;

    /// `clear-dirty-log`: `KVM_CLEAR_DIRTY_LOG` with every bit of the range set; KVM's verdict.
    fn clear_dirty_log(&mut self, op: &ClearDirtyLogOp) -> Result<SlotResult, BackendError>;

    /// `map` (version 2): the guest writes one PTE of page-table space `op.space` and then
    /// invalidates the GVA on every vCPU. Backends that run guest paging implement it; the
    /// others decline paging scenarios in [`Backend::start`].
    fn map(&mut self, op: &MapOp) -> Result<(), BackendError> {
        let _ = op;
        Err(BackendError::Unavailable("this backend does not run guest paging".into()))
    }

    /// `unmap` (version 2): the guest clears one PTE, then invalidates the GVA on every vCPU.
    fn unmap(&mut self, op: &UnmapOp) -> Result<(), BackendError> {
        let _ = op;
        Err(BackendError::Unavailable("this backend does not run guest paging".into()))
    }

    /// `cr3` (version 2): the vCPU loads page-table space `op.space`.
    fn cr3(&mut self, op: &Cr3Op) -> Result<(), BackendError> {
        let _ = op;
        Err(BackendError::Unavailable("this backend does not run guest paging".into()))
    }
}

/// Runs `scenario` on `backend`, handing each observation to `sink` as soon as it is made (so a
/// failure late in a scenario still leaves the earlier observations printed).
pub fn run(
    backend: &dyn Backend,
    scenario: &Scenario,
    sink: &mut dyn FnMut(&Observation),
) -> Result<(), RunError> {
    run_counted(backend, scenario, sink, None)
}

/// What [`run_counted`] calls after each step: the step and the machine's [`ShadowCounters`].
pub type CounterSink<'a> = &'a mut dyn FnMut(&Step, Option<ShadowCounters>);

/// [`run`], and after each step (its observation handed to `sink` first) `counters` gets the
/// step and the machine's [`ShadowCounters`] (`None` where it has none).
pub fn run_counted(
    backend: &dyn Backend,
    scenario: &Scenario,
    sink: &mut dyn FnMut(&Observation),
    counters: Option<CounterSink<'_>>,
) -> Result<(), RunError> {
    let mut keep_going = |o: &Observation| {
        sink(o);
        ControlFlow::Continue(())
    };
    run_counted_while(backend, scenario, &mut keep_going, counters)
}

/// Per step of a run: (step number, line, the machine's counters after it).
pub type CounterTrail = Vec<(u32, u32, Option<ShadowCounters>)>;

/// Runs `scenario` on `backend` and keeps the counters after every step ([`run_counted`]), for
/// comparing two machines step by step (`vmmu diff --counters`, the differential tests).
pub fn counter_trail(backend: &dyn Backend, scenario: &Scenario) -> Result<CounterTrail, RunError> {
    let mut trail = Vec::new();
    let mut keep = |step: &Step, c| trail.push((step.number, step.line, c));
    run_counted(backend, scenario, &mut |_| {}, Some(&mut keep))?;
    Ok(trail)
}

/// [`run_counted`] with a `sink` that can stop the run: once it returns `ControlFlow::Break`
/// (say, the observations' reader has gone), no further step runs and the run returns `Ok`.
pub fn run_counted_while(
    backend: &dyn Backend,
    scenario: &Scenario,
    sink: &mut dyn FnMut(&Observation) -> ControlFlow<()>,
    mut counters: Option<CounterSink<'_>>,
) -> Result<(), RunError> {
    let name = backend.name();
    let mut machine = match backend.start(scenario) {
        Ok(Start::Run(m)) => m,
        Ok(Start::Skip(reason)) => {
            let _ = sink(&Observation::Skipped { reason });
            return Ok(());
        }
        Err(source) => return Err(RunError::Start { backend: name.into(), source }),
    };
    let mut mmio_reply = 0u64;
    for step in &scenario.steps {
        let obs =
            one_step(machine.as_mut(), step, &mut mmio_reply).map_err(|source| RunError::Step {
                backend: name.into(),
                step: step.number,
                line: step.line,
                keyword: step.op.keyword(),
                source,
            })?;
        let flow = obs.map_or(ControlFlow::Continue(()), |o| sink(&o));
        if let Some(c) = counters.as_mut() {
            c(step, machine.shadow_counters());
        }
        if flow.is_break() {
            break;
        }
    }
    Ok(())
}

/// [`run`], collecting the observations. On failure the error comes with those made so far.
pub fn run_collect(
    backend: &dyn Backend,
    scenario: &Scenario,
) -> Result<Vec<Observation>, (Vec<Observation>, RunError)> {
    let mut out = Vec::new();
    match run(backend, scenario, &mut |o| out.push(o.clone())) {
        Ok(()) => Ok(out),
        Err(e) => Err((out, e)),
    }
}

fn one_step(
    m: &mut dyn Machine,
    step: &Step,
    mmio_reply: &mut u64,
) -> Result<Option<Observation>, BackendError> {
    let n = step.number;
    Ok(match &step.op {
        Op::Vm(_) => None,
        Op::Mem(id, decl) => {
            m.mem(*id, decl)?;
            None
        }
        Op::Slot(op) => Some(Observation::Slot { step: n, result: m.slot(op)? }),
        Op::Read(op) => {
            let exit = m.read(op, *mmio_reply)?;
            Some(Observation::Read { step: n, exit })
        }
        Op::Write(op) => Some(Observation::Write { step: n, exit: m.write(op)? }),
        Op::HostWrite(op) => {
            m.host_write(op)?;
            None
        }
        Op::HostRead(op) => Some(Observation::HostRead { step: n, value: m.host_read(op)? }),
        Op::MmioReply(v) => {
            *mmio_reply = *v;
            None
        }
        Op::Map(op) => {
            m.map(op)?;
            None
        }
        Op::Unmap(op) => {
            m.unmap(op)?;
            None
        }
        Op::Cr3(op) => {
            m.cr3(op)?;
            None
        }
        Op::DirtyLog(op) => Some(Observation::DirtyLog { step: n, result: m.dirty_log(op)? }),
        Op::ClearDirtyLog(op) => {
            Some(Observation::ClearDirtyLog { step: n, result: m.clear_dirty_log(op)? })
        }
    })
}
