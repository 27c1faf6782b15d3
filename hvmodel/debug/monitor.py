"""The hypervisor's view of a VM, as text: what ``monitor`` commands in gdb and ``hvmodel info`` print.

* ``walk VADDR`` — the guest walk level by level (one walker: ``mmu/walk.py``
  through a read-only view), and under it the VMM's own translation as its MMU
  describes it (``MMU.describe_gpa`` / ``describe_va``): for nested paging the EPT
  entries that translate each guest table and the final page, for shadow paging the
  shadow entries the hardware would walk;
* ``p2m GPA`` — the p2m's state, frame and flags for a guest-physical page;
* ``stats`` — the VM's counters;
* ``info mem`` — the guest's mappings merged into ranges (like QEMU's ``info mem``),
  ``info tlb`` — every mapped page: guest virtual → guest physical → machine
  (like QEMU's ``info tlb``, plus the machine column), ``info p2m`` — runs of guest
  pages by p2m state.

Nothing here changes guest state: no A/D bits, no EPT violations, no shadow pages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from unicorn import x86_const as X

from ..machine.pool import PAGE_SHIFT
from ..mmu.p2m import P2MState
from ..mmu.walk import ADDR_MASK, LEVEL_NAMES, PTE_NX, PTE_PS, PTE_RW, PTE_US, paging_ctl, pte_flags, walk
from ..vm.vcpu import PeekMemory

if TYPE_CHECKING:
    from ..vm.vm import VM

def _ctl(vm: "VM") -> tuple[int, int, bool]:
    v = vm.vcpu
    user = v.cpl() == 3
    ctl = paging_ctl(v.reg(X.UC_X86_REG_CR0), v.reg(X.UC_X86_REG_CR4), v.efer(), v.reg(X.UC_X86_REG_RFLAGS), user)
    return v.reg(X.UC_X86_REG_CR3), ctl, user


def walk_lines(vm: "VM", va: int) -> list[str]:
    """``monitor walk``: the guest walk of ``va``, then the nested or shadow view of it."""
    v = vm.vcpu
    cr3, ctl, user = _ctl(vm)
    out = [f"walk of {va:#x} in {vm.config.name} ({vm.config.mmu}): CR3 {cr3:#x}, CPL {v.cpl()}"]
    trace: list = []
    res = walk(PeekMemory(v), cr3, va, 0, user, ctl, trace)
    if not trace:
        out.append("guest: paging off (guest virtual = guest physical)")
    mmu = vm.mmu
    for level, egpa, e in trace:
        out.append(f"guest {LEVEL_NAMES[level]:<5} at gpa {egpa:#x}: {e:#018x} [{pte_flags(e)}] -> {e & ADDR_MASK:#x}")
        out.extend("    " + s for s in mmu.describe_gpa(egpa))
    if res < 0:
        out.append(f"guest: page fault, error code {~res:#x}")
        return out
    gpa = (res & ADDR_MASK) | (va & 0xFFF)
    out.append(f"guest physical {gpa:#x} (rights {'R' if res & 1 else '-'}{'W' if res & 2 else '-'}"
               f"{'X' if res & 4 else '-'})")
    out.extend(mmu.describe_va(cr3, va, gpa, user, ctl))
    if vm.p2m is not None:
        out.extend(p2m_lines(vm, gpa))
    return out


def p2m_lines(vm: "VM", gpa: int) -> list[str]:
    """``monitor p2m``: what the p2m holds for the page of ``gpa``."""
    p2m = vm.p2m
    gfn = gpa >> PAGE_SHIFT
    if p2m is None:
        return [f"p2m: none in native mode (gpa {gpa:#x} is flat guest memory)"]
    if gfn in p2m.mmio:
        return [f"p2m gfn {gfn:#x}: MMIO (local APIC), device window at machine frame {p2m.mmio[gfn]:#x}"]
    if gfn >= p2m.npages:
        return [f"p2m gfn {gfn:#x}: outside guest memory ({p2m.npages} pages)"]
    st = P2MState(int(p2m.state[gfn]))
    val = int(p2m.value[gfn])
    line = f"p2m gfn {gfn:#x}: {st.name}"
    if st in (P2MState.PRIVATE, P2MState.SHARED):
        pool = vm.pool
        line += (f", machine frame {val:#x} (machine {(val << PAGE_SHIFT) | (gpa & 0xFFF):#x}), "
                 f"refcount {int(pool.refcount[val])}{', copy-on-write' if pool.cow[val] else ''}"
                 f"{', zero frame' if val == 0 else ''}")
    elif st == P2MState.SWAPPED:
        line += f", swap slot {val}"
    return [line, *vm.mmu.describe(gfn)]


def stats_lines(vm: "VM") -> list[str]:
    """``monitor stats``: the VM's counters."""
    out = []
    for k, v in vm.counters().items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in v.items()) or "-"
        out.append(f"{k:<22} {v}")
    return out


def mappings(vm: "VM") -> list[tuple[int, int, int, int]]:
    """Every present leaf of the guest's tables: (va, size, gpa, rights W|U|X bits as 2|4|1)."""
    v = vm.vcpu
    cr3, ctl, _ = _ctl(vm)
    if not ctl & 1:
        return []
    mem = PeekMemory(v)
    out: list[tuple[int, int, int, int]] = []

    def visit(table: int, level: int, base: int, rights: int, nx: bool) -> None:
        for i in range(512):
            e = mem.read_pte(table + 8 * i)
            if not e & 1:
                continue
            va = base | (i << (12 + 9 * (level - 1)))
            if level == 4 and va & (1 << 47):
                va |= 0xFFFF << 48
            r = rights & e & (PTE_RW | PTE_US)
            x = nx or bool(e & PTE_NX)
            if level == 1 or (level < 4 and e & PTE_PS):
                size = 1 << (12 + 9 * (level - 1))
                out.append((va, size, e & ADDR_MASK & ~(size - 1), r | (0 if x else 1)))
            else:
                visit(e & ADDR_MASK, level - 1, va, r, x)

    visit(cr3 & ADDR_MASK, 4, 0, PTE_RW | PTE_US, False)
    return out


def _rights(r: int) -> str:
    return ("u" if r & PTE_US else "-") + "r" + ("w" if r & PTE_RW else "-") + ("x" if r & 1 else "-")


def info_mem(vm: "VM") -> list[str]:
    """``info mem``: contiguous virtual ranges with the same rights."""
    maps = mappings(vm)
    if not maps:
        return ["paging is off: guest virtual = guest physical"]
    out = []
    start, end, rights = maps[0][0], maps[0][0] + maps[0][1], maps[0][3]
    for va, size, _gpa, r in maps[1:] + [(None, 0, 0, None)]:
        if va == end and r == rights:
            end += size
            continue
        out.append(f"{start:016x}-{end:016x} {end - start:016x} {_rights(rights)}")
        if va is not None:
            start, end, rights = va, va + size, r
    return out


def info_tlb(vm: "VM") -> list[str]:
    """``info tlb``: every mapped page, guest virtual -> guest physical -> machine."""
    maps = mappings(vm)
    if not maps:
        return ["paging is off: guest virtual = guest physical"]
    out = []
    for va, size, gpa, r in maps:
        kind = {1 << 12: "4K", 1 << 21: "2M", 1 << 30: "1G"}[size]
        line = f"{va:016x}: {gpa:016x} {kind} {_rights(r)}"
        if vm.p2m is not None:
            frame = vm.p2m.frame_of(gpa >> PAGE_SHIFT)
            line += f" machine {frame << PAGE_SHIFT:#x}" if frame > 0 else " machine - (not backed)"
        out.append(line)
    return out


def info_p2m(vm: "VM") -> list[str]:
    """``info p2m``: runs of guest pages in the same p2m state."""
    p2m = vm.p2m
    if p2m is None:
        return ["no p2m in native mode (guest physical memory is one flat buffer)"]
    st = p2m.state
    out = []
    start = 0
    for gfn in range(1, p2m.npages + 1):
        if gfn == p2m.npages or st[gfn] != st[start]:
            out.append(f"{start << PAGE_SHIFT:012x}-{gfn << PAGE_SHIFT:012x} {gfn - start:7d} pages "
                       f"{P2MState(int(st[start])).name}")
            start = gfn
    for gfn, frame in sorted(p2m.mmio.items()):
        out.append(f"{gfn << PAGE_SHIFT:012x}-{(gfn + 1) << PAGE_SHIFT:012x}       1 pages MMIO "
                   f"(local APIC, machine frame {frame:#x})")
    return out


INFO = {"mem": info_mem, "tlb": info_tlb, "p2m": info_p2m}


def command(vm: "VM", line: str) -> list[str]:
    """Run one monitor command line; unknown commands answer with the list of commands."""
    words = line.split()
    try:
        if words[:1] == ["walk"] and len(words) == 2:
            return walk_lines(vm, int(words[1], 0))
        if words[:1] == ["p2m"] and len(words) == 2:
            return p2m_lines(vm, int(words[1], 0))
        if words == ["stats"]:
            return stats_lines(vm)
        if words[:1] == ["info"] and len(words) == 2 and words[1] in INFO:
            return INFO[words[1]](vm)
    except ValueError:
        return [f"not an address: {' '.join(words[1:])}"]
    return ["monitor commands: walk VADDR | p2m GPA | stats | info mem | info tlb | info p2m"]
