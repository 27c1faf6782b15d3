"""The reference mode: Unicorn's own x86 MMU over flat guest-physical memory.

In ``--mmu native`` there is no p2m, no pool and no fill hook: Unicorn runs in
``UC_TLB_CPU`` mode and QEMU's walker translates every guest access over one flat
buffer that *is* guest-physical memory. It is the independent reference the
checker compares the VMM's MMUs against, not a third VMM.

The VMM still needs guest-virtual accesses of its own (event delivery pushes the
frame, reads the IDT and the TSS); for those :class:`NativeMMU` walks the guest
tables over the flat buffer with the same ``walk()`` — QEMU would do exactly the
same reads and A/D writes when it delivers an event itself.
"""

from __future__ import annotations

import ctypes
import mmap

from .base import TableEntry, VmmTable
from .walk import walk


class FlatRAM:
    """Guest-physical memory as one anonymous mmap, mapped at address 0 in Unicorn."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._cbuf = (ctypes.c_char * size).from_buffer(self.buf)
        self.host_addr = ctypes.addressof(self._cbuf)
        self.mv = memoryview(self.buf)
        self.q = self.mv.cast("Q")

    # TableMemory for walk()
    def read_pte(self, gpa: int) -> int:
        return self.q[gpa >> 3]

    def write_pte(self, gpa: int, value: int) -> None:
        self.q[gpa >> 3] = value

    def read_gpa(self, gpa: int, size: int) -> bytes:
        """Bytes of guest-physical memory."""
        return bytes(self.mv[gpa:gpa + size])

    def write_gpa(self, gpa: int, data: bytes) -> None:
        """Write guest-physical memory (image loading)."""
        self.mv[gpa:gpa + len(data)] = data


class NativeMMU:
    """The VMM's own guest-virtual accesses in reference mode: a walk over flat RAM."""

    kind = "native"
    flush_pending = False
    intercepts_invlpg = False   # Unicorn's own MMU handles INVLPG of large pages itself
    p2m = None                  # flat guest-physical memory, nothing to resolve

    reference = True

    @classmethod
    def for_vm(cls, memory, pool, config) -> "NativeMMU":
        """This mode for a VM (mmu/modes.py): ``memory`` is its flat RAM."""
        return cls(memory)

    def __init__(self, ram: FlatRAM) -> None:
        self.ram = ram
        self.walks = 0

    def translate(self, cr3: int, va: int, acc: int, user: bool, ctl: int) -> int:
        """GVA → GPA (= address in the flat buffer) | perms, or ~fault."""
        self.walks += 1
        return walk(self.ram, cr3, va, acc, user, ctl)

    def on_exit(self) -> None:
        pass

    def overhead_frames(self) -> int:
        return 0

    def pinned(self, gfn: int) -> bool:
        return False

    def test_and_clear_accessed(self, gfn: int) -> bool:
        """No VMM structure records accesses in the reference mode (the host never asks)."""
        return False

    def zap(self, gfn: int) -> None:
        """Nothing is derived from a p2m (there is none)."""

    def describe(self, gfn: int) -> list[str]:
        return []

    def describe_gpa(self, gpa: int) -> list[str]:
        return []

    def describe_va(self, cr3: int, va: int, gpa: int, user: bool, ctl: int) -> list[str]:
        return ["native: guest physical = Unicorn physical (no VMM)"]

    def tables(self) -> list[VmmTable]:
        return []

    def entries(self, gfn: int) -> list[TableEntry]:
        return []

    def peek_gpa(self, gpa: int) -> int:
        return gpa if gpa < self.ram.size else -1

    def counters(self) -> dict[str, int]:
        return {"walks": self.walks}

    def release(self) -> None:
        pass
