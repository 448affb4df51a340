//! A bare-metal embedder of the vmmu core, as a hypervisor without an OS writes one: the core
//! with `default-features = false`, a host whose table pool, IPIs and waits need no OS, and the
//! exit handling of a vCPU loop. `src/main.rs` runs it on `x86_64-unknown-none` (its own
//! allocator and panic handler); `tests/hosted.rs` runs the same code on the build machine.
#![no_std]
#![deny(missing_docs)]

extern crate alloc;

pub mod host;
pub mod run;
