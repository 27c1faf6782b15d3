"""An independent permission oracle for the x86-64 page walk, after kvm-unit-tests x86/access.c.

This module does NOT use :mod:`hvmodel.mmu.walk`. It restates, from access.c's
``ac_emulate_access``/``ac_test_permissions``/``__ac_set_expected_status`` and the
Intel SDM vol. 3 §4.6-4.8, what one access must do for one *combination* of

* PTE bits: P, RW, US, A, D, NX, bit 51 and bit 40 (both reserved: MAXPHYADDR = 40,
  so access.c's bit 36 would be a legal address bit here and is replaced by bit 40);
* PDE bits: P, RW, US, A, D, PS, NX, bit 51, bit 40, bit 13 (reserved only in a 2 MiB leaf);
* PDPTE not writable (access.c's ``pdpte.ro``);
* CPU state: EFER.NXE, CR0.WP, CR4.SMEP, CR4.SMAP, EFLAGS.AC;
* the access: user or supervisor; read, write or fetch; once or "twice" (a supervisor
  read of the same address first, as access.c's AC_ACCESS_TWICE: its faults are
  discarded, its A bits stay).

A combination is a :class:`Case` (a bit set of ``AC_*`` flags, like access.c's
``at->flags``); :func:`expected` gives an :class:`Expected`; :func:`build_tables` lays
the case out as 4-level paging structures in a flat fake memory.

Legal combinations (:func:`enumerate_cases`)
-------------------------------------------
From access.c's ``ac_test_legal``:

1. fetch and write are not combined;
2. ``pde.13`` only with ``pde.pse`` (bit 13 is reserved only in a large leaf);
3. at most one reserved bit in the whole case (NX counts as reserved when EFER.NXE = 0).

access.c also refuses user accesses with CR4.SMEP = 1, only because its own test code
runs from pages it makes supervisor-only while SMEP is on. A model has no such
problem, so user accesses ARE combined with SMEP here (SMEP must not affect them).
PKU is not modelled by the walker and is not enumerated.

Our own rules, which only remove combinations that cannot differ from a kept one
(they keep the exhaustive run in ``tests/mmu/test_walk_matrix.py`` well under 20 s):

4. PTE flags are enumerated only when the PTE is really walked, i.e. the PDE is present,
   not a 2 MiB leaf and free of reserved bits; otherwise all ``pte.*`` flags are clear
   (with ``pde.pse`` there is no PTE at all; when the PDE faults the PTE is never read);
5. ``eflags.ac`` only with ``cr4.smap`` (AC has no effect on paging otherwise);
6. ``pde.d`` only with ``pde.pse``: bit 6 is ignored in a PDE that references a page
   table (SDM §4.5, PDE formats),
   so a non-leaf PDE with D set behaves exactly as without (a unit test covers that);
7. ``twice`` only when the first read can change something, i.e. some A bit it could
   set is clear (``pte.a`` for a 4 KiB leaf, ``pde.a``); with every A bit already set
   the supervisor read first writes nothing and the case equals the "once" one;
8. ``cr4.smep`` and ``cr4.smap`` not both set, in the spirit of access.c's "one reserved
   bit at a time": SMEP governs only supervisor fetches and SMAP only supervisor data
   accesses, so each access meets at most one of them;
9. ``pdpte.ro`` only with ``pde.rw``: with the PDE read-only, W is already withheld and
   a read-only PDPTE cannot change anything.

Count: 575,712 legal combinations with every dimension (the default arguments);
287,856 without SMAP/AC; 20,448 with every optional dimension dropped. See
:func:`count_cases`; ``tests/mmu/test_walk_matrix.py`` asserts these numbers.

Expected values
---------------
``fault``/``error_code`` as access.c: P, plus U for a user access, W for a write, I for a
fetch; RSVD (with P) for a present entry with a reserved bit; P cleared for a not-present
entry; I dropped when EFER.NXE = 0 and CR4.SMEP = 0. ``error_code`` is 0 when there is no
fault. Faults (SDM §4.6): a user access to a page whose US is not set at every level; a
write where RW is not set at every level, except a supervisor write with CR0.WP = 0; a
fetch where some level has NX (EFER.NXE = 1); SMEP: a supervisor fetch from a user page
(US at every level); SMAP: a supervisor data access (read or write, not fetch) to a user
page with EFLAGS.AC = 0.

``pte``/``pde`` are the exact final entry values of this (deterministic) model: a
non-leaf PDE gets A once the walk passes it (present, no reserved bit) even if the PTE
then faults; the leaf gets A, and D on a write, only when the access is allowed; an
entry with a reserved bit or not present is never written. ``pde_ignore_mask`` is what
access.c tolerates: the PDE's A bit when the case started with ``pde.a`` clear and the
access faults (hardware may or may not set A on a faulting 2 MiB leaf).
``cr2`` is the linear address when the access faults; ``gpa`` is the guest-physical
4 KiB page the access reaches when it does not fault.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Iterator

# ---------------------------------------------------------------------------
# Flags, in the spirit of access.c's AC_* enum (our own numbering).

AC_PTE_PRESENT = 1 << 0
AC_PTE_WRITABLE = 1 << 1
AC_PTE_USER = 1 << 2
AC_PTE_ACCESSED = 1 << 3
AC_PTE_DIRTY = 1 << 4
AC_PTE_NX = 1 << 5
AC_PTE_BIT51 = 1 << 6
AC_PTE_BIT40 = 1 << 7

AC_PDE_PRESENT = 1 << 8
AC_PDE_WRITABLE = 1 << 9
AC_PDE_USER = 1 << 10
AC_PDE_ACCESSED = 1 << 11
AC_PDE_DIRTY = 1 << 12
AC_PDE_PSE = 1 << 13
AC_PDE_NX = 1 << 14
AC_PDE_BIT51 = 1 << 15
AC_PDE_BIT40 = 1 << 16
AC_PDE_BIT13 = 1 << 17

AC_PDPTE_NO_WRITABLE = 1 << 18

AC_ACCESS_USER = 1 << 19
AC_ACCESS_WRITE = 1 << 20
AC_ACCESS_FETCH = 1 << 21
AC_ACCESS_TWICE = 1 << 22

AC_CPU_EFER_NX = 1 << 23
AC_CPU_CR0_WP = 1 << 24
AC_CPU_CR4_SMEP = 1 << 25
AC_CPU_CR4_SMAP = 1 << 26
AC_CPU_EFLAGS_AC = 1 << 27

FLAG_NAMES: dict[int, str] = {
    AC_PTE_PRESENT: "pte.p",
    AC_PTE_WRITABLE: "pte.rw",
    AC_PTE_USER: "pte.user",
    AC_PTE_ACCESSED: "pte.a",
    AC_PTE_DIRTY: "pte.d",
    AC_PTE_NX: "pte.nx",
    AC_PTE_BIT51: "pte.51",
    AC_PTE_BIT40: "pte.40",
    AC_PDE_PRESENT: "pde.p",
    AC_PDE_WRITABLE: "pde.rw",
    AC_PDE_USER: "pde.user",
    AC_PDE_ACCESSED: "pde.a",
    AC_PDE_DIRTY: "pde.d",
    AC_PDE_PSE: "pde.pse",
    AC_PDE_NX: "pde.nx",
    AC_PDE_BIT51: "pde.51",
    AC_PDE_BIT40: "pde.40",
    AC_PDE_BIT13: "pde.13",
    AC_PDPTE_NO_WRITABLE: "pdpte.ro",
    AC_ACCESS_USER: "user",
    AC_ACCESS_WRITE: "write",
    AC_ACCESS_FETCH: "fetch",
    AC_ACCESS_TWICE: "twice",
    AC_CPU_EFER_NX: "efer.nx",
    AC_CPU_CR0_WP: "cr0.wp",
    AC_CPU_CR4_SMEP: "cr4.smep",
    AC_CPU_CR4_SMAP: "cr4.smap",
    AC_CPU_EFLAGS_AC: "eflags.ac",
}
_NAME_TO_FLAG = {v: k for k, v in FLAG_NAMES.items()}

# ---------------------------------------------------------------------------
# Architectural constants, written out here so the oracle shares nothing with walk.py.

MAXPHYADDR = 40
_P, _RW, _US, _A, _D, _PS = 1, 2, 4, 32, 64, 128
_NX = 1 << 63

ERR_P = 1
ERR_W = 2
ERR_U = 4
ERR_RSVD = 8
ERR_I = 16

# Control-register bits, for turning a case into cr0/cr4/efer/rflags.
CR0_PG = 1 << 31
CR0_WP = 1 << 16
CR0_PE = 1
CR4_PAE = 1 << 5
CR4_SMEP = 1 << 20
CR4_SMAP = 1 << 21
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11
RFLAGS_AC = 1 << 18

# Layout (as access.c: data at 32 MiB, paging structures at 33 MiB).
DATA_PHYS = 32 << 20
PML4_PHYS = 33 << 20
PDPT_PHYS = PML4_PHYS + 0x1000
PD_PHYS = PML4_PHYS + 0x2000
PT_PHYS = PML4_PHYS + 0x3000
#: A linear address whose four table indices are all different and non-zero
#: (0x124, 0xd0, 3, 1) and whose offset inside a 2 MiB page is not page-aligned.
DEFAULT_VA = 0xFFFF_9234_0060_1234
#: A linear address whose table indices are all 511 and whose offset inside a 2 MiB
#: page is 0x1ff234. Any indexing of the linear address that takes 9 bits per level
#: from the same bits repeated (all ones) reaches the same entries.
TOP_VA = 0xFFFF_FFFF_FFFF_F234


@dataclass(frozen=True, slots=True)
class Case:
    """One combination: ``flags`` is a set of ``AC_*`` bits, ``index`` its position."""

    index: int
    flags: int

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)

    @property
    def name(self) -> str:
        """access.c style: the names of the set flags joined by spaces, e.g. ``pte.p pde.p write``."""
        return flags_name(self.flags)

    @classmethod
    def from_name(cls, name: str, index: int = -1) -> "Case":
        flags = 0
        for word in name.split():
            flags |= _NAME_TO_FLAG[word]
        return cls(index, flags)

    # CPU state of the case, as register values.
    @property
    def cr0(self) -> int:
        return CR0_PG | CR0_PE | (CR0_WP if self.flags & AC_CPU_CR0_WP else 0)

    @property
    def cr4(self) -> int:
        return (CR4_PAE | (CR4_SMEP if self.flags & AC_CPU_CR4_SMEP else 0)
                | (CR4_SMAP if self.flags & AC_CPU_CR4_SMAP else 0))

    @property
    def efer(self) -> int:
        return EFER_LME | EFER_LMA | (EFER_NXE if self.flags & AC_CPU_EFER_NX else 0)

    @property
    def rflags(self) -> int:
        return 2 | (RFLAGS_AC if self.flags & AC_CPU_EFLAGS_AC else 0)


def flags_name(flags: int) -> str:
    return " ".join(n for f, n in FLAG_NAMES.items() if flags & f) or "none"


@dataclass(frozen=True, slots=True)
class Expected:
    fault: bool
    error_code: int
    pte: int | None          # None: no PTE (the PDE is a 2 MiB leaf)
    pde: int
    pde_ignore_mask: int
    cr2: int | None = None   # the linear address, when the access faults
    gpa: int | None = None   # the 4 KiB guest-physical page reached, when it does not


# ---------------------------------------------------------------------------
# Table layout

def _rsvd_bits_pte(f: int) -> int:
    return (1 << 51 if f & AC_PTE_BIT51 else 0) | (1 << 40 if f & AC_PTE_BIT40 else 0)


def initial_entries(case: Case) -> tuple[int, int, int, int | None]:
    """The PML4E, PDPTE, PDE and PTE (None with ``pde.pse``) the case starts with."""
    f = case.flags
    pml4e = PDPT_PHYS | _P | _RW | _US
    pdpte = PD_PHYS | _P | _US | (0 if f & AC_PDPTE_NO_WRITABLE else _RW)
    if f & AC_PDE_PSE:
        pde = DATA_PHYS | _PS
    else:
        pde = PT_PHYS
    pde |= ((_P if f & AC_PDE_PRESENT else 0) | (_RW if f & AC_PDE_WRITABLE else 0)
            | (_US if f & AC_PDE_USER else 0) | (_A if f & AC_PDE_ACCESSED else 0)
            | (_D if f & AC_PDE_DIRTY else 0) | (_NX if f & AC_PDE_NX else 0)
            | (1 << 51 if f & AC_PDE_BIT51 else 0) | (1 << 40 if f & AC_PDE_BIT40 else 0)
            | (1 << 13 if f & AC_PDE_BIT13 else 0))
    pte = None
    if not f & AC_PDE_PSE:
        pte = (DATA_PHYS | (_P if f & AC_PTE_PRESENT else 0) | (_RW if f & AC_PTE_WRITABLE else 0)
               | (_US if f & AC_PTE_USER else 0) | (_A if f & AC_PTE_ACCESSED else 0)
               | (_D if f & AC_PTE_DIRTY else 0) | (_NX if f & AC_PTE_NX else 0)
               | _rsvd_bits_pte(f))
    return pml4e, pdpte, pde, pte


@functools.lru_cache(maxsize=64)
def entry_addresses(va: int = DEFAULT_VA) -> tuple[int, int, int, int]:
    """Guest-physical addresses of the PML4E, PDPTE, PDE and PTE used for ``va``.

    Index of level L (4 = PML4 ... 1 = PT): linear-address bits 12+9(L-1) .. 20+9(L-1).
    """
    return (PML4_PHYS + 8 * ((va >> 39) & 511), PDPT_PHYS + 8 * ((va >> 30) & 511),
            PD_PHYS + 8 * ((va >> 21) & 511), PT_PHYS + 8 * ((va >> 12) & 511))


def build_tables(case: Case, va: int = DEFAULT_VA) -> tuple[dict[int, int], int, int]:
    """Lay the case out as PML4 -> PDPT -> PD (-> PT): ``(entries by gpa, cr3, va)``.

    Every other entry of the four tables is zero (not present). With ``pde.pse`` the PD
    entry is a 2 MiB leaf at DATA_PHYS and the PT is absent.
    """
    pml4e, pdpte, pde, pte = initial_entries(case)
    a4, a3, a2, a1 = entry_addresses(va)
    tables = {a4: pml4e, a3: pdpte, a2: pde}
    if pte is not None:
        tables[a1] = pte
    return tables, PML4_PHYS, va


# ---------------------------------------------------------------------------
# The oracle proper

def _permission_fault(f: int, writable: bool, user_page: bool, executable: bool) -> bool:
    """access.c ``ac_test_permissions`` plus SMAP, for the combined rights of the levels."""
    user_acc = f & AC_ACCESS_USER
    if user_acc and not user_page:
        return True
    if f & AC_ACCESS_WRITE and not writable and (user_acc or f & AC_CPU_CR0_WP):
        return True  # a supervisor write ignores RW when CR0.WP = 0
    if f & AC_ACCESS_FETCH:
        if not executable:
            return True
        # SMEP: supervisor-mode fetches only (access.c never combines user with SMEP).
        if not user_acc and user_page and f & AC_CPU_CR4_SMEP:
            return True
    elif not user_acc and user_page and f & AC_CPU_CR4_SMAP and not f & AC_CPU_EFLAGS_AC:
        return True  # SMAP: supervisor data accesses to user pages unless EFLAGS.AC
    return False


def _emulate(f: int, pte: int | None, pde: int) -> tuple[bool, int, int | None, int, int]:
    """One access described by flags ``f``; returns (fault, error, pte, pde, ignore_pde)."""
    nxe = f & AC_CPU_EFER_NX
    fault = False
    error = ERR_P
    if f & AC_ACCESS_USER:
        error |= ERR_U
    if f & AC_ACCESS_WRITE:
        error |= ERR_W
    if f & AC_ACCESS_FETCH:
        error |= ERR_I
    ok_bits = _A | (_D if f & AC_ACCESS_WRITE else 0)

    pde_valid = (f & AC_PDE_PRESENT and not f & (AC_PDE_BIT51 | AC_PDE_BIT40 | AC_PDE_BIT13)
                 and not (f & AC_PDE_NX and not nxe))
    if not pde_valid:
        fault = True
        if f & AC_PDE_PRESENT:
            error |= ERR_RSVD
        else:
            error &= ~ERR_P
    else:
        writable = not f & AC_PDPTE_NO_WRITABLE and bool(f & AC_PDE_WRITABLE)
        user_page = bool(f & AC_PDE_USER)   # the PML4E and PDPTE always have US = 1
        executable = not f & AC_PDE_NX
        if f & AC_PDE_PSE:
            fault = _permission_fault(f, writable, user_page, executable)
            if not fault:
                pde |= ok_bits
        else:
            pde |= _A   # the walk passed the PDE
            assert pte is not None
            pte_valid = (f & AC_PTE_PRESENT and not f & (AC_PTE_BIT51 | AC_PTE_BIT40)
                         and not (f & AC_PTE_NX and not nxe))
            if not pte_valid:
                fault = True
                if f & AC_PTE_PRESENT:
                    error |= ERR_RSVD
                else:
                    error &= ~ERR_P
            else:
                fault = _permission_fault(f, writable and bool(f & AC_PTE_WRITABLE),
                                          user_page and bool(f & AC_PTE_USER),
                                          executable and not f & AC_PTE_NX)
                if not fault:
                    pte |= ok_bits
    # access.c: the PDE's A bit is not checked after a fault if the case started without it.
    ignore_pde = _A if fault and not f & AC_PDE_ACCESSED else 0
    if not nxe and not f & AC_CPU_CR4_SMEP:
        error &= ~ERR_I
    return fault, error, pte, pde, ignore_pde


def expected(case: Case, va: int = DEFAULT_VA) -> Expected:
    """What the access of ``case`` must do, after access.c ``__ac_set_expected_status``."""
    f = case.flags
    _, _, pde, pte = initial_entries(case)
    if f & AC_ACCESS_TWICE:
        # The first access: a supervisor read with the same CPU state; its fault is dropped.
        _, _, pte, pde, _ = _emulate(f & ~(AC_ACCESS_WRITE | AC_ACCESS_FETCH | AC_ACCESS_USER), pte, pde)
    fault, error, pte, pde, ignore = _emulate(f, pte, pde)
    gpa = None
    if not fault:
        if f & AC_PDE_PSE:
            gpa = DATA_PHYS | (va & 0x1FF000)
        else:
            gpa = DATA_PHYS
    return Expected(fault, error if fault else 0, pte, pde, ignore,
                    va if fault else None, gpa)


# ---------------------------------------------------------------------------
# Enumeration

def _combos(bits: list[int]) -> list[int]:
    out = []
    for sel in itertools.product((0, 1), repeat=len(bits)):
        v = 0
        for b, s in zip(bits, sel):
            if s:
                v |= b
        out.append(v)
    return out


def is_legal(flags: int) -> bool:
    """The legality rules 1-7 of the module docstring (independent of the enumeration)."""
    f = flags
    if f & AC_ACCESS_FETCH and f & AC_ACCESS_WRITE:
        return False
    if f & AC_PDE_BIT13 and not f & AC_PDE_PSE:
        return False
    reserved = f & (AC_PDE_BIT51 | AC_PDE_BIT40 | AC_PDE_BIT13 | AC_PTE_BIT51 | AC_PTE_BIT40)
    if not f & AC_CPU_EFER_NX:
        reserved |= f & (AC_PDE_NX | AC_PTE_NX)
    if reserved & (reserved - 1):
        return False
    pde_walks_pte = (f & AC_PDE_PRESENT and not f & AC_PDE_PSE
                     and not f & (AC_PDE_BIT51 | AC_PDE_BIT40)
                     and not (f & AC_PDE_NX and not f & AC_CPU_EFER_NX))
    pte_flags = f & 0xFF
    if pte_flags and not pde_walks_pte:
        return False
    if f & AC_CPU_EFLAGS_AC and not f & AC_CPU_CR4_SMAP:
        return False
    if f & AC_CPU_CR4_SMEP and f & AC_CPU_CR4_SMAP:
        return False
    if f & AC_PDE_DIRTY and not f & AC_PDE_PSE:
        return False
    if f & AC_PDPTE_NO_WRITABLE and not f & AC_PDE_WRITABLE:
        return False
    if f & AC_ACCESS_TWICE:
        a_clear = not f & AC_PDE_ACCESSED or (pde_walks_pte and not f & AC_PTE_ACCESSED)
        if not a_clear:
            return False
    return True


def enumerate_cases(smap: bool = True, smep: bool = True, twice: bool = True,
                    pdpte: bool = True, reserved: bool = True) -> Iterator[Case]:
    """Every legal combination (see the module docstring), in a stable order.

    The keyword arguments drop whole dimensions (the flag is then always clear):
    ``smap`` (CR4.SMAP and EFLAGS.AC), ``smep``, ``twice``, ``pdpte`` (``pdpte.ro``) and
    ``reserved`` (bits 51/40/13; NX with EFER.NXE = 0 stays, it is a permission bit too).
    Each yielded case satisfies :func:`is_legal`; the structure below only avoids
    trying the many illegal PTE combinations one by one.
    """
    cpu_bits = [AC_CPU_EFER_NX, AC_CPU_CR0_WP]
    if smep:
        cpu_bits.append(AC_CPU_CR4_SMEP)
    if smap:
        cpu_bits += [AC_CPU_CR4_SMAP, AC_CPU_EFLAGS_AC]
    acc_bits = [AC_ACCESS_USER, AC_ACCESS_WRITE, AC_ACCESS_FETCH]
    if twice:
        acc_bits.append(AC_ACCESS_TWICE)
    pde_bits = [AC_PDE_PRESENT, AC_PDE_WRITABLE, AC_PDE_USER, AC_PDE_ACCESSED, AC_PDE_DIRTY,
                AC_PDE_PSE, AC_PDE_NX]
    pte_bits = [AC_PTE_PRESENT, AC_PTE_WRITABLE, AC_PTE_USER, AC_PTE_ACCESSED, AC_PTE_DIRTY,
                AC_PTE_NX]
    if reserved:
        pde_bits += [AC_PDE_BIT51, AC_PDE_BIT40, AC_PDE_BIT13]
        pte_bits += [AC_PTE_BIT51, AC_PTE_BIT40]
    if pdpte:
        pde_bits.append(AC_PDPTE_NO_WRITABLE)

    # PTE combinations with at most one reserved bit, by EFER.NXE. A walked PTE sits
    # under a PDE without reserved bits, so the PTE may always use the one allowed.
    pte_lists: dict[bool, list[int]] = {}
    for nxe in (False, True):
        pte_lists[nxe] = []
        for pte in _combos(pte_bits):
            r = pte & (AC_PTE_BIT51 | AC_PTE_BIT40 | (0 if nxe else AC_PTE_NX))
            if not r & (r - 1):
                pte_lists[nxe].append(pte)

    index = 0
    for cpu in _combos(cpu_bits):
        if not is_legal(cpu):
            continue
        nxe = bool(cpu & AC_CPU_EFER_NX)
        for acc in _combos(acc_bits):
            if not is_legal(cpu | (acc & ~AC_ACCESS_TWICE)):
                continue
            for pde in _combos(pde_bits):
                head = cpu | acc | pde
                if not is_legal(head & ~AC_ACCESS_TWICE):
                    continue
                walks_pte = (pde & AC_PDE_PRESENT and not pde & AC_PDE_PSE
                             and not pde & (AC_PDE_BIT51 | AC_PDE_BIT40)
                             and not (pde & AC_PDE_NX and not nxe))
                if not walks_pte:
                    if not acc & AC_ACCESS_TWICE or not pde & AC_PDE_ACCESSED:
                        yield Case(index, head)
                        index += 1
                    continue
                plist = pte_lists[nxe]
                if acc & AC_ACCESS_TWICE and pde & AC_PDE_ACCESSED:
                    for pte in plist:
                        if not pte & AC_PTE_ACCESSED:
                            yield Case(index, head | pte)
                            index += 1
                else:
                    for pte in plist:
                        yield Case(index, head | pte)
                        index += 1


def count_cases(**kw: bool) -> int:
    return sum(1 for _ in enumerate_cases(**kw))
