//! The image's way in: a PVH entry note and the 32-bit code a PVH loader enters (protected
//! mode, paging off, interrupts off, no stack), which builds identity-mapped page tables for
//! the first GiB (2 MiB pages), turns on long mode and calls `_start` on a stack of its own.
//!
//! Invariants: everything here runs once, on the boot CPU, before any Rust code; the tables,
//! the GDT and the stack live in this image's `.bss`/`.rodata` at their link addresses, which
//! are their physical addresses (`link.ld`: loaded at 1 MiB, not relocated).

core::arch::global_asm!(
    // The PVH entry note (Xen's ELF note 18, XEN_ELFNOTE_PHYS32_ENTRY): name "Xen", and the
    // 32-bit physical entry address (an 8-byte field in a 64-bit image, as Linux's).
    ".section .note.pvh, \"a\", @note",
    ".balign 4",
    ".long 4",
    ".long 8",
    ".long 18",
    ".asciz \"Xen\"",
    ".balign 4",
    ".quad pvh_start",
    // Tables, stack: zeroed by the loader (.bss).
    ".section .bss.boot, \"aw\", @nobits",
    ".balign 4096",
    "boot_pml4: .skip 4096",
    "boot_pdpt: .skip 4096",
    "boot_pd: .skip 4096",
    "boot_stack: .skip {stack}",
    "boot_stack_top:",
    ".section .rodata.boot, \"a\"",
    ".balign 8",
    // Null, 64-bit code (selector 0x08), data (0x10).
    "boot_gdt: .quad 0, 0x00af9a000000ffff, 0x00cf92000000ffff",
    "boot_gdt_end:",
    "boot_gdt_ptr: .word boot_gdt_end - boot_gdt - 1",
    ".long boot_gdt",
    ".section .text.boot, \"ax\"",
    ".code32",
    ".global pvh_start",
    "pvh_start:",
    "cli",
    "cld",
    // 512 2 MiB pages: the first GiB, present, writable.
    "mov $boot_pd, %edi",
    "mov $0x83, %eax",
    "mov $512, %ecx",
    "1:",
    "mov %eax, (%edi)",
    "movl $0, 4(%edi)",
    "add $0x200000, %eax",
    "add $8, %edi",
    "loop 1b",
    "mov $boot_pd, %eax",
    "or $3, %eax",
    "mov %eax, boot_pdpt",
    "mov $boot_pdpt, %eax",
    "or $3, %eax",
    "mov %eax, boot_pml4",
    "mov $boot_pml4, %eax",
    "mov %eax, %cr3",
    // CR4.PAE, then EFER.LME, then CR0.PG (with PE): long mode, compatibility segment.
    "mov %cr4, %eax",
    "or $0x20, %eax",
    "mov %eax, %cr4",
    "mov $0xc0000080, %ecx",
    "rdmsr",
    "or $0x100, %eax",
    "wrmsr",
    "mov %cr0, %eax",
    "or $0x80000001, %eax",
    "mov %eax, %cr0",
    "lgdt boot_gdt_ptr",
    "ljmp $0x08, $2f",
    ".code64",
    "2:",
    "mov $0x10, %ax",
    "mov %ax, %ds",
    "mov %ax, %es",
    "mov %ax, %ss",
    "xor %eax, %eax",
    "mov %ax, %fs",
    "mov %ax, %gs",
    "lea boot_stack_top(%rip), %rsp",
    "xor %ebp, %ebp",
    "call _start",
    "3:",
    "hlt",
    "jmp 3b",
    stack = const STACK_BYTES,
    options(att_syntax)
);

/// The boot stack: the core's debug builds keep large frames.
const STACK_BYTES: usize = 1 << 20;
