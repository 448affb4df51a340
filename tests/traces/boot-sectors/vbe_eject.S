# boot sector: 32-bit PM; VBE banked window walk on std VGA (1024x768x32, 48 banks; 640x480x8, 5 banks),
# ivshmem RAM BAR and e1000 MMIO BAR accesses, guest-initiated ACPI PCI eject (port 0xae08) of both,
# accesses to the old BAR places, "DONE" to debugcon, hlt.
        .code16
        .globl _start
_start:
        cli
        xorw %ax,%ax
        movw %ax,%ds
        movw %ax,%ss
        movw $0x7c00,%sp
        lgdtl gdtr
        movl %cr0,%eax
        orl $1,%eax
        movl %eax,%cr0
        ljmpl $0x08,$pm
        .code32
pm:     movw $0x10,%ax
        movw %ax,%ds
        movw %ax,%es
        movw %ax,%ss
        movl $0x7c00,%esp
        # ---- VBE mode 1024x768x32, banked
        movw $1024,%bx; movw $768,%cx; movw $32,%si; movl $48,%edi
        call vbe
        movw $640,%bx; movw $480,%cx; movw $8,%si; movl $5,%edi
        call vbe
        movw $4,%ax; xorw %dx,%dx; call dispi   # ENABLE=0
        # ---- ivshmem at 00:05.0 BAR2 (0x18), e1000 at 00:06.0 BAR0 (0x10)
        movl $0x80002818,%eax; call cfgrd; andl $0xfffffff0,%eax; movl %eax,%ebp
        movl $0x80003010,%eax; call cfgrd; andl $0xfffffff0,%eax; movl %eax,%ebx
        movl $0x12345678,(%ebp)
        movl (%ebp),%eax
        movl $0x9abcdef0,0x1000(%ebp)
        movl 8(%ebx),%eax            # e1000 STATUS
        movl 0x5400(%ebx),%eax       # RAL0
        # ---- eject slot 5 (ivshmem) and 6 (e1000)
        movw $0xae08,%dx; movl $0x20,%eax; outl %eax,%dx
        movl (%ebp),%eax             # old RAM BAR: now MMIO
        movl $0x11111111,0x2000(%ebp)
        movl $0x40,%eax; outl %eax,%dx
        movl 8(%ebx),%eax            # old e1000 BAR: MMIO
        movl $0x22222222,0x10(%ebx)
        # ---- DONE to debugcon
        movw $0x402,%dx
        movb $'D',%al; outb %al,%dx
        movb $'O',%al; outb %al,%dx
        movb $'N',%al; outb %al,%dx
        movb $'E',%al; outb %al,%dx
        movb $10,%al; outb %al,%dx
1:      hlt
        jmp 1b

# vbe: bx=xres cx=yres si=bpp edi=banks
vbe:    movw $4,%ax; xorw %dx,%dx; call dispi
        movw $1,%ax; movw %bx,%dx; call dispi
        movw $2,%ax; movw %cx,%dx; call dispi
        movw $3,%ax; movw %si,%dx; call dispi
        movw $4,%ax; movw $1,%dx; call dispi
        xorl %ecx,%ecx
2:      movw $5,%ax; movw %cx,%dx; call dispi
        leal 0xa0000(,%ecx,4),%eax
        movl %ecx,(%eax)
        movl (%eax),%edx
        movl %ecx,0xb0000(,%ecx,4)   # outside the 64K window: MMIO
        incl %ecx
        cmpl %edi,%ecx
        jb 2b
        movw $5,%ax; xorw %dx,%dx; call dispi
        movl 0xa0000,%eax
        ret
# dispi: ax=index dx=value
dispi:  pushl %edx
        movw $0x1ce,%dx; outw %ax,%dx
        popl %eax
        movw $0x1cf,%dx; outw %ax,%dx
        ret
# cfgrd: eax=address -> eax=dword
cfgrd:  movw $0xcf8,%dx; outl %eax,%dx
        movw $0xcfc,%dx; inl %dx,%eax
        ret
        .p2align 3
gdt:    .quad 0
        .quad 0x00cf9a000000ffff
        .quad 0x00cf92000000ffff
gdtr:   .word 23
        .long gdt
        .org 510
        .byte 0x55,0xaa
