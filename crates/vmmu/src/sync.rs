//! The one synchronisation shim: every atomic, lock, cell and wait loop in the core goes through
//! here, so the same code runs normally and under [loom](https://docs.rs/loom) (`--cfg loom`).
//!
//! What lives here:
//! - re-exports of the atomic types, `fence` and `Ordering` (core's, or loom's under loom);
//! - `Arc` (alloc's, or loom's) and, outside loom, alloc's `Weak`;
//! - `UnsafeCell` with loom's closure API (`with`, `with_mut`) in both builds;
//! - `Mutex` and `RwLock`: spin locks on the shim atomics in normal builds (no_std, no OS),
//!   whose waiters wait with a [`Relax`], loom's own locks under loom. Most holds are short (the
//!   MMU lock, the shadow lock); a memslot update holds the VM's `vmm_lock` across its grace
//!   periods, and `vmm_lock` (and `mn_lock` in an update) is taken with `Mutex::lock_fair_with`,
//!   which a thread that retakes the lock at once cannot starve;
//! - [`Relax`]: how a waiter waits (grace periods, TLB-flush acknowledgements, lock spins). The
//!   host picks it: spin on bare metal, yield to the scheduler with std, loom's yield under loom.
//!
//! Contract: nothing in the core may use `core::sync::atomic` or `std::sync` directly.

/// A compiler-only fence (no instruction): the reader side of an asymmetric fence pair, whose
/// other side is a process-wide barrier (`srcu::ReaderFences::Asymmetric`). Never used under loom.
pub use core::sync::atomic::compiler_fence;
#[cfg(not(loom))]
pub use core::sync::atomic::{
    fence, AtomicBool, AtomicPtr, AtomicU16, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};
#[cfg(loom)]
pub use loom::sync::atomic::{
    fence, AtomicBool, AtomicPtr, AtomicU16, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};

/// A number no other caller of this function in the process gets: the identity of an SRCU domain,
/// so a reader record cannot be used with another domain. Not part of any modelled protocol, so
/// it is core's atomic even under loom.
pub(crate) fn next_domain_id() -> u64 {
    static NEXT: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, core::sync::atomic::Ordering::Relaxed)
}

#[cfg(not(loom))]
pub use alloc::sync::Arc;
/// `Weak` of alloc's `Arc` (loom's `Arc` has none: what uses it is not built under loom).
#[cfg(not(loom))]
pub use alloc::sync::Weak;
#[cfg(loom)]
pub use loom::sync::Arc;

/// How a thread waits for another to make progress.
pub trait Relax {
    /// Called once per iteration of a wait loop.
    fn relax(&self);
}

/// Busy-wait with the CPU's spin hint: for bare metal, where there is no scheduler.
#[derive(Clone, Copy, Debug, Default)]
pub struct Spin;

impl Relax for Spin {
    #[inline]
    fn relax(&self) {
        #[cfg(loom)]
        loom::thread::yield_now();
        #[cfg(not(loom))]
        core::hint::spin_loop();
    }
}

/// Yield to the OS scheduler (std), or to loom's scheduler under loom. The default for hosted
/// builds: on a 2-core machine with more runnable threads than cores, spinning alone can starve
/// the thread being waited for.
#[cfg(any(feature = "std", loom))]
#[derive(Clone, Copy, Debug, Default)]
pub struct Yield;

#[cfg(any(feature = "std", loom))]
impl Relax for Yield {
    #[inline]
    fn relax(&self) {
        #[cfg(loom)]
        loom::thread::yield_now();
        #[cfg(not(loom))]
        std::thread::yield_now();
    }
}

/// The relax policy used where the caller does not choose one.
#[cfg(any(feature = "std", loom))]
pub type DefaultRelax = Yield;
/// The relax policy used where the caller does not choose one.
#[cfg(not(any(feature = "std", loom)))]
pub type DefaultRelax = Spin;

/// One iteration of a wait loop with the default policy.
#[inline]
pub fn relax() {
    DefaultRelax::default().relax();
}

/// An `UnsafeCell` with loom's closure API, so accesses are tracked under loom.
#[cfg(not(loom))]
#[derive(Debug, Default)]
pub struct UnsafeCell<T>(core::cell::UnsafeCell<T>);

#[cfg(not(loom))]
impl<T> UnsafeCell<T> {
    /// A new cell.
    pub const fn new(v: T) -> Self {
        UnsafeCell(core::cell::UnsafeCell::new(v))
    }
    /// Runs `f` with a shared raw pointer to the contents.
    #[inline]
    pub fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        f(self.0.get())
    }
    /// Runs `f` with a unique raw pointer to the contents.
    #[inline]
    pub fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
    /// The contents, for an owner with `&mut self`.
    #[inline]
    pub fn get_mut(&mut self) -> &mut T {
        self.0.get_mut()
    }
}

#[cfg(loom)]
pub use loom::cell::UnsafeCell;

#[cfg(not(loom))]
mod locks {
    use super::{AtomicU32, Ordering, Relax};
    use core::cell::UnsafeCell;
    use core::ops::{Deref, DerefMut};

    /// A spin mutex. `lock` spins with the default [`Relax`] policy.
    #[derive(Debug, Default)]
    pub struct Mutex<T> {
        locked: AtomicU32,
        /// Threads in `lock_with`'s wait loop: a holder that wants to break its hold for them
        /// (KVM `cond_resched_rwlock_write`) asks [`Self::contended`]. Advisory: Relaxed.
        waiters: AtomicU32,
        /// 1 while a waiter of [`Self::lock_fair_with`] that starved has reserved the lock: from
        /// then on only it takes the lock when it is free (Linux's mutex hand-off to a starving
        /// waiter). Fairness only: mutual exclusion rests on `locked`. Relaxed.
        reserved: AtomicU32,
        value: UnsafeCell<T>,
    }

    // SAFETY: the lock hands out at most one guard at a time, so `&Mutex<T>` only ever gives one
    // thread access to the `T`; that needs `T: Send` and no more, as for `std::sync::Mutex`.
    unsafe impl<T: Send> Sync for Mutex<T> {}
    // SAFETY: moving the mutex moves the `T`.
    unsafe impl<T: Send> Send for Mutex<T> {}

    impl<T> Mutex<T> {
        /// A new unlocked mutex.
        pub const fn new(v: T) -> Self {
            Mutex {
                locked: AtomicU32::new(0),
                waiters: AtomicU32::new(0),
                reserved: AtomicU32::new(0),
                value: UnsafeCell::new(v),
            }
        }
        /// Takes the lock, spinning until it is free (with the build's default [`Relax`]).
        pub fn lock(&self) -> MutexGuard<'_, T> {
            self.lock_with(&super::DefaultRelax::default())
        }
        /// Takes the lock, waiting with `relax` (the host's policy).
        pub fn lock_with(&self, relax: &impl Relax) -> MutexGuard<'_, T> {
            self.wait(relax, Fairness::Barging)
        }
        /// [`Self::lock_with`] that cannot be starved: a waiter that has waited
        /// `STARVE_TURNS` turns of `relax` reserves the lock, and from then on no other thread
        /// takes it when it is free ([`Self::try_lock`] fails) until this waiter has. Without it
        /// a thread that drops the lock and takes it again at once (a VMM collecting dirty logs
        /// back to back) can keep a waiter out for hundreds of milliseconds; KVM's `slots_lock`,
        /// a sleeping mutex, hands itself to a waiter that starves.
        pub fn lock_fair_with(&self, relax: &impl Relax) -> MutexGuard<'_, T> {
            self.wait(relax, Fairness::HandOffWhenStarved)
        }
        /// The wait of [`Self::lock_with`] and [`Self::lock_fair_with`].
        fn wait(&self, relax: &impl Relax, fairness: Fairness) -> MutexGuard<'_, T> {
            if let Some(g) = self.try_lock() {
                return g;
            }
            self.waiters.fetch_add(1, Ordering::Relaxed);
            // Counted out when this waiter leaves, with the lock or by an unwind of `relax`.
            let _waiting = Waiting(&self.waiters);
            // Given back when this waiter leaves, with the lock or by an unwind of `relax`.
            let mut reservation: Option<Waiting<'_>> = None;
            let mut turns = 0u32;
            loop {
                if fairness == Fairness::HandOffWhenStarved
                    && reservation.is_none()
                    && turns >= STARVE_TURNS
                {
                    reservation = self
                        .reserved
                        .compare_exchange(0, 1, Ordering::Relaxed, Ordering::Relaxed)
                        .ok()
                        .map(|_| Waiting(&self.reserved));
                }
                if self.locked.load(Ordering::Relaxed) == 0 {
                    let g = if reservation.is_some() { self.take() } else { self.try_lock() };
                    if let Some(g) = g {
                        return g;
                    }
                }
                relax.relax();
                turns = turns.saturating_add(1);
            }
        }
        /// Whether a starving waiter has reserved the lock (for tests).
        #[cfg(test)]
        pub(super) fn reserved(&self) -> bool {
            self.reserved.load(Ordering::Relaxed) != 0
        }
        /// Whether another thread waits for the lock (a hint: it may change at once).
        pub fn contended(&self) -> bool {
            self.waiters.load(Ordering::Relaxed) != 0
        }
        /// After dropping a guard because [`Self::contended`] said so: spins briefly until a
        /// waiter has taken the lock, so that the next `lock` queues behind it instead of
        /// taking the lock back at once. Bounded: a waiter that is not running is not waited
        /// for.
        pub fn hand_off(&self) {
            for _ in 0..HAND_OFF_SPINS {
                if self.locked.load(Ordering::Relaxed) != 0 {
                    return;
                }
                core::hint::spin_loop();
            }
        }
        /// Takes the lock if it is free and no starving waiter of [`Self::lock_fair_with`] has
        /// reserved it.
        pub fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
            if self.reserved.load(Ordering::Relaxed) != 0 {
                return None;
            }
            self.take()
        }
        /// Takes the lock if it is free, reserved or not.
        fn take(&self) -> Option<MutexGuard<'_, T>> {
            // Acquire pairs with the Release in `MutexGuard::drop`: the previous holder's writes
            // to the value are visible to the new holder.
            self.locked
                .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
                .ok()
                .map(|_| MutexGuard { m: self, _value: core::marker::PhantomData })
        }
        /// The value, for an owner with `&mut self`.
        pub fn get_mut(&mut self) -> &mut T {
            self.value.get_mut()
        }
    }

    /// Proof of holding a `Mutex`. It gives `&mut T`, and is `Send`/`Sync` exactly as a
    /// `&mut T` is: `Sync` needs `T: Sync` (sharing the guard shares the value), which the
    /// `&Mutex<T>` alone would not require (`Mutex<T>: Sync` needs only `T: Send`).
    pub struct MutexGuard<'a, T> {
        m: &'a Mutex<T>,
        _value: core::marker::PhantomData<&'a mut T>,
    }

    impl<T> Deref for MutexGuard<'_, T> {
        type Target = T;
        fn deref(&self) -> &T {
            // SAFETY: a guard exists only while `locked` is held, and it is the only guard (a
            // guard may move to another thread, and takes the hold with it), so no `&mut` to the
            // value exists while this shared reference lives.
            unsafe { &*self.m.value.get() }
        }
    }
    impl<T> DerefMut for MutexGuard<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            // SAFETY: as in `deref`; `&mut self` makes this the only reference through the guard.
            unsafe { &mut *self.m.value.get() }
        }
    }
    impl<T> Drop for MutexGuard<'_, T> {
        fn drop(&mut self) {
            self.m.locked.store(0, Ordering::Release);
        }
    }

    const WRITER: u32 = 1 << 31;

    /// How long [`Mutex::hand_off`] waits for a waiter to take the lock: about the time a
    /// waiter's relax takes to come back (a `sched_yield` with nothing else to run, 1-2 us).
    const HAND_OFF_SPINS: u32 = 64;

    /// Whether a waiter of [`Mutex`] may reserve the lock once it starves.
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum Fairness {
        /// [`Mutex::lock_with`]: whoever finds the lock free takes it.
        Barging,
        /// [`Mutex::lock_fair_with`]: after `STARVE_TURNS` turns the waiter reserves the lock.
        HandOffWhenStarved,
    }

    /// Turns of `relax` after which a waiter of [`Mutex::lock_fair_with`] reserves the lock. An
    /// uncontended wait ends in a turn or two; one that takes this many is being barged.
    pub(super) const STARVE_TURNS: u32 = 32;

    /// A reader-writer spin lock (KVM's `mmu_lock` is an rwlock on x86). Writers set a flag that
    /// stops new readers, then wait for the readers in flight, so writers are not starved.
    #[derive(Debug, Default)]
    pub struct RwLock<T> {
        state: AtomicU32,
        value: UnsafeCell<T>,
    }

    // SAFETY: readers share `&T` across threads (needs `T: Sync`), writers get `&mut T` on any
    // thread (needs `T: Send`), as for `std::sync::RwLock`.
    unsafe impl<T: Send + Sync> Sync for RwLock<T> {}
    // SAFETY: moving the lock moves the `T`.
    unsafe impl<T: Send> Send for RwLock<T> {}

    impl<T> RwLock<T> {
        /// A new unlocked lock.
        pub const fn new(v: T) -> Self {
            RwLock { state: AtomicU32::new(0), value: UnsafeCell::new(v) }
        }
        /// Takes the lock shared (waiting with the build's default [`Relax`]).
        pub fn read(&self) -> RwLockReadGuard<'_, T> {
            self.read_with(&super::DefaultRelax::default())
        }
        /// Takes the lock shared, waiting with `relax` (the host's policy).
        pub fn read_with(&self, relax: &impl Relax) -> RwLockReadGuard<'_, T> {
            loop {
                let s = self.state.load(Ordering::Relaxed);
                if s & WRITER == 0
                    && self
                        .state
                        .compare_exchange_weak(s, s + 1, Ordering::Acquire, Ordering::Relaxed)
                        .is_ok()
                {
                    return RwLockReadGuard { l: self };
                }
                relax.relax();
            }
        }
        /// Takes the lock exclusive (waiting with the build's default [`Relax`]).
        pub fn write(&self) -> RwLockWriteGuard<'_, T> {
            self.write_with(&super::DefaultRelax::default())
        }
        /// Takes the lock exclusive, waiting with `relax` (the host's policy).
        pub fn write_with(&self, relax: &impl Relax) -> RwLockWriteGuard<'_, T> {
            // Claim the writer flag (one writer at a time), then wait for readers to drain.
            loop {
                let s = self.state.load(Ordering::Relaxed);
                if s & WRITER == 0
                    && self
                        .state
                        .compare_exchange_weak(s, s | WRITER, Ordering::Acquire, Ordering::Relaxed)
                        .is_ok()
                {
                    break;
                }
                relax.relax();
            }
            // Until the readers have drained the flag is a claim, not the lock: if `relax` (the
            // host's) unwinds meanwhile, the claim goes, the readers' counts stay, and the lock
            // is free again rather than held by nobody forever.
            let claim = WriterClaim(&self.state);
            // Acquire pairs with the readers' Release in their guard's drop.
            while self.state.load(Ordering::Acquire) != WRITER {
                relax.relax();
            }
            core::mem::forget(claim);
            RwLockWriteGuard { l: self }
        }
    }

    /// A waiter counted in a `Mutex`'s `waiters`: counted out when it goes, also by an unwind.
    struct Waiting<'a>(&'a AtomicU32);
    impl Drop for Waiting<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// A writer's claim on a `RwLock` while readers drain: dropped only on an unwind, when it
    /// takes the writer flag back and leaves the readers' counts.
    struct WriterClaim<'a>(&'a AtomicU32);
    impl Drop for WriterClaim<'_> {
        fn drop(&mut self) {
            self.0.fetch_and(!WRITER, Ordering::Release);
        }
    }

    /// Proof of holding a `RwLock` shared.
    pub struct RwLockReadGuard<'a, T> {
        l: &'a RwLock<T>,
    }
    impl<T> Deref for RwLockReadGuard<'_, T> {
        type Target = T;
        fn deref(&self) -> &T {
            // SAFETY: while a read guard exists no writer holds the lock, so only shared
            // references to the value exist.
            unsafe { &*self.l.value.get() }
        }
    }
    impl<T> Drop for RwLockReadGuard<'_, T> {
        fn drop(&mut self) {
            self.l.state.fetch_sub(1, Ordering::Release);
        }
    }

    /// Proof of holding a `RwLock` exclusive.
    pub struct RwLockWriteGuard<'a, T> {
        l: &'a RwLock<T>,
    }
    impl<T> Deref for RwLockWriteGuard<'_, T> {
        type Target = T;
        fn deref(&self) -> &T {
            // SAFETY: the write guard is the only holder of the lock.
            unsafe { &*self.l.value.get() }
        }
    }
    impl<T> DerefMut for RwLockWriteGuard<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            // SAFETY: the write guard is the only holder of the lock.
            unsafe { &mut *self.l.value.get() }
        }
    }
    impl<T> Drop for RwLockWriteGuard<'_, T> {
        fn drop(&mut self) {
            self.l.state.store(0, Ordering::Release);
        }
    }
}

#[cfg(loom)]
mod locks {
    //! Under loom the locks are loom's, so the model checker sees every acquisition.
    use core::ops::{Deref, DerefMut};

    /// loom's mutex behind the shim's API.
    #[derive(Debug, Default)]
    pub struct Mutex<T>(loom::sync::Mutex<T>);
    /// Proof of holding a `Mutex`.
    pub struct MutexGuard<'a, T>(loom::sync::MutexGuard<'a, T>);

    impl<T> Mutex<T> {
        /// A new unlocked mutex.
        pub fn new(v: T) -> Self {
            Mutex(loom::sync::Mutex::new(v))
        }
        /// Takes the lock.
        pub fn lock(&self) -> MutexGuard<'_, T> {
            MutexGuard(self.0.lock().unwrap_or_else(|e| e.into_inner()))
        }
        /// Takes the lock (loom schedules the wait; `relax` is not needed).
        pub fn lock_with(&self, _relax: &impl super::Relax) -> MutexGuard<'_, T> {
            self.lock()
        }
        /// As `lock_with` (loom explores every order of the waiters anyway).
        pub fn lock_fair_with(&self, _relax: &impl super::Relax) -> MutexGuard<'_, T> {
            self.lock()
        }
        /// Under loom: always, so models explore the lock break.
        pub fn contended(&self) -> bool {
            true
        }
        /// Under loom: nothing (loom schedules the waiters at the next lock).
        pub fn hand_off(&self) {}
        /// Takes the lock if it is free.
        pub fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
            self.0.try_lock().ok().map(MutexGuard)
        }
        /// The value, for an owner with `&mut self`.
        pub fn get_mut(&mut self) -> &mut T {
            self.0.get_mut().unwrap_or_else(|e| e.into_inner())
        }
    }
    impl<T> Deref for MutexGuard<'_, T> {
        type Target = T;
        fn deref(&self) -> &T {
            &self.0
        }
    }
    impl<T> DerefMut for MutexGuard<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            &mut self.0
        }
    }

    /// loom's rwlock behind the shim's API.
    #[derive(Debug, Default)]
    pub struct RwLock<T>(loom::sync::RwLock<T>);
    /// Proof of holding a `RwLock` shared.
    pub struct RwLockReadGuard<'a, T>(loom::sync::RwLockReadGuard<'a, T>);
    /// Proof of holding a `RwLock` exclusive.
    pub struct RwLockWriteGuard<'a, T>(loom::sync::RwLockWriteGuard<'a, T>);

    impl<T> RwLock<T> {
        /// A new unlocked lock.
        pub fn new(v: T) -> Self {
            RwLock(loom::sync::RwLock::new(v))
        }
        /// Takes the lock shared.
        pub fn read(&self) -> RwLockReadGuard<'_, T> {
            RwLockReadGuard(self.0.read().unwrap_or_else(|e| e.into_inner()))
        }
        /// Takes the lock exclusive.
        pub fn write(&self) -> RwLockWriteGuard<'_, T> {
            RwLockWriteGuard(self.0.write().unwrap_or_else(|e| e.into_inner()))
        }
        /// Takes the lock shared (loom schedules the wait).
        pub fn read_with(&self, _relax: &impl super::Relax) -> RwLockReadGuard<'_, T> {
            self.read()
        }
        /// Takes the lock exclusive (loom schedules the wait).
        pub fn write_with(&self, _relax: &impl super::Relax) -> RwLockWriteGuard<'_, T> {
            self.write()
        }
    }
    impl<T> Deref for RwLockReadGuard<'_, T> {
        type Target = T;
        fn deref(&self) -> &T {
            &self.0
        }
    }
    impl<T> Deref for RwLockWriteGuard<'_, T> {
        type Target = T;
        fn deref(&self) -> &T {
            &self.0
        }
    }
    impl<T> DerefMut for RwLockWriteGuard<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            &mut self.0
        }
    }
}

pub use locks::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn mutex_excludes() {
        let m = Mutex::new(0u32);
        {
            let mut g = m.lock();
            *g += 1;
            assert!(m.try_lock().is_none(), "a held mutex must not be taken twice");
        }
        assert_eq!(*m.lock(), 1);
    }

    #[cfg(feature = "std")]
    #[test]
    fn a_holder_sees_a_waiter_and_hands_the_lock_over() {
        let m = Arc::new(Mutex::new(std::vec::Vec::new()));
        let mut g = m.lock();
        assert!(!m.contended(), "nobody waits yet");
        let waiter = {
            let m = m.clone();
            std::thread::spawn(move || m.lock_with(&Yield).push("waiter"))
        };
        while !m.contended() {
            std::thread::yield_now();
        }
        g.push("holder");
        drop(g);
        m.hand_off();
        waiter.join().unwrap();
        assert!(!m.contended(), "the waiter left the count when it took the lock");
        m.lock().push("holder again");
        assert_eq!(*m.lock(), ["holder", "waiter", "holder again"]);
    }

    /// Another thread, played inside the waiter's `relax`: each turn it drops the lock and takes
    /// it straight back (a VMM collecting dirty logs back to back), so the waiter never finds
    /// it free. After `give_up` turns it lets go for good, so a starved waiter still ends.
    struct Barger<'a> {
        m: &'a Mutex<u32>,
        held: core::cell::RefCell<Option<MutexGuard<'a, u32>>>,
        turns: core::cell::Cell<u32>,
        retaken: core::cell::Cell<u32>,
        give_up: u32,
    }
    impl Relax for Barger<'_> {
        fn relax(&self) {
            self.turns.set(self.turns.get() + 1);
            let mut held = self.held.borrow_mut();
            drop(held.take());
            if self.turns.get() < self.give_up {
                if let Some(mut g) = self.m.try_lock() {
                    *g += 1;
                    *held = Some(g);
                    self.retaken.set(self.retaken.get() + 1);
                }
            }
        }
    }

    /// soak45 finding 5: a memslot update waited up to 0.76 s for `vmm_lock` behind a thread
    /// looping `get_dirty_log` (p50 2-3 us). The fair lock is reserved by a waiter that starves,
    /// and the barger's next try fails; the plain one lets the barger retake it every turn.
    #[test]
    fn a_starving_fair_waiter_gets_the_lock_before_a_barger_retakes_it() {
        let m = Mutex::new(0u32);
        let barger = |m| Barger {
            m,
            held: core::cell::RefCell::new(m.try_lock()),
            turns: core::cell::Cell::new(0),
            retaken: core::cell::Cell::new(0),
            give_up: 10_000,
        };
        let b = barger(&m);
        let g = m.lock_fair_with(&b);
        assert_eq!(*g, locks::STARVE_TURNS, "the barger retook the lock until the waiter starved");
        assert_eq!(b.retaken.get(), locks::STARVE_TURNS);
        drop(g);
        assert!(m.try_lock().is_some(), "the reservation ends with the waiter's hold");

        let b = barger(&m);
        let g = m.lock_with(&b);
        assert_eq!(b.retaken.get(), 9_999, "the plain lock is barged until the barger gives up");
        drop(g);
    }

    /// A starving waiter whose `relax` unwinds (a host callback that panics) gives its
    /// reservation back with its place among the waiters.
    #[cfg(feature = "std")]
    #[test]
    fn a_fair_waiter_that_unwinds_gives_the_reservation_back() {
        struct PanicsOnceReserved<'a>(Barger<'a>);
        impl Relax for PanicsOnceReserved<'_> {
            fn relax(&self) {
                if self.0.turns.get() >= locks::STARVE_TURNS {
                    assert!(self.0.m.reserved());
                    panic!("host callback");
                }
                self.0.relax();
            }
        }
        let m = Mutex::new(0u32);
        let b = PanicsOnceReserved(Barger {
            m: &m,
            held: core::cell::RefCell::new(m.try_lock()),
            turns: core::cell::Cell::new(0),
            retaken: core::cell::Cell::new(0),
            give_up: 10_000,
        });
        let r = std::panic::catch_unwind(core::panic::AssertUnwindSafe(|| {
            drop(m.lock_fair_with(&b));
        }));
        assert!(r.is_err(), "the waiter unwound while reserved");
        drop(b.0.held.borrow_mut().take());
        assert!(!m.reserved(), "no reservation outlives its waiter");
        assert!(!m.contended(), "nor its place among the waiters");
        assert!(m.try_lock().is_some());
    }

    /// `Sync` of `T`, seen from a concrete type: the inherent method applies when `T: Sync`,
    /// the trait's otherwise (method resolution prefers inherent methods whose bounds hold).
    struct SyncProbe<T>(core::marker::PhantomData<T>);
    trait NotSync {
        fn is_sync(&self) -> bool {
            false
        }
    }
    impl<T> NotSync for SyncProbe<T> {}
    impl<T: Sync> SyncProbe<T> {
        fn is_sync(&self) -> bool {
            true
        }
    }

    /// A guard is a `&mut T`: sharing it between threads shares the `T`, so it may be `Sync`
    /// only when `T` is (as `std::sync::MutexGuard`). A `Mutex<Cell<_>>` is `Sync` (a `Cell`
    /// is `Send`); were its guard `Sync` too, two threads could call `Cell::set` through one
    /// `&MutexGuard` at once: a data race from safe code.
    #[test]
    fn a_mutex_guard_is_sync_only_for_a_sync_value() {
        type CellGuard = MutexGuard<'static, core::cell::Cell<u32>>;
        assert!(SyncProbe::<Mutex<core::cell::Cell<u32>>>(Default::default()).is_sync());
        assert!(!SyncProbe::<CellGuard>(Default::default()).is_sync(), "a shared guard races");
        assert!(SyncProbe::<MutexGuard<'static, u32>>(Default::default()).is_sync());
    }

    #[test]
    fn rwlock_counts_readers_and_excludes_writer() {
        let l = RwLock::new(5u32);
        let a = l.read();
        let b = l.read();
        assert_eq!(*a + *b, 10);
        drop((a, b));
        *l.write() = 7;
        assert_eq!(*l.read(), 7);
    }

    #[cfg(feature = "std")]
    #[test]
    fn rwlock_under_contention() {
        let l = Arc::new(RwLock::new(0u64));
        let threads: std::vec::Vec<_> = (0..4)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        *l.write() += 1;
                        let _r = l.read();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*l.read(), 4000);
    }
}
