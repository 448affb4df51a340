//! The per-vCPU access mix: a deterministic stream of guest accesses from a seed.
//!
//! Each vCPU gets its own stream (seeded from the run's seed and its index), so a run's accesses
//! depend only on `(seed, vcpu)`, not on timing. What each kind touches, and what it may write:
//! - private RAM: any width, anywhere in the vCPU's own area, any value (the vCPU can predict
//!   every byte of its area);
//! - shared RAM: 8 bytes; writes only to words the vCPU owns, with [`shared_value`]s;
//! - ROM: reads and writes of any width (writes must exit: the slot is read-only);
//! - device window: the ID register and the vCPU's own scratch register;
//! - BAR: 8-byte reads outside its scratch page, 8-byte writes inside it, at either position;
//! - DIMM: 8-byte reads.
//!
//! With hot spots on (`--stress-paths`), every BAR read goes to the first word of position 0 and
//! every DIMM read to the first word of the DIMM: every vCPU hammers the same GPAs, which are
//! unmapped, mapped and moved under them, so they fault on them together inside a memslot
//! update's window, and those pages are the only ones of the window mapped for reading (a zap of
//! the window that finds them not present has nothing else that would flush the TLBs).

use crate::bus::RegisterDevice;
use crate::layout::{shared_value, MachineLayout, PRIVATE_PER_VCPU, SHARED_USED};
use crate::ram::Width;
use serde::Serialize;
use vmmu::types::Gpa;

/// What an access is for: decides how the oracle judges it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MixKind {
    /// Read of the vCPU's private RAM.
    PrivateRead,
    /// Write of the vCPU's private RAM.
    PrivateWrite,
    /// Read of a shared word.
    SharedRead,
    /// Write of a shared word the vCPU owns.
    SharedWrite,
    /// ROM read.
    RomRead,
    /// ROM write (exits).
    RomWrite,
    /// Device register read.
    DeviceRead,
    /// Device register write.
    DeviceWrite,
    /// BAR read.
    BarRead,
    /// BAR scratch-page write.
    BarWrite,
    /// DIMM read.
    DimmRead,
}

impl MixKind {
    /// All kinds, in [`MixWeights`] order.
    pub const ALL: [MixKind; 11] = [
        MixKind::PrivateRead,
        MixKind::PrivateWrite,
        MixKind::SharedRead,
        MixKind::SharedWrite,
        MixKind::RomRead,
        MixKind::RomWrite,
        MixKind::DeviceRead,
        MixKind::DeviceWrite,
        MixKind::BarRead,
        MixKind::BarWrite,
        MixKind::DimmRead,
    ];

    /// Whether the access is a store.
    pub const fn is_write(self) -> bool {
        matches!(
            self,
            MixKind::PrivateWrite
                | MixKind::SharedWrite
                | MixKind::RomWrite
                | MixKind::DeviceWrite
                | MixKind::BarWrite
        )
    }

    /// Load or store, as the hardware walk checks it.
    pub const fn access(self) -> crate::seam::AccessKind {
        crate::seam::AccessKind::from_write(self.is_write())
    }

    /// Whether what the access sees depends on the memslot history (BAR and DIMM).
    pub const fn is_dynamic(self) -> bool {
        matches!(self, MixKind::BarRead | MixKind::BarWrite | MixKind::DimmRead)
    }
}

/// One guest access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestAccess {
    /// What it is for.
    pub kind: MixKind,
    /// Guest-physical address, naturally aligned for `width`.
    pub gpa: Gpa,
    /// Bytes.
    pub width: Width,
    /// The value stored (writes), masked to `width`; 0 for reads.
    pub value: u64,
}

/// Relative weights of the access kinds (need not sum to anything; 0 disables a kind).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MixWeights(pub [u32; 11]);

impl Default for MixWeights {
    fn default() -> Self {
        // private r/w, shared r/w, rom r/w, device r/w, bar r/w, dimm r
        MixWeights([30, 20, 10, 5, 5, 2, 4, 2, 15, 3, 4])
    }
}

impl MixWeights {
    /// `--stress-paths`: more of the accesses whose outcome depends on the memslot history.
    pub const STRESS: MixWeights = MixWeights([16, 10, 8, 4, 4, 2, 2, 1, 25, 3, 25]);
    /// Private RAM only: a vCPU that, once warm, only hits its TLB.
    pub const PRIVATE_ONLY: MixWeights = MixWeights([1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
}

/// A vCPU's access stream.
#[derive(Clone, Debug)]
pub struct AccessGen {
    layout: MachineLayout,
    vcpu: usize,
    rng: fastrand::Rng,
    cumulative: [u32; 11],
    own_words: u64,
    shared_seq: u32,
    hot: bool,
}

impl AccessGen {
    /// The stream of vCPU `vcpu` for run seed `seed`. All-zero weights fall back to the default.
    pub fn new(layout: &MachineLayout, vcpu: usize, seed: u64, weights: MixWeights) -> AccessGen {
        let weights =
            if weights.0.iter().all(|w| *w == 0) { MixWeights::default() } else { weights };
        let mut cumulative = [0u32; 11];
        let mut sum = 0u32;
        for (c, w) in cumulative.iter_mut().zip(weights.0) {
            sum = sum.saturating_add(w);
            *c = sum;
        }
        // Words vCPU `vcpu` owns: vcpu, vcpu + n, vcpu + 2n, ...
        let words = SHARED_USED / 8;
        let own_words = words.saturating_sub(vcpu as u64).div_ceil(layout.vcpus as u64);
        // The seed mixes run seed and vCPU index through a multiplicative hash so neighbouring
        // seeds do not give shifted copies of one stream.
        let mixed = seed ^ (vcpu as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        AccessGen {
            layout: layout.clone(),
            vcpu,
            rng: fastrand::Rng::with_seed(mixed),
            cumulative,
            own_words,
            shared_seq: 0,
            hot: false,
        }
    }

    /// Turns the hot spots (module doc) on or off.
    pub fn with_hot_spots(mut self, on: bool) -> AccessGen {
        self.hot = on;
        self
    }

    fn kind(&mut self) -> MixKind {
        let total = self.cumulative[10];
        let x = self.rng.u32(0..total);
        let i = self.cumulative.partition_point(|c| *c <= x);
        MixKind::ALL[i.min(10)]
    }

    /// The next access.
    pub fn next_access(&mut self) -> GuestAccess {
        let kind = self.kind();
        let AccessGen { layout: l, vcpu, rng, own_words, shared_seq, hot, .. } = self;
        let hot = *hot;
        let vcpu = *vcpu;
        let width = |rng: &mut fastrand::Rng| Width::ALL[rng.usize(0..4)];
        let aligned =
            |rng: &mut fastrand::Rng, span: u64, w: Width| rng.u64(0..span / w.bytes()) * w.bytes();
        let (gpa, width, value) = match kind {
            MixKind::PrivateRead | MixKind::PrivateWrite => {
                let w = width(rng);
                let (r, base) = l.private_area(vcpu);
                let gpa = r.gpa.0 + base + aligned(rng, PRIVATE_PER_VCPU, w);
                (gpa, w, rng.u64(..) & w.mask())
            }
            MixKind::SharedRead => {
                let word = rng.u64(0..SHARED_USED / 8);
                (l.shared.gpa.0 + word * 8, Width::W8, 0)
            }
            MixKind::SharedWrite => {
                let word = vcpu as u64 + rng.u64(0..(*own_words).max(1)) * l.vcpus as u64;
                *shared_seq = shared_seq.wrapping_add(1);
                (l.shared.gpa.0 + word * 8, Width::W8, shared_value(vcpu, word, *shared_seq))
            }
            MixKind::RomRead | MixKind::RomWrite => {
                let w = width(rng);
                (l.rom.gpa.0 + aligned(rng, l.rom.size, w), w, rng.u64(..) & w.mask())
            }
            MixKind::DeviceRead => {
                if rng.bool() {
                    (l.device.0, Width::W4, 0)
                } else {
                    (l.device.0 + RegisterDevice::scratch_offset(vcpu), Width::W8, 0)
                }
            }
            MixKind::DeviceWrite => {
                (l.device.0 + RegisterDevice::scratch_offset(vcpu), Width::W8, rng.u64(..))
            }
            MixKind::BarRead if hot => (l.bar.positions[0].0, Width::W8, 0),
            MixKind::DimmRead if hot => (l.dimm.gpa.0, Width::W8, 0),
            MixKind::BarRead => {
                let pos = l.bar.positions[rng.usize(0..2)];
                (pos.0 + aligned(rng, l.bar.scratch_offset(), Width::W8), Width::W8, 0)
            }
            MixKind::BarWrite => {
                let pos = l.bar.positions[rng.usize(0..2)];
                let span = l.bar.size - l.bar.scratch_offset();
                (
                    pos.0 + l.bar.scratch_offset() + aligned(rng, span, Width::W8),
                    Width::W8,
                    rng.u64(..),
                )
            }
            MixKind::DimmRead => {
                (l.dimm.gpa.0 + aligned(rng, l.dimm.size, Width::W8), Width::W8, 0)
            }
        };
        let value = if kind.is_write() { value } else { 0 };
        GuestAccess { kind, gpa: Gpa(gpa), width, value }
    }
}

impl Iterator for AccessGen {
    type Item = GuestAccess;
    fn next(&mut self) -> Option<GuestAccess> {
        Some(self.next_access())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn same_seed_same_stream_other_vcpu_other_stream() {
        let l = MachineLayout::new(2);
        let a: Vec<_> = AccessGen::new(&l, 0, 7, MixWeights::default()).take(500).collect();
        let b: Vec<_> = AccessGen::new(&l, 0, 7, MixWeights::default()).take(500).collect();
        let c: Vec<_> = AccessGen::new(&l, 1, 7, MixWeights::default()).take(500).collect();
        let d: Vec<_> = AccessGen::new(&l, 0, 8, MixWeights::default()).take(500).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
    }

    #[test]
    fn accesses_stay_in_their_region_aligned_and_cover_every_kind() {
        let l = MachineLayout::new(3);
        let mut kinds = HashSet::new();
        for vcpu in 0..3 {
            for a in AccessGen::new(&l, vcpu, 1, MixWeights::default()).take(5000) {
                kinds.insert(a.kind);
                assert!(a.width.is_aligned(a.gpa.0), "{a:?}");
                assert_eq!(a.value & !a.width.mask(), 0);
                let inside = match a.kind {
                    MixKind::PrivateRead | MixKind::PrivateWrite => {
                        let (r, off) = l.private_area(vcpu);
                        let start = r.gpa.0 + off;
                        a.gpa.0 >= start && a.gpa.0 + a.width.bytes() <= start + PRIVATE_PER_VCPU
                    }
                    MixKind::SharedRead => l.shared.contains(a.gpa),
                    MixKind::SharedWrite => {
                        let word = (a.gpa.0 - l.shared.gpa.0) / 8;
                        l.shared_owner(word) == vcpu && word < SHARED_USED / 8
                    }
                    MixKind::RomRead | MixKind::RomWrite => l.rom.contains(a.gpa),
                    MixKind::DeviceRead | MixKind::DeviceWrite => {
                        a.gpa.0 - l.device.0 < l.device_size
                    }
                    MixKind::BarRead | MixKind::BarWrite => {
                        let off = l
                            .bar
                            .positions
                            .iter()
                            .map(|p| a.gpa.0.wrapping_sub(p.0))
                            .min()
                            .unwrap_or(u64::MAX);
                        off < l.bar.size
                            && (off >= l.bar.scratch_offset()) == (a.kind == MixKind::BarWrite)
                    }
                    MixKind::DimmRead => l.dimm.contains(a.gpa),
                };
                assert!(inside, "vCPU {vcpu}: {a:?} outside its region");
            }
        }
        assert_eq!(kinds.len(), MixKind::ALL.len());
    }

    #[test]
    fn weights_select_kinds() {
        let l = MachineLayout::new(1);
        let mut w = [0; 11];
        w[4] = 1;
        assert!(AccessGen::new(&l, 0, 3, MixWeights(w))
            .take(100)
            .all(|a| a.kind == MixKind::RomRead));
    }
}
