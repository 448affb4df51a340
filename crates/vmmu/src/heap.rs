//! Fallible heap allocation on stable Rust, for the paths that report exhaustion instead of
//! ending in the allocator's error handler (a panic on a bare-metal target): [`TryArc`], a
//! shared pointer whose one allocation can fail (`Arc::new` cannot, and `Arc::try_new` is not
//! stable; public as the handle of a TDP root, [`crate::tdp::RootRef`]), and, inside the crate,
//! `try_box` (`Box::try_new` is not stable) and `vec_room` / `take_vec_room`, room for a
//! vector's growth made fallibly ahead of time and handed over later without allocating (the
//! memslot sets' indexes: room made before an update publishes anything, handed to a set once
//! no reader can reach it).
//!
//! [`TryArc`]'s contract is `Arc`'s: the count is the number of live handles; the value is
//! dropped and its memory freed exactly once, by the handle whose drop takes the count to zero,
//! after every other handle's last use of it (the Release decrement of each drop, then an
//! Acquire fence in the last one, as `Arc`'s drop). The count is an atomic of the one `sync`
//! shim, so loom models see it.

use crate::sync::{fence, AtomicUsize, Ordering};
use alloc::boxed::Box;
use core::ptr::NonNull;

/// `Box::new(value)`, or `None` (and `value` dropped) if the global allocator has no room.
pub(crate) fn try_box<T>(value: T) -> Option<Box<T>> {
    let layout = core::alloc::Layout::new::<T>();
    if layout.size() == 0 {
        return Some(Box::new(value));
    }
    // SAFETY: `layout` has a non-zero size (checked above).
    let p = unsafe { alloc::alloc::alloc(layout) }.cast::<T>();
    if p.is_null() {
        return None;
    }
    // SAFETY: `p` is a fresh, non-null allocation of the global allocator with `T`'s layout,
    // which is what `Box<T>` owns and frees; it is initialised with `value` before the box is
    // made, and nothing else refers to it.
    unsafe {
        p.write(value);
        Some(Box::from_raw(p))
    }
}

/// Room for `extra` more elements in `v` without allocating: `Some(None)` if `v` has it, else
/// `Some(Some(w))` with `w` an empty vector with that room (and twice `v`'s length at least, so
/// growth stays amortised), allocated fallibly; `None` if the heap has no room for it.
pub(crate) fn vec_room<T>(
    v: &alloc::vec::Vec<T>,
    extra: usize,
) -> Option<Option<alloc::vec::Vec<T>>> {
    if has_vec_room(v, extra) {
        return Some(None);
    }
    let mut w = alloc::vec::Vec::new();
    w.try_reserve_exact((v.len() + extra).max(2 * v.len())).ok()?;
    Some(Some(w))
}

/// Whether `v` has room for `extra` more elements without allocating (then [`vec_room`] makes
/// nothing).
pub(crate) fn has_vec_room<T>(v: &alloc::vec::Vec<T>, extra: usize) -> bool {
    v.capacity() - v.len() >= extra
}

/// Gives `v` the room [`vec_room`] made, if it still lacks it: its elements move into `room`,
/// which it keeps. Allocates nothing.
pub(crate) fn take_vec_room<T>(v: &mut alloc::vec::Vec<T>, room: Option<alloc::vec::Vec<T>>) {
    if let Some(mut w) = room {
        if w.capacity() > v.capacity() {
            w.append(v);
            *v = w;
        }
    }
}

/// The allocation a [`TryArc`] points to.
struct Shared<T> {
    /// Live handles.
    refs: AtomicUsize,
    value: T,
}

/// A shared, immutable `T` like `Arc<T>`, made by `TryArc::try_new` (crate-internal), which
/// reports a full heap. Handles clone and deref as `Arc`'s do.
pub struct TryArc<T> {
    ptr: NonNull<Shared<T>>,
}

// SAFETY: as `Arc<T>`: handles on several threads share `&T` (needs `T: Sync`), and the last
// one, on any thread, drops the `T` (needs `T: Send`).
unsafe impl<T: Send + Sync> Send for TryArc<T> {}
// SAFETY: as above: `&TryArc<T>` gives `&T` and clones, which may be dropped on another thread.
unsafe impl<T: Send + Sync> Sync for TryArc<T> {}

impl<T> TryArc<T> {
    /// A first handle to `value`, or `None` if the heap has no room for it.
    pub(crate) fn try_new(value: T) -> Option<Self> {
        let b = try_box(Shared { refs: AtomicUsize::new(1), value })?;
        Some(TryArc { ptr: NonNull::from(Box::leak(b)) })
    }

    /// Whether `a` and `b` are handles to the same value (as `Arc::ptr_eq`).
    pub fn ptr_eq(a: &Self, b: &Self) -> bool {
        a.ptr == b.ptr
    }

    fn shared(&self) -> &Shared<T> {
        // SAFETY: `ptr` came from a leaked box that lives while a handle does (module doc):
        // this handle is one, so the allocation is live and its value initialised.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> core::ops::Deref for TryArc<T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        &self.shared().value
    }
}

impl<T> Clone for TryArc<T> {
    fn clone(&self) -> Self {
        // Relaxed, as `Arc::clone`: a new handle comes from a live one, which keeps the count
        // above zero meanwhile; the drops order what matters.
        let old = self.shared().refs.fetch_add(1, Ordering::Relaxed);
        // More handles than half the address space can only come from leaked handles; the
        // count must not wrap to a value whose drop would free a shared value.
        assert!(old < usize::MAX / 2, "TryArc count overflow");
        TryArc { ptr: self.ptr }
    }
}

impl<T> Drop for TryArc<T> {
    fn drop(&mut self) {
        // Release: this handle's uses of the value come before the free by the last handle.
        if self.shared().refs.fetch_sub(1, Ordering::Release) != 1 {
            return;
        }
        // Acquire: every other handle's uses (before its Release decrement) come before this.
        fence(Ordering::Acquire);
        // SAFETY: the count reached zero here: this was the last handle, so nothing else can
        // reach the allocation, which came from `Box::leak` in `try_new` and is freed once.
        drop(unsafe { Box::from_raw(self.ptr.as_ptr()) });
    }
}

impl<T: core::fmt::Debug> core::fmt::Debug for TryArc<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Debug::fmt(&**self, f)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// Counts its drops.
    struct Counted<'a>(&'a core::cell::Cell<u32>);

    impl Drop for Counted<'_> {
        fn drop(&mut self) {
            self.0.set(self.0.get() + 1);
        }
    }

    #[test]
    fn the_value_is_dropped_once_by_the_last_handle() {
        let drops = core::cell::Cell::new(0);
        let a = TryArc::try_new(Counted(&drops)).expect("heap");
        let b = a.clone();
        let c = b.clone();
        drop(a);
        drop(c);
        assert_eq!(drops.get(), 0);
        assert!(core::ptr::eq(&*b, &*b.clone()));
        drop(b);
        assert_eq!(drops.get(), 1);
    }

    #[test]
    fn handles_on_several_threads_share_the_value() {
        let a = TryArc::try_new(alloc::vec![1u64, 2, 3]).expect("heap");
        let threads: alloc::vec::Vec<_> = (0..4)
            .map(|_| {
                let b = a.clone();
                std::thread::spawn(move || b.iter().sum::<u64>())
            })
            .collect();
        drop(a);
        for t in threads {
            assert_eq!(t.join().expect("thread"), 6);
        }
    }

    #[test]
    fn zero_sized_values_box() {
        assert!(try_box(()).is_some());
        let a = TryArc::try_new(()).expect("heap");
        drop(a.clone());
    }
}
