"""No write the VMM makes on a guest's behalf may bypass copy-on-write.

The regression: under nested paging the walk's A/D update into a guest page table that
was write-protected for a cached large leaf wrote straight into its frame; when sharing
had merged that table page with another VM's, the other VM's table changed under it
(`hvmodel run scenarios/dedup-8vm.toml` stopped with "shared frame ... fails its
content checksum"). Every VMM write now goes through ``P2M.frame_for_write``.
"""

from __future__ import annotations

import pytest

from hvmodel.machine.pool import PAGE_SHIFT, MachinePool
from hvmodel.mmu.nested import NestedMMU
from hvmodel.mmu.p2m import P2M, P2MState
from hvmodel.mmu.shadow import ShadowMMU
from hvmodel.mmu.walk import ACC_READ, ACC_WRITE, CTL_PG, PTE_A, PTE_PS

P, RW = 1, 2
PD = 0x3000           # the guest table page that is shared between the two VMs
PD_GFN = PD >> PAGE_SHIFT


def gwrite(pool, p2m, gpa, value):
    frame, _ = p2m.resolve(gpa >> PAGE_SHIFT, True)
    pool.q[((frame << PAGE_SHIFT) | (gpa & 0xFFF)) >> 3] = value


def entry(pool, p2m, gpa):
    return int(pool.q[((p2m.frame_of(gpa >> PAGE_SHIFT) << PAGE_SHIFT) | (gpa & 0xFFF)) >> 3])


def two_vms_sharing_a_pd(large: bool):
    """Two VMs with identical tables (PML4 0x1000, PDPT 0x2000, PD 0x3000 mapping
    guest-virtual 0 and 2 MiB to the 2 MiB guest pages at 4 and 6 MiB, the second not yet
    accessed); the PD page is one shared frame."""
    pool = MachinePool(32 << 20)
    vms = []
    for owner in (1, 2):
        p2m = P2M(pool, 2048, owner=owner)     # 8 MiB of guest memory
        p2m.large_enabled = large
        gwrite(pool, p2m, 0x1000, 0x2000 | P | RW)
        gwrite(pool, p2m, 0x2000, PD | P | RW)
        gwrite(pool, p2m, PD, 0x400000 | P | RW | PTE_PS | PTE_A)
        gwrite(pool, p2m, PD + 8, 0x600000 | P | RW | PTE_PS)
        vms.append(p2m)
    a, b = vms
    frame = a.frame_of(PD_GFN)
    a.share_in_place(PD_GFN)
    b.share(PD_GFN, frame)
    assert a.frame_of(PD_GFN) == b.frame_of(PD_GFN) == frame
    return pool, a, b, frame


@pytest.mark.parametrize("large", [True, False], ids=["large-pages", "4k-backing"])
@pytest.mark.parametrize("mode", ["nested", "shadow"])
def test_an_accessed_bit_update_into_a_shared_table_page_breaks_sharing(mode, large):
    pool, a, b, frame = two_vms_sharing_a_pd(large)
    mmu = NestedMMU(a, pool) if mode == "nested" else ShadowMMU(a, pool)
    before = bytes(pool.frame_bytes(frame))
    # The first 2 MiB page: its translation is cached in pieces, so nested write-protects
    # the PD in its EPT tables (the path that wrote the shared frame).
    assert mmu.translate(0x1000, 0x000000, ACC_READ, False, CTL_PG) >= 0
    # The second: the walk sets the PDE's A bit, a write into the PD page.
    assert mmu.translate(0x1000, 0x200000, ACC_WRITE, False, CTL_PG) >= 0
    assert entry(pool, a, PD + 8) & PTE_A                     # VM a sees its A bit...
    assert a.state[PD_GFN] == P2MState.PRIVATE and a.frame_of(PD_GFN) != frame
    assert bytes(pool.frame_bytes(frame)) == before           # ...in its own copy only
    assert not entry(pool, b, PD + 8) & PTE_A                 # VM b's table did not change
    assert a.cow_breaks == 1


def test_a_vmm_write_of_guest_physical_memory_breaks_sharing():
    pool, a, b, frame = two_vms_sharing_a_pd(False)
    before = bytes(pool.frame_bytes(frame))
    a.write_gpa(PD + 16, b"\xff" * 8)            # a debugger's store, a loader, ...
    assert entry(pool, a, PD + 16) == 2**64 - 1
    assert bytes(pool.frame_bytes(frame)) == before and entry(pool, b, PD + 16) == 0


@pytest.mark.parametrize("mode", ["nested", "shadow"])
def test_a_vmm_store_through_a_guest_virtual_address_breaks_sharing(mode):
    # Event delivery pushes its frame with the MMU's translate(ACC_WRITE) and then writes
    # the machine address it returns: that address must be VM a's own copy.
    pool, a, b, frame = two_vms_sharing_a_pd(False)
    data = 0x500000                                   # guest-virtual 0x100000 (the first PDE)
    gwrite(pool, a, data, 0x1111)
    gwrite(pool, b, data, 0x1111)
    dframe = a.frame_of(data >> PAGE_SHIFT)
    a.share_in_place(data >> PAGE_SHIFT)
    b.share(data >> PAGE_SHIFT, dframe)
    mmu = NestedMMU(a, pool) if mode == "nested" else ShadowMMU(a, pool)
    r = mmu.translate(0x1000, 0x100000, ACC_WRITE, False, CTL_PG)
    assert r >= 0 and (r >> PAGE_SHIFT) != dframe
    pool.q[(r & ~0xFFF) >> 3] = 0x2222
    assert entry(pool, b, data) == 0x1111 and entry(pool, a, data) == 0x2222
