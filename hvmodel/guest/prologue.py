"""Assembly snippets for the guests hvmodel generates itself (the access matrix, the
fuzzer, test kernels): the descriptor tables every 64-bit kernel needs.

The hand-written guests in ``guests/`` use ``guests/runtime/boot.inc`` instead; these
snippets are for small generated kernels that must control their own page tables.
"""

from __future__ import annotations

# Selectors: null, kernel code 0x08, kernel data 0x10, user data 0x18 (|3), user code
# 0x20 (|3), a 16-byte TSS at 0x28 — the SYSRET ordering.
KERNEL_CS, KERNEL_DS, USER_DS, USER_CS, TSS_SEL = 0x08, 0x10, 0x1B, 0x23, 0x28


def tss_descriptor(base: int, limit: int = 0x67) -> int:
    """The low 8 bytes of a 64-bit available-TSS descriptor (base < 4 GiB)."""
    return ((limit & 0xFFFF) | (base & 0xFFFFFF) << 16 | 0x89 << 40 | (limit >> 16 & 0xF) << 48
            | (base >> 24 & 0xFF) << 56)


def descriptor_tables(prefix: str, *, gdt: int = 0x8000, idt: int = 0x9000, tss: int = 0xA000,
                      rsp0: int = 0x7F000, es: bool = False) -> str:
    """Build the GDT and TSS, load GDTR/TR/IDTR, reload CS (``retfq``) and the data segments.

    Labels are prefixed with ``prefix``; :func:`descriptor_data` emits the GDTR/IDTR
    operands it refers to. The IDT itself (256 gates at ``idt``) is filled by the caller.
    """
    return f"""
  mov edi, {gdt:#x}
  mov qword ptr [rdi], 0
  movabs rax, 0x00AF9A000000FFFF
  mov qword ptr [rdi+8], rax
  movabs rax, 0x00CF92000000FFFF
  mov qword ptr [rdi+16], rax
  movabs rax, 0x00CFF2000000FFFF
  mov qword ptr [rdi+24], rax
  movabs rax, 0x00AFFA000000FFFF
  mov qword ptr [rdi+32], rax
  movabs rax, {tss_descriptor(tss):#x}
  mov qword ptr [rdi+40], rax
  mov qword ptr [rdi+48], 0
  mov eax, {rsp0:#x}
  mov edi, {tss + 4:#x}
  mov qword ptr [rdi], rax
  lea rax, [rip + {prefix}_gdtr]
  lgdt [rax]
  mov ax, {TSS_SEL:#x}
  ltr ax
  lea rax, [rip + {prefix}_idtr]
  lidt [rax]
  lea rax, [rip + {prefix}_cs]
  push {KERNEL_CS:#x}
  push rax
  retfq
{prefix}_cs:
  mov ax, {KERNEL_DS:#x}
  mov ds, ax
  mov ss, ax
{"  mov es, ax" if es else ""}
"""


def descriptor_data(prefix: str, *, gdt: int = 0x8000, idt: int = 0x9000) -> str:
    """The GDTR and IDTR operands :func:`descriptor_tables` loads (place them after code)."""
    return f"""
{prefix}_gdtr:
  .word 55
  .quad {gdt:#x}
{prefix}_idtr:
  .word 4095
  .quad {idt:#x}
"""


SETGATE = """
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
"""
"""``setgate``: RAX = handler, RDI = gate address → a present DPL-0 interrupt gate."""
