"""Entry states for booted kernels, reached by running a few real loader instructions.

A PC loader ends by loading a GDT and the segment registers; so does this one, as
guest code the vCPU executes before the kernel's first instruction (not counted
as guest time). Descriptor caches, CPL and the operand size then come from the
CPU itself, exactly as after QEMU's Multiboot option ROM — no hidden state is
edited by hand.

The loader's area is the BIOS area 0xF0000-0xFFFFF, which the memory map marks
reserved:

============  ==========================================================
0xF0000       32-bit stub: ``lgdt``, ``ljmp 0x08``, load DS/ES/SS/FS/GS = 0x10
0xF0020       64-bit stub: ``lgdt``, far return to 0x28, load the data segments
0xF0080       the GDT descriptor (limit, 8-byte base)
0xF0090       the GDT: null, 0x08 flat 32-bit code, 0x10 flat data, 0x18 16-bit
              code, 0x20 16-bit data (QEMU's option ROM has the same five),
              0x28 64-bit code
0xF1000       ELF64 entry only: PML4; 0xF2000 PDPT (identity); 0xF3000-0xF6FFF
              four page directories of 2 MiB pages mapping 0-4 GiB;
              0xF7000 PDPT for the top 2 GiB (-2 GiB -> 0, as Linux's kernel map)
============  ==========================================================
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from unicorn import x86_const as X

from ..mmu.walk import CR0_PG, CR4_PAE
from ..vm.vcpu import MSR_EFER
from .multiboot import MB_BOOT_MAGIC

if TYPE_CHECKING:
    from ..vm.vm import VM

LOADER_BASE = 0xF0000
STUB32 = LOADER_BASE
STUB64 = LOADER_BASE + 0x20
GDT_DESC = LOADER_BASE + 0x80
GDT = LOADER_BASE + 0x90
PML4 = LOADER_BASE + 0x1000
PDPT_LOW = PML4 + 0x1000
PD_LOW = PDPT_LOW + 0x1000          # four page directories: 0-4 GiB
PDPT_HIGH = PD_LOW + 0x4000         # PML4[511]: -2 GiB .. 0 -> 0 .. 2 GiB
LOADER_END = PDPT_HIGH + 0x1000
ENTRY_STACK = 0x7000                # a valid stack (the spec leaves ESP undefined)

CODE32_SEL = 0x08
DATA_SEL = 0x10
CODE64_SEL = 0x28
GDT_ENTRIES = (0,
               0x00CF9A000000FFFF,   # 0x08: 32-bit code, base 0, 4 GiB
               0x00CF92000000FFFF,   # 0x10: data, base 0, 4 GiB
               0x00009E000000FFFF,   # 0x18: 16-bit code (as QEMU's option ROM)
               0x000092000000FFFF,   # 0x20: 16-bit data
               0x00AF9A000000FFFF)   # 0x28: 64-bit code

# Hand-encoded (the encodings are GNU as output); addresses are absolute.
_STUB32 = bytes.fromhex(
    "0f011580000f00"      # lgdtl 0xf0080
    "ea10000f000800"      # ljmp  $0x08, $0xf0010
    "0000"                # (padding to 0xf0010)
    "b810000000"          # mov   $0x10, %eax
    "8ed8" "8ec0" "8ed0" "8ee0" "8ee8")  # mov %eax, %ds/%es/%ss/%fs/%gs
_STUB32_INSNS = 8
_STUB64 = bytes.fromhex(
    "0f01142580000f00"    # lgdt  0xf0080
    "6a28"                # push  $0x28
    "6840000f00"          # push  $0xf0040
    "48cb"                # lretq
    ) + bytes(0x20 - 17) + bytes.fromhex(
    "b810000000"          # 0xf0040: mov $0x10, %eax
    "8ed8" "8ec0" "8ed0" "8ee0" "8ee8")
_STUB64_INSNS = 10

CR0_PE_ET = 0x11
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10


def loader_blobs(long_mode: bool) -> list[tuple[int, bytes]]:
    """The loader's code, GDT and (for long mode) identity tables, as (GPA, bytes)."""
    gdt = b"".join(struct.pack("<Q", d) for d in GDT_ENTRIES)
    blobs = [(STUB32, _STUB32), (STUB64, _STUB64),
             (GDT_DESC, struct.pack("<HQ", len(gdt) - 1, GDT)), (GDT, gdt)]
    if long_mode:
        blobs.append((PML4, struct.pack("<Q", PDPT_LOW | 3) + bytes(8 * 510) + struct.pack("<Q", PDPT_HIGH | 3)))
        blobs.append((PDPT_LOW, b"".join(struct.pack("<Q", (PD_LOW + 0x1000 * i) | 3) for i in range(4))))
        blobs.append((PD_LOW, b"".join(struct.pack("<Q", (i << 21) | 0x83) for i in range(4 * 512))))
        # -2 GiB: PDPT entries 510 and 511 reuse the first two identity page directories.
        blobs.append((PDPT_HIGH, bytes(8 * 510) + struct.pack("<QQ", PD_LOW | 3, (PD_LOW + 0x1000) | 3)))
    return blobs


def _run_stub(vm: "VM", start: int, insns: int) -> None:
    # Guest instructions, but the loader's: not counted in the VM's time.
    uc = vm.vcpu.uc
    uc.emu_start(start, 0, count=insns)
    v = vm.vcpu
    if v.hook_error is not None or v.pending is not None:
        raise RuntimeError(f"the boot loader stub failed at {v.rip:#x}: {v.hook_error or v.pending}")


def enter_protected32(vm: "VM", entry: int, info_addr: int) -> None:
    """Multiboot entry: 32-bit protected mode, paging off, flat CS 0x08 / DS 0x10.

    EAX = 0x2BADB002, EBX = the info structure, ECX = the entry point (as QEMU's
    option ROM leaves it), ESP = 0x7000, EFLAGS = 0x2 (IF and DF clear), CR0 =
    PE|ET, CR4 = 0, EFER = 0.
    """
    uc = vm.vcpu.uc
    # Leave long mode (docs/ENGINE.md U22): EFER.LME off, then PG 1 -> 0 clears LMA.
    uc.reg_write(X.UC_X86_REG_MSR, (MSR_EFER, 0))
    uc.reg_write(X.UC_X86_REG_CR0, CR0_PE_ET | CR0_PG)
    uc.reg_write(X.UC_X86_REG_CR0, CR0_PE_ET)
    uc.reg_write(X.UC_X86_REG_CR4, 0)
    uc.reg_write(X.UC_X86_REG_EFLAGS, 0x2)
    _run_stub(vm, STUB32, _STUB32_INSNS)
    for rid, val in ((X.UC_X86_REG_RAX, MB_BOOT_MAGIC), (X.UC_X86_REG_RBX, info_addr),
                     (X.UC_X86_REG_RCX, entry), (X.UC_X86_REG_RDX, 0), (X.UC_X86_REG_RSI, 0),
                     (X.UC_X86_REG_RDI, 0), (X.UC_X86_REG_RSP, ENTRY_STACK), (X.UC_X86_REG_RBP, 0),
                     (X.UC_X86_REG_RFLAGS, 0x2), (X.UC_X86_REG_RIP, entry)):
        uc.reg_write(rid, val)


def enter_long64(vm: "VM", entry: int, info_addr: int) -> None:
    """ELF64 entry: long mode, the loader's identity tables, CS 0x28 / DS 0x10.

    CR3 = 0xF1000 (0-4 GiB identity in 2 MiB pages, and -2 GiB mapped to 0),
    CR0 = PE|ET|PG, CR4 = PAE|OSFXSR|OSXMMEXCPT, EFER = LME|LMA, RDI = the info
    structure, RAX = 0x2BADB002, RSP = 0x7000, RFLAGS = 0x2.
    """
    uc = vm.vcpu.uc
    uc.reg_write(X.UC_X86_REG_CR3, PML4)
    uc.reg_write(X.UC_X86_REG_CR4, CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT)
    uc.reg_write(X.UC_X86_REG_CR0, CR0_PE_ET | CR0_PG)
    uc.reg_write(X.UC_X86_REG_RSP, ENTRY_STACK)
    uc.reg_write(X.UC_X86_REG_EFLAGS, 0x2)
    _run_stub(vm, STUB64, _STUB64_INSNS)
    for rid, val in ((X.UC_X86_REG_RAX, MB_BOOT_MAGIC), (X.UC_X86_REG_RBX, 0), (X.UC_X86_REG_RCX, 0),
                     (X.UC_X86_REG_RDX, 0), (X.UC_X86_REG_RSI, 0), (X.UC_X86_REG_RDI, info_addr),
                     (X.UC_X86_REG_RSP, ENTRY_STACK), (X.UC_X86_REG_RBP, 0),
                     (X.UC_X86_REG_RFLAGS, 0x2), (X.UC_X86_REG_RIP, entry)):
        uc.reg_write(rid, val)
