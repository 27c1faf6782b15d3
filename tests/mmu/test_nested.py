"""The nested MMU: 2D walks, reference counts, EPT violations, dirty tracking."""

from __future__ import annotations

import pytest

from hvmodel.machine.pool import PAGE_SHIFT, ZERO_FRAME, MachinePool
from hvmodel.mmu.nested import EPT_D, EPT_W, NestedMMU
from hvmodel.mmu.p2m import P2M, P2MState
from hvmodel.mmu.walk import ACC_READ, ACC_WRITE, CTL_PG, PERM_W, PTE_A, PTE_D, PTE_PS

P, RW = 1, 2


@pytest.fixture
def env():
    pool = MachinePool(8 << 20)
    p2m = P2M(pool, 1024, owner=1)  # 4 MiB of guest memory
    return pool, p2m, NestedMMU(p2m, pool)


def gwrite(pool, p2m, gpa, value):
    frame, _ = p2m.resolve(gpa >> PAGE_SHIFT, True)
    pool.q[((frame << PAGE_SHIFT) | (gpa & 0xFFF)) >> 3] = value


def gread(pool, p2m, gpa):
    return pool.q[((p2m.frame_of(gpa >> PAGE_SHIFT) << PAGE_SHIFT) | (gpa & 0xFFF)) >> 3]


def four_level(pool, p2m, va, target_gpa, leaf_flags=P | RW):
    """Guest tables PML4 0x1000, PDPT 0x2000, PD 0x3000, PT 0x4000 mapping va → target."""
    gwrite(pool, p2m, 0x1000 | ((va >> 39) & 511) * 8, 0x2000 | P | RW)
    gwrite(pool, p2m, 0x2000 | ((va >> 30) & 511) * 8, 0x3000 | P | RW)
    gwrite(pool, p2m, 0x3000 | ((va >> 21) & 511) * 8, 0x4000 | P | RW)
    gwrite(pool, p2m, 0x4000 | ((va >> 12) & 511) * 8, target_gpa | leaf_flags)
    gwrite(pool, p2m, target_gpa, 0x1234)
    return 0x1000


def test_2d_walk_of_4k_page_through_4k_nested_tables_makes_24_references(env):
    pool, p2m, mmu = env
    cr3 = four_level(pool, p2m, 0x7F_1234_5000, 0x10_0000)
    mmu.translate(cr3, 0x7F_1234_5000, ACC_READ, False, CTL_PG)  # warm: violations install leaves
    mmu.ntlb_flush()                                               # ...but a cold nested TLB
    before = mmu.walk_refs
    r = mmu.translate(cr3, 0x7F_1234_5000, ACC_READ, False, CTL_PG)
    assert r >= 0
    assert mmu.walk_refs - before == 24


def test_warm_nested_tlb_leaves_only_the_four_guest_references(env):
    pool, p2m, mmu = env
    cr3 = four_level(pool, p2m, 0x7F_1234_5000, 0x10_0000)
    mmu.translate(cr3, 0x7F_1234_5000, ACC_READ, False, CTL_PG)
    before, hits = mmu.walk_refs, mmu.ntlb_hits
    mmu.translate(cr3, 0x7F_1234_5000, ACC_READ, False, CTL_PG)
    assert mmu.walk_refs - before == 4
    assert mmu.ntlb_hits - hits == 5   # four guest tables + the final page


def test_nested_tlb_off_always_walks_24():
    pool = MachinePool(8 << 20)
    p2m = P2M(pool, 1024, owner=1)
    mmu = NestedMMU(p2m, pool, ntlb_entries=0)
    cr3 = four_level(pool, p2m, 0x7F_1234_5000, 0x10_0000)
    mmu.translate(cr3, 0x7F_1234_5000, ACC_READ, False, CTL_PG)
    for _ in range(2):
        before = mmu.walk_refs
        mmu.translate(cr3, 0x7F_1234_5000, ACC_READ, False, CTL_PG)
        assert mmu.walk_refs - before == 24


def test_2m_guest_page_makes_19_references_and_paging_off_makes_4(env):
    pool, p2m, mmu = env
    gwrite(pool, p2m, 0x1000, 0x2000 | P | RW)
    gwrite(pool, p2m, 0x2000, 0x3000 | P | RW)
    gwrite(pool, p2m, 0x3000 + 8, 0x200000 | P | RW | PTE_PS)
    mmu.translate(0x1000, 0x201000, ACC_READ, False, CTL_PG)
    mmu.ntlb_flush()
    before = mmu.walk_refs
    mmu.translate(0x1000, 0x201000, ACC_READ, False, CTL_PG)
    assert mmu.walk_refs - before == 3 * 5 + 4
    mmu.translate(0, 0x5000, ACC_READ, False, 0)
    mmu.ntlb_flush()
    before = mmu.walk_refs
    mmu.translate(0, 0x5000, ACC_READ, False, 0)
    assert mmu.walk_refs - before == 4


def test_translation_returns_the_machine_frame_the_p2m_chose(env):
    pool, p2m, mmu = env
    cr3 = four_level(pool, p2m, 0x40_0000_0000, 0x8000)
    r = mmu.translate(cr3, 0x40_0000_0000, ACC_WRITE, False, CTL_PG)
    assert r >> PAGE_SHIFT == p2m.frame_of(0x8)
    assert p2m.state[0x8] == P2MState.PRIVATE


def test_read_of_untouched_page_maps_zero_frame_and_write_allocates(env):
    pool, p2m, mmu = env
    cr3 = four_level(pool, p2m, 0x9000_0000, 0x5000)
    # 0x6000 is a never-written guest page; map it at another va through the same PT
    gwrite(pool, p2m, 0x4000 | ((0x9000_1000 >> 12) & 511) * 8, 0x6000 | P | RW | PTE_A | PTE_D)
    r = mmu.translate(cr3, 0x9000_1000, ACC_READ, False, CTL_PG)
    assert r >> PAGE_SHIFT == ZERO_FRAME and not r & PERM_W
    assert p2m.state[0x6] == P2MState.UNBACKED
    r = mmu.translate(cr3, 0x9000_1000, ACC_WRITE, False, CTL_PG)
    assert r >> PAGE_SHIFT not in (ZERO_FRAME, -1) and r & PERM_W
    assert p2m.state[0x6] == P2MState.PRIVATE
    assert mmu.flush_pending  # the read-only zero mapping may be cached: flush


def test_write_right_only_after_the_page_is_dirty(env):
    pool, p2m, mmu = env
    cr3 = four_level(pool, p2m, 0xA000_0000, 0x7000, P | RW | PTE_A | PTE_D)
    r = mmu.translate(cr3, 0xA000_0000, ACC_READ, False, CTL_PG)
    leaf = mmu.lookup(0x7)
    # gwrite backed the page but the EPT leaf is clean until a guest write
    assert leaf & EPT_W and not leaf & EPT_D and not r & PERM_W
    r = mmu.translate(cr3, 0xA000_0000, ACC_WRITE, False, CTL_PG)
    assert r & PERM_W and mmu.lookup(0x7) & EPT_D


def test_walk_sets_guest_accessed_bits_through_the_nested_tables(env):
    pool, p2m, mmu = env
    cr3 = four_level(pool, p2m, 0xB000_0000, 0x9000)
    mmu.translate(cr3, 0xB000_0000, ACC_WRITE, False, CTL_PG)
    pte = gread(pool, p2m, 0x4000 | ((0xB000_0000 >> 12) & 511) * 8)
    assert pte & PTE_A and pte & PTE_D
    assert gread(pool, p2m, 0x1000) & PTE_A


def test_access_outside_guest_memory_is_a_guest_memory_error(env):
    from hvmodel.mmu.p2m import GuestMemoryError
    pool, p2m, mmu = env
    with pytest.raises(GuestMemoryError, match="outside guest memory"):
        mmu.translate(0, 0x4000_0000, ACC_WRITE, False, 0)


def test_p2m_change_zaps_the_nested_leaf(env):
    pool, p2m, mmu = env
    mmu.translate(0, 0x3000, ACC_WRITE, False, 0)
    assert mmu.lookup(3)
    mmu.flush_pending = False
    p2m.changed(3)
    assert mmu.lookup(3) == 0 and mmu.flush_pending
