"""Transparent page sharing: hashing, hints, zero pages, salts, copy-on-write.

The mechanism is tested on 4 KiB backing (``large_pages=False``): on a host in the
high state nothing inside a 2 MiB page is shared (tests/memory/test_large_pages.py)."""

from __future__ import annotations

import numpy as np
import pytest

from hvmodel import Host, HostConfig, VMConfig
from hvmodel.guest.asm import build
from hvmodel.machine.pool import PAGE_SHIFT, PAGE_SIZE, ZERO_FRAME
from hvmodel.memory.sharing import SharingConfig
from hvmodel.mmu.p2m import P2MState

IDLE = build("cli; hlt")


def host_with(n, salting, salts=None, mmu="nested"):
    h = Host(HostConfig(memsize=16 << 20, sharing=SharingConfig(force_salting=salting), large_pages=False))
    vms = [h.power_on(VMConfig(name=f"v{i}", memsize=2 << 20, mmu=mmu,
                               pshare_salt=(salts[i] if salts else None)), IDLE) for i in range(n)]
    return h, vms


def fill(vm, gfn, data):
    vm.p2m.write_gpa(gfn << PAGE_SHIFT, data)


def page(tag):
    return bytes([tag]) * PAGE_SIZE


def test_identical_pages_across_vms_share_one_frame_with_a_common_salt():
    h, (a, b) = host_with(2, 1, ["s", "s"])
    fill(a, 100, page(7)); fill(b, 200, page(7))
    h.sharing.scan(a, a.p2m.npages)      # a's page becomes a hint
    assert a.p2m.state[100] == P2MState.PRIVATE
    h.sharing.scan(b, b.p2m.npages)      # b matches the hint: both share a's frame
    assert a.p2m.state[100] == b.p2m.state[200] == P2MState.SHARED
    assert a.p2m.value[100] == b.p2m.value[200]
    assert h.pool.refcount[a.p2m.value[100]] == 2
    c = h.counters()
    # the two VMs' identical code pages (the guest image at 1 MiB) are shared as well
    assert c["pages_shared"] == 2 and c["pages_sharing"] == 2


def test_default_salting_shares_nothing_across_vms():
    h, (a, b) = host_with(2, 2)
    fill(a, 100, page(7)); fill(b, 200, page(7))
    for _ in range(2):
        h.sharing.scan(a, a.p2m.npages)
        h.sharing.scan(b, b.p2m.npages)
    assert a.p2m.state[100] == b.p2m.state[200] == P2MState.PRIVATE


def test_default_salting_still_shares_inside_a_vm():
    h, (a,) = host_with(1, 2)
    fill(a, 100, page(7)); fill(a, 101, page(7))
    h.sharing.scan(a, a.p2m.npages)
    assert a.p2m.state[100] == a.p2m.state[101] == P2MState.SHARED
    assert a.p2m.value[100] == a.p2m.value[101]


def test_zero_pages_map_the_zero_frame():
    h, (a,) = host_with(1, 2)
    fill(a, 100, bytes(PAGE_SIZE))
    free = h.pool.free_frames
    h.sharing.scan(a, a.p2m.npages)
    assert a.p2m.state[100] == P2MState.SHARED and a.p2m.value[100] == ZERO_FRAME
    assert h.pool.free_frames == free + 1
    assert a.p2m.zero_pages() == 1


def test_a_hint_that_changed_is_dropped_not_shared():
    h, (a, b) = host_with(2, 1, ["s", "s"])
    fill(a, 100, page(7))
    h.sharing.scan(a, a.p2m.npages)      # hint for a:100 with page(7)'s hash
    fill(a, 100, page(8))                # the hinted page changes (not write-protected)
    fill(b, 200, page(7))
    h.sharing.scan(b, b.p2m.npages)
    assert a.p2m.state[100] == P2MState.PRIVATE and b.p2m.state[200] == P2MState.PRIVATE
    assert (b, 200) in h.sharing.hints.values()


def test_a_full_compare_guards_against_hash_collisions():
    h, (a, b) = host_with(2, 1, ["s", "s"])
    fill(a, 100, page(7)); fill(b, 200, page(7))
    h.sharing.scan(a, a.p2m.npages); h.sharing.scan(b, b.p2m.npages)
    frame = int(a.p2m.value[100])
    key = h.sharing.frame_key[frame]
    fill(b, 300, page(9))
    h.sharing.shared[(key[0], __import__("xxhash").xxh3_64_intdigest(page(9)))] = frame  # forge a collision
    h.sharing.scan(b, b.p2m.npages)
    assert b.p2m.state[300] == P2MState.PRIVATE and h.sharing.collisions >= 1


@pytest.mark.parametrize("mmu", ["nested", "shadow"])
def test_a_guest_write_breaks_sharing_and_keeps_the_other_copy(mmu):
    # Two VMs fill a page with the same pattern, the host shares it, then VM 0 writes
    # one byte: VM 0 must see its write, VM 1 the original, and they no longer share.
    src = """
      mov rdi, 0x300000
      mov rcx, 512
      movabs rax, 0x0123456789abcdef
    f: mov qword ptr [rdi], rax
      add rdi, 8
      dec rcx
      jnz f
      mov rcx, 200000
    s: dec rcx
      jnz s
      cmp rsi, 1
      jne chk
      mov rdi, 0x300000
      mov byte ptr [rdi], 0x42
    chk:
      mov rcx, 200000
    s2: dec rcx
      jnz s2
      mov rdi, 0x300000
      mov al, byte ptr [rdi]
      cmp rsi, 1
      je one
      cmp al, 0xef
      jne bad
      jmp ok
    one:
      cmp al, 0x42
      jne bad
    ok:
      mov al, 0
      out 0xf4, al
    bad:
      mov al, 1
      out 0xf4, al
    """
    img = build(src)
    h = Host(HostConfig(memsize=16 << 20, quantum=100_000, large_pages=False,
                        sharing=SharingConfig(force_salting=1, scan_time_min=1e-6, rate_max=10**9)))
    vms = [h.power_on(VMConfig(name=f"v{i}", memsize=4 << 20, mmu=mmu, pshare_salt="s", guest_arg=i + 1), img)
           for i in range(2)]
    results = h.run(max_insns=5_000_000)
    assert [r.exit_status for r in results] == [0, 0], [r.message for r in results]
    assert vms[0].p2m.cow_breaks >= 1
    g = 0x300
    assert vms[0].p2m.value[g] != vms[1].p2m.value[g] or vms[0].p2m.state[g] != P2MState.SHARED
    h.close()


def test_no_frame_is_mapped_by_two_vms_under_default_salting():
    img = build("""
      mov rdi, 0x300000
      mov rcx, 4096
      mov rax, 7
    f: mov qword ptr [rdi], rax
      add rdi, 8
      dec rcx
      jnz f
      mov rcx, 300000
    s: dec rcx
      jnz s
      mov al, 0
      out 0xf4, al
    """)
    h = Host(HostConfig(memsize=16 << 20, sharing=SharingConfig(scan_time_min=1e-6, rate_max=10**9),
                        large_pages=False))
    vms = [h.power_on(VMConfig(name=f"v{i}", memsize=4 << 20), img) for i in range(3)]
    h.run()
    owners = {}
    for vm in vms:
        st, val = vm.p2m.state, vm.p2m.value
        for f in np.unique(val[(st == P2MState.SHARED) & (val != ZERO_FRAME)]):
            owners.setdefault(int(f), set()).add(vm.id)
    assert owners and all(len(s) == 1 for s in owners.values())   # shared inside VMs only
    h.close()
