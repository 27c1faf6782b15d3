"""Ballooning end to end: the guest driver (guests/runtime/balloon.inc, guests/balloon.asm),
the back-door device and the host's Balloon (hvmodel/vm/balloon.py) on real guests."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from hvmodel import Host, HostConfig, VMConfig, load_guest
from hvmodel.check.lockstep import check
from hvmodel.guest.asm import build
from hvmodel.machine.pool import MachinePool
from hvmodel.devices.backdoor import BalloonStatus
from hvmodel.vm.balloon import Balloon
from hvmodel.mmu.p2m import P2M, P2MState

GUEST = Path(__file__).resolve().parents[2] / "guests" / "balloon.asm"
MIB = 1 << 20


@pytest.fixture(scope="module")
def image():
    return load_guest(GUEST)


def _run(image, target: int, mem: int = 32 * MIB, **cfg):
    # 4 KiB backing, so the host's frame accounting is exact per locked page.
    host = Host(HostConfig(memsize=256 * MIB, large_pages=False))
    vm = host.power_on(VMConfig(memsize=mem, **cfg), image)
    vm.balloon.target = target
    r = vm.run()
    assert r.exit_status == 0, f"{r.stop_reason}: {r.message}\n{r.console}"
    assert "working set intact" in r.console and "PASS" in r.console
    return host, vm, r


def _ballooned(vm) -> set[int]:
    return {int(g) for g in np.flatnonzero(vm.p2m.state == P2MState.BALLOONED)}


# -- the host side alone -------------------------------------------------------------------

def _balloon(npages: int = 1000, **kw) -> Balloon:
    return Balloon(P2M(MachinePool(8 * MIB), npages, owner=1), **kw)


def test_limit_is_ctl_max_percent_and_maxmemctl():
    assert _balloon().max == 650                              # Mem.CtlMaxPercent 65
    assert _balloon(max_percent=10).max == 100
    assert _balloon(maxmemctl=100 * 4096 + 123).max == 100     # bytes, rounded down to pages
    assert _balloon(maxmemctl=64 * MIB).max == 650             # the smaller of the two
    b = _balloon()
    b.max_percent = 50
    assert b.max == 500 and b.counters()["MCTLMAX"] == 500
    with pytest.raises(ValueError):
        b.max_percent = 101
    with pytest.raises(ValueError):
        b.target = -1


def test_counters_use_esxtops_names():
    b = _balloon()
    b.target = 5000
    c = b.counters()
    assert (c["MCTL?"], c["MCTLSZ"], c["MCTLTGT"], c["MCTLMAX"], c["balloon_violations"]) == (0, 0, 650, 650, 0)
    assert b.target == 5000  # the host's wish is kept; the guest sees the limit


def test_lock_refuses_beyond_the_limit():
    # (d) the limit, on the host side: 65 % of 1000 pages
    b = _balloon()
    b.start(2)
    frames = [b.p2m.resolve(g, True)[0] for g in range(700)]
    free = b.p2m.pool.free_frames
    assert all(b.lock(g) == BalloonStatus.SUCCESS for g in range(650))
    assert b.lock(650) == BalloonStatus.PPN_NOTNEEDED  # would exceed the limit
    assert b.size == 650 and b.refused == 1
    assert b.p2m.pool.free_frames == free + 650
    assert b.p2m.state[650] == P2MState.PRIVATE and b.p2m.frame_of(650) == frames[650]


def test_unlock_of_a_touched_page_keeps_it_backed():
    b = _balloon()
    b.start(2)
    b.lock(3)
    b.p2m.resolve(3, True)  # the guest touched it: a violation, a zeroed frame
    assert b.p2m.balloon_violations == 1
    assert b.unlock(3) == BalloonStatus.SUCCESS
    assert b.size == 0 and b.p2m.state[3] == P2MState.PRIVATE


# -- (a) inflate to the target -------------------------------------------------------------

def test_guest_inflates_to_the_target_and_the_host_gets_the_frames(image):
    host0, vm0, r0 = _run(image, 0)
    host, vm, r = _run(image, 1000)
    c = r.counters
    assert (c["MCTL?"], c["MCTLSZ"], c["MCTLTGT"], c["balloon_violations"]) == (1, 1000, 1000, 0)
    assert c["MCTLMAX"] == (32 * MIB >> 12) * 65 // 100
    assert "t=0s target 1000 size 1000 pages" in r.console
    assert "peak 1000 pages, final 1000 pages (target 1000), 0 refused" in r.console
    assert r0.counters["MCTLSZ"] == 0 and "peak 0 pages" in r0.console
    # The pages in the balloon are exactly the BALLOONED ones, and hold no frame.
    assert _ballooned(vm) == vm.balloon.locked and len(vm.balloon.locked) == 1000
    assert all(vm.p2m.frame_of(g) < 0 for g in vm.balloon.locked)
    # The driver took pages of the page cache the guest dropped (backed): each LOCK freed
    # a frame. Net, against the same guest with target 0: 1000 frames, less the one page
    # of the driver's array of guest page numbers that holds them.
    assert r0.counters["GRANT"] - c["GRANT"] == 1000 - 1
    assert host.pool.free_frames - host0.pool.free_frames == 1000 - 1
    # Each LOCK that freed a frame flushed the vCPU's TLB (no stale translation survives).
    assert c["tlb_flushes"] >= 1000


# -- (b) deflate when the host lowers the target ---------------------------------------------

def test_lowering_the_target_mid_run_deflates(image):
    host = Host(HostConfig(memsize=256 * MIB))
    vm = host.power_on(VMConfig(memsize=32 * MIB), image)
    want = [1000]
    vm.balloon.target = want[0]
    seen = []

    def on_round(h):
        # Called after each round, after the host's own memory policy: the target set here
        # is the one the guest reads in the next round (whatever the policy decided).
        seen.append(vm.balloon.size)
        if vm.balloon.size == 1000 and seen.count(1000) >= 3:
            want[0] = 0
        vm.balloon.target = want[0]

    (r,) = host.run(on_round=on_round)
    assert r.exit_status == 0, f"{r.stop_reason}: {r.message}\n{r.console}"
    assert max(seen) == 1000 and seen[-1] == 0
    c = r.counters
    assert (c["MCTLSZ"], c["MCTLTGT"], c["balloon_locks"], c["balloon_unlocks"]) == (0, 0, 1000, 1000)
    assert c["balloon_violations"] == 0
    assert not _ballooned(vm)
    assert "target 1000 size 1000 pages" in r.console
    assert "target 0 size 0 pages" in r.console
    assert "peak 1000 pages, final 0 pages (target 0)" in r.console
    # the guest wrote and checked pages the balloon gave back
    assert " 0 free-page reuses" not in r.console


# -- (c) a guest that touches a page it ballooned ------------------------------------------------

VIOLATOR = """
    mov edi, 0x300000          # the page (gfn 0x300): used, then given to the balloon
    mov qword ptr [rdi], 0x1234
    mov r8d, 0x400000          # results
    mov edx, 0x5670
    mov eax, 0x456c6d6f        # START, basic commands
    xor ecx, ecx
    mov ebx, 2
    in eax, dx
    mov dword ptr [r8], eax
    mov eax, 0x456c6d6f        # LOCK 0x300
    mov ecx, 2
    mov ebx, 0x300
    in eax, dx
    mov dword ptr [r8 + 4], eax
    mov dword ptr [r8 + 8], ebx
    mov eax, 0x456c6d6f        # LOCK 0x301 (never touched)
    mov ecx, 2
    mov ebx, 0x301
    in eax, dx
    mov dword ptr [r8 + 12], eax
    mov eax, 0x456c6d6f        # LOCK 0x302: beyond sched.mem.maxmemctl (2 pages)
    mov ecx, 2
    mov ebx, 0x302
    in eax, dx
    mov dword ptr [r8 + 16], eax
    mov rax, qword ptr [rdi]   # the violation: a read of the ballooned page
    mov qword ptr [r8 + 24], rax
    mov qword ptr [rdi + 8], 0x55
    mov rax, qword ptr [rdi + 8]
    mov qword ptr [r8 + 32], rax
    xor eax, eax
    out 0xf4, al
"""


@pytest.mark.parametrize("mmu", ["nested", "shadow"])
def test_touching_a_ballooned_page_gets_a_zeroed_page_and_counts(mmu):
    host = Host(HostConfig(memsize=64 * MIB))
    vm = host.power_on(VMConfig(memsize=16 * MIB, mmu=mmu, maxmemctl=2 * 4096),
                       build(VIOLATOR, source_name="violator"))
    vm.balloon.target = 2
    r = vm.run(100_000)
    assert r.exit_status == 0, r.message
    start, lock, tgt, lock2, lock3, seen, wrote = struct.unpack("<IIIIIxxxxQQ", vm.p2m.read_gpa(0x400000, 40))
    assert start == BalloonStatus.SUCCESS_WITH_CAPABILITIES
    assert (lock, tgt, lock2) == (0, 2, 0)
    assert lock3 == BalloonStatus.PPN_NOTNEEDED  # (d) the limit, through the port
    assert seen == 0            # not 0x1234: the old frame is gone, the page reads as zero
    assert wrote == 0x55
    c = r.counters
    assert c["balloon_violations"] == 1
    assert (c["MCTLSZ"], c["MCTLMAX"], c["balloon_refused"]) == (2, 2, 1)
    assert vm.p2m.state[0x300] == P2MState.PRIVATE   # backed again, still in the balloon's books
    assert vm.p2m.state[0x301] == P2MState.BALLOONED


# -- (d) the limit with the real driver ---------------------------------------------------------

def test_guest_sees_and_stops_at_the_limit(image):
    host, vm, r = _run(image, 100_000, mem=16 * MIB)
    limit = (16 * MIB >> 12) * 65 // 100  # 2662 pages
    c = r.counters
    assert (c["MCTLMAX"], c["MCTLTGT"], c["MCTLSZ"]) == (limit, limit, limit)
    assert len(_ballooned(vm)) == limit
    assert f"peak {limit} pages, final {limit} pages (target {limit})" in r.console
    assert c["balloon_violations"] == 0


def test_maxmemctl_caps_the_balloon(image):
    host, vm, r = _run(image, 1000, maxmemctl=2 * MIB)
    assert (r.counters["MCTLMAX"], r.counters["MCTLSZ"]) == (512, 512)


# -- (e) the reference has no balloon: lock-step with target 0 ------------------------------------

def test_lockstep_with_target_zero(image):
    res = check(image, ["nested", "shadow"], memsize=8 * MIB, every=500_000)
    assert res.ok, res.report
    assert res.pages_compared == 2 * (8 * MIB >> 12)
    assert res.checkpoints >= 1
