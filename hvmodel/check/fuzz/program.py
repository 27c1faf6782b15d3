"""The program model: the operations a generated program is made of, and its constants.

The guest-physical layout and the rules every program obeys are in :mod:`hvmodel.check.fuzz`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable

from ...mmu.walk import PTE_A, PTE_D, PTE_NX, PTE_P, PTE_PCD, PTE_PWT, PTE_RW, PTE_US


MEMSIZE = 8 << 20
HOST_MEM = 32 << 20
EVERY = 200           # instructions between lock-step comparisons (and at every exit)
MAX_INSNS = 2_000_000

PML4_BASE = 0x1000
MAX_SPACES = 4
K_PDPT, K_PD, K_PT = 0x5000, 0x6000, 0x7000
GDT, IDT, TSS = 0x8000, 0x9000, 0xA000
POOL_BASE, POOL_END = 0x10000, 0x80000
LOG_BASE = 0x80000
KSTACK_TOP = 0x9F000
USTACK_PAGE = 0x9F000
USTACK_TOP = 0xA0000
DATA_BASE, DATA_END = 0x200000, MEMSIZE
RET_ZONE = 0xF80      # bytes [0xF80, 0x1000) of every fetched data page are `ret`
DONE_MARK = 0x600D600D

MAX_INVLPG = 6        # more affected pages than this: reload CR3 instead

# flags generated mappings may carry (never G, never PS: render sets PS)
AVAIL_BITS = (1 << 9) | (1 << 10) | (1 << 11) | (0x7F << 52)
RSVD_HIGH = (1 << 40, 1 << 45, 1 << 51)   # above MAXPHYADDR 40: reserved at every level
RSVD_LOW = 1 << 13                        # reserved in a 2 MiB / 1 GiB leaf only
FLAG_MASK = (PTE_RW | PTE_US | PTE_PWT | PTE_PCD | PTE_A | PTE_D | PTE_NX | AVAIL_BITS
              | (0xFFF << 40))

SIZE = {1: 1 << 12, 2: 1 << 21, 3: 1 << 30, 4: 1 << 39}
LEVEL_NAME = {1: "4K", 2: "2M", 3: "1G", 4: "PML4E"}

# the virtual-address grid the generator draws from (indices per level)
SLOTS = (1, 2, 37, 256, 511)          # PML4 indices; 256 and 511 are the upper half
PDPT_IDX = (0, 1, 3, 511)
PD_IDX = (0, 1, 5, 511)
PT_IDX = (0, 1, 2, 9, 511)
FRAMES_2M = (0x200000, 0x400000, 0x600000)



# ------------------------------------------------------------------------------------
# the program model


@dataclass(frozen=True)
class Map:
    space: int
    va: int
    level: int
    pa: int
    flags: int
    tflags: int = PTE_RW | PTE_US
    flush: str = "invlpg"      # invlpg | cr3 | none (none: only if nothing present changed)

    def __str__(self) -> str:
        return (f"Map(space={self.space}, va={self.va:#x}, {LEVEL_NAME[self.level]}, pa={self.pa:#x}, "
                f"{fmt_flags(self.flags)}, tables {fmt_flags(self.tflags)}, flush={self.flush})")


@dataclass(frozen=True)
class Unmap:
    space: int
    va: int
    level: int
    flush: str = "invlpg"

    def __str__(self) -> str:
        return f"Unmap(space={self.space}, va={self.va:#x}, level {self.level}, flush={self.flush})"


@dataclass(frozen=True)
class Protect:
    space: int
    va: int
    level: int
    flags: int
    flush: str = "invlpg"

    def __str__(self) -> str:
        return (f"Protect(space={self.space}, va={self.va:#x}, level {self.level}, "
                f"{fmt_flags(self.flags)}, flush={self.flush})")


@dataclass(frozen=True)
class Share:
    dst: int
    src: int
    slot: int
    flush: str = "invlpg"

    def __str__(self) -> str:
        return f"Share(space {self.dst} <- space {self.src}, PML4[{self.slot}], flush={self.flush})"


@dataclass(frozen=True)
class SwitchCR3:
    space: int

    def __str__(self) -> str:
        return f"SwitchCR3({self.space})"


@dataclass(frozen=True)
class SetCtl:
    wp: bool
    nxe: bool
    smep: bool
    smap: bool

    def __str__(self) -> str:
        return f"SetCtl(wp={int(self.wp)}, nxe={int(self.nxe)}, smep={int(self.smep)}, smap={int(self.smap)})"


@dataclass(frozen=True)
class Access:
    va: int
    kind: str                  # read | write | fetch
    cpl: int = 0
    value: int = 0
    ac: bool = False           # supervisor access with RFLAGS.AC = 1 (stac)

    def __str__(self) -> str:
        extra = " ac" if self.ac else ""
        val = f" value={self.value:#x}" if self.kind == "write" else ""
        return f"Access({self.kind} {self.va:#x} cpl{self.cpl}{extra}{val})"


Op = Map | Unmap | Protect | Share | SwitchCR3 | SetCtl | Access


@dataclass(frozen=True)
class Program:
    ops: tuple
    ctl: SetCtl = SetCtl(True, True, False, False)      # controls at the start
    pool: tuple = ()            # data pages pre-filled with a pattern (others stay untouched)
    name: str = "<fuzz>"

    def __len__(self) -> int:
        return len(self.ops)

    def with_ops(self, ops: Iterable) -> "Program":
        return replace(self, ops=tuple(ops))

    def describe(self) -> str:
        lines = [f"program {self.name}: {len(self.ops)} ops, start {self.ctl}, "
                 f"data pages {', '.join(f'{p:#x}' for p in self.pool)}"]
        lines += [f"  {i:3}: {op}" for i, op in enumerate(self.ops)]
        return "\n".join(lines)


def fmt_flags(f: int) -> str:
    s = "".join(ch for bit, ch in ((PTE_RW, "W"), (PTE_US, "U"), (PTE_A, "A"), (PTE_D, "D"),
                                   (PTE_PWT, "t"), (PTE_PCD, "c")) if f & bit)
    if f & PTE_NX:
        s += "X"
    if f & (0xFFF << 40) or f & RSVD_LOW:
        s += "R"
    if f & AVAIL_BITS:
        s += "v"
    return s or "-"


def sext(va: int) -> int:
    va &= (1 << 48) - 1
    return va | (0xFFFF << 48) if va >> 47 else va


def canonical(va: int) -> bool:
    top = va >> 47
    return top == 0 or top == 0x1FFFF


def index(va: int, level: int) -> int:
    return (va >> (12 + 9 * (level - 1))) & 511


def page_pattern(pa: int) -> int:
    return 0xA5A5_0000_0000_0000 | pa
