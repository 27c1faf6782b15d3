"""The access matrix through real guest instructions: agreement, and proof it can fail."""

from __future__ import annotations

from hvmodel.check import matrix as m
from hvmodel.check import oracle as o
from hvmodel.mmu import walk as W


def test_sampled_matrix_agrees_with_oracle_and_reference():
    res = m.run_matrix(["nested"], sample=40)
    assert res.combinations >= 10_000
    assert res.ok, "\n".join(res.lines())
    assert res.reference_deviations == []
    assert res.lines()[0] == f"access matrix, nested: {res.combinations} combinations, 0 mismatches"


def _nx_ignored(vm):
    """A walker bug: NX is combined as if EFER.NXE were always clear."""
    if vm.config.mmu == "native":
        return
    orig = vm.mmu.translate
    vm.mmu.translate = lambda cr3, va, acc, user, ctl: orig(cr3, va, acc, user, ctl & ~W.CTL_NXE)


def _wp_ignored(vm):
    """A walker bug: CR0.WP is ignored (supervisor writes to read-only pages succeed)."""
    if vm.config.mmu == "native":
        return
    orig = vm.mmu.translate
    vm.mmu.translate = lambda cr3, va, acc, user, ctl: orig(cr3, va, acc, user, ctl & ~W.CTL_WP)


def test_matrix_catches_a_walker_that_ignores_nx():
    res = m.run_matrix(["nested"], sample=97, configure=_nx_ignored)
    assert not res.ok
    assert any("efer.nx" in line for line in res.mismatches["nested"])


def test_matrix_catches_a_walker_that_ignores_cr0_wp():
    cases = [c for c in o.enumerate_cases() if c.has(o.AC_CPU_CR0_WP) and c.has(o.AC_ACCESS_WRITE)
             and not c.has(o.AC_ACCESS_USER)][::50]
    res = m.run_matrix(["nested"], cases=cases, configure=_wp_ignored)
    assert not res.ok
    assert all("cr0.wp" in line for line in res.mismatches["nested"])


def test_descriptor_round_trips_the_initial_entries():
    case = o.Case.from_name("pte.p pte.rw pde.p pde.rw pde.user write efer.nx")
    pml4e, pdpte, pde, pte, bits = __import__("struct").unpack_from("<QQQQQ", m._descriptor(case))
    assert (pml4e, pdpte, pde, pte) == o.initial_entries(case)
    assert bits == m.F_WRITE | m.F_NX
