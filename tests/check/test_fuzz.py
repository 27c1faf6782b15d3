"""Generated page-table programs: they agree with the reference, and the fuzzer can fail and shrink."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvmodel.check import fuzz as F
from hvmodel.check.fuzz import (Access, Map, Program, Protect, SetCtl, fuzz, format_result,
                                program_for_seed, render, run_program, shrink)
from hvmodel.guest.asm import build
from hvmodel.mmu.walk import PTE_A, PTE_RW, PTE_US


# --------------------------------------------------------------------------------------
# Regression found by this fuzzer (seed 1, program 56): INVLPG of an address inside a
# 2 MiB / 1 GiB page must invalidate every TLB entry of that page (SDM 4.10.4.1). The
# fill hook can only give Unicorn 4 KiB entries: shadow intercepts INVLPG and flushes
# when a piece of a large page may be cached (hvmodel/vm/intercept.py); nested
# write-protects the guest tables on the walk to such a leaf (hvmodel/mmu/nested.py).

INVLPG_LARGE_PAGE = Program(ops=(
    Map(space=0, va=0xFFFFFFFFC0000000, level=2, pa=0x400000, flags=PTE_RW | PTE_A,
        tflags=PTE_RW | PTE_US),
    Access(va=0xFFFFFFFFC0001E30, kind="write", value=0xFE79106A1E74C915),   # caches 4 KiB piece 1
    Protect(space=0, va=0xFFFFFFFFC0000000, level=2, flags=PTE_RW | PTE_US),  # A cleared, invlpg base
    Access(va=0xFFFFFFFFC0001F40, kind="read"),   # must walk again and set A
), name="invlpg-large-page")


@pytest.mark.parametrize("mode", ["nested", "shadow"])
def test_invlpg_of_a_large_page_invalidates_all_of_it(mode):
    out = run_program(INVLPG_LARGE_PAGE, [mode])
    assert out.ok, out.report


# --------------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), index=st.integers(0, 10_000))
def test_generated_programs_agree_with_the_reference(seed, index):
    program = program_for_seed(seed, index)
    out = run_program(program, ["nested", "shadow"])
    assert out.ok, f"{out.kind}: {program.describe()}\n{out.report}"


def test_same_seed_same_program():
    a, b = program_for_seed(11, 7), program_for_seed(11, 7)
    assert a == b
    assert render(a) == render(b)
    assert render(program_for_seed(11, 8)) != render(a)
    assert F.generate(random.Random(5), 30) == F.generate(random.Random(5), 30)
    assert 20 <= len(a) <= 60


def test_programs_cover_the_features():
    kinds, levels, cpls, ops = set(), set(), set(), set()
    for i in range(15):
        for op in program_for_seed(3, i).ops:
            ops.add(type(op).__name__)
            if isinstance(op, Access):
                kinds.add(op.kind)
                cpls.add(op.cpl)
            if isinstance(op, Map):
                levels.add(op.level)
    assert kinds == {"read", "write", "fetch"} and cpls == {0, 3} and levels == {1, 2, 3}
    assert ops == {"Map", "Unmap", "Protect", "Share", "SwitchCR3", "SetCtl", "Access"}


def _ignore_us_bit(vm):
    """A walker bug: user accesses are checked as supervisor accesses."""
    if vm.config.mmu == "native":
        return
    orig = vm.mmu.translate
    vm.mmu.translate = lambda cr3, va, acc, user, ctl: orig(cr3, va, acc, False, ctl)


def test_fuzz_finds_and_shrinks_a_broken_mmu():
    res = fuzz(3, 10, ["nested"], configure=_ignore_us_bit)
    assert not res.ok and res.failures == 1
    f = res.first_failure
    assert f.kind == "mismatch"
    assert res.programs_run == f.index + 1
    assert len(f.program) < len(f.original)
    assert len(f.program) <= 6
    assert any(isinstance(op, Access) and op.cpl == 3 for op in f.program.ops)
    # the shrunk program still fails the same way, and passes on a sound MMU
    assert not run_program(f.program, ["nested"], configure=_ignore_us_bit).ok
    assert run_program(f.program, ["nested"]).ok
    text = format_result(res)
    assert f"hvmodel fuzz --seed 3 --count 1 --start {f.index} --mmu nested" in text
    assert res.replay_command in text and "mismatches" in res.summary()
    assert "user_page" in f.text and "page walk of" in f.report or "memory differs" in f.report


def test_fuzz_passes_and_counts():
    res = fuzz(3, 2, ["nested", "shadow"], start=0)
    assert res.ok and res.programs_run == 2 and res.failures == 0
    assert res.summary().startswith("2 programs, 0 mismatches")


def test_shrink_to_the_one_op_that_matters():
    program = program_for_seed(2, 0)
    x = program.ops[len(program) // 2]
    calls = []

    def fails(p: Program) -> bool:
        calls.append(p)
        return x in p.ops

    small = shrink(program, fails)
    assert small.ops == (x,)
    assert len(calls) < 4 * len(program)


def test_shrink_keeps_two_dependent_ops_in_order():
    program = program_for_seed(2, 1)
    a, b = program.ops[3], program.ops[-2]

    def fails(p: Program) -> bool:
        return a in p.ops and b in p.ops and p.ops.index(a) < p.ops.index(b)

    assert shrink(program, fails).ops == (a, b)


def test_any_subset_renders_and_builds():
    program = program_for_seed(9, 4)
    rng = random.Random(1)
    for _ in range(3):
        keep = [op for op in program.ops if rng.random() < 0.5]
        build(render(program.with_ops(keep)))


def test_render_drops_accesses_outside_the_data_region():
    # a 1 GiB leaf maps physical 0: an access at a low offset would hit kernel pages
    prog = Program(ops=(Map(0, 1 << 39, 3, 0, PTE_RW), Access((1 << 39) + 0x1000, "write", value=1),
                        Access((1 << 39) + 0x200010, "write", value=2)), ctl=SetCtl(True, True, False, False))
    text = render(prog)
    assert "# 1: Access(write 0x8000001000 cpl0 value=0x1)  (no effect: skipped)" in text
    assert "(no effect" not in text.split("# 2:")[1].splitlines()[0]


def test_regression_seed1_program25_large_piece_recorded_after_a_flush():
    # A fill that also flushed Unicorn's TLB used to forget the large-page region it was
    # handing out, so a later INVLPG in that 2 MiB page did not drop the stale piece.
    out = run_program(program_for_seed(1, 25), ["nested", "shadow"])
    assert out.ok, out.report
