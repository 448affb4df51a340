# 2 vCPUs: the BSP wakes the AP (INIT-SIPI-SIPI, trampoline copied to 0x8000); the AP reads the
# flash at 0xfffc0010 forever; the BSP takes the pflash out of array mode and back N times
# (QEMU deletes and re-creates its read-only slot each time), then prints DONE on debugcon.
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
        ljmpl $0x08,$ap32
tramp_end:
        .code32
pm:     movw $0x10,%ax
        movw %ax,%ds
        movw %ax,%es
        movw %ax,%ss
        movl $0x7c00,%esp
        # INIT to all excluding self, then SIPI vector 0x08 twice
        movl $0,0xfee00310
        movl $0x000c4500,0xfee00300
        movl $200000,%ecx
1:      loop 1b
        movl $0x000c4608,0xfee00300
        movl $200000,%ecx
1:      loop 1b
        movl $0x000c4608,0xfee00300
        movl $2000000,%ecx
1:      loop 1b
        movl $NITER,%esi
2:      movb $0x90,0xfffc0000
        movl 0xfffc0000,%eax
        movb $0xff,0xfffc0000
        movl 0xfffc0000,%eax
        movl $DELAY,%ecx
1:      loop 1b
        decl %esi
        jnz 2b
        movw $0x402,%dx
        movb $'D',%al; outb %al,%dx
        movb $'O',%al; outb %al,%dx
        movb $'N',%al; outb %al,%dx
        movb $'E',%al; outb %al,%dx
        movb $10,%al; outb %al,%dx
3:      hlt
        jmp 3b
ap32:   movw $0x10,%ax
        movw %ax,%ds
        movw %ax,%ss
4:      movl 0xfffc0010,%eax
        jmp 4b
        .p2align 3
gdt:    .quad 0
        .quad 0x00cf9a000000ffff
        .quad 0x00cf92000000ffff
gdtr:   .word 23
        .long gdt
        .org 510
        .byte 0x55,0xaa
