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

/// CPL0 code (paging): store each `(address, value)` as one 8-byte `mov` (`writes`, in order),
/// then `invlpg` `gva` if given, then the sync store to `sync`.
pub fn kernel_writes(writes: &[(u64, u64)], invlpg: Option<u64>, sync: u64) -> Vec<u8> {
    let mut c = Vec::with_capacity(23 * writes.len() + 40);
    for &(at, v) in writes {
        mov_rax_imm64(&mut c, at);
        mov_rbx_imm64(&mut c, v);
        c.extend_from_slice(&[0x48, 0x89, 0x18]); // mov qword [rax], rbx
    }
    if let Some(gva) = invlpg {
        mov_rax_imm64(&mut c, gva);
        c.extend_from_slice(&[0x0f, 0x01, 0x38]); // invlpg [rax]
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
        let c = kernel_writes(&[(0x20_1000, 0x7)], Some(0x4000_0000), SYNC_GPA);
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
}
