//! The backend's own guest: a 64-bit long-mode machine whose access code runs at CPL3.
//!
//! Everything lives in one buffer mapped at guest-physical 0 by slot [`OWN_SLOT`] (address
//! space 0), below 8 MiB, where scenarios may not go:
//!
//! | gpa | what |
//! |---|---|
//! | `GDT` | null, kernel code/data (DPL 0), user code/data (DPL 3), 64-bit TSS |
//! | `IDT` | 256 interrupt gates to the exception stubs (CPL 0) |
//! | `TSS` | `RSP0` = top of the kernel stack, no I/O bitmap |
//! | `STUBS` | one 16-byte stub per vector: report the vector on the exception port, halt |
//! | `CODE` | the current step's access code |
//! | `KSTACK_TOP` | kernel stack for exception delivery |
//! | `PML4`, `PDPT`, `PD0..` | identity map of the low 64 GiB with user+writable 2 MiB pages |
//!
//! Without guest paging (version-1 scenarios) vCPUs never enter CPL0 on purpose: registers and
//! segments are set through `KVM_SET_SREGS` / `KVM_SET_REGS` so each vCPU starts at CPL3
//! (CS.RPL = CS.DPL = SS.DPL = 3), and the access code hands control back with an MMIO store
//! (see [`crate::code`]). CPL0 runs only when the guest takes an exception, which is a backend
//! failure anyway: the stub reports the vector with an `out` (legal at CPL0). On a nested PVM
//! host CPL0 code is emulated and slow, CPL3 is not.
//!
//! With guest paging (`paging=4level`, see `crate::paging`) the identity map above is unused:
//! CR3 points at the page-table spaces in the pool, IDT vector 14 goes to a #PF handler that
//! reports CR2 and the error code, and the backend puts a vCPU at CPL0 ([`with_cpl`],
//! [`kernel_regs`]) to run short routines of its own in the code page: page-table stores and
//! INVLPG, MOV CR3. `paging=pae` uses the 32-bit variant of the tables ([`image32`],
//! [`sregs32`]).

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vmmu_scenario::ACCESS_LIMIT;

/// The slot id of the backend's own memory (one of the ids scenarios may not use).
pub const OWN_SLOT: u32 = 32760;
/// Size of the backend's own memory.
pub const OWN_SIZE: usize = 1 << 20;

/// Global descriptor table.
pub const GDT: u64 = 0x1000;
/// Interrupt descriptor table.
pub const IDT: u64 = 0x2000;
/// Task-state segment.
pub const TSS: u64 = 0x3000;
/// Exception stubs, 16 bytes per vector.
pub const STUBS: u64 = 0x4000;
/// The access code page.
pub const CODE: u64 = 0x5000;
/// Where 32-bit access code keeps an 8-byte value (in the code page, after the code).
pub const DATA: u64 = CODE + 0x800;
/// Top of the (unused) user stack.
pub const USTACK_TOP: u64 = 0x7000;
/// Top of the kernel stack used for exception delivery.
pub const KSTACK_TOP: u64 = 0x10000;
/// Page-map level 4.
pub const PML4: u64 = 0x10000;
/// The one page-directory-pointer table (64 entries used).
pub const PDPT: u64 = 0x11000;
/// First of the 64 page directories.
pub const PD0: u64 = 0x12000;

const KERNEL_CS: u16 = 0x08;
const KERNEL_DS: u16 = 0x10;
const USER_CS: u16 = 0x18 | 3;
const USER_DS: u16 = 0x20 | 3;
const TSS_SEL: u16 = 0x28;

pub(crate) const PTE_P: u64 = 1;
pub(crate) const PTE_RW: u64 = 1 << 1;
pub(crate) const PTE_US: u64 = 1 << 2;
pub(crate) const PTE_PS: u64 = 1 << 7;
/// Accessed and dirty, set in the 2 MiB leaves from the start (see `image_at`).
pub(crate) const PTE_AD: u64 = (1 << 5) | (1 << 6);

/// Number of 1 GiB page directories needed to cover [`ACCESS_LIMIT`].
const PDS: u64 = ACCESS_LIMIT >> 30;

/// The bytes of the backend's memory (as `(gpa, bytes)` pieces) before any step runs.
pub fn image() -> Vec<(u64, Vec<u8>)> {
    image_at(0)
}

/// The same guest with its own memory at guest-physical `base` instead of 0: pieces are
/// `(offset in the own memory, bytes)`, and every address inside them (descriptor table and
/// stack pointers, gate offsets, table links) is `base` plus the constant of this module. The
/// identity map still covers the low [`ACCESS_LIMIT`] bytes, so `base + OWN_SIZE` must be at
/// most that. Use with [`sregs_at`] and [`regs_at`].
pub fn image_at(base: u64) -> Vec<(u64, Vec<u8>)> {
    let mut pieces = Vec::new();
    // GDT: 64-bit code has L=1, D=0; data is a flat 4 GiB segment; the TSS descriptor is 16 bytes.
    let mut gdt = Vec::new();
    for d in [
        0u64,
        0x00af_9b00_0000_ffff, // 0x08 kernel code, DPL 0, L
        0x00cf_9300_0000_ffff, // 0x10 kernel data, DPL 0
        0x00af_fb00_0000_ffff, // 0x18 user code, DPL 3, L
        0x00cf_f300_0000_ffff, // 0x20 user data, DPL 3
    ] {
        gdt.extend_from_slice(&d.to_le_bytes());
    }
    let tss = base + TSS;
    let tss_lo = 0x67 | ((tss & 0xff_ffff) << 16) | (0x89u64 << 40) | (((tss >> 24) & 0xff) << 56);
    gdt.extend_from_slice(&tss_lo.to_le_bytes());
    gdt.extend_from_slice(&(tss >> 32).to_le_bytes());
    pieces.push((GDT, gdt));

    // IDT: present 64-bit interrupt gates (type 0xe), DPL 0, to the kernel code segment.
    let mut idt = Vec::with_capacity(256 * 16);
    for v in 0..256u64 {
        idt.extend_from_slice(&gate(base + STUBS + 16 * v));
    }
    pieces.push((IDT, idt));

    // TSS: RSP0 at offset 4; I/O map base beyond the limit (no bitmap).
    let mut tss = vec![0u8; 0x68];
    tss[4..12].copy_from_slice(&(base + KSTACK_TOP).to_le_bytes());
    tss[0x66..0x68].copy_from_slice(&0x68u16.to_le_bytes());
    pieces.push((TSS, tss));

    let mut stubs = Vec::with_capacity(256 * 16);
    for v in 0..=255u8 {
        stubs.extend_from_slice(&crate::code::exception_stub(v));
    }
    pieces.push((STUBS, stubs));

    // Page tables: PML4[0] -> PDPT; PDPT[i] -> PD i; PD i maps [i GiB, i+1 GiB) with 2 MiB pages.
    let flags = PTE_P | PTE_RW | PTE_US;
    pieces.push((PML4, ((base + PDPT) | flags).to_le_bytes().to_vec()));
    let pdpt: Vec<u8> =
        (0..PDS).flat_map(|i| ((base + PD0 + i * 4096) | flags).to_le_bytes()).collect();
    pieces.push((PDPT, pdpt));
    // The leaves are accessed and dirty from the start. Under shadow paging (a nested host) KVM
    // maps a read through a clean guest leaf read-only, to catch the write that must set D, and
    // through a dirty one writable when the host page is writable, which marks the page in a
    // dirty-logged slot: with D set everywhere a read dirties a page exactly when it does under
    // TDP (the host maps the page writable already), whatever the guest wrote before.
    let pds: Vec<u8> =
        (0..PDS * 512).flat_map(|i| ((i << 21) | flags | PTE_PS | PTE_AD).to_le_bytes()).collect();
    pieces.push((PD0, pds));
    pieces
}

/// A present 64-bit interrupt gate (type 0xe, DPL 0) to `off` in the kernel code segment.
pub fn gate(off: u64) -> [u8; 16] {
    let lo = (off & 0xffff)
        | (u64::from(KERNEL_CS) << 16)
        | (0x8eu64 << 40)
        | (((off >> 16) & 0xffff) << 48);
    let mut g = [0u8; 16];
    g[..8].copy_from_slice(&lo.to_le_bytes());
    g[8..].copy_from_slice(&(off >> 32).to_le_bytes());
    g
}

fn seg(selector: u16, type_: u8, dpl: u8, code64: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl,
        db: u8::from(!code64),
        s: 1,
        l: u8::from(code64),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The privilege level guest code runs at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cpl {
    /// CPL0: page-table writes, INVLPG, MOV CR3, the #PF handler.
    Kernel,
    /// CPL3: the scenario's accesses.
    User,
}

/// The mode of the guest's code segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodeMode {
    /// 64-bit code in long mode.
    Long64,
    /// 32-bit protected-mode code (the PAE guest of [`image32`]).
    Protected32,
}

/// The code and data segments of `cpl` with code in `mode`; everything else in `s` (control
/// registers, CR3 included, descriptor tables) is kept.
pub fn with_cpl(mut s: kvm_sregs, cpl: Cpl, mode: CodeMode) -> kvm_sregs {
    let (cs, ds, dpl) = match cpl {
        Cpl::Kernel => (KERNEL_CS, KERNEL_DS, 0),
        Cpl::User => (USER_CS, USER_DS, 3),
    };
    s.cs = seg(cs, 0xb, dpl, mode == CodeMode::Long64);
    let data = seg(ds, 0x3, dpl, false);
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s
}

/// Long mode, paging on, segments at CPL3; starts from the vCPU's current special registers.
pub fn sregs(s: kvm_sregs) -> kvm_sregs {
    let mut s = with_cpl(s, Cpl::User, CodeMode::Long64);
    s.tr = kvm_segment {
        base: TSS,
        limit: 0x67,
        selector: TSS_SEL,
        type_: 0xb, // busy 64-bit TSS
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    s.ldt =
        kvm_segment { selector: 0, type_: 0x2, present: 1, limit: 0xffff, ..Default::default() };
    s.gdt.base = GDT;
    s.gdt.limit = 7 * 8 - 1;
    s.idt.base = IDT;
    s.idt.limit = 256 * 16 - 1;
    s.cr0 = 0x8005_0033; // PG | AM | WP | NE | ET | MP | PE
    s.cr3 = PML4;
    s.cr4 = 0x20; // PAE
    s.efer = 0x500; // LMA | LME
    s
}

/// Registers for running the code page: RIP at [`CODE`], interrupts off.
pub fn regs() -> kvm_regs {
    regs_at(0)
}

/// Registers for running the code page at CPL0 (paging): RIP at [`CODE`], RSP at the top of the
/// kernel stack, interrupts off.
pub fn kernel_regs() -> kvm_regs {
    kvm_regs { rip: CODE, rsp: KSTACK_TOP, rflags: 0x2, ..Default::default() }
}

/// [`sregs`] for the guest of [`image_at`]`(base)`.
pub fn sregs_at(s: kvm_sregs, base: u64) -> kvm_sregs {
    let mut s = sregs(s);
    s.tr.base = base + TSS;
    s.gdt.base = base + GDT;
    s.idt.base = base + IDT;
    s.cr3 = base + PML4;
    s
}

/// [`regs`] for the guest of [`image_at`]`(base)`.
pub fn regs_at(base: u64) -> kvm_regs {
    kvm_regs { rip: base + CODE, rsp: base + USTACK_TOP, rflags: 0x2, ..Default::default() }
}

/// The 32-bit protected-mode guest of `paging=pae`: the pieces of [`image`] that differ (GDT
/// with 32-bit code segments and a 32-bit TSS, IDT of 8-byte gates, TSS with `ESP0`/`SS0`),
/// written over it. IDT vector 14 goes to `pf_handler`, every other vector to its stub (whose
/// bytes mean the same in 32-bit code).
pub fn image32(pf_handler: u64) -> Vec<(u64, Vec<u8>)> {
    let mut gdt = Vec::new();
    let tss = TSS;
    let tss_desc =
        0x67 | ((tss & 0xff_ffff) << 16) | (0x89u64 << 40) | (((tss >> 24) & 0xff) << 56);
    for d in [
        0u64,
        0x00cf_9b00_0000_ffff, // 0x08 kernel code, DPL 0, 32-bit
        0x00cf_9300_0000_ffff, // 0x10 kernel data, DPL 0
        0x00cf_fb00_0000_ffff, // 0x18 user code, DPL 3, 32-bit
        0x00cf_f300_0000_ffff, // 0x20 user data, DPL 3
        tss_desc,              // 0x28 32-bit TSS
        0,
    ] {
        gdt.extend_from_slice(&d.to_le_bytes());
    }
    let mut idt = Vec::with_capacity(256 * 8);
    for v in 0..256u64 {
        let off = if v == 14 { pf_handler } else { STUBS + 16 * v };
        // A 32-bit interrupt gate is the low half of the 64-bit one.
        idt.extend_from_slice(&gate(off)[..8]);
    }
    let mut tss = vec![0u8; 0x68];
    tss[4..8].copy_from_slice(&(KSTACK_TOP as u32).to_le_bytes());
    tss[8..10].copy_from_slice(&KERNEL_DS.to_le_bytes());
    tss[0x66..0x68].copy_from_slice(&0x68u16.to_le_bytes());
    vec![(GDT, gdt), (IDT, idt), (TSS, tss)]
}

/// 32-bit protected mode with PAE paging at CPL3 (the guest of [`image32`]), CR3 = `cr3`.
pub fn sregs32(s: kvm_sregs, cr3: u64) -> kvm_sregs {
    let mut s = with_cpl(sregs(s), Cpl::User, CodeMode::Protected32);
    s.tr.type_ = 0xb; // busy 32-bit TSS
    s.idt.limit = 256 * 8 - 1;
    s.cr3 = cr3;
    s.efer = 0;
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_fits_below_own_size_and_maps_64_gib() {
        let img = image();
        for (gpa, bytes) in &img {
            assert!(gpa + bytes.len() as u64 <= OWN_SIZE as u64, "{gpa:#x}");
        }
        let pds = &img.iter().find(|(g, _)| *g == PD0).unwrap().1;
        assert_eq!(pds.len() as u64, 64 * 4096);
        let last = u64::from_le_bytes(pds[pds.len() - 8..].try_into().unwrap());
        assert_eq!(last & !0xfff, ACCESS_LIMIT - (2 << 20));
        assert_eq!(last & 0xfff, 0xe7, "P, RW, US, A, D, PS");
    }

    #[test]
    fn idt_gate_points_at_its_stub() {
        let img = image();
        let idt = &img.iter().find(|(g, _)| *g == IDT).unwrap().1;
        let g14 = &idt[14 * 16..15 * 16];
        let off = u64::from(u16::from_le_bytes([g14[0], g14[1]]))
            | (u64::from(u16::from_le_bytes([g14[6], g14[7]])) << 16);
        assert_eq!(off, STUBS + 14 * 16);
        assert_eq!(g14[5], 0x8e);
    }
}
