"""The machine page pool: all of the host's machine memory, shared by every VM.

One anonymous ``mmap`` holds every machine frame. It is mapped once, with
``mem_map_ptr``, at machine address 0 into every vCPU's Unicorn instance
(docs/ENGINE.md U8): the VMM chooses the frame a guest page uses through the
TLB-fill hook's ``entry.paddr``, never by mapping pages one by one.

Per-frame state lives in numpy arrays owned here: a reference count (a shared
frame is mapped by several guest pages) and an owner (the VM id, or
``OWNER_VMM`` for the hypervisor's own frames such as nested page tables).
Frame 0 is the zero frame: always zero, never handed out, so a machine address
of 0 in a table is never a live guest page by accident.
"""

from __future__ import annotations

import ctypes
import mmap

import numpy as np

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = ~(PAGE_SIZE - 1)
LARGE_FRAMES = 512  # a 2 MiB page: 512 contiguous, 2 MiB-aligned 4 KiB frames

OWNER_FREE = -1
OWNER_VMM = 0  # VMs are numbered from 1

ZERO_FRAME = 0

_ZEROS = bytes(PAGE_SIZE)


class HostOutOfMemory(RuntimeError):
    """The machine pool has no free frame left.

    A defined outcome, not a crash: the caller (p2m resolver, nested table
    allocation) turns it into a VM stop with a message that names the page.
    """


class MachinePool:
    """Frames of machine memory with an allocator, refcounts and owners."""

    def __init__(self, size: int) -> None:
        if size < 16 * PAGE_SIZE or size % PAGE_SIZE:
            raise ValueError(f"host memory must be a multiple of 4 KiB and at least 64 KiB, got {size}")
        self.size = size
        self.nframes = size >> PAGE_SHIFT
        self.buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        # A ctypes view pins the mmap (it cannot be closed while mapped into Unicorn).
        self._cbuf = (ctypes.c_char * size).from_buffer(self.buf)
        self.host_addr = ctypes.addressof(self._cbuf)
        self.mv = memoryview(self.buf)
        self.q = self.mv.cast("Q")  # 64-bit view: table entries are read as q[mpa >> 3]
        self.refcount = np.zeros(self.nframes, dtype=np.uint32)
        self.owner = np.full(self.nframes, OWNER_FREE, dtype=np.int16)
        # LIFO free list: recently freed frames are reused first (warm in host caches).
        # Kept as a Python list because pop/append are the allocator's whole job.
        # The top frame is the device window: every vCPU maps its emulated MMIO page (the
        # local APIC) at this machine address instead of RAM, so it is never handed out.
        self.device_frame = self.nframes - 1
        self._free: list[int] = list(range(self.nframes - 2, ZERO_FRAME, -1))
        self.owner[ZERO_FRAME] = OWNER_VMM
        self.refcount[ZERO_FRAME] = 1
        self.owner[self.device_frame] = OWNER_VMM
        self.refcount[self.device_frame] = 1
        self.allocs = 0
        self.frees = 0
        self.large_allocs = 0
        self.large_misses = 0   # no free aligned 2 MiB run: the caller fell back to 4 KiB
        # Frames some vCPU fetched instructions from. Unicorn keys translated code by
        # machine address and does not notice the VMM rewriting a frame (docs/ENGINE.md
        # U9), so such a frame, once freed, waits in quarantine until every vCPU has
        # dropped its translated code (launder()). That cannot happen while a vCPU is
        # running: flushing translated code from inside a fill hook silently corrupts
        # execution on Unicorn 2.1.4 (measured; docs/ENGINE.md N2), so alloc() never hands out a
        # quarantined frame while ``running`` is set.
        self.fetched = np.zeros(self.nframes, dtype=np.bool_)
        self._quarantine: list[int] = []
        self.on_launder: list = []   # callbacks that drop every vCPU's translated code
        self.running = 0             # vCPUs inside emu_start
        self.launders = 0
        # Frames that must not be written through a guest mapping: shared
        # (copy-on-write) frames and the zero frame. Kept here because sharing spans VMs.
        self.cow = np.zeros(self.nframes, dtype=np.bool_)
        self.cow[ZERO_FRAME] = True

    # -- allocation ---------------------------------------------------------------

    @property
    def free_frames(self) -> int:
        """Frames currently free (quarantined ones included)."""
        return len(self._free) + len(self._quarantine)

    @property
    def allocatable(self) -> int:
        """Frames alloc() can hand out while a vCPU runs (quarantined ones wait for a launder)."""
        return len(self._free)

    @property
    def used_frames(self) -> int:
        """Frames in use, including the zero frame."""
        return self.nframes - self.free_frames

    def alloc(self, owner: int) -> int:
        """Take a free frame for ``owner``, zeroed, with refcount 1.

        Raises HostOutOfMemory when no frame can be handed out now.
        """
        if not self._free:
            if self._quarantine and not self.running:
                self.launder()
            else:
                raise HostOutOfMemory(f"machine pool exhausted ({self.nframes} frames of {PAGE_SIZE} bytes"
                                      f"{', the free ones still hold translated code' if self._quarantine else ''})")
        frame = self._free.pop()
        off = frame << PAGE_SHIFT
        self.buf[off:off + PAGE_SIZE] = _ZEROS
        self.refcount[frame] = 1
        self.owner[frame] = owner
        self.allocs += 1
        return frame

    def alloc_large(self, owner: int) -> int:
        """Take 512 contiguous, 2 MiB-aligned free frames (zeroed, refcount 1 each).

        Returns the first frame, or -1 when no such run is free — the caller backs the
        range with 4 KiB frames instead (ESXi backs guest memory with large pages *when
        possible*). Never launders or reclaims for a large page: fragmentation is not an
        out-of-memory condition.
        """
        n = self.nframes - self.nframes % LARGE_FRAMES
        if n == 0:
            return -1
        # Free and not quarantined (a quarantined frame is free but may still hold code).
        ok = (self.owner[:n] == OWNER_FREE) & ~self.fetched[:n]
        runs = np.flatnonzero(ok.reshape(-1, LARGE_FRAMES).all(axis=1))
        if not len(runs):
            self.large_misses += 1
            return -1
        first = int(runs[-1]) * LARGE_FRAMES
        end = first + LARGE_FRAMES
        self._free = [f for f in self._free if not first <= f < end]
        off = first << PAGE_SHIFT
        self.buf[off:off + LARGE_FRAMES * PAGE_SIZE] = bytes(LARGE_FRAMES * PAGE_SIZE)
        self.refcount[first:end] = 1
        self.owner[first:end] = owner
        self.allocs += LARGE_FRAMES
        self.large_allocs += 1
        return first

    def launder(self) -> None:
        """Drop every vCPU's translated code and free the quarantined frames.

        Call only while no vCPU runs (between slices).
        """
        if not self._quarantine:
            return
        for cb in self.on_launder:
            cb()
        q = self._quarantine
        self.fetched[q] = False
        self._free.extend(q)
        self._quarantine = []
        self.launders += 1

    def get(self, frame: int) -> None:
        """Add a reference to a live frame (sharing)."""
        if self.refcount[frame] == 0:
            raise ValueError(f"frame {frame:#x} is free")
        self.refcount[frame] += 1

    def put(self, frame: int) -> None:
        """Drop a reference; the frame returns to the free list at zero."""
        if frame == ZERO_FRAME:
            return
        rc = self.refcount[frame]
        if rc == 0:
            raise ValueError(f"double free of frame {frame:#x}")
        rc -= 1
        self.refcount[frame] = rc
        if rc == 0:
            self.owner[frame] = OWNER_FREE
            self.cow[frame] = False
            (self._quarantine if self.fetched[frame] else self._free).append(frame)
            self.frees += 1

    # -- content ------------------------------------------------------------------

    def frame_bytes(self, frame: int) -> memoryview:
        """A writable view of one frame's 4 KiB."""
        off = frame << PAGE_SHIFT
        return self.mv[off:off + PAGE_SIZE]

    def read(self, mpa: int, size: int) -> bytes:
        """Bytes at a machine address (for the VMM, not the hot path)."""
        return bytes(self.mv[mpa:mpa + size])

    def write(self, mpa: int, data: bytes) -> None:
        """Write bytes at a machine address (for the VMM, not the hot path)."""
        self.mv[mpa:mpa + len(data)] = data

    def close(self) -> None:
        """Release the views; the mmap itself stays alive while Unicorn maps it."""
        self.q.release()
        self.mv.release()
