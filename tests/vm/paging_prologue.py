"""A minimal kernel prologue for VM tests: identity-map 1 GiB with 2 MiB pages, GDT, TSS, IDT.

Layout (guest-physical): PML4 0x10000, PDPT 0x11000, PD 0x12000, GDT 0x8000, IDT 0x9000,
TSS 0xA000 (RSP0 = 0x7f000), kernel stack 0x100000. Gates are installed by `setgate`
(RAX = handler, RDI = gate address, interrupt gate, selector 0x08, DPL 0).
"""

PROLOGUE = """
  mov rsp, 0x100000
  mov rdi, 0x10000
  mov rax, 0x11007
  mov qword ptr [rdi], rax
  mov rdi, 0x11000
  mov rax, 0x12007
  mov qword ptr [rdi], rax
  mov rdi, 0x12000
  mov rax, 0x87
  mov rcx, 512
pro_fill:
  mov qword ptr [rdi], rax
  add rax, 0x200000
  add rdi, 8
  dec rcx
  jnz pro_fill
  mov rax, 0x10000
  mov cr3, rax
  mov rax, cr4
  or rax, 0x20
  mov cr4, rax
  mov rax, cr0
  or eax, 0x80010000
  mov cr0, rax
  mov rdi, 0x8000
  mov qword ptr [rdi], 0
  movabs rax, 0x00AF9A000000FFFF
  mov qword ptr [rdi+8], rax
  movabs rax, 0x00CF92000000FFFF
  mov qword ptr [rdi+16], rax
  movabs rax, 0x00CFF2000000FFFF
  mov qword ptr [rdi+24], rax
  movabs rax, 0x00AFFA000000FFFF
  mov qword ptr [rdi+32], rax
  movabs rax, 0x00008900A0000067
  mov qword ptr [rdi+40], rax
  mov qword ptr [rdi+48], 0
  mov rax, 0x7f000
  mov rdi, 0xA004
  mov qword ptr [rdi], rax
  lea rax, [rip + pro_gdtr]
  lgdt [rax]
  mov ax, 0x28
  ltr ax
  lea rax, [rip + pro_idtr]
  lidt [rax]
  lea rax, [rip + pro_cs]
  push 0x08
  push rax
  retfq
pro_cs:
  mov ax, 0x10
  mov ds, ax
  mov ss, ax
  jmp main
setgate:
  mov word ptr [rdi], ax
  mov word ptr [rdi+2], 0x08
  mov word ptr [rdi+4], 0x8E00
  shr rax, 16
  mov word ptr [rdi+6], ax
  shr rax, 16
  mov dword ptr [rdi+8], eax
  mov dword ptr [rdi+12], 0
  ret
pro_gdtr:
  .word 55
  .quad 0x8000
pro_idtr:
  .word 4095
  .quad 0x9000
"""
