"""The host-memory guests: dedup.asm (zero / identical / unique pages re-verified over
rounds, for page sharing) and hog.asm (a whole-memory working set walked without locality,
for swapping; their build and symbols are checked in test_guests_build.py). dedup passes on hvmodel;
the per-VM value in RSI reaches both guests and only the unique pages depend on it."""

from __future__ import annotations

from pathlib import Path

import pytest
from capstone import CS_ARCH_X86, CS_MODE_64, Cs

from hvmodel import Host, HostConfig, VMConfig, load_guest
from hvmodel.guest.asm import build_file

GUEST_DIR = Path(__file__).resolve().parents[2] / "guests"
HOST_GUESTS = ["dedup", "hog"]


@pytest.mark.parametrize("name", HOST_GUESTS)
def test_boot_calls_the_rsi_hook(name):
    # boot.inc zeroes RSI before main; the guests catch it by redirecting boot.inc's
    # `call idt_init` to their hook, which saves RSI and jumps to the real idt_init.
    img = build_file(GUEST_DIR / f"{name}.asm")
    hook = img.symbols[f"{name}_entry_hook"]
    md = Cs(CS_ARCH_X86, CS_MODE_64)
    boot_code = img.code[: img.symbols["enable_nx"] - img.load_addr]
    calls = [i.op_str for i in md.disasm(boot_code, img.load_addr) if i.mnemonic == "call"]
    assert calls == [hex(hook)], calls
    first = next(md.disasm(img.code[hook - img.load_addr:], hook))
    assert first.mnemonic == "mov" and first.op_str.endswith(", rsi")


def test_dedup_passes_at_16m():
    host = Host(HostConfig(memsize=64 << 20))
    vm = host.power_on(VMConfig(memsize=16 << 20), load_guest(GUEST_DIR / "dedup.asm"))
    r = vm.run()
    assert r.exit_status == 0, f"{r.stop_reason}: {r.message}\n{r.console}"
    assert "PASS" in r.console
    # 3584 pages = 35 groups of 100 + 84: 25/50/25 per group, the last group cut short
    assert "3584 pages from 0x200000: 900 zero, 1800 identical" in r.console
    assert "884 unique (per-VM seed 1); 40 rounds" in r.console
    assert "40 rounds ok, final full check ok" in r.console
    assert r.counters["instructions"] < 35_000_000


def _native_run(name, seed, mem):
    from harness_native import NativeVM
    from unicorn.x86_const import UC_X86_REG_RSI

    vm = NativeVM(build_file(GUEST_DIR / f"{name}.asm"), mem)
    vm.uc.reg_write(UC_X86_REG_RSI, seed)
    r = vm.run(100_000_000)
    assert r.status == 0, f"{r.reason}\n{r.output}"
    return vm, r


def test_dedup_seed_only_changes_unique_pages():
    pages = {}
    for seed, mem in [(0, 4 << 20), (2, 4 << 20), (3, 6 << 20)]:
        vm, r = _native_run("dedup", seed, mem)
        assert f"(per-VM seed {seed or 1})" in r.output
        pages[seed] = bytes(vm.uc.mem_read(0x200000, 200 * 4096))
    for p in range(200):
        a, b, c = (pages[s][p * 4096:(p + 1) * 4096] for s in (0, 2, 3))
        kind = p % 100
        if kind < 25:  # zero
            assert a == b == c == bytes(4096), p
        elif kind < 75:  # identical in every VM, whatever its seed or memory size
            assert a == b == c != bytes(4096), p
        else:  # unique per VM
            assert a != b and b != c and a != c, p


def test_hog_uses_the_seed():
    vm1, r1 = _native_run("hog", 1, 3 << 20)
    vm2, r2 = _native_run("hog", 7, 3 << 20)
    assert "seed 7" in r2.output and "PASS" in r2.output
    assert vm1.uc.mem_read(0x200000, 4096) != vm2.uc.mem_read(0x200000, 4096)
