/*
 * Entry code of the example kernel: a Multiboot v1 header with the address fields
 * (flag 16, so this ELF64 file boots as QEMU's -kernel boots it), the 32-bit entry
 * that turns on long mode, and the exception entry stubs.
 *
 * Built without MULTIBOOT (-DNO_MULTIBOOT) the file has no header and the ELF64
 * entry point start64 is used instead (entered in long mode, RDI = info).
 */
#define MB_MAGIC  0x1BADB002
#define MB_FLAGS  0x00010003              /* page-align modules, memory info, address fields */

#ifndef NO_MULTIBOOT
	.section .multiboot, "a"
	.align 4
mb_header:
	.long MB_MAGIC
	.long MB_FLAGS
	.long -(MB_MAGIC + MB_FLAGS)
	.long mb_header                    /* header_addr */
	.long __load_start                 /* load_addr */
	.long __load_end                   /* load_end_addr */
	.long __bss_end                    /* bss_end_addr */
	.long _start                       /* entry_addr */
#endif

	.text
	.code32
	.globl _start
_start:
	cld
	mov	%eax, boot_magic
	mov	%ebx, boot_info
	lgdt	gdt_desc
	/* CR4.PAE, CR3 = the kernel's tables, EFER.LME | NXE, CR0.PG | WP */
	mov	%cr4, %eax
	or	$0x20, %eax
	mov	%eax, %cr4
	mov	$pml4, %eax
	mov	%eax, %cr3
	mov	$0xC0000080, %ecx
	rdmsr
	or	$0x900, %eax
	wrmsr
	mov	%cr0, %eax
	or	$0x80010000, %eax
	mov	%eax, %cr0
	ljmp	$0x08, $long_mode

	.code64
	.globl start64
start64:                                   /* ELF64 entry: long mode already, RDI = info */
	cld
	movl	$0, boot_magic
	mov	%edi, boot_info
	lgdt	gdt_desc
	mov	$pml4, %eax
	mov	%rax, %cr3
	mov	$0xC0000080, %ecx
	rdmsr
	or	$0x800, %eax
	wrmsr
	pushq	$0x08
	pushq	$long_mode
	lretq

long_mode:
	mov	$0x10, %eax
	mov	%eax, %ds
	mov	%eax, %es
	mov	%eax, %ss
	mov	%eax, %fs
	mov	%eax, %gs
	mov	$stack_top, %rsp
	mov	boot_magic, %edi
	mov	boot_info, %esi
	call	kmain
	mov	%eax, %edi
	call	power_off
1:	cli
	hlt
	jmp	1b

/* Exception entry: push a zero error code where the CPU pushes none, then the vector. */
	.macro	isr_noerr n
	.globl	isr\n
isr\n:	pushq	$0
	pushq	$\n
	jmp	isr_common
	.endm
	.macro	isr_err n
	.globl	isr\n
isr\n:	pushq	$\n
	jmp	isr_common
	.endm

	isr_noerr 0
	isr_noerr 1
	isr_noerr 2
	isr_noerr 3
	isr_noerr 4
	isr_noerr 5
	isr_noerr 6
	isr_noerr 7
	isr_err   8
	isr_noerr 9
	isr_err   10
	isr_err   11
	isr_err   12
	isr_err   13
	isr_err   14
	isr_noerr 15
	isr_noerr 16
	isr_err   17
	isr_noerr 18
	isr_noerr 19
	isr_noerr 64

isr_common:
	push	%rax
	push	%rbx
	push	%rcx
	push	%rdx
	push	%rsi
	push	%rdi
	push	%rbp
	push	%r8
	push	%r9
	push	%r10
	push	%r11
	push	%r12
	push	%r13
	push	%r14
	push	%r15
	mov	%rsp, %rdi
	call	isr_handler
	pop	%r15
	pop	%r14
	pop	%r13
	pop	%r12
	pop	%r11
	pop	%r10
	pop	%r9
	pop	%r8
	pop	%rbp
	pop	%rdi
	pop	%rsi
	pop	%rdx
	pop	%rcx
	pop	%rbx
	pop	%rax
	add	$16, %rsp
	iretq

	.section .rodata
	.globl	isr_table
isr_table:
	.quad	isr0, isr1, isr2, isr3, isr4, isr5, isr6, isr7, isr8, isr9
	.quad	isr10, isr11, isr12, isr13, isr14, isr15, isr16, isr17, isr18, isr19
	.globl	isr_timer
isr_timer:
	.quad	isr64

	.data
	.align	8
gdt:
	.quad	0
	.quad	0x00AF9A000000FFFF         /* 0x08: 64-bit code */
	.quad	0x00CF92000000FFFF         /* 0x10: data */
gdt_desc:
	.word	gdt_desc - gdt - 1
	.quad	gdt
	.globl	boot_magic, boot_info
boot_magic:	.long 0
boot_info:	.long 0

/* Page tables: 0-4 GiB identity-mapped with 2 MiB pages; PDPT[4] (4-5 GiB) left
 * absent for the page-fault test to fill in. */
	.align	4096
	.globl	pml4, pdpt, pd_extra
pml4:	.quad	pdpt + 3
	.fill	511, 8, 0
pdpt:	.quad	pd + 3, pd + 0x1003, pd + 0x2003, pd + 0x3003
	.fill	508, 8, 0
pd:
	.set	i, 0
	.rept	2048
	.quad	(i << 21) | 0x83
	.set	i, i + 1
	.endr
pd_extra:
	.fill	512, 8, 0

	.bss
	.align	16
	.space	16384
stack_top:
	.section .note.GNU-stack, "", @progbits
