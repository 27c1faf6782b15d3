"""The table model: the guest's page tables as the program builds them, which rendering and
generation replay (what each operation must invalidate, what an access would reach).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...mmu.walk import PTE_D, PTE_P, PTE_PS
from .program import (DATA_BASE, DATA_END, FLAG_MASK, MAX_INVLPG, MAX_SPACES, PML4_BASE, POOL_BASE, POOL_END,
                      RET_ZONE, RSVD_LOW, SIZE, USTACK_TOP, Access, canonical, index, Map, Program, Protect,
                      SetCtl, sext, Share, SwitchCR3, Unmap)


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


class TableModel:
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
            value = child.pa | PTE_P | (op.tflags & FLAG_MASK & ~PTE_D)
            t.ent[i] = _Ent(value, child.pa, child)
            writes.append((t.pa + 8 * i, value))
            t = child
        i = index(va, op.level)
        old = t.ent.get(i)
        if old is not None:
            affected += self._under(old, op.level, va)
            changed_present = True
        flags = op.flags & FLAG_MASK
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
        value = e.addr | PTE_P | (op.flags & FLAG_MASK)
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
            lines += [f"mov ecx, {epa:#x}", *load_reg("rax", value), "mov qword ptr [rcx], rax"]
        if flush == "none" and not changed_present:
            return lines
        if flush == "cr3" or len(affected) > MAX_INVLPG:
            lines += ["mov rax, cr3", "mov cr3, rax"]
        else:
            for a in affected or [va]:
                lines += [*load_reg("rax", a), "invlpg [rax]"]
        return lines

    def _setctl(self, op: SetCtl) -> list[str]:
        self.ctl = op
        return ctl_lines(op) + ["mov rax, cr3", "mov cr3, rax"]

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
        lines = [f"lea r15, [rip + {rec}]", *load_reg("rbx", op.va)]
        if op.kind == "read":
            lines += load_reg("rax", 0xBAD0_0000_0000_0000 | n)
        else:
            lines += load_reg("rax", op.value)
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


def load_reg(reg: str, value: int) -> list[str]:
    value &= (1 << 64) - 1
    if value < 1 << 31:
        return [f"mov {reg}, {value:#x}"]
    return [f"movabs {reg}, {value:#x}"]


def ctl_lines(c: SetCtl) -> list[str]:
    return ["mov rax, cr0", f"{'bts' if c.wp else 'btr'} rax, 16", "mov cr0, rax",
            "mov rax, cr4", f"{'bts' if c.smep else 'btr'} rax, 20",
            f"{'bts' if c.smap else 'btr'} rax, 21", "mov cr4, rax",
            "mov ecx, 0xc0000080", "rdmsr", f"{'bts' if c.nxe else 'btr'} eax, 11", "wrmsr"]
