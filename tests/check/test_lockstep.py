"""The lock-step checker: every guest agrees with the reference MMU, and a broken MMU is caught."""

from __future__ import annotations

from pathlib import Path

import pytest

from hvmodel.check.lockstep import check
from hvmodel.guest.load import load_guest

GUESTS = sorted((Path(__file__).resolve().parents[2] / "guests").glob("*.asm"))


@pytest.mark.parametrize("path", GUESTS, ids=lambda p: p.stem)
def test_guest_agrees_with_reference(path):
    mem = 32 << 20 if path.stem == "tlbthrash" else 8 << 20
    res = check(load_guest(path), ["nested", "shadow"], memsize=mem, every=50_000)
    assert res.ok, res.report
    assert res.pages_compared == 2 * (mem >> 12)
    assert res.checkpoints >= 1


def _break_privilege(vm):
    """A walker bug: user accesses are checked as supervisor accesses."""
    if vm.config.mmu == "native":
        return
    orig = vm.mmu.translate
    vm.mmu.translate = lambda cr3, va, acc, user, ctl: orig(cr3, va, acc, False, ctl)


def _break_dirty_bit(vm):
    """A walker bug: the D bit is never set (writes are treated as reads by the walk)."""
    if vm.config.mmu == "native":
        return
    from hvmodel.mmu import nested, walk as W

    def translate(cr3, va, acc, user, ctl, _m=vm.mmu):
        _m.walks += 1
        r = W.walk(_m, cr3, va, W.ACC_READ if acc == W.ACC_WRITE else acc, user, ctl)
        if r < 0:
            return r
        leaf = _m._leaf((r & W.ADDR_MASK) >> 12, acc == W.ACC_WRITE)
        return (leaf & W.ADDR_MASK) | W.PERM_RWX
    vm.mmu.translate = translate


def test_checker_catches_a_walker_that_ignores_privilege():
    res = check(load_guest(GUESTS[0].parent / "usermode.asm"), ["nested"], memsize=8 << 20,
                configure=_break_privilege)
    assert not res.ok
    assert "vector 14" in res.report and "page walk of" in res.report
    assert "PTE" in res.report


def test_checker_catches_missing_dirty_bits_in_final_memory():
    res = check(load_guest(GUESTS[0].parent / "hello.asm"), ["nested"], memsize=8 << 20,
                configure=_break_dirty_bit)
    assert not res.ok
    # The fill that withholds D from the guest's tables is caught at once; before the
    # access checks, only the final memory (or registers) showed it.
    assert "differs from the guest's tables" in res.report or "memory differs" in res.report
