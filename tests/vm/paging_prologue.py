"""A minimal kernel prologue for VM tests: identity-map 1 GiB with 2 MiB pages, GDT, TSS, IDT.

Layout (guest-physical): PML4 0x10000, PDPT 0x11000, PD 0x12000, GDT 0x8000, IDT 0x9000,
TSS 0xA000 (RSP0 = 0x7f000), kernel stack 0x100000. Gates are installed by `setgate`
(RAX = handler, RDI = gate address, interrupt gate, selector 0x08, DPL 0).
"""

from hvmodel.guest.prologue import SETGATE, descriptor_data, descriptor_tables

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
{TABLES}  jmp main
{SETGATE}{DATA}""".format(TABLES=descriptor_tables("pro"), SETGATE=SETGATE, DATA=descriptor_data("pro"))
