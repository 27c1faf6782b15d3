"""Large pages: 2 MiB machine backing, its mapping by both MMUs, breaking, and sharing's rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hvmodel import Host, HostConfig, VMConfig
from hvmodel.guest.asm import build
from hvmodel.guest.load import load_guest
from hvmodel.machine.pool import LARGE_FRAMES, PAGE_SHIFT, PAGE_SIZE, ZERO_FRAME, MachinePool
from hvmodel.machine.swap import SwapDevice
from hvmodel.memory.sharing import SharingConfig
from hvmodel.mmu.nested import EPT_PS, NestedMMU
from hvmodel.mmu.p2m import P2M, P2MState
from hvmodel.mmu.walk import ACC_READ, CTL_PG

GUESTS = Path(__file__).resolve().parents[2] / "guests"
P, RW = 1, 2


def large_p2m(pool_mb: int = 8, npages: int = 1024) -> tuple[MachinePool, P2M]:
    pool = MachinePool(pool_mb << 20)
    p2m = P2M(pool, npages, owner=1)
    p2m.large_enabled = True
    return pool, p2m


# -- the pool ------------------------------------------------------------------------------

def test_a_large_allocation_is_512_aligned_contiguous_zeroed_frames_off_the_free_list():
    pool = MachinePool(8 << 20)                       # 4 runs of 512 frames; run 0 holds the zero frame
    small = [pool.alloc(1) for _ in range(10)]
    pool.buf[:] = b"\xab" * len(pool.buf)             # garbage everywhere, zero frame included
    first = pool.alloc_large(2)
    assert first % LARGE_FRAMES == 0 and first >= LARGE_FRAMES
    run = range(first, first + LARGE_FRAMES)
    assert all(pool.refcount[f] == 1 and pool.owner[f] == 2 for f in run)
    assert pool.buf[first << PAGE_SHIFT:(first + LARGE_FRAMES) << PAGE_SHIFT] == bytes(LARGE_FRAMES * PAGE_SIZE)
    rest = []
    while pool.free_frames:
        rest.append(pool.alloc(3))
    assert not set(rest) & set(run) and not set(rest) & set(small)
    assert len(set(rest)) == len(rest)
    assert pool.alloc_large(4) == -1 and pool.large_misses == 1


def test_no_large_allocation_once_every_2m_run_has_a_used_frame():
    pool = MachinePool(8 << 20)
    small = [pool.alloc(1) for _ in range(3 * LARGE_FRAMES)]   # low frames first: into run 3
    assert max(small) // LARGE_FRAMES == 3
    free = pool.free_frames
    assert pool.alloc_large(1) == -1 and pool.free_frames == free


# -- the p2m -------------------------------------------------------------------------------

def test_a_read_maps_the_zero_frame_and_the_first_write_backs_the_whole_2m_range():
    pool, p2m = large_p2m()
    assert p2m.map_for(600, False) == (ZERO_FRAME, False)
    assert p2m.count(P2MState.PRIVATE) == 0
    frame, writable = p2m.resolve(600, True)
    assert writable and p2m.large_count() == 1 and p2m.large[1]
    lo = LARGE_FRAMES
    frames = p2m.value[lo:lo + LARGE_FRAMES]
    assert (p2m.state[lo:lo + LARGE_FRAMES] == P2MState.PRIVATE).all()
    assert frames[0] % LARGE_FRAMES == 0 and (np.diff(frames) == 1).all()
    assert frame == frames[600 - lo]
    assert p2m.first_touches == 1 and p2m.large_pages_backed == 1


def test_a_partly_touched_or_partial_range_gets_4k_pages():
    pool, p2m = large_p2m(npages=1024 + 100)          # region 2 is only 100 pages long
    p2m.large_ok = False
    p2m.resolve(5, True)                              # a 4 KiB page in region 0 (host not in high)
    p2m.large_ok = True
    p2m.resolve(6, True)                              # region 0 is no longer untouched
    p2m.resolve(1030, True)                           # the partial region
    assert p2m.large_count() == 0 and p2m.count(P2MState.PRIVATE) == 3


def test_breaking_keeps_the_frames_and_swapping_breaks_first(tmp_path):
    pool, p2m = large_p2m()
    p2m.swap = SwapDevice(tmp_path / "vm.vswp", p2m.npages)
    p2m.write_gpa(0x1000, b"hello")
    p2m.write_gpa(0x2000, b"world")
    before = p2m.value[:LARGE_FRAMES].copy()
    p2m.swap_out(1)
    assert p2m.large_breaks == 1 and not p2m.large[0]
    assert p2m.state[1] == P2MState.SWAPPED
    assert (p2m.value[2:LARGE_FRAMES] == before[2:]).all()     # the others did not move
    assert p2m.read_gpa(0x1000, 5) == b"hello" and p2m.read_gpa(0x2000, 5) == b"world"
    p2m.swap.close()


# -- nested: 2 MiB EPT leaves ----------------------------------------------------------------

def four_level(p2m, va, target_gpa):
    """Guest tables at GPA 0x1000-0x4000 mapping va → target_gpa (all inside region 0)."""
    for gpa, val in ((0x1000 | ((va >> 39) & 511) * 8, 0x2000 | P | RW),
                     (0x2000 | ((va >> 30) & 511) * 8, 0x3000 | P | RW),
                     (0x3000 | ((va >> 21) & 511) * 8, 0x4000 | P | RW),
                     (0x4000 | ((va >> 12) & 511) * 8, target_gpa | P | RW)):
        p2m.write_gpa(gpa, val.to_bytes(8, "little"))
    return 0x1000


def test_2d_walk_over_2m_nested_leaves_makes_19_references_and_a_break_makes_it_24():
    pool, p2m = large_p2m()
    mmu = NestedMMU(p2m, pool)
    va = 0x7F_1234_5000
    cr3 = four_level(p2m, va, 0x10_0000)
    assert p2m.large[0]
    r1 = mmu.translate(cr3, va, ACC_READ, False, CTL_PG)
    assert mmu.lookup(0) & EPT_PS and mmu.large_leaves == 1
    mmu.ntlb_flush()
    before = mmu.walk_refs
    assert mmu.translate(cr3, va, ACC_READ, False, CTL_PG) == r1
    assert mmu.walk_refs - before == (4 + 1) * (3 + 1) - 1
    # Same machine page as the p2m says, whatever the leaf size.
    assert r1 >> PAGE_SHIFT == p2m.value[0x100]
    p2m.break_large(0)
    assert mmu.large_splits == 1 and not mmu.lookup(5) & EPT_PS
    assert mmu.translate(cr3, va, ACC_READ, False, CTL_PG) == r1   # split in place: same frames
    mmu.ntlb_flush()
    before = mmu.walk_refs
    mmu.translate(cr3, va, ACC_READ, False, CTL_PG)
    assert mmu.walk_refs - before == 24


# -- guests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mmu", ["nested", "shadow"])
def test_memtest_verifies_its_memory_on_large_pages_and_both_mmus_map_them_2m(mmu):
    h = Host(HostConfig(memsize=128 << 20))
    vm = h.power_on(VMConfig(memsize=32 << 20, mmu=mmu), load_guest(GUESTS / "memtest.asm"))
    r = h.run()[0]
    assert r.exit_status == 0, r.message
    c = r.counters
    assert c["large_pages"] == 16 and c["large_breaks"] == 0
    assert c["ept_large_leaves" if mmu == "nested" else "shadow_large_leaves"] > 0
    h.close()


def test_under_pressure_large_pages_are_broken_before_they_are_reclaimed():
    h = Host(HostConfig(memsize=8 << 20))
    vm = h.power_on(VMConfig(memsize=16 << 20), load_guest(GUESTS / "hog.asm"))
    r = h.run()[0]
    assert r.exit_status == 0, r.message
    c = r.counters
    assert c["large_pages_backed"] >= 1 and c["large_breaks"] == c["large_pages_backed"]
    assert c["SWW"] > 0 and c["large_pages"] == 0
    # The host also fell to low, where this VM (above its target) had to wait for memory.
    assert c["allocs_blocked"] > 0 and c["blocked_exits"] == c["allocs_blocked"]
    h.close()


# -- sharing ------------------------------------------------------------------------------------

def test_sharing_hashes_large_pages_in_high_but_shares_only_after_breaking_them():
    h = Host(HostConfig(memsize=32 << 20, sharing=SharingConfig(force_salting=0)))
    idle = build("cli; hlt")
    a = h.power_on(VMConfig(name="a", memsize=4 << 20), idle)
    a.p2m.write_gpa(0x200000, b"\x07" * PAGE_SIZE)       # backs region 1 with a 2 MiB page
    assert a.p2m.large[1]
    h.sharing.scan(a, a.p2m.npages)                      # high: hashed, nothing shared
    assert a.p2m.count(P2MState.SHARED) == 0 and a.p2m.large[1]
    assert h.sharing.pages_scanned >= LARGE_FRAMES and h.sharing.lpage_shareable >= LARGE_FRAMES - 2
    h.sharing.break_large = True                         # what the host sets from clear on
    h.sharing.scan(a, a.p2m.npages)
    assert not a.p2m.large[1] and a.p2m.large_breaks >= 1
    assert a.p2m.zero_pages() >= LARGE_FRAMES - 1       # the untouched rest went to the zero frame
    assert a.p2m.read_gpa(0x200000, 4) == b"\x07" * 4
    h.close()


def test_the_host_allows_new_large_pages_only_in_high_and_breaks_from_clear():
    h = Host(HostConfig(memsize=32 << 20))
    vm = h.power_on(VMConfig(memsize=4 << 20), build("cli; hlt"))
    h.states.state = "high"
    h.policy(vm, 0)
    assert vm.p2m.large_ok and not h.sharing.break_large
    # Fill the host so free memory is under minFree: clear or worse.
    hog = [h.pool.alloc(0) for _ in range(h.pool.free_frames - 10)]
    h.policy(vm, 0)
    assert h.states.state != "high" and not vm.p2m.large_ok and h.sharing.break_large
    for f in hog:
        h.pool.put(f)
    h.close()
