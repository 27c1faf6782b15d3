"""A guest image and the boot protocol: the value the VM is created from (a leaf module).

Everything that makes images (the assembler, :func:`hvmodel.guest.load.load_guest`, the
kernel loader in :mod:`hvmodel.boot`) and everything that consumes them (the VM, the
host, the checker, the benchmarks) meet here, so this module imports nothing of
hvmodel: an image is plain bytes with an entry point, or a *boot protocol* object that
installs a kernel into the VM itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

DEFAULT_LOAD_ADDR = 0x100000   # guest-physical 1 MiB (docs/GUEST-ABI.md)


class GuestBuildError(ValueError):
    """A guest image could not be built or loaded (exit status 2 in the CLI): a source that
    does not assemble, or whose assembled code is not what it says; a missing or bad file."""


class BootError(GuestBuildError):
    """A kernel image that cannot be booted: malformed, or a piece that does not fit the VM
    (raised by :mod:`hvmodel.boot`; the VM turns one raised while it installs the kernel
    into a :class:`hvmodel.vm.vm.VMError`)."""


class BootTarget(Protocol):
    """The VM a boot protocol installs a kernel into (:class:`hvmodel.vm.vm.VM` is one).

    ``config.memsize`` is its guest memory in bytes, ``ram.write_gpa(gpa, data)`` writes
    guest-physical memory as the VMM, and ``vcpu`` is the vCPU whose entry state the
    loader sets by running its stubs (:mod:`hvmodel.boot.entry`).
    """

    config: Any
    ram: Any
    vcpu: Any


class BootProtocol(Protocol):
    """A kernel that installs itself (Multiboot or ELF64, :class:`hvmodel.boot.loader.KernelBoot`)."""

    def install(self, vm: BootTarget) -> None:
        """Write the kernel and what it is handed into ``vm`` and set its entry state; raise
        :class:`BootError` if a piece does not fit."""
        ...


@dataclass(frozen=True)
class GuestImage:
    """Code to load at ``load_addr`` and enter at ``entry`` — or, with ``boot``, a kernel that
    installs itself (``code`` is then empty)."""

    code: bytes
    load_addr: int
    entry: int
    symbols: dict[str, int] = field(default_factory=dict)
    source_name: str = "<guest>"
    boot: BootProtocol | None = None

    @property
    def end(self) -> int:
        """The first guest-physical address after the code."""
        return self.load_addr + len(self.code)


__all__ = ["BootError", "BootProtocol", "BootTarget", "DEFAULT_LOAD_ADDR", "GuestBuildError", "GuestImage"]
