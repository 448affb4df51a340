//! Machine code for one access step: the bytes the guest runs at CPL3.
//!
//! Every snippet loads the address into `rax`, does exactly one load or store of the step's
//! width through `[rax]`, then a one-byte store to [`SYNC_GPA`] (through `rcx`) to hand control
//! back to the host, followed by `ud2` so a runaway guest traps instead of executing whatever
//! follows. The sync store is an MMIO exit: no slot covers [`SYNC_GPA`] (it is below 8 MiB,
//! where scenarios may not map or access, and outside the backend's own slot). An `out` to a
//! port would be cheaper, but on a PVM host (`kvm_pvm`) `out` at CPL3 raises #GP even with
//! RFLAGS.IOPL = 3. Loads zero-extend into
//! `rax` (`movzx` for 1 and 2 bytes, a 32-bit `mov` for 4), so after the exit `rax` holds exactly
//! the loaded value. Stores take the value from `rbx`.

use vmmu_scenario::Width;

/// The guest-physical address the access code stores one byte to when it is done.
pub const SYNC_GPA: u64 = 0x7f_f000;
/// The port the exception stubs write the vector number to.
pub const EXCEPTION_PORT: u8 = 0x11;

fn mov_rax_imm64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&[0x48, 0xb8]);
    out.extend_from_slice(&v.to_le_bytes());
}

fn mov_rbx_imm64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&[0x48, 0xbb]);
    out.extend_from_slice(&v.to_le_bytes());
}

fn sync_and_trap(out: &mut Vec<u8>, sync: u64) {
    out.extend_from_slice(&[0x48, 0xb9]); // mov rcx, sync
    out.extend_from_slice(&sync.to_le_bytes());
    out.extend_from_slice(&[0x88, 0x01]); // mov byte [rcx], al
    out.extend_from_slice(&[0x0f, 0x0b]); // ud2
}

/// The bytes [`read`] and [`write`] end with.
#[cfg(test)]
const TAIL: [u8; 14] = [0x48, 0xb9, 0x00, 0xf0, 0x7f, 0, 0, 0, 0, 0, 0x88, 0x01, 0x0f, 0x0b];

/// `mov rax, gpa; load rax <- [rax] (zero-extended); sync; ud2`.
pub fn read(gpa: u64, width: Width) -> Vec<u8> {
    read_then_sync(gpa, width, SYNC_GPA)
}

/// [`read()`] with the closing one-byte store going to `sync` instead of [`SYNC_GPA`] (a guest
/// whose own memory is elsewhere, see [`crate::replay`]).
pub fn read_then_sync(gpa: u64, width: Width, sync: u64) -> Vec<u8> {
    let mut c = Vec::with_capacity(20);
    mov_rax_imm64(&mut c, gpa);
    c.extend_from_slice(match width {
        Width::W1 => &[0x0f, 0xb6, 0x00], // movzx eax, byte [rax]
        Width::W2 => &[0x0f, 0xb7, 0x00], // movzx eax, word [rax]
        Width::W4 => &[0x8b, 0x00],       // mov eax, dword [rax]
        Width::W8 => &[0x48, 0x8b, 0x00], // mov rax, qword [rax]
    });
    sync_and_trap(&mut c, sync);
    c
}

/// `mov rax, gpa; mov rbx, value; store [rax] <- bl/bx/ebx/rbx; sync; ud2`.
pub fn write(gpa: u64, width: Width, value: u64) -> Vec<u8> {
    write_then_sync(gpa, width, value, SYNC_GPA)
}

/// [`write()`] with the closing store going to `sync` instead of [`SYNC_GPA`].
pub fn write_then_sync(gpa: u64, width: Width, value: u64, sync: u64) -> Vec<u8> {
    let mut c = Vec::with_capacity(30);
    mov_rax_imm64(&mut c, gpa);
    mov_rbx_imm64(&mut c, value);
    c.extend_from_slice(match width {
        Width::W1 => &[0x88, 0x18],       // mov byte [rax], bl
        Width::W2 => &[0x66, 0x89, 0x18], // mov word [rax], bx
        Width::W4 => &[0x89, 0x18],       // mov dword [rax], ebx
        Width::W8 => &[0x48, 0x89, 0x18], // mov qword [rax], rbx
    });
    sync_and_trap(&mut c, sync);
    c
}

/// The exception stub for `vector`: `mov eax, vector; out EXCEPTION_PORT, al; hlt; jmp hlt`.
/// At most 16 bytes.
pub fn exception_stub(vector: u8) -> [u8; 16] {
    let mut s = [0xcc; 16];
    s[..10].copy_from_slice(&[0xb8, vector, 0, 0, 0, 0xe6, EXCEPTION_PORT, 0xf4, 0xeb, 0xfd]);
    s
}

/// The pages a routine invalidates: `pages` 4 KiB pages from `gva` up (one `invlpg` for one
/// page, a loop for more).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Invlpg {
    /// The first page's address.
    pub gva: u64,
    /// How many pages (at least 1).
    pub pages: u32,
}

impl Invlpg {
    /// The one page holding `gva`.
    pub const fn page(gva: u64) -> Self {
        Invlpg { gva, pages: 1 }
    }
}

/// The `invlpg` of `inv` with the address in rax (eax in 32-bit code, whose encodings of these
/// instructions are the same without the REX.W prefix): `invlpg [rax]`, or for more pages `mov
/// ecx, pages; l: invlpg [rax]; add rax, 0x1000; dec ecx; jnz l`.
fn invlpg_pages(c: &mut Vec<u8>, inv: Invlpg, rex_w: bool) {
    const INVLPG: [u8; 3] = [0x0f, 0x01, 0x38];
    if inv.pages <= 1 {
        c.extend_from_slice(&INVLPG);
        return;
    }
    c.push(0xb9); // mov ecx, pages
    c.extend_from_slice(&inv.pages.to_le_bytes());
    let body_start = c.len();
    c.extend_from_slice(&INVLPG);
    if rex_w {
        c.push(0x48);
    }
    c.extend_from_slice(&[0x05, 0x00, 0x10, 0x00, 0x00]); // add rax/eax, 0x1000
    c.extend_from_slice(&[0xff, 0xc9]); // dec ecx
    let back = c.len() + 2 - body_start; // to the invlpg, from the end of the jnz
    c.extend_from_slice(&[0x75, (back as u8).wrapping_neg()]); // jnz
}

/// CPL0 code (paging): store each `(address, value)` as one 8-byte `mov` (`writes`, in order),
/// then invalidate the pages of `invlpg` if given, then the sync store to `sync`.
pub fn kernel_writes(writes: &[(u64, u64)], invlpg: Option<Invlpg>, sync: u64) -> Vec<u8> {
    let mut c = Vec::with_capacity(23 * writes.len() + 50);
    for &(at, v) in writes {
        mov_rax_imm64(&mut c, at);
        mov_rbx_imm64(&mut c, v);
        c.extend_from_slice(&[0x48, 0x89, 0x18]); // mov qword [rax], rbx
    }
    if let Some(inv) = invlpg {
        mov_rax_imm64(&mut c, inv.gva);
        invlpg_pages(&mut c, inv, true);
    }
    sync_and_trap(&mut c, sync);
    c
}

/// CPL0 code (paging): `mov rax, root; mov cr3, rax`, then the sync store to `sync`.
pub fn kernel_cr3(root: u64, sync: u64) -> Vec<u8> {
    let mut c = Vec::with_capacity(30);
    mov_rax_imm64(&mut c, root);
    c.extend_from_slice(&[0x0f, 0x22, 0xd8]); // mov cr3, rax
    sync_and_trap(&mut c, sync);
    c
}

/// The #PF handler (paging, CPL0): stores CR2 to `report` and the error code (on top of the
/// stack) to `report + 8`, both MMIO exits, then halts for good.
pub fn pf_handler(report: u64) -> Vec<u8> {
    let mut c = Vec::with_capacity(32);
    c.extend_from_slice(&[0x0f, 0x20, 0xd0]); // mov rax, cr2
    c.extend_from_slice(&[0x48, 0xb9]); // mov rcx, report
    c.extend_from_slice(&report.to_le_bytes());
    c.extend_from_slice(&[0x48, 0x89, 0x01]); // mov [rcx], rax
    c.extend_from_slice(&[0x48, 0x8b, 0x04, 0x24]); // mov rax, [rsp]
    c.extend_from_slice(&[0x48, 0x89, 0x41, 0x08]); // mov [rcx + 8], rax
    c.extend_from_slice(&[0xf4, 0xeb, 0xfd]); // hlt; jmp hlt
    c
}

// 32-bit code (`paging=pae`: a 32-bit protected-mode guest). Addresses are below 4 GiB.

fn imm32(v: u64) -> [u8; 4] {
    // Callers pass guest-virtual addresses below 4 GiB and 32-bit halves.
    (v as u32).to_le_bytes()
}

fn sync_and_trap32(out: &mut Vec<u8>, sync: u64) {
    out.push(0xb9); // mov ecx, sync
    out.extend_from_slice(&imm32(sync));
    out.extend_from_slice(&[0x88, 0x01]); // mov byte [ecx], al
    out.extend_from_slice(&[0x0f, 0x0b]); // ud2
}

/// 32-bit [`read()`]: `mov eax, gva; load; sync; ud2`. Widths 1, 2 and 4 load into `eax`
/// (zero-extended); width 8 is one MMX `movq mm0, [eax]`, stored to `data` (user memory the
/// host reads back) by `movq [data], mm0`.
pub fn read32(gva: u64, width: Width, data: u64, sync: u64) -> Vec<u8> {
    let mut c = Vec::with_capacity(24);
    c.push(0xb8); // mov eax, gva
    c.extend_from_slice(&imm32(gva));
    match width {
        Width::W1 => c.extend_from_slice(&[0x0f, 0xb6, 0x00]), // movzx eax, byte [eax]
        Width::W2 => c.extend_from_slice(&[0x0f, 0xb7, 0x00]), // movzx eax, word [eax]
        Width::W4 => c.extend_from_slice(&[0x8b, 0x00]),       // mov eax, dword [eax]
        Width::W8 => {
            c.extend_from_slice(&[0x0f, 0x6f, 0x00]); // movq mm0, [eax]
            c.extend_from_slice(&[0x0f, 0x7f, 0x05]); // movq [data], mm0
            c.extend_from_slice(&imm32(data));
        }
    }
    sync_and_trap32(&mut c, sync);
    c
}

/// 32-bit [`write()`]: `mov eax, gva; store; sync; ud2`. Widths 1, 2 and 4 store from `ebx`
/// (`value` as an immediate); width 8 loads `mm0` from `data` (where the host put the value)
/// and stores it with one `movq [eax], mm0`.
pub fn write32(gva: u64, width: Width, value: u64, data: u64, sync: u64) -> Vec<u8> {
    let mut c = Vec::with_capacity(28);
    if width == Width::W8 {
        c.extend_from_slice(&[0x0f, 0x6f, 0x05]); // movq mm0, [data]
        c.extend_from_slice(&imm32(data));
    } else {
        c.push(0xbb); // mov ebx, value
        c.extend_from_slice(&imm32(value));
    }
    c.push(0xb8); // mov eax, gva
    c.extend_from_slice(&imm32(gva));
    c.extend_from_slice(match width {
        Width::W1 => &[0x88, 0x18],       // mov byte [eax], bl
        Width::W2 => &[0x66, 0x89, 0x18], // mov word [eax], bx
        Width::W4 => &[0x89, 0x18],       // mov dword [eax], ebx
        Width::W8 => &[0x0f, 0x7f, 0x00], // movq [eax], mm0
    });
    sync_and_trap32(&mut c, sync);
    c
}

fn store32(c: &mut Vec<u8>, at: u64, v: u64) {
    c.push(0xb8); // mov eax, at
    c.extend_from_slice(&imm32(at));
    c.extend_from_slice(&[0xc7, 0x00]); // mov dword [eax], v
    c.extend_from_slice(&imm32(v));
}

/// 32-bit [`kernel_writes`]: each 8-byte entry as two 4-byte stores, as a 32-bit PAE OS makes
/// them (Linux `set_pte`/`pte_clear`): a new value high half first, then the low half (with P);
/// a clear low half first (dropping P), then the high half.
pub fn kernel_writes32(writes: &[(u64, u64)], invlpg: Option<Invlpg>, sync: u64) -> Vec<u8> {
    let mut c = Vec::with_capacity(22 * writes.len() + 20);
    for &(at, v) in writes {
        if v == 0 {
            store32(&mut c, at, 0);
            store32(&mut c, at + 4, 0);
        } else {
            store32(&mut c, at + 4, v >> 32);
            store32(&mut c, at, v & 0xffff_ffff);
        }
    }
    if let Some(inv) = invlpg {
        c.push(0xb8); // mov eax, gva
        c.extend_from_slice(&imm32(inv.gva));
        invlpg_pages(&mut c, inv, false);
    }
    sync_and_trap32(&mut c, sync);
    c
}

/// 32-bit [`kernel_cr3`]: `mov eax, root; mov cr3, eax` (loads the four PDPTEs), sync.
pub fn kernel_cr3_32(root: u64, sync: u64) -> Vec<u8> {
    let mut c = Vec::with_capacity(20);
    c.push(0xb8);
    c.extend_from_slice(&imm32(root));
    c.extend_from_slice(&[0x0f, 0x22, 0xd8]); // mov cr3, eax
    sync_and_trap32(&mut c, sync);
    c
}

/// 32-bit [`pf_handler`]: CR2 to `report`, the error code to `report + 8` (4-byte MMIO
/// stores), then halts for good.
pub fn pf_handler32(report: u64) -> Vec<u8> {
    let mut c = Vec::with_capacity(24);
    c.extend_from_slice(&[0x0f, 0x20, 0xd0]); // mov eax, cr2
    c.push(0xb9); // mov ecx, report
    c.extend_from_slice(&imm32(report));
    c.extend_from_slice(&[0x89, 0x01]); // mov [ecx], eax
    c.extend_from_slice(&[0x8b, 0x04, 0x24]); // mov eax, [esp]
    c.extend_from_slice(&[0x89, 0x41, 0x08]); // mov [ecx + 8], eax
    c.extend_from_slice(&[0xf4, 0xeb, 0xfd]); // hlt; jmp hlt
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_encodings() {
        let r = read(0x1122_3344_5566_7788, Width::W8);
        assert_eq!(
            &r[..13],
            [0x48, 0xb8, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 0x48, 0x8b, 0x00]
        );
        assert_eq!(&r[13..], &TAIL);
        assert_eq!(&read(0, Width::W1)[10..13], &[0x0f, 0xb6, 0x00]);
        assert_eq!(&read(0, Width::W2)[10..13], &[0x0f, 0xb7, 0x00]);
        assert_eq!(&read(0, Width::W4)[10..12], &[0x8b, 0x00]);
    }

    #[test]
    fn write_encodings() {
        let w = write(0x8000_0000, Width::W2, 0xbeef);
        assert_eq!(&w[..2], &[0x48, 0xb8]);
        assert_eq!(&w[10..12], &[0x48, 0xbb]);
        assert_eq!(&w[12..20], &0xbeef_u64.to_le_bytes());
        assert_eq!(&w[20..23], &[0x66, 0x89, 0x18]);
        assert_eq!(&w[23..], &TAIL);
        assert_eq!(&write(0, Width::W1, 0)[20..22], &[0x88, 0x18]);
        assert_eq!(&write(0, Width::W4, 0)[20..22], &[0x89, 0x18]);
        assert_eq!(&write(0, Width::W8, 0)[20..23], &[0x48, 0x89, 0x18]);
    }

    #[test]
    fn stub_reports_vector_then_halts_forever() {
        let s = exception_stub(14);
        assert_eq!(&s[..10], &[0xb8, 14, 0, 0, 0, 0xe6, 0x11, 0xf4, 0xeb, 0xfd]);
    }
    #[test]
    fn kernel_routines() {
        let c = kernel_writes(&[(0x20_1000, 0x7)], Some(Invlpg::page(0x4000_0000)), SYNC_GPA);
        assert_eq!(&c[..2], &[0x48, 0xb8]);
        assert_eq!(&c[10..12], &[0x48, 0xbb]);
        assert_eq!(&c[20..23], &[0x48, 0x89, 0x18]);
        assert_eq!(&c[23..25], &[0x48, 0xb8]);
        assert_eq!(&c[33..36], &[0x0f, 0x01, 0x38]);
        assert_eq!(&c[36..], &TAIL);
        assert_eq!(kernel_writes(&[], None, SYNC_GPA), TAIL);
        let c = kernel_cr3(0x20_1000, SYNC_GPA);
        assert_eq!(&c[10..13], &[0x0f, 0x22, 0xd8]);
        assert_eq!(&c[13..], &TAIL);
        let h = pf_handler(0x7f_e000);
        assert_eq!(&h[..3], &[0x0f, 0x20, 0xd0]);
        assert_eq!(h.len(), 3 + 10 + 3 + 4 + 4 + 3);
    }

    /// More pages than one: a counted loop over them.
    #[test]
    fn invlpg_of_a_range_loops_over_its_pages() {
        let c = kernel_writes(&[], Some(Invlpg { gva: 0x4000_0000, pages: 512 }), SYNC_GPA);
        assert_eq!(&c[..2], &[0x48, 0xb8]);
        assert_eq!(&c[10..15], &[0xb9, 0x00, 0x02, 0, 0]);
        let body = [0x0f, 0x01, 0x38, 0x48, 0x05, 0x00, 0x10, 0, 0, 0xff, 0xc9, 0x75, 0xf3];
        assert_eq!(&c[15..28], &body);
        assert_eq!(&c[28..], &TAIL);
        // jnz goes back to the invlpg: -13, the loop's length (-12 without REX.W).
        let k = kernel_writes32(&[], Some(Invlpg { gva: 0x4000_0000, pages: 512 }), 0);
        assert_eq!(&k[5..10], &[0xb9, 0x00, 0x02, 0, 0]);
        assert_eq!(&k[10..22], &[0x0f, 0x01, 0x38, 0x05, 0x00, 0x10, 0, 0, 0xff, 0xc9, 0x75, 0xf4]);
    }

    #[test]
    fn code_32_bit() {
        let r = read32(0xc000_0008, Width::W8, 0x5800, 0x7f_f000);
        assert_eq!(&r[..5], &[0xb8, 0x08, 0, 0, 0xc0]);
        assert_eq!(&r[5..8], &[0x0f, 0x6f, 0x00]);
        assert_eq!(&r[8..15], &[0x0f, 0x7f, 0x05, 0x00, 0x58, 0, 0]);
        assert_eq!(&r[15..], &[0xb9, 0x00, 0xf0, 0x7f, 0, 0x88, 0x01, 0x0f, 0x0b]);
        assert_eq!(&read32(0, Width::W4, 0, 0)[5..7], &[0x8b, 0x00]);
        let w = write32(0x1000_0000, Width::W2, 0xbeef, 0, 0);
        assert_eq!(&w[..5], &[0xbb, 0xef, 0xbe, 0, 0]);
        assert_eq!(&w[10..13], &[0x66, 0x89, 0x18]);
        let w = write32(0x1000_0000, Width::W8, 0, 0x5800, 0);
        assert_eq!(&w[..7], &[0x0f, 0x6f, 0x05, 0x00, 0x58, 0, 0]);
        assert_eq!(&w[12..15], &[0x0f, 0x7f, 0x00]);
        // High half first when setting, low half first when clearing.
        let k = kernel_writes32(&[(0x20_0000, 0x8_0000_1007)], None, 0);
        assert_eq!(&k[..11], &[0xb8, 0x04, 0, 0x20, 0, 0xc7, 0x00, 0x08, 0, 0, 0]);
        assert_eq!(&k[11..22], &[0xb8, 0, 0, 0x20, 0, 0xc7, 0x00, 0x07, 0x10, 0, 0]);
        let k = kernel_writes32(&[(0x20_0000, 0)], Some(Invlpg::page(0xc000_0000)), 0);
        assert_eq!(&k[..5], &[0xb8, 0, 0, 0x20, 0]);
        assert_eq!(&k[27..30], &[0x0f, 0x01, 0x38]);
        assert_eq!(&kernel_cr3_32(0x20_1000, 0)[5..8], &[0x0f, 0x22, 0xd8]);
        assert_eq!(pf_handler32(0x7f_e000).len(), 3 + 5 + 2 + 3 + 3 + 3);
    }
}
