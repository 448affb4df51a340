//! What a walk of the second-level tables read: one SPTE per level, root first (KVM prints this
//! hierarchy when a walk finds reserved bits). Reported in fault errors, made by the walks.

use crate::types::Level;
use core::fmt;

/// The entries a walk read, one per level from the root down (KVM prints this hierarchy when a
/// walk finds reserved bits).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct SpteDump {
    /// `(level, spte)` pairs, root first; only the first `len` are meaningful.
    entries: [(u8, u64); 5],
    len: usize,
}

impl SpteDump {
    pub(crate) fn push(&mut self, level: Level, spte: u64) {
        if self.len < self.entries.len() {
            self.entries[self.len] = (level.get(), spte);
            self.len += 1;
        }
    }
    /// The `(level, spte)` pairs read, root first.
    pub fn entries(&self) -> &[(u8, u64)] {
        &self.entries[..self.len]
    }
    /// The last entry read (the leaf, or where the walk stopped).
    pub fn last(&self) -> Option<(u8, u64)> {
        self.entries().last().copied()
    }
}

impl fmt::Debug for SpteDump {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut l = f.debug_list();
        for (level, spte) in self.entries() {
            l.entry(&format_args!("L{level}: {spte:#018x}"));
        }
        l.finish()
    }
}

impl fmt::Display for SpteDump {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (level, spte)) in self.entries().iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "level {level}: {spte:#018x}")?;
        }
        Ok(())
    }
}
