"""The host: owns the machine pool and the VMs, admits them, and runs them.

This is the top of the dependency chain below the CLI (cli → host → vm → mmu →
p2m → machine). Scheduling several VMs round-robin and the memory policy between
slices grow here (issue 5); today a host runs its VMs one after another.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .guest.image import GuestImage
from .machine.pool import PAGE_SIZE, MachinePool
from .vm.vm import DEFAULT_MAX_INSNS, MIB, VM, VMConfig, VMError, VMResult

DEFAULT_HOST_MEM = 256 * MIB
# Frames a VM needs beyond its own pages when fully backed: nested tables for its
# memory (one 4 KiB table per 2 MiB, plus upper levels) — the VMM's overhead.
_OVERHEAD_FRAMES = 8


class AdmissionError(VMError):
    """The host cannot power on a VM (not enough machine memory)."""


@dataclass
class HostConfig:
    """Host-wide settings."""

    memsize: int = DEFAULT_HOST_MEM


@dataclass
class Host:
    """A machine pool and the VMs placed on it."""

    config: HostConfig = field(default_factory=HostConfig)

    def __post_init__(self) -> None:
        try:
            self.pool = MachinePool(self.config.memsize)
        except ValueError as e:
            raise VMError(str(e)) from None
        self.vms: list[VM] = []

    def overhead_frames(self, memsize: int) -> int:
        """Nested-table frames a fully touched VM of ``memsize`` bytes needs."""
        pages = memsize // PAGE_SIZE
        return (pages + 511) // 512 + _OVERHEAD_FRAMES

    def power_on(self, config: VMConfig, image: GuestImage) -> VM:
        """Admit and create a VM. Without swap (yet) its memory must fit in the host."""
        need = config.memsize // PAGE_SIZE + self.overhead_frames(config.memsize)
        committed = sum(vm.config.memsize // PAGE_SIZE + self.overhead_frames(vm.config.memsize)
                        for vm in self.vms)
        usable = self.pool.nframes - 1  # the zero frame is never handed out
        if committed + need > usable:
            raise AdmissionError(
                f"cannot power on {config.name}: it needs {need * PAGE_SIZE // MIB} MiB of machine memory "
                f"(guest memory {config.memsize // MIB} MiB + overhead), the host has "
                f"{(usable - committed) * PAGE_SIZE // MIB} MiB left of {self.config.memsize // MIB} MiB "
                f"and no swap to overcommit with")
        vm = VM(config, image, self.pool, vm_id=len(self.vms) + 1)
        self.vms.append(vm)
        return vm

    def run(self, max_insns: int = DEFAULT_MAX_INSNS) -> list[VMResult]:
        """Run every VM to completion; results in power-on order."""
        return [vm.run(max_insns) for vm in self.vms]

    def counters(self) -> dict[str, object]:
        """Host-wide counters (PMEM in esxtop terms)."""
        p = self.pool
        return {
            "memsize": self.config.memsize,
            "frames": p.nframes,
            "frames_used": p.used_frames,
            "frames_free": p.free_frames,
            "frame_allocs": p.allocs,
            "frame_frees": p.frees,
        }
