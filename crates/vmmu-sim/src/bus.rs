//! The MMIO bus: in-process devices on guest-physical ranges, and the "exit to userspace" record
//! for an access no device claims (KVM: `kvm_io_bus` first, else `KVM_EXIT_MMIO`).
//!
//! Devices are registered before the machine runs (`&mut self`); dispatch takes `&self`, takes no
//! lock and allocates nothing, so vCPUs never serialise on the bus. Counting exits is the
//! caller's business (per vCPU), again so the bus has no shared counter on the access path.

use crate::ram::Width;
use core::ops::Range;
use core::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use vmmu::types::Gpa;

/// A device model behind part of the guest-physical space.
pub trait MmioDevice: Send + Sync {
    /// A guest load of `width` bytes at `gpa` (inside the device's range); the value, masked to
    /// `width` by the bus.
    fn read(&self, gpa: Gpa, width: Width) -> u64;
    /// A guest store of the low `width` bytes of `value` at `gpa`.
    fn write(&self, gpa: Gpa, width: Width, value: u64);
}

/// An access no device claimed: what userspace would see in `kvm_run.mmio`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioExit {
    /// The guest-physical address.
    pub gpa: Gpa,
    /// Bytes accessed.
    pub width: Width,
    /// `Some(data)` for a store, `None` for a load.
    pub write: Option<u64>,
}

/// Where an MMIO access went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusOutcome {
    /// A device handled it; for a load, the value it returned (0 for a store).
    Device(u64),
    /// No device claimed it: an exit to userspace; for a load, `value` is the configured reply.
    Exit {
        /// The exit record.
        exit: MmioExit,
        /// The value a load receives (0 for a store).
        value: u64,
    },
}

/// Why a device could not be registered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty or wraps.
    #[error("device range {start:#x}..{end:#x} is empty")]
    Empty {
        /// Start of the range.
        start: u64,
        /// End of the range.
        end: u64,
    },
    /// The range overlaps a registered device.
    #[error("device range {start:#x}..{end:#x} overlaps an existing device")]
    Overlap {
        /// Start of the range.
        start: u64,
        /// End of the range.
        end: u64,
    },
}

/// Devices on guest-physical ranges.
#[derive(Default)]
pub struct MmioBus {
    devices: Vec<(Range<u64>, Arc<dyn MmioDevice>)>,
    reply: AtomicU64,
}

impl core::fmt::Debug for MmioBus {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MmioBus")
            .field("ranges", &self.devices.iter().map(|d| d.0.clone()).collect::<Vec<_>>())
            .finish()
    }
}

impl MmioBus {
    /// An empty bus: every access exits to userspace, loads read 0.
    pub fn new() -> MmioBus {
        MmioBus::default()
    }

    /// Puts `device` on `[start, start + len)`.
    pub fn register(
        &mut self,
        start: Gpa,
        len: u64,
        device: Arc<dyn MmioDevice>,
    ) -> Result<(), BusError> {
        let end = start
            .0
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::Empty { start: start.0, end: start.0.wrapping_add(len) })?;
        if self.devices.iter().any(|(r, _)| r.start < end && start.0 < r.end) {
            return Err(BusError::Overlap { start: start.0, end });
        }
        let at = self.devices.partition_point(|(r, _)| r.start < start.0);
        self.devices.insert(at, (start.0..end, device));
        Ok(())
    }

    /// The value unclaimed loads receive from now on (KVM: what userspace writes into
    /// `kvm_run.mmio.data`), truncated to the access width.
    pub fn set_userspace_reply(&self, value: u64) {
        self.reply.store(value, Ordering::Relaxed);
    }

    /// Sends one access to its device, or makes an exit record. `write` is `Some(value)` for a
    /// store.
    #[inline]
    pub fn dispatch(&self, gpa: Gpa, width: Width, write: Option<u64>) -> BusOutcome {
        let i = self.devices.partition_point(|(r, _)| r.start <= gpa.0);
        if let Some((r, dev)) = i.checked_sub(1).and_then(|i| self.devices.get(i)) {
            if gpa.0 < r.end {
                return match write {
                    Some(v) => {
                        dev.write(gpa, width, v & width.mask());
                        BusOutcome::Device(0)
                    }
                    None => BusOutcome::Device(dev.read(gpa, width) & width.mask()),
                };
            }
        }
        let value =
            if write.is_some() { 0 } else { self.reply.load(Ordering::Relaxed) & width.mask() };
        BusOutcome::Exit {
            exit: MmioExit { gpa, width, write: write.map(|v| v & width.mask()) },
            value,
        }
    }
}

/// A small register device for the machine's device window: an identification register at offset
/// 0 (reads [`RegisterDevice::ID`], ignores writes), one 8-byte scratch register per vCPU at
/// offset `8 * (1 + vcpu)`, which keeps the last value written, and a second identification
/// register at [`RegisterDevice::SECOND_ID_OFFSET`] (reads [`RegisterDevice::SECOND_ID`]). Every
/// other offset reads [`RegisterDevice::UNASSIGNED`]. Register accesses narrower than 8 bytes see the low bytes.
#[derive(Debug)]
pub struct RegisterDevice {
    base: Gpa,
    scratch: Box<[AtomicU64]>,
}

impl RegisterDevice {
    /// What the identification register reads: "VMMU" in ASCII.
    pub const ID: u64 = 0x554d_4d56;
    /// What unassigned offsets read.
    pub const UNASSIGNED: u64 = u64::MAX;
    /// Where the second identification register lies (the start of the window's second page).
    pub const SECOND_ID_OFFSET: u64 = 0x1000;
    /// What the second identification register reads: "VMM2" in ASCII. A second page with a
    /// value of its own: an access that reaches the wrong page of the window reads the wrong
    /// identification.
    pub const SECOND_ID: u64 = 0x324d_4d56;

    /// A device at `base` with `vcpus` scratch registers.
    pub fn new(base: Gpa, vcpus: usize) -> RegisterDevice {
        RegisterDevice { base, scratch: (0..vcpus).map(|_| AtomicU64::new(0)).collect() }
    }

    /// The offset of vCPU `vcpu`'s scratch register.
    pub const fn scratch_offset(vcpu: usize) -> u64 {
        8 * (1 + vcpu as u64)
    }

    fn scratch(&self, gpa: Gpa) -> Option<&AtomicU64> {
        let off = gpa.0.checked_sub(self.base.0)?;
        if off < 8 || off % 8 != 0 {
            return None;
        }
        self.scratch.get((off / 8 - 1) as usize)
    }
}

impl MmioDevice for RegisterDevice {
    fn read(&self, gpa: Gpa, _width: Width) -> u64 {
        if gpa == self.base {
            return Self::ID;
        }
        if gpa.0.wrapping_sub(self.base.0) == Self::SECOND_ID_OFFSET {
            return Self::SECOND_ID;
        }
        // Relaxed: each scratch register is one vCPU's; nothing else is ordered by it.
        self.scratch(gpa).map_or(Self::UNASSIGNED, |r| r.load(Ordering::Relaxed))
    }

    fn write(&self, gpa: Gpa, width: Width, value: u64) {
        if let Some(r) = self.scratch(gpa) {
            r.store(value & width.mask(), Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_claim_their_range_and_the_rest_exits() {
        let mut bus = MmioBus::new();
        bus.register(Gpa(0x1000), 0x1000, Arc::new(RegisterDevice::new(Gpa(0x1000), 2)))
            .expect("reg");
        assert_eq!(
            bus.dispatch(Gpa(0x1000), Width::W4, None),
            BusOutcome::Device(RegisterDevice::ID)
        );
        assert_eq!(
            bus.dispatch(Gpa(0x1010), Width::W8, Some(0x1234_5678_9abc)),
            BusOutcome::Device(0)
        );
        assert_eq!(bus.dispatch(Gpa(0x1010), Width::W2, None), BusOutcome::Device(0x9abc));
        assert_eq!(bus.dispatch(Gpa(0x1100), Width::W1, None), BusOutcome::Device(0xff));
        let out = bus.dispatch(Gpa(0x2000), Width::W4, None);
        assert_eq!(
            out,
            BusOutcome::Exit {
                exit: MmioExit { gpa: Gpa(0x2000), width: Width::W4, write: None },
                value: 0
            }
        );
        bus.set_userspace_reply(0x1_0000_00ff);
        let BusOutcome::Exit { value, .. } = bus.dispatch(Gpa(0xfff), Width::W2, None) else {
            panic!("below the device is unclaimed");
        };
        assert_eq!(value, 0xff);
        let BusOutcome::Exit { exit, .. } = bus.dispatch(Gpa(0x2000), Width::W1, Some(0x1ab))
        else {
            panic!("unclaimed");
        };
        assert_eq!(exit.write, Some(0xab));
    }

    #[test]
    fn overlapping_and_empty_ranges_are_refused() {
        let mut bus = MmioBus::new();
        let dev = Arc::new(RegisterDevice::new(Gpa(0), 1));
        bus.register(Gpa(0x1000), 0x1000, dev.clone()).expect("first");
        assert!(matches!(bus.register(Gpa(0x1fff), 2, dev.clone()), Err(BusError::Overlap { .. })));
        assert!(matches!(bus.register(Gpa(0x5000), 0, dev.clone()), Err(BusError::Empty { .. })));
        bus.register(Gpa(0x2000), 0x10, dev).expect("adjacent is fine");
    }
}
