# PAM + SMRAM toggles by the guest itself, with every other vCPU doing MMIO around the
# remapped regions. The BSP wakes all APs (INIT-SIPI-SIPI, trampoline at 0x8000), then NITER
# rounds: for each PAM value in 3,1,0,2 (RW, RE, off, WE) it sets all seven PAM registers
# (PAMBASE.. on the host bridge: 0x59 on i440fx, 0x90 on q35) and writes/reads 0xc8010,
# 0xe0010 and 0xf0010; then opens SMRAM (SMRAMREG: 0x72 i440fx, 0x9d q35; D_OPEN|G_SMRAME|seg 2),
# touches 0xa0000/0xb8000, closes it, touches them again. Each AP loops: write its LAPIC id to
# 0xe0100+16*id and 0xa0100+16*id, read 0xc8100+16*id and 0xa0200+16*id.
# DONE on debugcon (0x402) at the end.
# PAM0 (0xf0000-0xfffff) is left as SeaBIOS set it (read-only) and the APs run from a copy of
# their loop at 0x200000: QEMU re-creates every RAM slot next to a region that changes, and a
# vCPU fetching an instruction from a slot in the middle of that delete + create gets a KVM
# emulation failure (pam_smp_v1: the APs died at their first SMRAM close).
        .code16
        .globl _start
_start:
        cli
        xorw %ax,%ax
        movw %ax,%ds
        movw %ax,%es
        movw %ax,%ss
        movw $0x7c00,%sp
        cld
        movw $tramp,%si
        movw $0x8000,%di
        movw $(tramp_end-tramp),%cx
        rep movsb
        lgdtl gdtr
        movl %cr0,%eax
        orl $1,%eax
        movl %eax,%cr0
        ljmpl $0x08,$pm
tramp:  cli
        xorw %ax,%ax
        movw %ax,%ds
        lgdtl gdtr
        movl %cr0,%eax
        orl $1,%eax
        movl %eax,%cr0
        ljmpl $0x08,$0x200000
tramp_end:
        .code32
pm:     movw $0x10,%ax
        movw %ax,%ds
        movw %ax,%es
        movw %ax,%ss
        movl $0x7c00,%esp
        movw $0x402,%dx
        movb $'S',%al; outb %al,%dx
        movl $apcode,%esi
        movl $0x200000,%edi
        movl $(apend-apcode),%ecx
        rep movsb
        movl $0,0xfee00310
        movl $0x000c4500,0xfee00300
        movl $20000,%ecx
1:      loop 1b
        movl $0x000c4608,0xfee00300
        movl $20000,%ecx
1:      loop 1b
        movl $0x000c4608,0xfee00300
        movl $200000,%ecx
1:      loop 1b
        xorl %esi,%esi
2:      movb $0x33,%bl; call pam
        call touch
        movb $0x11,%bl; call pam
        call touch
        movb $0x00,%bl; call pam
        call touch
        movb $0x22,%bl; call pam
        call touch
        movb $0x33,%bl; call pam
        movb $0x4a,%bl; call smram      # D_OPEN | G_SMRAME | C_BASE_SEG=2
        movl %esi,0xa0000
        movl 0xa0000,%eax
        movl %esi,0xb8000
        movb $0x0a,%bl; call smram      # closed
        movl %esi,0xa0004
        movl 0xb8000,%eax
        movw $0x402,%dx
        movb $'.',%al; outb %al,%dx
        incl %esi
        cmpl $NITER,%esi
        jb 2b
        movw $0x402,%dx
        movb $'D',%al; outb %al,%dx
        movb $'O',%al; outb %al,%dx
        movb $'N',%al; outb %al,%dx
        movb $'E',%al; outb %al,%dx
        movb $10,%al; outb %al,%dx
3:      hlt
        jmp 3b
touch:  movl %esi,0xc8010
        movl 0xc8010,%eax
        movl %esi,0xe0010
        movl 0xe0010,%eax
        movl %esi,0xf0010
        movl 0xf0010,%eax
        ret
# pam: bl = value for every PAM byte (PAM0 only uses the high nibble)
pam:    movl $(PAMBASE+1),%edi
        movl $6,%ecx
4:      movl %edi,%eax
        andl $0xfc,%eax
        orl $0x80000000,%eax
        movw $0xcf8,%dx; outl %eax,%dx
        movl %edi,%eax
        andl $3,%eax
        movw $0xcfc,%dx
        addw %ax,%dx
        movb %bl,%al
        outb %al,%dx
        incl %edi
        loop 4b
        ret
smram:  movl $(0x80000000|(SMRAMREG&0xfc)),%eax
        movw $0xcf8,%dx; outl %eax,%dx
        movb %bl,%al
        movw $(0xcfc+(SMRAMREG&3)),%dx; outb %al,%dx
        ret
apcode: movw $0x10,%ax
        movw %ax,%ds
        movw %ax,%ss
        movl 0xfee00020,%ebx
        shrl $24,%ebx
        shll $4,%ebx
5:      movl %ebx,0xe0100(%ebx)
        movl 0xc8100(%ebx),%eax
        movl %ebx,0xa0100(%ebx)
        movl 0xa0200(%ebx),%eax
        movl $APDELAY,%ecx
6:      loop 6b
        jmp 5b
apend:
        .p2align 3
gdt:    .quad 0
        .quad 0x00cf9a000000ffff
        .quad 0x00cf92000000ffff
gdtr:   .word 23
        .long gdt
        .org 510
        .byte 0x55,0xaa
