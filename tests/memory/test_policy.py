"""Reclamation policy: host states, the idle memory tax, targets, sampling, compression."""

from __future__ import annotations

import numpy as np
import pytest

from hvmodel import Host, HostConfig, VMConfig
from hvmodel.guest.asm import build
from hvmodel.machine.pool import PAGE_SIZE, MachinePool
from hvmodel.memory.alloc import ActivitySampler, Claim, idle_tax_k, rho, shares_of, targets
from hvmodel.memory.compress import CompressionCache
from hvmodel.memory.states import MemoryStates, min_free

GIB, MIB = 1 << 30, 1 << 20


# -- minFree and states ------------------------------------------------------------------

def test_min_free_sliding_scale():
    assert min_free(4 * GIB) == int(0.06 * 4 * GIB)
    assert min_free(12 * GIB) == int(0.06 * 4 * GIB + 0.04 * 8 * GIB)
    assert min_free(28 * GIB) == int(0.06 * 4 * GIB + 0.04 * 8 * GIB + 0.02 * 16 * GIB)
    assert min_free(64 * GIB) == int(0.06 * 4 * GIB + 0.04 * 8 * GIB + 0.02 * 16 * GIB + 0.01 * 36 * GIB)
    assert min_free(96 * MIB) == int(0.06 * 96 * MIB)       # the model's small hosts
    assert min_free(96 * MIB, pct=3) == int(0.03 * 96 * MIB)


@pytest.mark.parametrize("ratio,state", [(5.0, "high"), (4.0, "high"), (2.55, "clear"), (1.0, "clear"),
                                         (0.99, "soft"), (0.64, "soft"), (0.5, "hard"), (0.32, "hard"),
                                         (0.2, "low"), (0.01, "low")])
def test_state_going_down_follows_the_lower_bounds(ratio, state):
    s = MemoryStates(min_free_bytes=1000)
    assert s.update(int(ratio * 1000)) == state


def test_each_transition_down_then_up_with_hysteresis():
    s = MemoryStates(min_free_bytes=1000)
    seen = [s.update(x) for x in (5000, 3000, 900, 500, 200, 100)]
    assert seen == ["high", "clear", "soft", "hard", "low", "low"]
    # up: 0.33 is above hard's bound but not by the 10 % margin: still low
    assert s.update(330) == "low"
    assert s.update(360) == "hard"          # 0.36 >= 0.32 * 1.1
    assert s.update(680) == "hard"          # 0.68 < 0.64 * 1.1
    assert s.update(710) == "soft"
    assert s.update(1050) == "soft"         # < 1.0 * 1.1
    assert s.update(1200) == "clear"
    assert s.update(4300) == "clear"        # < 4.0 * 1.1
    assert s.update(4500) == "high"
    assert s.transitions == 8
    assert s.at_least("high") and not s.at_least("clear")


# -- the idle memory tax and targets ---------------------------------------------------------

def test_idle_tax_against_hand_computed_values():
    assert idle_tax_k(0.75) == 4.0 and idle_tax_k(0.0) == 1.0
    # S = 1000 shares, P = 100 pages: all active -> 10; all idle -> 10 / 4; half -> 1000/(100*2.5) = 4
    assert rho(1000, 100, 1.0, 0.75) == pytest.approx(10.0)
    assert rho(1000, 100, 0.0, 0.75) == pytest.approx(2.5)
    assert rho(1000, 100, 0.5, 0.75) == pytest.approx(4.0)
    # tau = 0: no tax, plain shares per page
    assert rho(1000, 100, 0.0, 0.0) == pytest.approx(10.0)


def test_shares_settings():
    assert shares_of("low", 100) == 500 and shares_of("normal", 100) == 1000 and shares_of("high", 100) == 2000
    assert shares_of(1234, 100) == 1234
    with pytest.raises(ValueError):
        shares_of("medium", 100)


def test_targets_give_idle_memory_to_the_active_vm():
    # Equal shares; one VM active, one idle: tax k = 4 -> targets 4 : 1.
    t = targets([Claim(1000, 1.0, 0, 10_000), Claim(1000, 0.0, 0, 10_000)], available=5000)
    assert t == [4000, 1000]
    # equalised rho
    assert rho(1000, t[0], 1.0, 0.75) == pytest.approx(rho(1000, t[1], 0.0, 0.75))


def test_a_partly_active_vm_pays_1_for_its_active_pages_and_k_for_the_rest():
    # VM 1: 2,000 of its 4,000 pages active; VM 2: idle; 3,000 pages to share.
    # By hand: at level x = S·λ, P1 = 2000 + (x − 2000)/4 and P2 = x/4; P1 + P2 = 3000
    # gives x = 3000: P1 = 2250, P2 = 750, and ρ = 1000 / (A + 4 (P − A)) = 1/3 for both.
    t = targets([Claim(1000, 0.5, 0, 4000), Claim(1000, 0.0, 0, 4000)], available=3000)
    assert t == [2250, 750]
    assert 1000 / (2000 + 4 * (t[0] - 2000)) == pytest.approx(1000 / (4 * t[1]))
    # The same shares per active page at P1 = 2250: f = 2000/2250 in the paper's formula.
    assert rho(1000, t[0], 2000 / t[0], 0.75) == pytest.approx(rho(1000, t[1], 0.0, 0.75))


def test_targets_respect_reservation_and_limit():
    t = targets([Claim(1000, 1.0, 0, 1500), Claim(1000, 0.0, 2000, 10_000)], available=5000)
    assert t[0] == 1500          # limited
    assert t[1] == 3500          # the rest; above its reservation
    t = targets([Claim(1000, 1.0, 0, 10_000), Claim(1000, 0.0, 3000, 10_000)], available=5000)
    assert t == [2000, 3000]     # the reservation binds


# -- sampling ------------------------------------------------------------------------------

@pytest.mark.parametrize("large", [True, False], ids=["2m", "4k"])
@pytest.mark.parametrize("mmu", ["nested", "shadow"])
def test_sampling_estimates_the_touched_fraction(mmu, large):
    # The guest touches 1,024 of its 4,096 pages over and over: f = 0.25 (+ a few code/stack pages).
    img = build("""
      mov rsp, 0x100000
    again:
      mov rdi, 0x400000
      mov rcx, 1024
    t: mov qword ptr [rdi], rcx
      add rdi, 0x1000
      dec rcx
      jnz t
      jmp again
    """)
    h = Host(HostConfig(memsize=64 * MIB))
    vm = h.power_on(VMConfig(memsize=16 * MIB, mmu=mmu, large_pages=large), img)
    vm.step(10**9, 200_000)                     # warm up: every page of the set touched
    # On 2 MiB pages the sampled pages must still fault one by one (the MMUs map watched
    # ranges 4 KiB): the estimate is per 4 KiB page either way.
    assert (vm.p2m.large_count() > 0) == large
    rng = np.random.default_rng(7)
    estimates = []
    for _ in range(6):
        s = ActivitySampler(samples=400)
        s.begin(vm, rng)
        for _ in range(4):
            vm.step(10**9, 100_000)
        s.end(vm)
        estimates.append(s.last)
    true = (1024 + 3) / 4096
    assert abs(np.mean(estimates) - true) < 0.05, (estimates, true)
    assert all(abs(e - true) < 0.12 for e in estimates)


def test_averages_rise_fast_and_fall_slowly():
    s = ActivitySampler()
    s.fast = s.slow = 0.2
    s.fast += s.fast_alpha * (1.0 - s.fast); s.slow += s.slow_alpha * (1.0 - s.slow)
    assert s.estimate == pytest.approx(0.6)     # the fast average leads on the way up
    for _ in range(3):
        s.fast += s.fast_alpha * (0.0 - s.fast); s.slow += s.slow_alpha * (0.0 - s.slow)
    assert s.estimate == pytest.approx(s.slow) and s.slow > 2 * s.fast   # the slow one holds on the way down


# -- compression ------------------------------------------------------------------------------

def test_the_cache_gives_a_frame_back_when_its_slots_are_all_free():
    pool = MachinePool(1 * MIB)
    zc = CompressionCache(pool, max_frames=4)
    page = (b"abcdefgh" * 64) * 8
    free = pool.free_frames
    for g in range(5):                          # 5 one-slot pages: two frames
        assert zc.store(g, page, zc.compress(page))
    assert len(zc.frames) == 2 and pool.free_frames == free - 2
    zc.load(4)                                  # the second frame's only page leaves
    assert len(zc.frames) == 1 and pool.free_frames == free - 1
    for g in range(4):
        assert zc.load(g) == page
    assert zc.frames == [] and pool.free_frames == free


def test_compressible_pages_take_one_slot_and_come_back_intact():
    pool = MachinePool(1 * MIB)
    zc = CompressionCache(pool, max_frames=2)
    page = (b"abcdefgh" * 64) * 8
    blob = zc.compress(page)
    assert blob is not None and len(blob) <= 1024
    assert zc.store(5, page, blob)
    assert zc.counters()["CACHESZ"] == 1 and zc.slots_used == 1
    assert zc.load(5) == page and zc.unzipped == 1


def test_incompressible_pages_are_refused():
    pool = MachinePool(1 * MIB)
    zc = CompressionCache(pool, max_frames=2)
    assert zc.compress(np.random.default_rng(1).bytes(PAGE_SIZE)) is None and zc.rejected == 1


def test_the_cache_is_capped_and_evicts_lru_to_swap(tmp_path):
    img = build("""
      mov rdi, 0x400000
      mov rcx, 512
    f: mov qword ptr [rdi], rcx
      add rdi, 0x1000
      dec rcx
      jnz f
      cli
      hlt
    """)
    h = Host(HostConfig(memsize=64 * MIB, swap_dir=tmp_path))
    vm = h.power_on(VMConfig(memsize=8 * MIB), img)
    vm.run()
    p2m = vm.p2m
    gfns = list(range(0x400, 0x400 + 512))
    kinds = [p2m.reclaim_page(g) for g in gfns]
    cap_frames = p2m.zip.max_frames
    assert p2m.zip.counters()["CACHESZ"] <= cap_frames
    assert kinds.count("zip") == 512          # all compress well...
    assert p2m.swap_outs > 0                  # ...but the cache is full: the oldest went to swap
    for g in gfns:                            # and every page reads back as written
        assert int.from_bytes(p2m.read_gpa(g << 12, 8), "little") == 512 - (g - 0x400)
    h.close()


def test_a_corrupted_compressed_page_stops_with_the_page_named(tmp_path):
    from hvmodel.mmu.p2m import GuestMemoryError
    img = build("mov rdi, 0x400000; mov qword ptr [rdi], 7; cli; hlt")
    h = Host(HostConfig(memsize=64 * MIB, swap_dir=tmp_path))
    vm = h.power_on(VMConfig(memsize=8 * MIB), img)
    vm.run()
    assert vm.p2m.reclaim_page(0x400) == "zip"
    frame, slot, _, length, _ = vm.p2m.zip.entries[0x400]
    h.pool.write((frame << 12) + slot * 1024 + length // 2, b"\x00\x01")
    with pytest.raises(GuestMemoryError, match=r"guest page 0x400 .*decompress"):
        vm.p2m.resolve(0x400, False)
    h.close()
