"""Generated page-table programs, run in lock-step against the reference MMU.

``hvmodel check`` compares the VMM's MMUs with the reference on hand-written guests;
this module writes the guests. A *program* is a short list of operations on the
guest's own page tables and of memory accesses through them; :func:`render` turns it
into a complete guest kernel (assembly text), :func:`fuzz` runs many of them under
:func:`hvmodel.check.lockstep.check` and, on the first disagreement, shrinks the
failing program to a few operations (delta debugging, after hypothesis).

Operations
----------
``Map(space, va, level, pa, flags, tflags, flush)``
    Install a leaf (level 1/2/3 = 4 KiB / 2 MiB / 1 GiB) for ``va``; missing tables on
    the way are created (entries ``tflags``), a large leaf in the way is replaced by a
    fresh table, a table in the way of a large leaf is replaced by the leaf.
``Unmap(space, va, level, flush)``
    Clear the entry of that level on the walk of ``va`` (a leaf, or a whole subtree).
``Protect(space, va, level, flags, flush)``
    Rewrite the flags of an existing entry (leaf or not), keeping its address.
``Share(dst, src, slot, flush)``
    ``dst``'s PML4 entry ``slot`` points to ``src``'s PDPT: one subtree in two spaces.
``SwitchCR3(space)``
    ``mov cr3`` (to the current space: a reload).
``SetCtl(wp, nxe, smep, smap)``
    CR0.WP, EFER.NXE, CR4.SMEP, CR4.SMAP, followed by a CR3 reload.
``Access(va, kind, cpl, value, ac)``
    A qword read / write, or a fetch (``call`` of a ``ret``), at CPL 0 or 3 (``ac``:
    a supervisor access under ``stac``), in the current address space.

Every program is architecturally determined, whatever subset of its operations is
kept (so the shrinker cannot produce an ill-defined program): :func:`render` replays
the operations on a model of the tables, and

* every entry change is followed by ``invlpg`` of each virtual page whose translation
  went through the old entry (or by a CR3 reload when there are many, or when the
  operation asks for one); only a change of not-present entries to present ones may go
  without (the SDM does not require an invalidation for it); ``SwitchCR3`` and
  ``SetCtl`` flush everything; no global pages (CR4.PGE stays 0, G never set);
* tables are fresh pages of a pool (never reused), the kernel (code, stacks, tables,
  GDT/IDT/TSS, result log) lives in the identity-mapped first 2 MiB, shared by every
  space through PML4 entry 0, which no operation touches; generated mappings only
  point into the data region (2-8 MiB) — except 1 GiB leaves, which can only map
  physical 0 and are then used only at offsets in the data region;
* an access whose translation (by the model, ignoring rights) would reach anything
  but the data region is dropped by :func:`render`; writes stay below offset 0xF80 of
  their page, whose last 128 bytes are ``ret`` (0xC3) wherever a fetch may land, so
  no code is ever modified; no access straddles a page;
* #PF and #GP handlers log (vector, error code, CR2) in the result log and resume at
  the recovery address the access put in R15, in ring 0 on the kernel stack; a read
  logs the value it loaded (a faulting read logs its preset marker), so a wrong
  translation shows in the final memory comparison as well as in the registers.

Guest-physical layout (``MEMSIZE`` = 8 MiB)::

    0x001000-0x004fff  PML4 of spaces 0-3      0x005000-0x007fff  kernel PDPT, PD, PT
    0x008000 GDT, 0x009000 IDT, 0x00a000 TSS   0x010000-0x07ffff  table pool (112 pages)
    0x080000-0x08ffff  result log              0x09e000 kernel stack, 0x09f000 user stack
    0x100000-          kernel code; the last page holds the ring-3 stubs (US)
    0x200000-0x7fffff  data pages
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterable

from ..guest.prologue import descriptor_data, descriptor_tables
from ..mmu.walk import (PTE_A, PTE_D, PTE_NX, PTE_P, PTE_PCD, PTE_PS, PTE_PWT, PTE_RW,
                        PTE_US)

__all__ = ["Map", "Unmap", "Protect", "Share", "SwitchCR3", "SetCtl", "Access", "Program",
           "generate", "render", "program_for_seed", "shrink", "fuzz", "run_program",
           "format_result", "FuzzResult", "FuzzFailure", "RunOutcome", "MEMSIZE", "EVERY"]

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
_FLAG_MASK = (PTE_RW | PTE_US | PTE_PWT | PTE_PCD | PTE_A | PTE_D | PTE_NX | AVAIL_BITS
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


# ------------------------------------------------------------------------------------
# the table model: what render() and generate() replay


class _Table:
    __slots__ = ("pa", "level", "ent")

    def __init__(self, pa: int, level: int) -> None:
        self.pa = pa
        self.level = level
        self.ent: dict[int, _Ent] = {}


class _Ent:
    __slots__ = ("value", "addr", "child")

    def __init__(self, value: int, addr: int, child: _Table | None) -> None:
        self.value = value      # what the guest wrote (P always set)
        self.addr = addr        # the table or the (large-)page address
        self.child = child      # the next table, or None for a leaf


class _Model:
    """The guest's tables as the program wrote them (hardware A/D bits not tracked)."""

    def __init__(self, program: Program) -> None:
        self.roots = [_Table(PML4_BASE + 0x1000 * i, 4) for i in range(MAX_SPACES)]
        self.pool_next = POOL_BASE
        self.cur = 0
        self.ctl = program.ctl
        self.fetch_pages: set[int] = set()

    # -- queries ------------------------------------------------------------------
    def pool_left(self) -> int:
        return (POOL_END - self.pool_next) >> 12

    def entry_path(self, space: int, va: int, level: int) -> tuple[_Table, int] | None:
        """The table holding the entry of ``level`` on the walk of ``va`` (through tables only)."""
        t = self.roots[space]
        for lv in range(4, level, -1):
            e = t.ent.get(index(va, lv))
            if e is None or e.child is None:
                return None
            t = e.child
        return t, index(va, level)

    def translate(self, space: int, va: int) -> tuple[int, int, int] | None:
        """(pa, level, leaf va) by structure only (rights ignored), or None if a walk ends."""
        if not canonical(va):
            return None
        t = self.roots[space]
        for lv in (4, 3, 2, 1):
            e = t.ent.get(index(va, lv))
            if e is None:
                return None
            if e.child is None:
                if lv == 4:
                    return None
                size = SIZE[lv]
                return e.addr + (va & (size - 1)), lv, va & ~(size - 1)
            t = e.child
        return None

    def leaves(self, space: int) -> list[tuple[int, int, int]]:
        """Every (va, level, pa) leaf of a space."""
        out: list[tuple[int, int, int]] = []
        for i, e in sorted(self.roots[space].ent.items()):
            self._collect(e, 4, sext(i << 39), out)
        return out

    def _collect(self, e: _Ent, level: int, va: int, out: list) -> None:
        if e.child is None:
            if level < 4:
                out.append((va, level, e.addr))
            return
        for i, c in sorted(e.child.ent.items()):
            self._collect(c, level - 1, sext(va + (i << (12 + 9 * (level - 2)))), out)

    def _under(self, e: _Ent, level: int, va: int) -> list[int]:
        out: list = []
        self._collect(e, level, va, out)
        return [v for v, _, _ in out]

    # -- changes (each returns asm lines, or None when the op does nothing) -------
    def alloc(self, level: int) -> _Table:
        t = _Table(self.pool_next, level)
        self.pool_next += 0x1000
        return t

    def apply(self, op, n: int) -> list[str] | None:
        if isinstance(op, Map):
            return self._map(op)
        if isinstance(op, Unmap):
            return self._unmap(op)
        if isinstance(op, Protect):
            return self._protect(op)
        if isinstance(op, Share):
            return self._share(op)
        if isinstance(op, SwitchCR3):
            self.cur = op.space
            return [f"mov eax, {self.roots[op.space].pa:#x}", "mov cr3, rax"]
        if isinstance(op, SetCtl):
            return self._setctl(op)
        if isinstance(op, Access):
            return self._access(op, n)
        raise TypeError(op)

    def _map(self, op: Map) -> list[str] | None:
        if not 1 <= op.level <= 3 or not canonical(op.va) or index(op.va, 4) == 0:
            return None
        va = op.va & ~(SIZE[op.level] - 1)
        # how many new tables: each level above op.level that is not a table yet
        t: _Table | None = self.roots[op.space]
        need = 0
        for lv in range(4, op.level, -1):
            e = t.ent.get(index(va, lv)) if t is not None else None
            if e is None or e.child is None:
                need += lv - op.level
                break
            t = e.child
        if need > self.pool_left():
            return None
        writes: list[tuple[int, int]] = []
        affected: list[int] = []
        changed_present = False
        t = self.roots[op.space]
        for lv in range(4, op.level, -1):
            i = index(va, lv)
            e = t.ent.get(i)
            if e is not None and e.child is not None:
                t = e.child
                continue
            if e is not None:      # a large leaf in the way
                affected.append(va & ~(SIZE[lv] - 1))
                changed_present = True
            child = self.alloc(lv - 1)
            value = child.pa | PTE_P | (op.tflags & _FLAG_MASK & ~PTE_D)
            t.ent[i] = _Ent(value, child.pa, child)
            writes.append((t.pa + 8 * i, value))
            t = child
        i = index(va, op.level)
        old = t.ent.get(i)
        if old is not None:
            affected += self._under(old, op.level, va)
            changed_present = True
        flags = op.flags & _FLAG_MASK
        value = op.pa | PTE_P | flags
        if op.level > 1:
            value |= PTE_PS | (op.flags & RSVD_LOW)
        t.ent[i] = _Ent(value, op.pa, None)
        writes.append((t.pa + 8 * i, value))
        return self._emit(writes, affected, changed_present, op.flush, va)

    def _unmap(self, op: Unmap) -> list[str] | None:
        if not canonical(op.va) or index(op.va, 4) == 0 or not 1 <= op.level <= 4:
            return None
        where = self.entry_path(op.space, op.va, op.level)
        if where is None or where[1] not in where[0].ent:
            return None
        t, i = where
        va = op.va & ~(SIZE[op.level] - 1)
        affected = self._under(t.ent.pop(i), op.level, va)
        return self._emit([(t.pa + 8 * i, 0)], affected, True, op.flush, va)

    def _protect(self, op: Protect) -> list[str] | None:
        if not canonical(op.va) or index(op.va, 4) == 0 or not 1 <= op.level <= 4:
            return None
        where = self.entry_path(op.space, op.va, op.level)
        if where is None or where[1] not in where[0].ent:
            return None
        t, i = where
        e = t.ent[i]
        va = op.va & ~(SIZE[op.level] - 1)
        value = e.addr | PTE_P | (op.flags & _FLAG_MASK)
        if e.child is None and op.level > 1:
            value |= PTE_PS | (op.flags & RSVD_LOW)
        if op.level == 4:
            value |= op.flags & PTE_PS      # PS in a PML4E: a reserved-bit fault
        affected = self._under(e, op.level, va)
        t.ent[i] = _Ent(value, e.addr, e.child)
        return self._emit([(t.pa + 8 * i, value)], affected, True, op.flush, va)

    def _share(self, op: Share) -> list[str] | None:
        if op.dst == op.src or not 0 < op.slot < 512:
            return None
        src = self.roots[op.src].ent.get(op.slot)
        if src is None or src.child is None:
            return None
        dst = self.roots[op.dst]
        va = sext(op.slot << 39)
        old = dst.ent.get(op.slot)
        affected = self._under(old, 4, va) if old is not None else []
        dst.ent[op.slot] = _Ent(src.value, src.addr, src.child)
        return self._emit([(dst.pa + 8 * op.slot, src.value)], affected, old is not None, op.flush, va)

    def _emit(self, writes, affected, changed_present, flush, va) -> list[str]:
        lines: list[str] = []
        for epa, value in writes:
            lines += [f"mov ecx, {epa:#x}", *_load("rax", value), "mov qword ptr [rcx], rax"]
        if flush == "none" and not changed_present:
            return lines
        if flush == "cr3" or len(affected) > MAX_INVLPG:
            lines += ["mov rax, cr3", "mov cr3, rax"]
        else:
            for a in affected or [va]:
                lines += [*_load("rax", a), "invlpg [rax]"]
        return lines

    def _setctl(self, op: SetCtl) -> list[str]:
        self.ctl = op
        return _ctl_lines(op) + ["mov rax, cr3", "mov cr3, rax"]

    def _access(self, op: Access, n: int) -> list[str] | None:
        if op.kind not in ("read", "write", "fetch") or op.cpl not in (0, 3):
            return None
        off = op.va & 0xFFF
        if op.kind == "fetch" and off < RET_ZONE or op.kind != "fetch" and off > 0xFF8:
            return None
        if op.kind == "write" and off >= RET_ZONE:
            return None
        if not canonical(op.va):
            if op.kind == "fetch":
                return None     # where a far-out call faults is not pinned down
        else:
            tr = self.translate(self.cur, op.va)
            if tr is not None:
                pa = tr[0]
                if not DATA_BASE <= pa < DATA_END:
                    return None
                if op.kind == "fetch":
                    self.fetch_pages.add(pa & ~0xFFF)
        rec = f"rec_{n}"
        lines = [f"lea r15, [rip + {rec}]", *_load("rbx", op.va)]
        if op.kind == "read":
            lines += _load("rax", 0xBAD0_0000_0000_0000 | n)
        else:
            lines += _load("rax", op.value)
        if op.cpl == 3:
            lines += ["push 0x1b", f"push {USTACK_TOP:#x}", "push 2", "push 0x23",
                      f"lea rcx, [rip + u_{op.kind}]", "push rcx", "iretq"]
        else:
            if op.ac:
                lines.append("stac")
            lines.append({"read": "mov rax, qword ptr [rbx]", "write": "mov qword ptr [rbx], rax",
                          "fetch": "call rbx"}[op.kind])
        lines += [f"{rec}:", "clac" if op.ac else "nop", "mov qword ptr [r14], rax", "add r14, 8"]
        return lines


def _load(reg: str, value: int) -> list[str]:
    value &= (1 << 64) - 1
    if value < 1 << 31:
        return [f"mov {reg}, {value:#x}"]
    return [f"movabs {reg}, {value:#x}"]


def _ctl_lines(c: SetCtl) -> list[str]:
    return ["mov rax, cr0", f"{'bts' if c.wp else 'btr'} rax, 16", "mov cr0, rax",
            "mov rax, cr4", f"{'bts' if c.smep else 'btr'} rax, 20",
            f"{'bts' if c.smap else 'btr'} rax, 21", "mov cr4, rax",
            "mov ecx, 0xc0000080", "rdmsr", f"{'bts' if c.nxe else 'btr'} eax, 11", "wrmsr"]


# ------------------------------------------------------------------------------------
# rendering


_PROLOGUE_HEAD = f"""
# paging off: kernel tables, identity map of the first 2 MiB (4 KiB pages)
    mov rsp, {KSTACK_TOP:#x}
    mov edi, {K_PDPT:#x}
    mov eax, {K_PD | 7:#x}
    mov qword ptr [rdi], rax
    mov edi, {K_PD:#x}
    mov eax, {K_PT | 7:#x}
    mov qword ptr [rdi], rax
    mov edi, {K_PT:#x}
    mov eax, 3
    mov ecx, 512
fz_fill:
    mov qword ptr [rdi], rax
    add rax, 0x1000
    add rdi, 8
    dec ecx
    jnz fz_fill
    mov edi, {K_PT + 8 * (USTACK_PAGE >> 12):#x}
    or qword ptr [rdi], 4
    lea rax, [rip + user_page]
    shr rax, 12
    mov edi, {K_PT:#x}
    or qword ptr [rdi + rax*8], 4
"""

_PROLOGUE_TAIL = f"""
# paging on
    mov eax, {PML4_BASE:#x}
    mov cr3, rax
    mov rax, cr4
    bts rax, 5
    mov cr4, rax
{{ctl}}
    mov rax, cr0
    bts rax, 31
    mov cr0, rax
{descriptor_tables('fz', gdt=GDT, idt=IDT, tss=TSS, rsp0=KSTACK_TOP, es=True)}    lea rax, [rip + h_gp]
    mov edi, {IDT + 16 * 13:#x}
    mov edx, 0x8E00
    call setgate
    lea rax, [rip + h_pf]
    mov edi, {IDT + 16 * 14:#x}
    mov edx, 0x8E00
    call setgate
    lea rax, [rip + h_sys]
    mov edi, {IDT + 16 * 0x80:#x}
    mov edx, 0xEE00
    call setgate
    mov r14d, {LOG_BASE:#x}
    xor eax, eax
    xor ebx, ebx
    xor ecx, ecx
    xor edx, edx
    xor edi, edi
    xor esi, esi
# ---- the program
"""

_EPILOGUE = f"""
# ---- done
    mov qword ptr [r14], {DONE_MARK:#x}
    xor eax, eax
    out 0xf4, al
fz_hang:
    jmp fz_hang

setgate:
    mov word ptr [rdi], ax
    mov word ptr [rdi+2], 0x08
    mov word ptr [rdi+4], dx
    shr rax, 16
    mov word ptr [rdi+6], ax
    shr rax, 16
    mov dword ptr [rdi+8], eax
    mov dword ptr [rdi+12], 0
    ret

# #GP and #PF: log (vector, error code, CR2), resume at R15 in ring 0 on the kernel stack
h_gp:
    mov qword ptr [r14], 13
    jmp h_log
h_pf:
    mov qword ptr [r14], 14
h_log:
    mov rcx, qword ptr [rsp]
    mov qword ptr [r14+8], rcx
    mov rcx, cr2
    mov qword ptr [r14+16], rcx
    add r14, 24
    add rsp, 8
# int 0x80 (the end of a ring-3 access) and the common resume
h_sys:
    mov qword ptr [rsp], r15
    mov qword ptr [rsp+8], 0x08
    mov qword ptr [rsp+16], 2
    mov qword ptr [rsp+24], {KSTACK_TOP:#x}
    mov qword ptr [rsp+32], 0x10
    iretq

{descriptor_data('fz', gdt=GDT, idt=IDT)}
# ---- ring 3 (this page is US)
    .align 4096
user_page:
u_read:
    mov rax, qword ptr [rbx]
    int 0x80
u_write:
    mov qword ptr [rbx], rax
    int 0x80
u_fetch:
    call rbx
    int 0x80
"""


def render(program: Program) -> str:
    """The guest kernel that runs ``program`` (assembly text for :func:`hvmodel.guest.asm.build`)."""
    model = _Model(program)
    body: list[str] = []
    for n, op in enumerate(program.ops):
        lines = model.apply(op, n)
        body.append(f"# {n}: {op}" + ("" if lines is not None else "  (no effect: skipped)"))
        body += ["    " + ln if not ln.endswith(":") else ln for ln in lines or []]
    prefill: list[str] = []
    for pa in sorted(set(program.pool) | model.fetch_pages):
        if pa in program.pool:
            prefill += [f"    mov edi, {pa:#x}", *("    " + s for s in _load("rax", page_pattern(pa))),
                        f"    mov ecx, {RET_ZONE // 8}", "    rep stosq"]
        else:
            prefill += [f"    mov edi, {pa + RET_ZONE:#x}"]
        prefill += ["    movabs rax, 0xC3C3C3C3C3C3C3C3", f"    mov ecx, {(0x1000 - RET_ZONE) // 8}",
                    "    rep stosq"]
    spaces = [f"    mov edi, {PML4_BASE + 0x1000 * i:#x}\n    mov eax, {K_PDPT | 7:#x}\n"
              "    mov qword ptr [rdi], rax" for i in range(MAX_SPACES)]
    ctl = "\n".join("    " + s for s in _ctl_lines(program.ctl))
    return "\n".join([f"# {program.name}: generated by hvmodel.check.fuzz",
                      _PROLOGUE_HEAD, *spaces, "# data pages: pattern, and ret where fetched",
                      *prefill, _PROLOGUE_TAIL.format(ctl=ctl), *body, _EPILOGUE])


# ------------------------------------------------------------------------------------
# generation


def _rand_flags(rng: random.Random, leaf: bool, level: int) -> int:
    f = 0
    if rng.random() < 0.75:
        f |= PTE_RW
    if rng.random() < 0.7:
        f |= PTE_US
    if rng.random() < 0.5:
        f |= PTE_A
    if leaf and rng.random() < 0.3:
        f |= PTE_D
    if rng.random() < 0.2:
        f |= PTE_NX
    if rng.random() < 0.08:
        f |= rng.choice((PTE_PWT, PTE_PCD, PTE_PWT | PTE_PCD))
    if rng.random() < 0.08:
        f |= rng.choice((1 << 9, 1 << 11, 1 << 52, 1 << 58))
    if rng.random() < 0.04:
        f |= RSVD_LOW if leaf and level > 1 and rng.random() < 0.5 else rng.choice(RSVD_HIGH)
    return f


def _table_flags(rng: random.Random) -> int:
    f = 0
    if rng.random() < 0.9:
        f |= PTE_RW
    if rng.random() < 0.85:
        f |= PTE_US
    if rng.random() < 0.5:
        f |= PTE_A
    if rng.random() < 0.06:
        f |= PTE_NX
    return f


def _grid_va(rng: random.Random, level: int) -> int:
    va = rng.choice(SLOTS) << 39 | rng.choice(PDPT_IDX) << 30
    if level <= 2:
        va |= rng.choice(PD_IDX) << 21
    if level == 1:
        va |= rng.choice(PT_IDX) << 12
    return sext(va)


def _flush(rng: random.Random) -> str:
    r = rng.random()
    return "invlpg" if r < 0.7 else "cr3" if r < 0.85 else "none"


def generate(rng: random.Random, size: int, name: str = "<fuzz>") -> Program:
    """A random program of ``size`` operations (deterministic for the state of ``rng``)."""
    nspaces = rng.randint(2, MAX_SPACES)
    pool: list[int] = []
    for frame in FRAMES_2M:
        for _ in range(rng.randint(2, 5)):
            pool.append(frame + (rng.choice((0, 1, 2, 3, 0x1ff)) if rng.random() < 0.6
                                 else rng.randrange(512)) * 0x1000)
    pool = sorted(set(pool))
    pages = list(pool)
    for _ in range(2):      # data pages nobody pre-fills (first touch through the fuzzed maps)
        pages.append(rng.choice(FRAMES_2M) + rng.randrange(512) * 0x1000)
    filled = tuple(p for p in pool if rng.random() < 0.85)
    ctl = SetCtl(wp=rng.random() < 0.7, nxe=rng.random() < 0.8, smep=rng.random() < 0.3,
                 smap=rng.random() < 0.3)
    base = Program(ops=(), ctl=ctl, pool=filled, name=name)
    model = _Model(base)
    ops: list = []
    while len(ops) < size:
        op = _gen_op(rng, model, nspaces, pages)
        if op is None:
            continue
        if model.apply(op, len(ops)) is None:
            continue
        ops.append(op)
    return base.with_ops(ops)


def _gen_op(rng: random.Random, m: _Model, nspaces: int, pages: list[int]):
    r = rng.random()
    leaves = m.leaves(m.cur)
    if r < 0.24 or not leaves and r < 0.5:
        space = m.cur if rng.random() < 0.65 else rng.randrange(nspaces)
        level = rng.choices((1, 2, 3), (0.6, 0.27, 0.13))[0]
        if level == 1:
            pa = rng.choice(pages)
        elif level == 2:
            pa = rng.choice(FRAMES_2M)
        else:
            pa = 0
        if rng.random() < 0.3:   # an alias of something mapped already
            others = [lf for lf in leaves if lf[1] == level]
            if others:
                pa = rng.choice(others)[2]
        return Map(space, _grid_va(rng, level), level, pa, _rand_flags(rng, True, level),
                   _table_flags(rng), _flush(rng))
    if r < 0.68:
        return _gen_access(rng, m, leaves, pages)
    if r < 0.75:
        space = m.cur if rng.random() < 0.7 else rng.randrange(nspaces)
        lv = m.leaves(space)
        if not lv:
            return None
        va, level, _ = rng.choice(lv)
        if rng.random() < 0.3:
            level = rng.randint(level, 4)
        return Unmap(space, va, level, _flush(rng))
    if r < 0.86:
        space = m.cur if rng.random() < 0.75 else rng.randrange(nspaces)
        lv = m.leaves(space)
        if not lv:
            return None
        va, level, _ = rng.choice(lv)
        if rng.random() < 0.35:
            level = rng.randint(level, 4)
            flags = _table_flags(rng) if rng.random() < 0.7 else _rand_flags(rng, False, level)
            if level == 4 and rng.random() < 0.1:
                flags |= PTE_PS     # reserved in a PML4E; render clears PS below PML4
            return Protect(space, va, level, flags if level == 4 else flags & ~PTE_PS, _flush(rng))
        return Protect(space, va, level, _rand_flags(rng, True, level), _flush(rng))
    if r < 0.92:
        space = rng.randrange(nspaces)
        if space == m.cur:
            space = rng.randrange(nspaces)
        return SwitchCR3(space)
    if r < 0.96:
        return SetCtl(wp=rng.random() < 0.7, nxe=rng.random() < 0.8, smep=rng.random() < 0.3,
                      smap=rng.random() < 0.3)
    src = rng.randrange(nspaces)
    slots = [i for i, e in m.roots[src].ent.items() if e.child is not None]
    if not slots or nspaces < 2:
        return None
    dst = rng.choice([s for s in range(nspaces) if s != src])
    return Share(dst, src, rng.choice(slots), _flush(rng))


def _gen_access(rng: random.Random, m: _Model, leaves, pages):
    kind = rng.choices(("read", "write", "fetch"), (0.45, 0.35, 0.2))[0]
    cpl = 3 if rng.random() < 0.35 else 0
    ac = cpl == 0 and m.ctl.smap and rng.random() < 0.4
    if kind == "fetch":
        off = RET_ZONE + rng.randrange(0x1000 - RET_ZONE)
    elif kind == "write":
        off = rng.randrange(RET_ZONE // 8) * 8
    else:
        off = rng.randrange(0x1000 // 8) * 8
    r = rng.random()
    if leaves and r < 0.85:
        va, level, pa = rng.choice(leaves)
        if level == 1:
            target = va
        else:
            size = SIZE[level]
            inside = [p for p in pages if pa <= p < pa + size]
            page = rng.choice(inside) if inside and rng.random() < 0.8 else \
                (pa + rng.randrange(size >> 12) * 0x1000 if level == 2 else rng.choice(pages))
            target = va + (page - pa)
        va = target + off
    elif r < 0.97 or kind == "fetch":
        va = _grid_va(rng, 1) + off
    else:
        va = rng.choice((0x0000_8000_0000_0000, 0xFFFF_7FFF_FFFF_F000, 0x1234_0000_0000_0000)) + off
    value = rng.getrandbits(64)
    return Access(va, kind, cpl, value, ac)


def program_for_seed(seed: int, index: int, size: int | None = None) -> Program:
    """Program ``index`` of the run with ``seed``: the same on every machine and every run."""
    rng = random.Random(f"hvmodel-fuzz:{seed}:{index}")
    n = size if size is not None else rng.randint(20, 60)
    return generate(rng, n, name=f"fuzz-{seed}-{index}")


# ------------------------------------------------------------------------------------
# shrinking


def shrink(program: Program, still_fails: Callable[[Program], bool], *,
           max_runs: int = 400) -> Program:
    """A smaller program that still fails: delta debugging over the operation list.

    First drops the operations that no longer do anything, then removes chunks of
    operations (halves, quarters, ... single ops) while ``still_fails`` holds, until no
    single operation can go; finally simplifies flushes to ``invlpg``, the start
    controls to WP+NXE and the pre-filled pages to none. Any subset of a program is a
    valid program (render replays it on the model: a Map that loses its tables
    recreates them, an access whose page is gone faults or is dropped), so a Map can go
    without its dependents and every candidate is well defined. ``max_runs`` bounds
    the calls of ``still_fails``.
    """
    runs = 0
    best = program

    def attempt(cand: Program) -> bool:
        nonlocal runs, best
        if runs >= max_runs:
            return False
        runs += 1
        if still_fails(cand):
            best = cand
            return True
        return False

    # drop the effect-less ops first (one run)
    live = _live_ops(best)
    if len(live) < len(best.ops):
        attempt(best.with_ops(live))

    chunk = max(1, len(best.ops) // 2)
    while True:
        progress = False
        i = 0
        while i < len(best.ops):
            ops = best.ops
            if attempt(best.with_ops(ops[:i] + ops[i + chunk:])):
                progress = True
            else:
                i += chunk
        if chunk == 1:
            if not progress:
                break
        else:
            chunk = max(1, chunk // 2)
        if runs >= max_runs:
            break

    # simplify what is left: plain invlpg flushes, then plain start controls
    for i, op in enumerate(best.ops):
        if getattr(op, "flush", "invlpg") != "invlpg":
            attempt(best.with_ops(best.ops[:i] + (replace(op, flush="invlpg"),) + best.ops[i + 1:]))
    if best.ctl != SetCtl(True, True, False, False):
        attempt(replace(best, ctl=SetCtl(True, True, False, False)))
    if best.pool:
        attempt(replace(best, pool=()))
    return best


def _live_ops(program: Program) -> list:
    model = _Model(program)
    return [op for n, op in enumerate(program.ops) if model.apply(op, n) is not None]


# ------------------------------------------------------------------------------------
# running


@dataclass
class RunOutcome:
    ok: bool
    kind: str                  # "" | "mismatch" | "invalid" (the reference did not finish well)
    report: str
    summary: str
    instructions: int = 0


def run_program(program: Program, modes: list[str], *, configure=None,
                every: int = EVERY) -> RunOutcome:
    """Build ``program`` and check it in lock-step; also check that the reference finished."""
    from ..guest.asm import build
    from .lockstep import check

    image = build(render(program), source_name=program.name)
    seen: dict[str, object] = {}

    def conf(vm):
        seen[vm.config.name] = vm
        if configure is not None:
            configure(vm)

    res = check(image, list(modes), memsize=MEMSIZE, host_mem=HOST_MEM, every=every,
                max_insns=MAX_INSNS, configure=conf)
    if not res.ok:
        return RunOutcome(False, "mismatch", res.report, res.summary(), res.instructions)
    ref = seen["native"]
    bad = ""
    if ref.stop_reason != "power_off" or ref.exit_status != 0:
        bad = f"the reference did not finish: {ref.stop_reason} {ref.message}"
    else:
        for v, err, _cr2, rip in ref.events.log:
            if v not in (13, 14, 0x80) or v == 13 and err != 0:
                bad = f"unexpected event in the reference: vector {v} err {err} at {rip:#x}"
                break
    if bad:
        return RunOutcome(False, "invalid", bad, res.summary(), res.instructions)
    return RunOutcome(True, "", "", res.summary(), res.instructions)


@dataclass
class FuzzFailure:
    seed: int
    index: int
    kind: str                  # mismatch | invalid (a generator bug: the program is not well formed)
    original: Program
    program: Program           # shrunk
    text: str                  # the shrunk program's assembly
    report: str                # the check report of the shrunk program
    original_report: str
    shrink_runs: int = 0


@dataclass
class FuzzResult:
    seed: int
    start: int
    count: int
    modes: list[str]
    programs_run: int = 0
    failures: int = 0
    instructions: int = 0
    elapsed: float = 0.0
    first_failure: FuzzFailure | None = None

    @property
    def ok(self) -> bool:
        return self.failures == 0

    @property
    def replay_command(self) -> str:
        i = self.first_failure.index if self.first_failure else self.start
        return f"hvmodel fuzz --seed {self.seed} --count 1 --start {i} --mmu {','.join(self.modes)}"

    def summary(self) -> str:
        s = (f"{self.programs_run} programs, {self.failures} mismatches "
             f"({', '.join(self.modes)} vs native, seed {self.seed}, start {self.start}, "
             f"{self.instructions:,} instructions, {self.elapsed:.1f} s)")
        return s


def fuzz(seed: int, count: int, modes: list[str], *, start: int = 0, configure=None,
         progress: Callable[[int, RunOutcome], None] | None = None, shrink_failures: bool = True,
         max_shrink_runs: int = 400) -> FuzzResult:
    """Run programs ``start .. start+count-1`` of ``seed``; shrink and stop at the first failure.

    ``configure(vm)`` is passed to the checker (tests arm a broken MMU with it);
    ``progress(index, outcome)`` is called after each program.
    """
    t0 = time.perf_counter()
    res = FuzzResult(seed=seed, start=start, count=count, modes=list(modes))
    for index in range(start, start + count):
        program = program_for_seed(seed, index)
        out = run_program(program, modes, configure=configure)
        res.programs_run += 1
        res.instructions += out.instructions
        if progress is not None:
            progress(index, out)
        if out.ok:
            continue
        res.failures += 1
        small, runs = program, 0
        final = out
        if shrink_failures:
            calls = [0]

            def still_fails(p: Program, kind=out.kind) -> bool:
                calls[0] += 1
                o = run_program(p, modes, configure=configure)
                return not o.ok and o.kind == kind
            small = shrink(program, still_fails, max_runs=max_shrink_runs)
            runs = calls[0]
            final = run_program(small, modes, configure=configure)
        res.first_failure = FuzzFailure(seed, index, out.kind, program, small, render(small),
                                        final.report or out.report, out.report, runs)
        break
    res.elapsed = time.perf_counter() - t0
    return res


def format_result(res: FuzzResult) -> str:
    """What ``hvmodel fuzz`` prints."""
    lines = [res.summary()]
    f = res.first_failure
    if f is not None:
        what = ("the VMM disagrees with the reference" if f.kind == "mismatch"
                else "GENERATOR BUG: the program is not well formed (the reference did not run it cleanly)")
        lines += [f"program {f.index} of seed {f.seed} fails: {what}",
                  f"shrunk from {len(f.original)} to {len(f.program)} operations "
                  f"({f.shrink_runs} shrink runs):",
                  f.program.describe(), "", "check report:", f.report, "",
                  f"replay: {res.replay_command}"]
    return "\n".join(lines)
