"""What a divergence report shows: the guest walk of an address, level by level."""

from __future__ import annotations

from unicorn import x86_const as X

from ..mmu.walk import ADDR_MASK, PTE_PS, paging_ctl, walk
from ..vm.vcpu import PeekMemory
from ..vm.vm import VM

_NAMES = {4: "PML4E", 3: "PDPTE", 2: "PDE", 1: "PTE"}


def describe_walk(vm: VM, va: int) -> list[str]:
    """The guest walk of ``va`` in ``vm``, level by level, without side effects."""
    v = vm.vcpu
    cr0, cr3, cr4 = v.reg(X.UC_X86_REG_CR0), v.reg(X.UC_X86_REG_CR3), v.reg(X.UC_X86_REG_CR4)
    ctl = paging_ctl(cr0, cr4, v.efer(), v.reg(X.UC_X86_REG_RFLAGS), v.cpl() == 3)

    trace: list = []
    res = walk(PeekMemory(v), cr3, va, 0, v.cpl() == 3, ctl, trace)
    out = [f"{vm.config.name}: cr3={cr3:#x}"]
    for level, egpa, e in trace:
        where = f"gpa {egpa:#x}"
        if vm.p2m is not None:
            where += f" (machine {vm.mmu.peek_gpa(egpa):#x})"
        flags = "".join(ch for bit, ch in ((1, "P"), (2, "W"), (4, "U"), (32, "A"), (64, "D"),
                                           (PTE_PS, "S")) if e & bit)
        nx = " NX" if e >> 63 else ""
        out.append(f"  {_NAMES[level]:<5} at {where}: {e:#018x} [{flags}{nx}] -> {e & ADDR_MASK:#x}")
    if res < 0:
        out.append(f"  -> fault {~res:#x}")
    else:
        gpa = res & ADDR_MASK
        where = f" (machine {vm.mmu.peek_gpa(gpa):#x})" if vm.p2m is not None else ""
        out.append(f"  -> gpa {gpa:#x}{where} perms {res & 7}")
    return out
