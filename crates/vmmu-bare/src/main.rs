//! The bare-metal image: `#![no_std]`, `#![no_main]`, a bump allocator over a static heap, a
//! panic handler that writes to the serial port, and an exit through QEMU's debug-exit port.
//! Built for `x86_64-unknown-none` (`cargo build -p vmmu-bare --target x86_64-unknown-none`,
//! linked by `build.rs` with `link.ld` at 1 MiB); a PVH loader enters `boot.rs`, which turns on
//! long mode and calls `_start`. `scripts/boot-bare` boots it under QEMU and compares its
//! serial log with the hosted run. On a hosted target the same binary is an ordinary program
//! running the same scenarios.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod boot;

#[cfg(target_os = "none")]
mod bare {
    use core::alloc::{GlobalAlloc, Layout};
    use core::fmt::Write;
    use core::sync::atomic::{AtomicUsize, Ordering};

    /// 32 MiB of heap in .bss: table pools, guest RAM and the VMs' own allocations.
    const HEAP_BYTES: usize = 32 << 20;

    #[repr(align(4096))]
    struct Heap(core::cell::UnsafeCell<[u8; HEAP_BYTES]>);
    // SAFETY: the heap's bytes are only reached through the allocator, which hands out each
    // range once (a bump pointer moved by compare-and-swap).
    unsafe impl Sync for Heap {}
    static HEAP: Heap = Heap(core::cell::UnsafeCell::new([0; HEAP_BYTES]));

    /// A bump allocator: never frees (the scenarios are bounded), lock-free, usable with
    /// interrupts off.
    struct Bump {
        next: AtomicUsize,
    }

    // SAFETY: `alloc` returns a range of `HEAP` aligned to `layout.align()` that no other call
    // returned (the compare-and-swap claims it), or null when the heap is exhausted.
    unsafe impl GlobalAlloc for Bump {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let base = HEAP.0.get() as usize;
            let mut cur = self.next.load(Ordering::Relaxed);
            loop {
                let start = (base + cur).next_multiple_of(layout.align()) - base;
                let Some(end) = start.checked_add(layout.size()).filter(|&e| e <= HEAP_BYTES)
                else {
                    return core::ptr::null_mut();
                };
                match self.next.compare_exchange_weak(
                    cur,
                    end,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    // SAFETY: `start + size <= HEAP_BYTES`: inside the heap.
                    Ok(_) => return unsafe { (HEAP.0.get() as *mut u8).add(start) },
                    Err(c) => cur = c,
                }
            }
        }
        unsafe fn dealloc(&self, _ptr: *mut u8, _layout: Layout) {}
    }

    #[global_allocator]
    static ALLOC: Bump = Bump { next: AtomicUsize::new(0) };

    /// COM1, for the log.
    struct Serial;

    impl Write for Serial {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            for b in s.bytes() {
                // SAFETY: an `out` to the COM1 data port: no memory is touched.
                unsafe {
                    core::arch::asm!("out dx, al", in("dx") 0x3f8u16, in("al") b, options(nomem, nostack))
                };
            }
            Ok(())
        }
    }

    /// Ends the run: the status on QEMU's `isa-debug-exit` port (0xf4; QEMU exits with
    /// `status * 2 + 1`), then halts (a machine without that device stays halted).
    fn finish(status: u8) -> ! {
        // SAFETY: an `out` to I/O port 0xf4 (unused on a PC; QEMU's debug-exit device when
        // configured): no memory is touched.
        unsafe {
            core::arch::asm!("out dx, al", in("dx") 0xf4u16, in("al") status, options(nomem, nostack))
        };
        halt()
    }

    fn halt() -> ! {
        loop {
            // SAFETY: `hlt` waits for an interrupt; nothing else.
            unsafe { core::arch::asm!("hlt", options(nomem, nostack)) };
        }
    }

    #[panic_handler]
    fn panic(info: &core::panic::PanicInfo) -> ! {
        let _ = writeln!(Serial, "panic: {info}");
        finish(2)
    }

    /// The entry point a loader jumps to.
    #[no_mangle]
    pub extern "C" fn _start() -> ! {
        match vmmu_bare::run::run_all() {
            Ok(summaries) => {
                for s in &summaries {
                    let _ = writeln!(Serial, "{s:?}");
                }
                let _ = writeln!(Serial, "ok");
                finish(0)
            }
            Err(e) => {
                let _ = writeln!(Serial, "failed: {e}");
                finish(1)
            }
        }
    }
}

#[cfg(not(target_os = "none"))]
fn main() {
    match vmmu_bare::run::run_all() {
        Ok(summaries) => {
            for s in &summaries {
                println!("{s:?}");
            }
            println!("ok");
        }
        Err(e) => {
            eprintln!("failed: {e}");
            std::process::exit(1);
        }
    }
}
