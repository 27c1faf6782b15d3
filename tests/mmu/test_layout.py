"""The bit-layout invariants checked at import (as KVM's spte.h static asserts): they hold for the
real constants, and each checker names a broken layout."""

from __future__ import annotations

import pytest

from hvmodel.mmu import nested, shadow, walk as W
from hvmodel.vm import vcpu


def test_the_real_layouts_have_no_problem():
    assert W.layout_problems(vars(W)) == []
    assert nested.ept_layout_problems(vars(nested)) == []
    assert shadow.role_layout_problems(vars(shadow)) == []
    assert vcpu.engine_layout_problems(vars(vcpu)) == []


@pytest.mark.parametrize("change, words", [
    ({"PERM_W": 4, "PERM_X": 2}, "PERM_W must be 1 << ACC_WRITE"),
    ({"WALK_2M": 4}, "overlaps"),
    ({"WALK_1G": 1 << 12}, "clear of the address"),
    ({"FAULT_GP": 8}, "FAULT_GP"),
    ({"CTL_SMAP": 1 << 3}, "CTL_SMAP"),
    ({"PTE_G": 1 << 12}, "clear of the address bits"),
])
def test_a_broken_walk_layout_is_named(change, words):
    problems = W.layout_problems({**vars(W), **change})
    assert any(words in p for p in problems), problems


def test_broken_ept_role_and_engine_layouts_are_named():
    assert nested.ept_layout_problems({**vars(nested), "EPT_A": nested.EPT_PS})
    assert nested.ept_layout_problems({**vars(nested), "EPT_D": 1 << 12})
    assert shadow.role_layout_problems({**vars(shadow), "_ROLE_DIRECT": 4})
    assert vcpu.engine_layout_problems({**vars(vcpu), "PERM_X": 8})
    assert vcpu.engine_layout_problems({**vars(vcpu), "ACC_FETCH": 1})


def test_a_broken_layout_refuses_the_import():
    with pytest.raises(ImportError, match="bit layout broken"):
        W.static_assert_layout(["x"], "m")
