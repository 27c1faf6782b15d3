"""Shared helpers: build a guest from inline assembly and run it on a fresh host."""

from __future__ import annotations

import pytest

from hvmodel.guest.asm import build
from hvmodel.host import Host, HostConfig
from hvmodel.vm.vm import VMConfig


def run_asm(src: str, *, mem: int = 16 << 20, host_mem: int = 64 << 20, max_insns: int = 5_000_000,
            **cfg):
    """Assemble ``src`` at 0x100000, run it, return (vm, result)."""
    image = build(src, source_name="test")
    host = Host(HostConfig(memsize=host_mem))
    vm = host.power_on(VMConfig(memsize=mem, **cfg), image)
    return vm, vm.run(max_insns)


@pytest.fixture
def run_guest_asm():
    return run_asm
