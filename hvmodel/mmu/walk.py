"""The x86-64 guest page walk: one implementation for every MMU, the checker and the tools.

4-level paging (CR4.PAE, EFER.LMA) with 4 KiB, 2 MiB and 1 GiB leaves. The rules
follow the Intel SDM vol. 3 §4.5-4.7 and match what QEMU's own walker (the
reference MMU) does, so differences found by ``hvmodel check`` are real bugs:

* an entry is used only if present and free of reserved bits; reserved are the
  address bits above MAXPHYADDR, NX when EFER.NXE = 0, PS in a PML4E, and the
  low address bits of a large leaf (bits 29:13 of a 1 GiB PDPTE, 20:13 of a
  2 MiB PDE — bit 12 is PAT there);
* every non-leaf entry used gets its Accessed bit as the walk passes it, even if
  the walk faults later (the hardware and QEMU both do this); so does a 1 GiB
  leaf, which QEMU marks before it checks it (the SDM allows A on a faulting
  leaf; kvm-unit-tests' access.c tolerates it);
* rights combine over the levels: W = AND of RW, U = AND of US, X = no NX;
  a supervisor write ignores RW when CR0.WP = 0; SMEP forbids supervisor
  fetches from user pages, SMAP supervisor data accesses to them;
* the leaf gets A, and D on a write, only when the access is allowed;
* the rights returned are those of the privilege that asked, and write is
  withheld while the leaf is clean, so that the first write walks again and
  sets D — exactly the protection QEMU puts in its TLB.

The walk reads and writes guest table entries through ``mem``, any object with
``read_pte(gpa) -> int`` and ``write_pte(gpa, value)``: flat guest memory for
the reference, a 2D walk through the nested tables, or the p2m. That indirection
is what makes this one function serve every mode.

The result is a single int so the fill path allocates no objects for it:
``>= 0`` is ``gpa_of_4k_page | perms`` (plus WALK_2M / WALK_1G when the leaf is a
large page); ``< 0`` is ``~fault`` where ``fault`` holds the #PF error code bits, or
FAULT_GP for a non-canonical address.
"""

from __future__ import annotations

from typing import Mapping, Protocol

# Accesses, as Unicorn's UC_MEM_READ/WRITE/FETCH (16/17/18) minus 16.
ACC_READ = 0
ACC_WRITE = 1
ACC_FETCH = 2

# Rights, numerically the same as UC_PROT_READ/WRITE/EXEC.
PERM_R = 1
PERM_W = 2
PERM_X = 4
PERM_RWX = 7
# Set in a successful result when the leaf was a 2 MiB / 1 GiB page: the fill path
# must remember that Unicorn's 4 KiB TLB entry is a piece of a large page.
WALK_2M = 8
WALK_1G = 16
WALK_LARGE = WALK_2M | WALK_1G

# #PF error code bits.
PFEC_P = 1
PFEC_W = 2
PFEC_U = 4
PFEC_RSVD = 8
PFEC_I = 16
# Not a #PF: a non-canonical address is a #GP(0) (or #SS for stack accesses).
FAULT_GP = 1 << 16

# Paging-structure entry bits.
PTE_P = 1 << 0
PTE_RW = 1 << 1
PTE_US = 1 << 2
PTE_PWT = 1 << 3
PTE_PCD = 1 << 4
PTE_A = 1 << 5
PTE_D = 1 << 6
PTE_PS = 1 << 7
PTE_G = 1 << 8
PTE_NX = 1 << 63

ADDR_MASK = 0x000F_FFFF_FFFF_F000
LEVEL_NAMES = {4: "PML4E", 3: "PDPTE", 2: "PDE", 1: "PTE"}

# Paging controls that change what an entry means, packed into one int ("ctl").
# The same bits later form the shadow MMU's page role.
CTL_PG = 1 << 0     # CR0.PG
CTL_WP = 1 << 1     # CR0.WP
CTL_NXE = 1 << 2    # EFER.NXE
CTL_SMEP = 1 << 3   # CR4.SMEP
CTL_SMAP = 1 << 4   # CR4.SMAP and the access is subject to it (supervisor, AC = 0 or implicit)

CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_PGE = 1 << 7
CR4_SMEP = 1 << 20
CR4_SMAP = 1 << 21
EFER_NXE = 1 << 11
EFER_LMA = 1 << 10
RFLAGS_AC = 1 << 18

MAXPHYADDR = 40  # what the modelled CPU reports in CPUID 0x80000008
_RSVD_PHYS = ADDR_MASK & ~((1 << MAXPHYADDR) - 1)  # bits 51:40
_RSVD_1G = 0x3FFFE000   # bits 29:13 of a 1 GiB leaf
_RSVD_2M = 0x001FE000   # bits 20:13 of a 2 MiB leaf


class TableMemory(Protocol):
    """Where guest paging structures are read and their A/D bits written."""

    def read_pte(self, gpa: int) -> int: ...

    def write_pte(self, gpa: int, value: int) -> None: ...


def pte_flags(e: int) -> str:
    """A paging-structure entry's flags as letters, for reports: ``PWUADSG`` and `` NX``."""
    bits = ((PTE_P, "P"), (PTE_RW, "W"), (PTE_US, "U"), (PTE_A, "A"), (PTE_D, "D"), (PTE_PS, "S"), (PTE_G, "G"))
    return "".join(ch for bit, ch in bits if e & bit) + (" NX" if e & PTE_NX else "")


def paging_ctl(cr0: int, cr4: int, efer: int, rflags: int, user: bool, implicit: bool = False) -> int:
    """Pack the control-register bits the walk depends on for one access."""
    ctl = 0
    if cr0 & CR0_PG:
        ctl |= CTL_PG
    if cr0 & CR0_WP:
        ctl |= CTL_WP
    if efer & EFER_NXE:
        ctl |= CTL_NXE
    if cr4 & CR4_SMEP:
        ctl |= CTL_SMEP
    if cr4 & CR4_SMAP and not user and (implicit or not rflags & RFLAGS_AC):
        ctl |= CTL_SMAP
    return ctl


def walk(mem: TableMemory, cr3: int, va: int, acc: int, user: bool, ctl: int,
         trace: list | None = None) -> int:
    """Translate guest-virtual ``va`` for one access; set A/D bits as hardware does.

    ``acc`` is ACC_READ/WRITE/FETCH, ``user`` is True for a CPL 3 access that is
    not an implicit supervisor access. ``trace``, if given, receives
    ``(level, entry_gpa, entry_value)`` per entry read — for reports, not the hot path.
    Returns ``gpa_page | perms`` or ``~fault`` (see the module docstring).
    """
    if not ctl & CTL_PG:
        return (va & ADDR_MASK) | PERM_RWX
    top = va >> 47
    if top and top != 0x1FFFF:
        return ~FAULT_GP

    rsvd = _RSVD_PHYS if ctl & CTL_NXE else _RSVD_PHYS | PTE_NX
    rights = PTE_RW | PTE_US  # AND over the levels
    nx = 0                    # OR over the levels
    table = cr3 & ADDR_MASK
    level = 4
    while True:
        egpa = table | ((va >> (9 * level)) & 0xFF8)
        e = mem.read_pte(egpa)
        if trace is not None:
            trace.append((level, egpa, e))
        if not e & PTE_P:
            return ~_pfec(0, acc, user, ctl)
        if e & rsvd or (level == 4 and e & PTE_PS):
            return ~_pfec(PFEC_P | PFEC_RSVD, acc, user, ctl)
        if level == 3 and not e & PTE_A:
            # A PDPTE gets A before the walk knows whether it is a 1 GiB leaf, so a
            # faulting 1 GiB leaf keeps it: QEMU does this and the SDM allows it.
            e |= PTE_A
            mem.write_pte(egpa, e)
        if level == 1 or e & PTE_PS:
            if level == 3 and e & _RSVD_1G or level == 2 and e & _RSVD_2M:
                return ~_pfec(PFEC_P | PFEC_RSVD, acc, user, ctl)
            break
        rights &= e
        nx |= e
        if not e & PTE_A:
            e |= PTE_A
            mem.write_pte(egpa, e)
        table = e & ADDR_MASK
        level -= 1

    # e is the leaf at `level`; egpa its address.
    rights &= e
    nx = (nx | e) & PTE_NX if ctl & CTL_NXE else 0
    perms = 0
    if user:
        if not rights & PTE_US:
            return ~_pfec(PFEC_P, acc, user, ctl)
        perms = PERM_R | (PERM_W if rights & PTE_RW else 0) | (0 if nx else PERM_X)
    else:
        if not (ctl & CTL_SMAP and rights & PTE_US):
            perms = PERM_R
            if rights & PTE_RW or not ctl & CTL_WP:
                perms |= PERM_W
        if not nx and not (ctl & CTL_SMEP and rights & PTE_US):
            perms |= PERM_X
    if not perms & (1 << acc):  # PERM_R/W/X = 1 << ACC_READ/WRITE/FETCH
        return ~_pfec(PFEC_P, acc, user, ctl)

    if acc == ACC_WRITE:
        if e & (PTE_A | PTE_D) != PTE_A | PTE_D:
            e |= PTE_A | PTE_D
            mem.write_pte(egpa, e)
    else:
        if not e & PTE_A:
            e |= PTE_A
            mem.write_pte(egpa, e)
        if not e & PTE_D:
            perms &= ~PERM_W  # the first write must come back here to set D

    size_mask = (1 << (12 + 9 * (level - 1))) - 1
    gpa = ((e & ADDR_MASK) & ~size_mask) | (va & size_mask & ADDR_MASK)
    return gpa | perms | (0 if level == 1 else WALK_2M if level == 2 else WALK_1G)


def _pfec(bits: int, acc: int, user: bool, ctl: int) -> int:
    """Complete a #PF error code with the access's W/U/I bits."""
    if acc == ACC_WRITE:
        bits |= PFEC_W
    elif acc == ACC_FETCH and ctl & (CTL_NXE | CTL_SMEP):
        # I/D is reported only when instruction fetches can fault on their own.
        bits |= PFEC_I
    if user:
        bits |= PFEC_U
    return bits


# -- bit-layout invariants ----------------------------------------------------------------------
# Checked at import, as KVM's spte.h does with static asserts: the fill path combines these
# constants with plain integer arithmetic, so a layout that overlaps would translate silently
# wrong rather than fail.

def _single_bits(c: Mapping[str, int], names: tuple[str, ...]) -> list[str]:
    out = []
    seen = 0
    for n in names:
        v = c[n]
        if v <= 0 or v & (v - 1):
            out.append(f"{n} = {v:#x} is not a single bit")
        elif seen & v:
            out.append(f"{n} = {v:#x} overlaps another of {', '.join(names)}")
        seen |= v
    return out


def layout_problems(c: Mapping[str, int]) -> list[str]:
    """What is wrong with the walk's bit layout in namespace ``c`` (empty: nothing)."""
    out = []
    for perm, acc in (("PERM_R", "ACC_READ"), ("PERM_W", "ACC_WRITE"), ("PERM_X", "ACC_FETCH")):
        if c[perm] != 1 << c[acc]:
            out.append(f"{perm} must be 1 << {acc} (walk() tests the right with perms & (1 << acc))")
    if c["PERM_R"] | c["PERM_W"] | c["PERM_X"] != c["PERM_RWX"]:
        out.append("PERM_RWX must be PERM_R | PERM_W | PERM_X")
    flags = ("PERM_R", "PERM_W", "PERM_X", "WALK_2M", "WALK_1G")
    out += _single_bits(c, flags)
    if c["WALK_LARGE"] != c["WALK_2M"] | c["WALK_1G"]:
        out.append("WALK_LARGE must be WALK_2M | WALK_1G")
    result_flags = c["PERM_RWX"] | c["WALK_2M"] | c["WALK_1G"]
    if result_flags & c["ADDR_MASK"] or result_flags >= 1 << 12:
        out.append("the walk's result flags must lie in bits 11:0, clear of the address (ADDR_MASK)")
    out += _single_bits(c, ("PFEC_P", "PFEC_W", "PFEC_U", "PFEC_RSVD", "PFEC_I", "FAULT_GP"))
    out += _single_bits(c, ("CTL_PG", "CTL_WP", "CTL_NXE", "CTL_SMEP", "CTL_SMAP"))
    out += _single_bits(c, ("PTE_P", "PTE_RW", "PTE_US", "PTE_PWT", "PTE_PCD", "PTE_A", "PTE_D", "PTE_PS",
                            "PTE_G", "PTE_NX"))
    low = c["PTE_P"] | c["PTE_RW"] | c["PTE_US"] | c["PTE_A"] | c["PTE_D"] | c["PTE_PS"] | c["PTE_G"]
    if low & c["ADDR_MASK"] or c["PTE_NX"] & c["ADDR_MASK"]:
        out.append("entry flag bits must be clear of the address bits (ADDR_MASK)")
    return out


def static_assert_layout(problems: list[str], where: str) -> None:
    """Refuse to import ``where`` with a broken bit layout (an error, not ``assert``: -O keeps it)."""
    if problems:
        raise ImportError(f"{where}: bit layout broken: " + "; ".join(problems))


static_assert_layout(layout_problems(globals()), __name__)
