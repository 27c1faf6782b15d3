"""The MMU contract: what every MMU mode offers the vCPU, the VM, the host, the debugger
and fault injection.

An MMU translates guest-virtual pages on TLB fills (``translate``, the hot path), keeps
whatever it derives from the p2m coherent with it (``zap``, the p2m listener), answers
the host's memory management (``pinned``, ``test_and_clear_accessed``,
``overhead_frames``) and describes itself for reports (``describe*``, ``tables``,
``entries``) so that no caller reads its internals or branches on its mode's name.

The three implementations are :class:`hvmodel.mmu.nested.NestedMMU` (EPT),
:class:`hvmodel.mmu.shadow.ShadowMMU` and the reference
:class:`hvmodel.mmu.native.NativeMMU`; :data:`hvmodel.mmu.modes.MODES` maps a mode name
to its class. ``tests/mmu/test_contract.py`` checks that each class has every member.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class VmmTable:
    """One page of a paging structure the VMM owns: a nested (EPT) table or a shadow page."""

    level: int       # 4 = a root ... 1 = a table of 4 KiB leaves
    frame: int       # the machine frame holding its 512 entries
    gfn: int         # shadow: the guest table (or guest large page) it shadows; nested: -1
    role: int = 0    # shadow: the page's role bits (hvmodel.mmu.shadow.role_of)


@dataclass(frozen=True)
class TableEntry:
    """One entry of a VMM-owned paging structure on the path of a translation."""

    level: int       # 4 ... 1
    index: int       # index into the machine pool's qword view (machine address >> 3)
    value: int
    leaf: bool       # the entry maps a page (a 4 KiB leaf, or a 2 MiB one at level 2)


@runtime_checkable
class MMU(Protocol):
    """An MMU mode for one VM. Attributes:

    ``kind``               the mode's name (``nested``, ``shadow``, ``native``)
    ``flush_pending``      a translation it handed out changed: the vCPU flushes Unicorn's
                           TLB (before it runs again, or inside the fill) and clears it
    ``intercepts_invlpg``  the vCPU must intercept guest INVLPGs for it (vm/intercept.py)
    ``p2m``                the VM's p2m (None in native mode): the vCPU lets the VMM's own
                           accesses allocate past the host's low-state block through it
    """

    kind: str
    flush_pending: bool
    intercepts_invlpg: bool
    p2m: Any

    # -- the vCPU ---------------------------------------------------------------------
    def translate(self, cr3: int, va: int, acc: int, user: bool, ctl: int) -> int:
        """GVA → ``address | perms`` (machine address, or the flat buffer's in native mode)
        for one access, or ``~fault`` (a #PF error code, or FAULT_GP); see mmu/walk.py."""
        ...

    def on_exit(self) -> None:
        """The vCPU stopped running guest code: finish deferred work (traced writes)."""
        ...

    def peek_gpa(self, gpa: int) -> int:
        """GPA → address in the vCPU's physical buffer with no side effects; -1 outside."""
        ...

    # -- the VM and the host ---------------------------------------------------------
    def counters(self) -> dict[str, int]:
        """This MMU's counters, by the names the README documents."""
        ...

    def overhead_frames(self) -> int:
        """Machine frames the VMM spends on this VM's translation structures."""
        ...

    def pinned(self, gfn: int) -> bool:
        """Must the host leave ``gfn`` in place (a guest table the MMU shadows)?"""
        ...

    def test_and_clear_accessed(self, gfn: int) -> bool:
        """Was ``gfn`` accessed since the last call? (its translation is dropped here)."""
        ...

    def zap(self, gfn: int) -> None:
        """The p2m listener: ``gfn``'s frame or rights changed; drop what was derived from it."""
        ...

    def release(self) -> None:
        """Give every frame the MMU holds back to the pool (VM power-off)."""
        ...

    # -- reports, the debugger, fault injection ---------------------------------------
    def describe(self, gfn: int) -> list[str]:
        """What this MMU holds for guest page ``gfn`` (``monitor p2m``), one line each."""
        ...

    def describe_gpa(self, gpa: int) -> list[str]:
        """The VMM's own entries translating guest-physical ``gpa`` (nested: the EPT walk)."""
        ...

    def describe_va(self, cr3: int, va: int, gpa: int, user: bool, ctl: int) -> list[str]:
        """How the VMM translates guest-virtual ``va`` (guest-physical ``gpa``): nested, the
        final page through its tables; shadow, the shadow walk; native, no VMM."""
        ...

    def tables(self) -> list[VmmTable]:
        """Every page of the VMM's own paging structures, in a stable order."""
        ...

    def entries(self, gfn: int) -> list[TableEntry]:
        """The VMM's entries that translate guest page ``gfn`` in the guest-physical dimension,
        root first, down to a leaf or the first entry not present (nested: the EPT walk;
        an MMU without guest-physical tables has none)."""
        ...


# Every member of the contract, for the test that checks each implementation has them.
MEMBERS = ("kind", "flush_pending", "intercepts_invlpg", "p2m", "translate", "on_exit", "peek_gpa", "counters",
           "overhead_frames", "pinned", "test_and_clear_accessed", "zap", "release", "describe",
           "describe_gpa", "describe_va", "tables", "entries")


__all__ = ["MEMBERS", "MMU", "TableEntry", "VmmTable"]
