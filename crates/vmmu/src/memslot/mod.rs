//! Memslots: guest-physical regions mapped to host memory, validated with KVM's rules, looked up
//! by gfn, and updated with KVM's generation protocol. (Being built: issue 2.)
