"""The lock-step checker sees every access: wrong pages, wrong values, system state, memory between checkpoints."""

from __future__ import annotations

import pytest
from unicorn import x86_const as X

from hvmodel.check.lockstep import check
from hvmodel.guest.asm import build
from hvmodel.mmu.walk import ACC_READ, PERM_W

# Two pages with the same contents; one read of the first, whose result the guest throws
# away at once: nothing of it is left at the next checkpoint.
SAME_PAGES = """
%include "runtime/boot.inc"
main:
    mov rdi, 0x300000
    movabs rax, 0x5a5a5a5a12345678
    mov ecx, 1024
    rep stosq
    mov rax, cr3
    mov cr3, rax
    movabs rax, 0x5a5a5a5a12345678
    mov rdi, 0x300000
    out 0x80, al
    mov rbx, qword ptr [rdi + 0x18]
    mov qword ptr [rdi + 0x18], rax
    xor ebx, ebx
    mov al, 0
    out 0xf4, al
"""
READ_INSN = "mov rbx, qword ptr [rdi + 0x18]"


def _image():
    return build(SAME_PAGES, source_name="same-pages")


def _neighbour_read(vm):
    """A VMM bug: the first read fill of guest page 0x300 is served from the next frame
    (read-only, so the guest's next write to the page fills again, correctly)."""
    if vm.config.mmu == "native":
        return
    orig = vm.mmu.translate
    done = []

    def translate(cr3, va, acc, user, ctl):
        r = orig(cr3, va, acc, user, ctl)
        if not done and acc == ACC_READ and va >> 12 == 0x300 and r >= 0:
            done.append(va)
            return (r + 0x1000) & ~PERM_W
        return r
    vm.mmu.translate = translate


def _dma_flip(vm):
    """A VMM bug: a device write (port 0x80 here) flips a bit of guest page 0x300, which the
    guest reads once and then overwrites."""
    if vm.config.mmu == "native":
        return
    orig = vm.io.write

    def write(port, size, value):
        if port == 0x80:
            vm.pool.q[(vm.p2m.frame_of(0x300) << 9) + 3] ^= 1 << 40
        return orig(port, size, value)
    vm.io.write = write


def _instruction_of(image, text: str) -> int:
    """The number of the instruction (1 = the first) at which the reference first executes
    ``text``: a code hook on its address (Unicorn has counted it when the hook runs)."""
    from capstone import CS_ARCH_X86, CS_MODE_64, Cs
    from unicorn import UC_HOOK_CODE
    from hvmodel.vm.vm import VM, VMConfig
    addr = next(i.address for i in Cs(CS_ARCH_X86, CS_MODE_64).disasm(image.code, image.load_addr)
                if f"{i.mnemonic} {i.op_str}" == text)
    vm = VM(VMConfig(name="native", memsize=8 << 20, mmu="native"), image)
    seen: list[int] = []
    vm.vcpu.uc.hook_add(UC_HOOK_CODE, lambda *_: seen.append(vm.vcpu.now()), None, addr, addr)
    vm.run()
    return seen[0]


@pytest.mark.parametrize("mode", ["nested", "shadow"])
def test_a_read_from_the_neighbouring_frame_is_caught_at_the_access(mode):
    image = _image()
    before = check(image, [mode], memsize=8 << 20, configure=_neighbour_read, accesses=False)
    assert before.ok, "checkpoints and final memory alone cannot see it (the blind spot)"
    res = check(image, [mode], memsize=8 << 20, configure=_neighbour_read)
    assert not res.ok
    assert res.diverged_at == _instruction_of(image, READ_INSN)
    assert READ_INSN in res.report
    assert "guest-physical 0x301000" in res.report          # where the mode's access went
    # both walks, level by level, the reference's taken just before the instruction
    assert f"{mode}: cr3=" in res.report and "native: cr3=" in res.report and "PDE" in res.report
    assert f"(after {res.diverged_at - 1:,} instructions)" in res.report


def test_a_wrong_value_read_is_caught_with_both_values():
    image = _image()
    assert check(image, ["nested"], memsize=8 << 20, configure=_dma_flip, accesses=False).ok
    res = check(image, ["nested"], memsize=8 << 20, configure=_dma_flip)
    assert not res.ok
    assert res.diverged_at == _instruction_of(image, READ_INSN)
    assert "value differ" in res.report
    assert "value 0x5a5a5b5a12345678" in res.report and "value 0x5a5a5a5a12345678" in res.report


def test_guests_agree_access_by_access():
    res = check(_image(), ["nested", "shadow"], memsize=8 << 20)
    assert res.ok, res.report
    assert res.accesses > 2 * 8192 and res.fills > 0 and res.digests >= 2


def _clobber_kernel_gs_base(vm):
    """A VMM bug: the first exit clobbers KERNEL_GS_BASE (nothing in the guest reads it)."""
    if vm.config.mmu == "native":
        return
    step = vm.step

    def stepped(*a, **kw):
        ex = step(*a, **kw)
        vm.vcpu.uc.reg_write(X.UC_X86_REG_MSR, (0xC0000102, 0x1234000))
        return ex
    vm.step = stepped


def test_system_registers_are_compared():
    res = check(_image(), ["nested"], memsize=8 << 20, configure=_clobber_kernel_gs_base)
    assert not res.ok
    assert "kernel_gs_base 0x1234000 vs 0x0" in res.report


UNREAD = """
%include "runtime/boot.inc"
main:
    mov rdi, 0x300000
    mov qword ptr [rdi], rdi
    mov ecx, 200000
spin:
    dec ecx
    jnz spin
    mov al, 0
    out 0xf4, al
"""


def _silent_write(vm):
    """A VMM bug: after its first slice it writes a guest page the guest never reads again."""
    if vm.config.mmu == "native":
        return
    step = vm.step
    done = []

    def stepped(*a, **kw):
        ex = step(*a, **kw)
        if not done and vm.vcpu.insns > 50_000:
            done.append(1)
            vm.pool.q[vm.p2m.frame_of(0x300) << 9] ^= 1
        return ex
    vm.step = stepped


def test_memory_is_compared_at_checkpoints_not_only_at_the_end():
    image = build(UNREAD, source_name="unread")
    res = check(image, ["shadow"], memsize=8 << 20, every=20_000, configure=_silent_write)
    assert not res.ok
    assert "checkpoint digest" in res.report and "gpa 0x300000" in res.report
    assert res.diverged_at <= 80_000          # the guest runs 400,000 instructions
