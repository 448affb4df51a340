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
}
