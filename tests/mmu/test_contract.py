"""The MMU contract (hvmodel/mmu/base.py): every mode has every member, the mode table, the one
p2m listener, and the self-descriptions the debugger and fault injection use instead of internals."""

from __future__ import annotations

import pytest

from hvmodel.machine.pool import LARGE_FRAMES, PAGE_SHIFT, MachinePool
from hvmodel.mmu.base import MEMBERS, MMU
from hvmodel.mmu.modes import MODES, VMM_MODES
from hvmodel.mmu.native import FlatRAM
from hvmodel.mmu.nested import EPT_PS, NestedMMU
from hvmodel.mmu.p2m import P2M
from hvmodel.mmu.shadow import ShadowMMU
from hvmodel.mmu.walk import ACC_READ, ACC_WRITE, CTL_PG
from hvmodel.vm.vm import MMU_MODES, VMConfig

P, RW = 1, 2


def four_level(p2m: P2M, va: int, target_gpa: int) -> int:
    """Guest tables at GPA 0x1000-0x4000 mapping va → target_gpa."""
    for gpa, val in ((0x1000 | ((va >> 39) & 511) * 8, 0x2000 | P | RW),
                     (0x2000 | ((va >> 30) & 511) * 8, 0x3000 | P | RW),
                     (0x3000 | ((va >> 21) & 511) * 8, 0x4000 | P | RW),
                     (0x4000 | ((va >> 12) & 511) * 8, target_gpa | P | RW)):
        p2m.write_gpa(gpa, val.to_bytes(8, "little"))
    return 0x1000


def instances():
    pool = MachinePool(8 << 20)
    cfg = VMConfig(memsize=4 << 20)
    out = {}
    for name, cls in MODES.items():
        if cls.reference:
            out[name] = cls.for_vm(FlatRAM(cfg.memsize), None, cfg)
        else:
            out[name] = cls.for_vm(P2M(pool, cfg.memsize >> PAGE_SHIFT, owner=len(out) + 1), pool, cfg)
    return out


def test_the_mode_table_names_every_mode_once_and_the_reference_last():
    assert MMU_MODES == ("nested", "shadow", "native")
    assert VMM_MODES == ("nested", "shadow")
    assert [cls.kind for cls in MODES.values()] == list(MODES)


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_has_every_member_of_the_contract(mode):
    mmu = instances()[mode]
    missing = [m for m in MEMBERS if not hasattr(mmu, m)]
    assert not missing
    assert isinstance(mmu, MMU)
    assert mmu.kind == mode and mmu.flush_pending is False
    assert (mmu.p2m is None) == MODES[mode].reference
    # Every method the Protocol declares is in MEMBERS (the test cannot silently miss one).
    declared = {n for n in vars(MMU) if not n.startswith("_")} | set(MMU.__annotations__)
    assert declared <= set(MEMBERS) | {"mro"}


def test_the_p2m_has_one_listener_per_vmm_mmu_and_it_is_zap():
    inst = instances()
    for mode in VMM_MODES:
        mmu = inst[mode]
        assert mmu.p2m.listeners == [mmu.zap]


def test_describe_gpa_stops_at_a_2m_nested_leaf_and_names_the_page_frame():
    # Regression: `monitor walk` walked on below an EPT 2 MiB leaf, reading guest data as an
    # "EPT PTE" and printing a machine address made of it.
    pool = MachinePool(8 << 20)
    p2m = P2M(pool, 1024, owner=1)
    p2m.large_enabled = True
    mmu = NestedMMU(p2m, pool)
    va = 0x7F_1234_5000
    mmu.translate(four_level(p2m, va, 0x10_5000), va, ACC_READ, False, CTL_PG)
    assert p2m.large[0] and mmu.lookup(0x105) & EPT_PS
    # The data page holds bytes that look like an EPT entry.
    p2m.write_gpa(0x10_5000, (0xDEAD_B000 | 7).to_bytes(8, "little") * 512)
    path = mmu.entries(0x105)
    assert [t.level for t in path] == [4, 3, 2] and path[-1].leaf
    lines = mmu.describe_gpa(0x10_5123)
    assert "EPT PTE" not in "\n".join(lines)
    assert lines[2].endswith("(2 MiB page)")
    frame = int(p2m.value[0x105])
    assert lines[-1] == f"  -> machine {(frame << PAGE_SHIFT) | 0x123:#x}"
    assert frame == int(p2m.value[0]) + 0x105 and frame % LARGE_FRAMES == 0x105


def test_describe_gpa_of_a_4k_leaf_is_the_four_level_walk():
    pool = MachinePool(8 << 20)
    p2m = P2M(pool, 1024, owner=1)
    mmu = NestedMMU(p2m, pool)
    va = 0x40_0000_3000
    mmu.translate(four_level(p2m, va, 0x20_0000), va, ACC_WRITE, False, CTL_PG)
    lines = mmu.describe_gpa(0x20_0008)
    assert [ln.split(" at ")[0] for ln in lines[:4]] == ["EPT PML4E", "EPT PDPTE", "EPT PDE", "EPT PTE"]
    assert lines[4] == f"  -> machine {(int(p2m.value[0x200]) << PAGE_SHIFT) | 8:#x}"
    assert mmu.describe(0x200)[0].startswith("  EPT leaf: 0x") and mmu.describe(0x300) == ["  EPT leaf: none"]
    # Untouched: the walk stops at the first entry not present.
    assert mmu.describe_gpa(0x3F_0000)[-1] == "  (not present: the next access is an EPT violation)"


def test_tables_list_the_vmm_pages_of_each_mode():
    pool = MachinePool(8 << 20)
    p2m = P2M(pool, 1024, owner=1)
    nested = NestedMMU(p2m, pool)
    assert [(t.level, t.frame) for t in nested.tables()] == [(4, nested.root)]
    va = 0x40_0000_3000
    nested.translate(four_level(p2m, va, 0x20_0000), va, ACC_READ, False, CTL_PG)
    # The guest tables (GPA 0x1000-0x4000) and the page (2 MiB up) need one leaf table each.
    assert sorted(t.level for t in nested.tables()) == [1, 1, 2, 3, 4]
    assert {t.frame for t in nested.tables()} == nested.table_frames

    p2m2 = P2M(pool, 1024, owner=2)
    shadow = ShadowMMU(p2m2, pool)
    assert shadow.tables() == [] and shadow.entries(5) == []
    shadow.translate(four_level(p2m2, va, 0x20_0000), va, ACC_READ, False, CTL_PG)
    tabs = shadow.tables()
    assert [t.level for t in tabs] == [4, 3, 2, 1]
    assert [(t.gfn, t.role) for t in tabs] == sorted((sp.gfn, sp.role) for sp in shadow.pages.values())
    assert shadow.describe(1) == ["  shadowed: this page holds guest page tables (write-protected)"]
    assert shadow.describe(0x200) == []
    lines = shadow.describe_va(0x1000, va, 0x20_0000, False, CTL_PG)
    assert lines[0].startswith("shadow root: machine frame") and lines[-1].startswith("  -> machine 0x")
