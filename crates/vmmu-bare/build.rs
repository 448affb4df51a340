//! Links the bare-metal image (`x86_64-unknown-none` only) with `link.ld`: one image at 1 MiB
//! physical, not position-independent, with the PVH entry note a loader (QEMU's `-kernel`,
//! Xen, cloud-hypervisor) enters by. Hosted builds link as any program.

fn main() {
    println!("cargo:rerun-if-changed=link.ld");
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("none") {
        let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
        println!("cargo:rustc-link-arg-bins=-T{dir}/link.ld");
        // The target links a static PIE by default; the image is entered at its link address
        // with paging off, before anything could apply relocations.
        println!("cargo:rustc-link-arg-bins=--no-pie");
    }
}
