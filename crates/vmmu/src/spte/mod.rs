//! SPTE formats (EPT, NPT, NPT with an SEV C-bit), hardware classification, the MMIO SPTE codec
//! and the MMIO caching policy. (Being built: issue 3.)
