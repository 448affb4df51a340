//! SRCU-like grace periods for memslot readers. (Being built: issue 2.)
