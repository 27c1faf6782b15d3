"""Every legal access.c-style combination: walk() against the independent oracle.

For each case of :func:`hvmodel.check.oracle.enumerate_cases` the paging structures are
laid out in a dict-backed fake memory, the access is walked (for "twice" cases a
supervisor read first, whose A bits stay in memory), and fault, exact error code, final
PTE and PDE (PDE A ignored where access.c ignores it) are compared with the oracle. So are
the GPA reached, the rights returned, and the A bit of the PML4E and PDPTE the walk passed.

The exhaustive run uses ``DEFAULT_VA`` (table indices 0x124, 0xd0, 3, 1, so a wrong
index shift is caught); a sample is repeated at ``TOP_VA`` (all indices 511).
"""

from __future__ import annotations


from hvmodel.check import oracle as o
from hvmodel.mmu.walk import ACC_FETCH, ACC_READ, ACC_WRITE, paging_ctl, walk

N_EXPECTED = 575_712
_A = 1 << 5


class DictMemory:
    """Guest table memory as a dict gpa -> entry; absent entries read as 0."""

    __slots__ = ("entries", "writes")

    def __init__(self, entries: dict[int, int]):
        self.entries = entries
        self.writes = 0

    def read_pte(self, gpa: int) -> int:
        return self.entries.get(gpa, 0)

    def write_pte(self, gpa: int, value: int) -> None:
        self.entries[gpa] = value
        self.writes += 1


_CPU_MASK = (o.AC_CPU_EFER_NX | o.AC_CPU_CR0_WP | o.AC_CPU_CR4_SMEP | o.AC_CPU_CR4_SMAP
             | o.AC_CPU_EFLAGS_AC)


def run_case(case: o.Case, va: int, ctl_cache: dict) -> str | None:
    """Walk one case; return None when walk() agrees with the oracle, else a description."""
    f = case.flags
    tables, cr3, va = o.build_tables(case, va)
    mem = DictMemory(tables)
    user = bool(f & o.AC_ACCESS_USER)
    ctls = ctl_cache.get(f & _CPU_MASK)
    if ctls is None:
        ctls = ctl_cache[f & _CPU_MASK] = (
            paging_ctl(case.cr0, case.cr4, case.efer, case.rflags, user=False),
            paging_ctl(case.cr0, case.cr4, case.efer, case.rflags, user=True))
    acc = ACC_WRITE if f & o.AC_ACCESS_WRITE else ACC_FETCH if f & o.AC_ACCESS_FETCH else ACC_READ
    if f & o.AC_ACCESS_TWICE:
        walk(mem, cr3, va, ACC_READ, False, ctls[0])  # its fault, if any, is dropped
    r = walk(mem, cr3, va, acc, user, ctls[user])

    exp = o.expected(case, va)
    a4, a3, a2, a1 = o.entry_addresses(va)
    entries = mem.entries
    pte = entries.get(a1) if exp.pte is not None else None
    pde = entries[a2]
    if (r < 0) == exp.fault and (~r == exp.error_code if r < 0
                                 else r & ~0xFFF == exp.gpa and r & (1 << acc)) \
            and pte == exp.pte and not (pde ^ exp.pde) & ~exp.pde_ignore_mask \
            and entries[a4] & entries[a3] & _A:
        return None
    # Describe the disagreement.
    problems = []
    if (r < 0) != exp.fault:
        problems.append(f"fault={r < 0} expected {exp.fault}")
    elif r < 0 and ~r != exp.error_code:
        problems.append(f"error code {~r:#x} expected {exp.error_code:#x}")
    elif r >= 0:
        if r & ~0xFFF != exp.gpa:
            problems.append(f"gpa {r & ~0xFFF:#x} expected {exp.gpa:#x}")
        if not r & (1 << acc):
            problems.append(f"perms {r & 7:#x} lack the access {acc}")
    if pte != exp.pte:
        problems.append(f"pte {pte:#x} expected {exp.pte:#x}")
    if (pde ^ exp.pde) & ~exp.pde_ignore_mask:
        problems.append(f"pde {pde:#x} expected {exp.pde:#x} (ignoring {exp.pde_ignore_mask:#x})")
    if not entries[a4] & entries[a3] & _A:
        problems.append("PML4E/PDPTE A not set")
    return f"#{case.index} [{case.name}]: " + "; ".join(problems)


def test_matrix_count_per_dimension():
    # Each dimension can be dropped; the smallest set is still over 10,000 combinations.
    assert o.count_cases(smap=False, smep=False, twice=False, pdpte=False, reserved=False) == 20_448
    assert o.count_cases(smap=False) == 287_856


def test_enumerated_cases_are_legal_distinct_and_numbered():
    flags = [(c.index, c.flags) for c in o.enumerate_cases(smap=False)]
    assert [i for i, _ in flags] == list(range(len(flags)))
    assert all(o.is_legal(f) for _, f in flags)
    assert len({f for _, f in flags}) == len(flags)


def test_enumeration_matches_brute_force_on_a_subspace():
    # Without SMAP/SMEP/twice/pdpte/reserved the flag space is 2^20: check every point.
    kept = {c.flags for c in o.enumerate_cases(smap=False, smep=False, twice=False, pdpte=False,
                                                reserved=False)}
    bits = [o.AC_PTE_PRESENT, o.AC_PTE_WRITABLE, o.AC_PTE_USER, o.AC_PTE_ACCESSED, o.AC_PTE_DIRTY,
            o.AC_PTE_NX, o.AC_PDE_PRESENT, o.AC_PDE_WRITABLE, o.AC_PDE_USER, o.AC_PDE_ACCESSED,
            o.AC_PDE_DIRTY, o.AC_PDE_PSE, o.AC_PDE_NX, o.AC_ACCESS_USER, o.AC_ACCESS_WRITE,
            o.AC_ACCESS_FETCH, o.AC_CPU_EFER_NX, o.AC_CPU_CR0_WP]
    brute = set()
    for n in range(1 << len(bits)):
        flags = 0
        for i, b in enumerate(bits):
            if n >> i & 1:
                flags |= b
        if o.is_legal(flags):
            brute.add(flags)
    assert kept == brute


def test_case_names_round_trip():
    case = o.Case.from_name("pte.p pte.rw pde.p pde.user write cr0.wp efer.nx")
    assert case.name == "pte.p pte.rw pde.p pde.user write efer.nx cr0.wp"
    assert o.Case.from_name(case.name).flags == case.flags


def test_walk_matches_oracle_on_all_575712_legal_combinations():
    cache: dict = {}
    failures = []
    n = 0
    for case in o.enumerate_cases():
        n += 1
        msg = run_case(case, o.DEFAULT_VA, cache)
        if msg is not None:
            failures.append(msg)
    assert n == N_EXPECTED and n >= 10_000
    assert not failures, f"{len(failures)} of {n} cases disagree:\n" + "\n".join(failures[:30])


def test_walk_matches_oracle_at_the_top_of_the_address_space():
    """The core matrix again at TOP_VA: all indices 511, offset 0x1ff234 inside a 2 MiB leaf."""
    cache: dict = {}
    failures = []
    for case in o.enumerate_cases(smap=False, smep=False, twice=False, pdpte=False, reserved=False):
        msg = run_case(case, o.TOP_VA, cache)
        if msg is not None:
            failures.append(msg)
    assert not failures, f"{len(failures)} cases disagree:\n" + "\n".join(failures[:10])


# Hand-worked oracle examples (access.c semantics), so the oracle is not only checked
# against walk() itself.
_PTE0 = o.DATA_PHYS
_PDE0 = o.PT_PHYS


def _exp(name: str) -> o.Expected:
    return o.expected(o.Case.from_name(name))


def test_oracle_user_write_to_read_only_pte():
    e = _exp("pte.p pte.user pde.p pde.rw pde.user user write efer.nx cr0.wp")
    assert e.fault and e.error_code == 0b111 and e.cr2 == o.DEFAULT_VA and e.gpa is None
    assert e.pte == _PTE0 | 0b101                        # untouched
    assert e.pde == _PDE0 | 0b111 | 0x20                 # passed: A set
    assert e.pde_ignore_mask == 0x20                     # access.c tolerates it anyway


def test_oracle_supervisor_write_with_wp_clear_succeeds_and_dirties():
    e = _exp("pte.p pde.p write efer.nx")
    assert not e.fault and e.error_code == 0 and e.gpa == o.DATA_PHYS
    assert e.pte == _PTE0 | 0x1 | 0x60 and e.pde == _PDE0 | 0x1 | 0x20


def test_oracle_reserved_and_not_present():
    e = _exp("pte.p pte.51 pde.p user fetch efer.nx")
    assert e.error_code == 0b11101                       # P|U|RSVD|I
    e = _exp("pte.p pde.p pde.nx fetch")                 # NX reserved without NXE; I dropped
    assert e.error_code == 0b1001 and e.pde == _PDE0 | 1 | (1 << 63)
    e = _exp("pde.rw pde.user user write cr4.smep")      # PDE not present: P clear
    assert e.error_code == 0b110
    e = _exp("pte.user pde.p pde.user fetch cr4.smep")   # SMEP alone reports I
    assert e.error_code == 0b10000


def test_oracle_smep_smap_and_ac():
    assert _exp("pte.p pte.user pde.p pde.user fetch efer.nx cr4.smep").error_code == 0b10001
    assert not _exp("pte.p pte.user pde.p pde.user user fetch efer.nx cr4.smep").fault
    assert _exp("pte.p pte.user pde.p pde.user efer.nx cr4.smap").error_code == 0b1
    assert not _exp("pte.p pte.user pde.p pde.user efer.nx cr4.smap eflags.ac").fault
    assert not _exp("pte.p pte.user pde.p pde.user fetch efer.nx cr4.smap").fault


def test_oracle_twice_keeps_the_first_reads_accessed_bits():
    # the first (supervisor) read succeeds and sets A; the user write then faults
    e = _exp("pte.p pte.user pde.p pde.user user write twice efer.nx cr0.wp")
    assert e.fault and e.pte == _PTE0 | 0b101 | 0x20
    # with SMAP the first read faults too: nothing on the leaf, A on the walked PDE
    e = _exp("pte.p pte.user pde.p pde.user user write twice efer.nx cr0.wp cr4.smap")
    assert e.pte == _PTE0 | 0b101 and e.pde & 0x20


def test_oracle_2m_leaf():
    e = _exp("pde.p pde.rw pde.pse write efer.nx cr0.wp")
    assert e.pte is None and e.pde == o.DATA_PHYS | 0x80 | 0b11 | 0x60
    assert e.gpa == o.DATA_PHYS | (o.DEFAULT_VA & 0x1FF000)
    e = _exp("pde.p pde.pse pde.13 efer.nx")
    assert e.error_code == 0b1001 and e.pde == o.DATA_PHYS | 0x80 | 1 | (1 << 13)
