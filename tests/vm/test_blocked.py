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


@pytest.mark.parametrize("mmu", ["nested", "shadow"])
def test_paging_without_long_mode_stops_the_vm_with_a_clear_message(mmu, tmp_path):
    # 32-bit / PAE paging is not modelled: walking such tables as 4-level ones would be
    # silently wrong, so the VM stops at the first translation instead. The guest: a
    # Multiboot image (entered in 32-bit protected mode) that turns on 32-bit paging.
    import struct
    from keystone import KS_ARCH_X86, KS_MODE_32, Ks
    from hvmodel.boot.multiboot import MB_HEADER_MAGIC
    from hvmodel.guest.load import load_guest
    code, _ = Ks(KS_ARCH_X86, KS_MODE_32).asm(
        "mov eax, 0x200000; mov cr3, eax; mov eax, cr0; or eax, 0x80000000; mov cr0, eax;"
        "mov ebx, 0x300000; mov eax, dword ptr [ebx]; hlt")
    flags = 0x10003
    head = struct.pack("<8I", MB_HEADER_MAGIC, flags, (-(MB_HEADER_MAGIC + flags)) & 0xFFFFFFFF,
                       0x100000, 0x100000, 0, 0, 0x100020)
    img = tmp_path / "pg32.mb"
    img.write_bytes(head + bytes(code))
    h = Host(HostConfig(memsize=32 << 20))
    vm = h.power_on(VMConfig(memsize=8 << 20, mmu=mmu), load_guest(img))
    r = vm.run(100_000)
    assert r.stop_reason == "unsupported_mode" and r.exit_status is None, r.message
    assert "paging without long mode" in r.message
    h.close()
