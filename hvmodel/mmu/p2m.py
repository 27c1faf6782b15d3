"""The p2m: one VM's guest-physical → machine map, and the resolver for EPT violations.

Per guest page number (gfn) the p2m holds a *state* and a value (a machine
frame, or a swap slot / compression handle for pages that left RAM). It is the
single owner of GPA → frame: the nested tables, shadow entries and Unicorn's
TLBs are caches derived from it. Every change that can invalidate a cached
translation calls the registered listeners with the gfn (they zap what they
derived) and bumps ``generation``; vCPUs watching the generation flush their
TLB before they run again.

States (Xen names every state; so do we):

========== ========================================================= =========
state      meaning                                                   value
========== ========================================================= =========
UNBACKED   never touched: reads as zero, first touch allocates       —
PRIVATE    backed by a frame this VM alone maps, writable            frame
SHARED     COW-shared frame (page sharing); a write breaks sharing   frame
SWAPPED    contents in the VM's swap file                            slot
COMPRESSED contents in the VM's compression cache                    handle
BALLOONED  given to the balloon driver; frame freed                  —
MMIO       an emulated device page (no frame; accesses trap)         device id
========== ========================================================= =========
"""

from __future__ import annotations

from enum import IntEnum
from typing import Callable

import numpy as np

from ..machine.pool import PAGE_SHIFT, ZERO_FRAME, HostOutOfMemory, MachinePool


class P2MState(IntEnum):
    UNBACKED = 0
    PRIVATE = 1
    SHARED = 2
    SWAPPED = 3
    COMPRESSED = 4
    BALLOONED = 5
    MMIO = 6


class GuestMemoryError(RuntimeError):
    """A guest-physical page could not be provided; the VM must stop.

    The message names the guest page and why (host out of memory, swap I/O error, ...).
    """

    def __init__(self, gfn: int, why: str, *, host_failure: bool = False) -> None:
        super().__init__(f"guest page {gfn:#x} (GPA {gfn << PAGE_SHIFT:#x}): {why}")
        self.gfn = gfn
        self.why = why
        self.host_failure = host_failure  # the host failed (OOM, swap I/O), not the guest


class P2M:
    """Guest-physical page states and frames for one VM (numpy arrays)."""

    def __init__(self, pool: MachinePool, npages: int, owner: int) -> None:
        self.pool = pool
        self.npages = npages
        self.owner = owner
        self.state = np.zeros(npages, dtype=np.uint8)
        self.value = np.zeros(npages, dtype=np.int64)
        self.generation = 0
        # Called as listener(gfn) after the gfn's frame or rights changed.
        self.listeners: list[Callable[[int], None]] = []
        # esxtop-style counters this layer owns.
        self.first_touches = 0

    # -- queries --------------------------------------------------------------------

    def frame_of(self, gfn: int) -> int:
        """The machine frame backing ``gfn``, or -1 if it has none in RAM."""
        st = self.state[gfn]
        if st == P2MState.PRIVATE or st == P2MState.SHARED:
            return int(self.value[gfn])
        return -1

    def count(self, state: P2MState) -> int:
        """How many guest pages are in ``state``."""
        return int(np.count_nonzero(self.state == state))

    # -- the resolver ------------------------------------------------------------------

    def resolve(self, gfn: int, write: bool) -> tuple[int, bool]:
        """Make ``gfn`` accessible for a read or a write: the EPT-violation path.

        Returns ``(frame, writable)``. Raises GuestMemoryError when the page cannot
        be provided (outside guest memory, host out of memory).
        """
        if gfn >= self.npages:
            raise GuestMemoryError(gfn, f"outside guest memory ({self.npages} pages)")
        st = self.state[gfn]
        if st == P2MState.PRIVATE:
            return int(self.value[gfn]), True
        if st == P2MState.UNBACKED:
            try:
                frame = self.pool.alloc(self.owner)
            except HostOutOfMemory as e:
                raise GuestMemoryError(gfn, f"host out of memory: {e}", host_failure=True) from None
            self.value[gfn] = frame
            self.state[gfn] = P2MState.PRIVATE
            self.first_touches += 1
            return frame, True
        raise GuestMemoryError(gfn, f"state {P2MState(st).name} cannot be resolved yet")

    # -- guest-physical access for the VMM (loading images, reports, the checker) ----

    def read_gpa(self, gpa: int, size: int) -> bytes:
        """Bytes of guest-physical memory; untouched pages read as zero. No side effects."""
        out = bytearray()
        pool = self.pool
        while size:
            n = min(size, (1 << PAGE_SHIFT) - (gpa & 0xFFF))
            frame = self.frame_of(gpa >> PAGE_SHIFT)
            if frame < 0:
                out += bytes(n)
            else:
                off = (frame << PAGE_SHIFT) | (gpa & 0xFFF)
                out += pool.mv[off:off + n]
            gpa += n
            size -= n
        return bytes(out)

    def write_gpa(self, gpa: int, data: bytes) -> None:
        """Write guest-physical memory as the VMM (backs pages as needed)."""
        pos = 0
        while pos < len(data):
            n = min(len(data) - pos, (1 << PAGE_SHIFT) - (gpa & 0xFFF))
            frame, _ = self.resolve(gpa >> PAGE_SHIFT, True)
            off = (frame << PAGE_SHIFT) | (gpa & 0xFFF)
            self.pool.mv[off:off + n] = data[pos:pos + n]
            gpa += n
            pos += n

    def map_for(self, gfn: int, write: bool) -> tuple[int, bool]:
        """The frame an MMU should map for an access, and whether it may be written.

        An untouched page read maps the shared zero frame read-only; only a write
        allocates (first touch). Everything else is :meth:`resolve`.
        """
        if not write and gfn < self.npages and self.state[gfn] == P2MState.UNBACKED:
            return ZERO_FRAME, False
        return self.resolve(gfn, write)

    # -- changes ------------------------------------------------------------------------

    def changed(self, gfn: int) -> None:
        """Announce that ``gfn``'s translation changed: derived caches must drop it."""
        self.generation += 1
        for cb in self.listeners:
            cb(gfn)

    def release_all(self) -> None:
        """Return every frame to the pool (VM power-off)."""
        for gfn in np.flatnonzero((self.state == P2MState.PRIVATE) | (self.state == P2MState.SHARED)):
            self.pool.put(int(self.value[gfn]))
        self.state[:] = P2MState.UNBACKED
        self.value[:] = 0
        self.generation += 1
