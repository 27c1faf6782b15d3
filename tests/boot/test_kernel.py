"""The example C + assembly kernel, built with gcc/ld, boots as QEMU -kernel would boot it."""

from __future__ import annotations

import struct
import subprocess
import sys

import pytest

from hvmodel.boot.loader import load_kernel
from hvmodel.check.lockstep import check
from hvmodel.host.host import Host, HostConfig
from hvmodel.vm.vm import VMConfig


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hvmodel", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("mmu", ["nested", "shadow", "native"])
def test_multiboot_kernel_boots_and_exits_with_its_status(kernels, mmu):
    mb, _ = kernels
    proc = run_cli("run", str(mb), "--mmu", mmu, "--append", "exit=42")
    assert proc.returncode == 42, proc.stdout + proc.stderr
    out = proc.stdout
    assert "entered by a Multiboot loader" in out
    assert "FAIL" not in out and "all checks passed" in out
    assert "ok   6 #UD taken and handled" in out
    assert "ok   7 #PF at 4 GiB (write, not present)" in out
    assert f"cmdline: {mb} exit=42" in out
    assert "mem_upper KiB: 64512" in out            # 64 MiB - 1 MiB
    assert "mmap 0x100000 0x3f00000 type 1" in out
    assert "cpu vendor: GenuineIntel" in out


def test_elf64_kernel_is_entered_in_long_mode(kernels):
    _, k64 = kernels
    proc = run_cli("run", str(k64), "--mem", "32M", "--append", "exit=5")
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert "entered as an ELF64 kernel" in proc.stdout
    assert "mem_upper KiB: 31744" in proc.stdout and "all checks passed" in proc.stdout


def test_modules_are_page_aligned_after_the_kernel(kernels, tmp_path):
    mb, _ = kernels
    mod1 = tmp_path / "one.txt"
    mod1.write_text("first module\nsecond line\n")
    mod2 = tmp_path / "two.bin"
    mod2.write_bytes(b"\x00" * 5000)
    proc = run_cli("run", str(mb), "--initrd", f"{mod1} a=1,{mod2}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "modules: 2" in proc.stdout
    assert f"module {mod1} a=1 at 0x110000 size 25 first line: first module" in proc.stdout
    assert f"module {mod2} at 0x111000 size 5000" in proc.stdout


def test_kernel_in_lock_step_with_the_reference(kernels):
    mb, k64 = kernels
    for path in (mb, k64):
        res = check(load_kernel(path), ["nested", "shadow"], memsize=32 << 20, host_mem=96 << 20, every=2000)
        assert res.ok, res.report
        assert res.checkpoints > 5 and res.stop_reason == "power_off"


def test_entry_state_is_the_multiboot_contract(kernels):
    """Stopped before the first instruction: 32-bit protected mode as multiboot.S leaves it."""
    from unicorn import x86_const as X
    mb, _ = kernels
    image = load_kernel(mb)
    host = Host(HostConfig(memsize=64 << 20))
    vm = host.power_on(VMConfig(memsize=16 << 20), image)
    v = vm.vcpu
    assert v.rip == image.entry == image.symbols["_start"]
    assert v.reg(X.UC_X86_REG_EAX) == 0x2BADB002 and v.reg(X.UC_X86_REG_EBX) == 0x9500
    assert v.reg(X.UC_X86_REG_CS) == 0x08 and v.reg(X.UC_X86_REG_DS) == 0x10 and v.reg(X.UC_X86_REG_SS) == 0x10
    assert v.reg(X.UC_X86_REG_CR0) == 0x11 and v.efer() == 0 and v.reg(X.UC_X86_REG_CR4) == 0
    assert v.reg(X.UC_X86_REG_RFLAGS) == 0x2
    assert v.table_reg(X.UC_X86_REG_GDTR)[1:3] == (0xF0090, 47)
    assert vm.vcpu.insns == 0  # the loader's stub is not guest time
    info = vm.ram.read_gpa(0x9500, 88)
    flags, lower, upper, bootdev = struct.unpack_from("<IIII", info)
    assert (flags, lower, upper, bootdev) == (0x24F, 639, 15 * 1024, 0x8000FFFF)
    mmap_len, mmap_addr = struct.unpack_from("<II", info, 44)
    assert (mmap_len, mmap_addr) == (5 * 24, 0x9000)
    name = struct.unpack_from("<I", info, 64)[0]
    assert vm.ram.read_gpa(name, 5) == b"qemu\0"
    host.close()
