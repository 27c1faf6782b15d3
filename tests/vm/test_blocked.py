"""A blocked allocation (host state low) ends the slice with no guest event; the instruction
restarts whole, exactly once, when the VM runs again."""

from __future__ import annotations

import pytest

from hvmodel import Host, HostConfig, VMConfig
from hvmodel.guest.asm import build
from hvmodel.vm.exits import ExitReason

GUEST = build("""
  mov rdi, 0x300000
  mov rsp, 0x401000
  mov rax, 0x1234
  add qword ptr [rdi], 5       // reads the zero page, then its write must allocate
  push rax                     // RSP moves only if the store happens
  mov rbx, qword ptr [rdi]
  cmp rbx, 5
  jne bad
  cmp rsp, 0x400ff8
  jne bad
  mov rbx, qword ptr [rsp]
  cmp rbx, 0x1234
  jne bad
  mov al, 0
  out 0xf4, al
bad:
  mov al, 1
  out 0xf4, al
""")


@pytest.mark.parametrize("mmu", ["nested", "shadow"])
def test_blocked_allocations_restart_their_instruction_exactly_once(mmu):
    h = Host(HostConfig(memsize=32 << 20))
    vm = h.power_on(VMConfig(memsize=8 << 20, mmu=mmu, large_pages=False), GUEST)
    refusals = {"left": 3}

    def blocked(p2m):
        if refusals["left"]:
            refusals["left"] -= 1
            return True
        return False

    # Block the first three allocations (the guest's data page and its stack page, one retry).
    vm.p2m.blocked = blocked
    reasons = []
    while vm.running:
        ex = vm.step()
        if ex is not None:
            reasons.append(ex.reason)
    r = vm.result()
    assert r.exit_status == 0, r.message
    assert reasons.count(ExitReason.BLOCKED) == 3 and r.counters["blocked_exits"] == 3
    assert r.counters["allocs_blocked"] == 3
    assert r.counters["guest_page_faults"] == 0       # nothing was delivered to the guest
    h.close()
