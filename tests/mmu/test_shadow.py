"""The shadow MMU: it follows the guest's table changes, survives a tiny budget, goes out of sync."""

from __future__ import annotations

import pytest

from conftest import run_asm
from hvmodel.check.lockstep import check
from hvmodel.guest.asm import build
from hvmodel.machine.pool import PAGE_SHIFT, MachinePool
from hvmodel.mmu.p2m import P2M
from hvmodel.mmu.shadow import ShadowMMU
from hvmodel.mmu.walk import ACC_READ, ACC_WRITE, CTL_PG, CTL_WP, PTE_P, PTE_RW, PTE_US

import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vm"))
from paging_prologue import PROLOGUE  # noqa: E402

# A 4 KiB page table for 0xC800000..0xCA00000 (PDE 100) at 0x13000; the test page at
# 0xC800000 is remapped between two physical pages with distinct contents.
REMAP = PROLOGUE + """
main:
  mov rdi, 0x12000 + 100*8
  mov rax, 0x13003
  mov qword ptr [rdi], rax
  mov rdi, 0x400000
  movabs rax, 0x1111111111111111
  mov qword ptr [rdi], rax
  mov rdi, 0x401000
  movabs rax, 0x2222222222222222
  mov qword ptr [rdi], rax
  mov rbx, 0xC800000
  mov rcx, 0
  mov r12, 200
again:
  // map 0xC800000 -> 0x400000, read, remap -> 0x401000 (live PTE change), invlpg, read
  mov rdi, 0x13000
  mov rax, 0x400003
  mov qword ptr [rdi], rax
  invlpg [rbx]
  mov rdx, qword ptr [rbx]
  movabs rax, 0x1111111111111111
  cmp rdx, rax
  jne bad
  mov rdi, 0x13000
  mov rax, 0x401003
  mov qword ptr [rdi], rax
  invlpg [rbx]
  mov rdx, qword ptr [rbx]
  movabs rax, 0x2222222222222222
  cmp rdx, rax
  jne bad
  dec r12
  jnz again
  mov al, 0
  out 0xf4, al
bad:
  mov al, 1
  out 0xf4, al
"""


def test_shadow_follows_a_live_pte_change_after_invlpg():
    vm, r = run_asm(REMAP, mmu="shadow")
    assert r.exit_status == 0, r.message
    c = r.counters
    assert c["tracing_faults"] > 0 or c["oos_events"] > 0
    assert c["hidden_faults"] > 0


def test_remap_loop_agrees_with_the_reference_in_both_modes():
    res = check(build(REMAP), ["nested", "shadow"], memsize=16 << 20, every=1000)
    assert res.ok, res.report


def test_a_leaf_table_written_often_goes_out_of_sync_and_stays_correct():
    vm, r = run_asm(REMAP, mmu="shadow")
    assert r.counters["oos_events"] >= 1   # the PT at 0x13000 is written 400 times


@pytest.mark.parametrize("guest", ["hello", "pagefault", "faults", "memtest"])
def test_tiny_shadow_budget_evicts_and_still_passes(guest):
    from hvmodel.guest.load import load_guest
    from hvmodel.host.host import Host, HostConfig
    from hvmodel.vm.vm import VMConfig
    image = load_guest(Path(__file__).resolve().parents[2] / "guests" / f"{guest}.asm")
    vm = Host(HostConfig(memsize=64 << 20)).power_on(
        # 4 KiB backing: 2 MiB shadow leaves over large pages would need too few shadow pages.
        VMConfig(memsize=16 << 20, mmu="shadow", shadow_max_pages=4, large_pages=False), image)
    r = vm.run()
    assert r.exit_status == 0, r.message
    assert r.counters["shadow_pages"] <= 5
    assert r.counters["shadow_evictions"] > 0


# -- unit tests on the MMU itself ------------------------------------------------------

@pytest.fixture
def env():
    pool = MachinePool(8 << 20)
    p2m = P2M(pool, 1024, owner=1)
    return pool, p2m, ShadowMMU(p2m, pool)


def gwrite(pool, p2m, gpa, value):
    frame, _ = p2m.resolve(gpa >> PAGE_SHIFT, True)
    pool.q[((frame << PAGE_SHIFT) | (gpa & 0xFFF)) >> 3] = value


def tables(pool, p2m, va, target):
    gwrite(pool, p2m, 0x1000 | ((va >> 39) & 511) * 8, 0x2000 | PTE_P | PTE_RW | PTE_US)
    gwrite(pool, p2m, 0x2000 | ((va >> 30) & 511) * 8, 0x3000 | PTE_P | PTE_RW | PTE_US)
    gwrite(pool, p2m, 0x3000 | ((va >> 21) & 511) * 8, 0x4000 | PTE_P | PTE_RW | PTE_US)
    gwrite(pool, p2m, 0x4000 | ((va >> 12) & 511) * 8, target | PTE_P | PTE_RW | PTE_US)
    gwrite(pool, p2m, target, 0x55)
    return 0x1000


def test_second_fill_is_a_shadow_hit(env):
    pool, p2m, mmu = env
    cr3 = tables(pool, p2m, 0x7000_0000, 0x9000)
    r1 = mmu.translate(cr3, 0x7000_0000, ACC_READ, False, CTL_PG | CTL_WP)
    assert mmu.hidden_faults == 1 and mmu.hits == 0
    r2 = mmu.translate(cr3, 0x7000_0000, ACC_READ, False, CTL_PG | CTL_WP)
    assert mmu.hits == 1 and r1 == r2
    assert r2 >> PAGE_SHIFT == p2m.frame_of(9)


def test_guest_tables_are_write_protected_and_a_write_is_traced(env):
    pool, p2m, mmu = env
    cr3 = tables(pool, p2m, 0x7000_0000, 0x9000)
    mmu.translate(cr3, 0x7000_0000, ACC_READ, False, CTL_PG | CTL_WP)
    # map the PT page itself at another address and write through it
    gwrite(pool, p2m, 0x4000 | ((0x7000_1000 >> 12) & 511) * 8, 0x4000 | PTE_P | PTE_RW)
    r = mmu.translate(cr3, 0x7000_1000, ACC_READ, False, CTL_PG | CTL_WP)
    assert r >= 0 and not r & 2          # read of a table page: no write right
    r = mmu.translate(cr3, 0x7000_1000, ACC_WRITE, False, CTL_PG | CTL_WP)
    assert r & 2 and mmu.tracing_faults == 1 and mmu.pending_traces == [4]


def test_traced_change_zaps_the_derived_entry(env):
    pool, p2m, mmu = env
    cr3 = tables(pool, p2m, 0x7000_0000, 0x9000)
    mmu.translate(cr3, 0x7000_0000, ACC_READ, False, CTL_PG | CTL_WP)
    mmu.pending_traces.append(4)
    gwrite(pool, p2m, 0xA000, 0x66)  # back the new target page
    gwrite(pool, p2m, 0x4000 | ((0x7000_0000 >> 12) & 511) * 8, 0xA000 | PTE_P | PTE_RW | PTE_US)
    mmu.on_exit()
    assert mmu.zaps >= 1 and mmu.flush_pending
    r = mmu.translate(cr3, 0x7000_0000, ACC_READ, False, CTL_PG | CTL_WP)
    assert r >> PAGE_SHIFT == p2m.frame_of(0xA)


def test_p2m_change_zaps_leaves_through_the_reverse_map(env):
    pool, p2m, mmu = env
    cr3 = tables(pool, p2m, 0x7000_0000, 0x9000)
    mmu.translate(cr3, 0x7000_0000, ACC_READ, False, CTL_PG | CTL_WP)
    before = mmu.zaps
    mmu.flush_pending = False
    p2m.changed(9)
    assert mmu.zaps == before + 1 and mmu.flush_pending
    mmu.translate(cr3, 0x7000_0000, ACC_READ, False, CTL_PG | CTL_WP)
    assert mmu.hidden_faults == 2


def test_root_switch_is_counted(env):
    pool, p2m, mmu = env
    cr3 = tables(pool, p2m, 0x7000_0000, 0x9000)
    gwrite(pool, p2m, 0x5000 | ((0x7000_0000 >> 39) & 511) * 8, 0x2000 | PTE_P | PTE_RW | PTE_US)
    mmu.translate(cr3, 0x7000_0000, ACC_READ, False, CTL_PG)
    mmu.translate(0x5000, 0x7000_0000, ACC_READ, False, CTL_PG)
    mmu.translate(cr3, 0x7000_0000, ACC_READ, False, CTL_PG)
    assert mmu.root_switches == 2
    assert mmu.hits == 1   # the second space shares the lower tables; its root is new


# Regression (found by the lock-step access checks on guests/edges.asm): a PTE the guest
# changed while its table was out of sync, then walked by a hidden fault (which sets its A
# bit), was absorbed into the table's snapshot as if the VMM had made the change, so the
# resync on the next CR3 switch kept the stale shadow entry: after switching away and back
# the guest read its old frame.
OOS_THEN_SWITCH = PROLOGUE + """
main:
  mov rdi, 0x12000 + 100*8
  mov rax, 0x13003
  mov qword ptr [rdi], rax
  mov rdi, 0x400000
  mov qword ptr [rdi], 0xa
  mov rdi, 0x401000
  mov qword ptr [rdi], 0xb
  mov rdi, 0x402000
  mov qword ptr [rdi], 0xc
  // a second address space with the same PML4[0]
  mov rsi, 0x10000
  mov rax, qword ptr [rsi]
  mov rdi, 0x30000
  mov qword ptr [rdi], rax
  mov rbx, 0xC800000
  mov rdi, 0x13000
  mov rax, 0x400003
  mov qword ptr [rdi], rax
  invlpg [rbx]
  cmp qword ptr [rbx], 0xa
  jne bad
  // PTE[1] written three times: the table goes out of sync
  mov rax, 0x401003
  mov qword ptr [rdi + 8], rax
  invlpg [rbx + 0x1000]
  cmp qword ptr [rbx + 0x1000], 0xb
  jne bad
  mov rax, 0x402003
  mov qword ptr [rdi + 8], rax
  invlpg [rbx + 0x1000]
  cmp qword ptr [rbx + 0x1000], 0xc
  jne bad
  mov rax, 0x401003
  mov qword ptr [rdi + 8], rax
  invlpg [rbx + 0x1000]
  cmp qword ptr [rbx + 0x1000], 0xb
  jne bad
  // PTE[0] -> 0x401000 while out of sync; the read walks it and sets A
  mov rax, 0x401003
  mov qword ptr [rdi], rax
  invlpg [rbx]
  cmp qword ptr [rbx], 0xb
  jne bad
  // away and back: the table is resynced; the new PTE[0] must stand
  mov rax, 0x30000
  mov cr3, rax
  mov rax, 0x10000
  mov cr3, rax
  cmp qword ptr [rbx], 0xb
  jne bad
  mov al, 0
  out 0xf4, al
bad:
  mov al, 1
  out 0xf4, al
"""


def test_a_pte_changed_while_out_of_sync_survives_the_resync():
    vm, r = run_asm(OOS_THEN_SWITCH, mmu="shadow")
    assert r.counters["oos_events"] >= 1 and r.counters["resyncs"] >= 1
    assert r.exit_status == 0, "the guest read its old frame after the resync"
    res = check(build(OOS_THEN_SWITCH), ["shadow"], memsize=16 << 20)
    assert res.ok, res.report
