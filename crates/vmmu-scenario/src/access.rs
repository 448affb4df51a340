//! The direction of a guest access: what a `read` or `write` step does to memory, as both
//! backends' guest-table walkers, TLBs and backing checks take it (one type, so no backend
//! passes a bare `bool` for it).

/// What a guest access does to memory. (No `Fetch`: no scenario step fetches from a slot; the
/// backends' own code fetches are not steps.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AccessKind {
    /// A load.
    Read,
    /// A store.
    Write,
}

impl AccessKind {
    /// Whether the access stores.
    #[inline]
    pub const fn is_write(self) -> bool {
        matches!(self, AccessKind::Write)
    }

    /// `Write` if `write`, else `Read`.
    #[inline]
    pub const fn from_write(write: bool) -> AccessKind {
        if write {
            AccessKind::Write
        } else {
            AccessKind::Read
        }
    }
}

#[cfg(test)]
mod tests {
    use super::AccessKind;

    #[test]
    fn from_write_and_is_write_agree() {
        for w in [false, true] {
            assert_eq!(AccessKind::from_write(w).is_write(), w);
        }
        assert_eq!(AccessKind::from_write(true), AccessKind::Write);
    }
}
