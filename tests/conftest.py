"""Shared helpers: build a guest from inline assembly and run it on a fresh host; build the example kernel."""

from __future__ import annotations

import shutil
import subprocess
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from hvmodel.guest.asm import build
from hvmodel.host.host import Host, HostConfig
from hvmodel.vm.vm import VMConfig

# The hvmodel pytest plugin (fixtures hvrun, host, vm, guest; marker fault) comes through the
# package's pytest11 entry point once installed; from a checkout that is not the installed
# copy, load it here — never both (pytest refuses a plugin registered twice).
if not any(ep.value == "hvmodel.pytest_plugin" for ep in entry_points(group="pytest11")):
    pytest_plugins = ["hvmodel.pytest_plugin"]


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


KERNEL_SRC = Path(__file__).resolve().parent.parent / "guests" / "multiboot"


def build_kernels(out: Path) -> tuple[Path, Path]:
    """make the Multiboot kernel and its ELF64 twin into ``out``; skip if there is no toolchain."""
    missing = [t for t in ("make", "gcc", "ld") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"no {', '.join(missing)} on this machine: cannot build the example kernel")
    proc = subprocess.run(["make", "-s", "-C", str(KERNEL_SRC), f"OUT={out}", "CC=gcc", "LD=ld", "all", "elf64"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return out / "kernel.elf", out / "kernel64.elf"


@pytest.fixture(scope="session")
def kernels(tmp_path_factory) -> tuple[Path, Path]:
    return build_kernels(tmp_path_factory.mktemp("kernel"))
