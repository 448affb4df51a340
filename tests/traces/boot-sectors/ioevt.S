# pci-testdev ioeventfd loop (as kvm-unit-tests' pci_testdev_one): find 1b36:0005 on bus 0,
# read its BAR0 (MMIO, 2 KiB) and BAR1 (PIO); NITER rounds of: for test 0..2 (no-eventfd,
# wildcard-eventfd, datamatch-eventfd): select it (byte write to BAR0+0), read count, width,
# data and offset, write data 16 times at BAR0+offset with that width, read count; then the same
# on the PIO BAR; every 4th round turn the device's memory decoding off, write BAR0+offset
# (now unassigned: exits to QEMU), move BAR0 to 0xe0000000, run the tests there, move it back
# and turn decoding on. DONE on debugcon (0x402) at the end.
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
        movl $0x80000000,%ebp            # bus 0 dev 0 fn 0
1:      movl %ebp,%eax; call cfgrd
        cmpl $0x00051b36,%eax
        je found
        addl $0x800,%ebp
        cmpl $0x80010000,%ebp
        jb 1b
        jmp done
found:  leal 0x10(%ebp),%eax; call cfgrd
        andl $0xfffffff0,%eax
        movl %eax,bar0
        leal 0x14(%ebp),%eax; call cfgrd
        andl $0xfffffffc,%eax
        movl %eax,bar1
        xorl %esi,%esi
2:      movl bar0,%edi; call mtests
        call ptests
        testl $3,%esi
        jnz 3f
        leal 0x04(%ebp),%eax; movl $0x0101,%ebx; call cfgwr    # decoding off (mem off, io on)
        movl bar0,%edi
        movl $0x55,0x80(%edi)
        movl 0x80(%edi),%eax
        leal 0x10(%ebp),%eax; movl $0xe0000000,%ebx; call cfgwr
        leal 0x04(%ebp),%eax; movl $0x0103,%ebx; call cfgwr    # on, at 0xe0000000
        movl $0xe0000000,%edi; call mtests
        leal 0x04(%ebp),%eax; movl $0x0101,%ebx; call cfgwr
        leal 0x10(%ebp),%eax; movl bar0,%ebx; call cfgwr
        leal 0x04(%ebp),%eax; movl $0x0103,%ebx; call cfgwr
        movl $0x66,0xe0000080
3:      movw $0x402,%dx; movb $'.',%al; outb %al,%dx
        incl %esi
        cmpl $NITER,%esi
        jb 2b
done:   movw $0x402,%dx
        movb $'D',%al; outb %al,%dx
        movb $'O',%al; outb %al,%dx
        movb $'N',%al; outb %al,%dx
        movb $'E',%al; outb %al,%dx
        movb $10,%al; outb %al,%dx
9:      hlt
        jmp 9b
# mtests: edi = BAR0 address
mtests: xorl %ebx,%ebx
4:      movb %bl,(%edi)
        movl 12(%edi),%eax
        movzbl 1(%edi),%ecx
        movl 8(%edi),%eax
        movl 4(%edi),%edx
        addl %edi,%edx
        pushl %ebx
        movl $16,%ebx
5:      cmpl $1,%ecx; jne 6f; movb %al,(%edx); jmp 7f
6:      cmpl $2,%ecx; jne 8f; movw %ax,(%edx); jmp 7f
8:      movl %eax,(%edx)
7:      decl %ebx
        jnz 5b
        popl %ebx
        movl 12(%edi),%eax
        incl %ebx
        cmpl $3,%ebx
        jb 4b
        ret
# ptests: the same through the PIO BAR
ptests: xorl %ebx,%ebx
4:      movw bar1,%dx
        movb %bl,%al; outb %al,%dx
        addw $1,%dx; inb %dx,%al; movzbl %al,%ecx
        addw $3,%dx; inl %dx,%eax; movl %eax,%edi        # offset
        addw $4,%dx; inl %dx,%eax                        # data
        movw bar1,%dx; addw %di,%dx
        pushl %ebx
        movl $16,%ebx
5:      cmpl $1,%ecx; jne 6f; outb %al,%dx; jmp 7f
6:      cmpl $2,%ecx; jne 8f; outw %ax,%dx; jmp 7f
8:      outl %eax,%dx
7:      decl %ebx
        jnz 5b
        popl %ebx
        incl %ebx
        cmpl $3,%ebx
        jb 4b
        ret
cfgrd:  movw $0xcf8,%dx; outl %eax,%dx
        movw $0xcfc,%dx; inl %dx,%eax
        ret
cfgwr:  movw $0xcf8,%dx; outl %eax,%dx
        movw $0xcfc,%dx; movl %ebx,%eax; outl %eax,%dx
        ret
        .p2align 2
bar0:   .long 0
bar1:   .long 0
        .p2align 3
gdt:    .quad 0
        .quad 0x00cf9a000000ffff
        .quad 0x00cf92000000ffff
gdtr:   .word 23
        .long gdt
        .org 510
        .byte 0x55,0xaa
