"""The p2m: one VM's guest-physical → machine map, and the resolver for EPT violations.

Per guest page number (gfn) the p2m holds a *state* and a value (a machine
frame, or a swap slot / compression handle for pages that left RAM). It is the
single owner of GPA → frame: the nested tables, shadow entries and Unicorn's
TLBs are caches derived from it. Every change that can invalidate a cached
translation calls the registered listeners with the gfn (the MMUs' ``zap``: they
drop what they derived and set ``flush_pending``, which the vCPU honours before it
runs again or inside the fill) and bumps ``generation``, a change count (the balloon
back-door compares it to learn whether a LOCK changed a mapping).

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

Large pages (ESXi's ``Mem.AllocGuestLargePage``): the first write to an untouched,
2 MiB-aligned range of guest memory backs the whole range with a 2 MiB machine page
(512 contiguous, aligned frames) when the pool has one and the host allows it
(``large_ok``, which the host clears outside the ``high`` state). Every page of the
range is then PRIVATE with its own frame, and ``large[region]`` says the 512 frames
form one 2 MiB page, which the MMUs may map with one 2 MiB leaf. Anything that must
treat one 4 KiB page on its own — sharing it, swapping or compressing it, ballooning
it — first *breaks* the large page (``break_large``): the frames stay where they are,
the MMUs drop their 2 MiB mappings.
"""

from __future__ import annotations

from contextlib import contextmanager
from enum import IntEnum
from typing import Callable, Iterator, Protocol

import numpy as np

from ..machine.pool import LARGE_FRAMES, OWNER_VMM, PAGE_SHIFT, PAGE_SIZE, ZERO_FRAME, HostOutOfMemory, MachinePool
from ..machine.swap import SwapDevice, SwapError


class P2MState(IntEnum):
    UNBACKED = 0
    PRIVATE = 1
    SHARED = 2
    SWAPPED = 3
    COMPRESSED = 4
    BALLOONED = 5
    MMIO = 6


# The states as plain ints for the fill path: comparing a numpy scalar with an IntEnum
# member goes through enum's class __getattr__ and numpy's conversion (measured: most of
# a shadow hidden fault's time was P2MState.__getattr__), while ``state.item(gfn)``
# against an int is a few tens of nanoseconds.
_UNBACKED = int(P2MState.UNBACKED)
_PRIVATE = int(P2MState.PRIVATE)
_SHARED = int(P2MState.SHARED)


class AllocationBlocked(RuntimeError):
    """The host is in the ``low`` state and this VM is above its target: its allocation
    waits until memory is freed. The vCPU ends its slice without any guest-visible event
    (a refused fill restarts the instruction) and the host runs it again later."""

    def __init__(self, gfn: int) -> None:
        super().__init__(f"allocation for guest page {gfn:#x} blocked (host memory state low)")
        self.gfn = gfn


class GuestMemoryError(RuntimeError):
    """A guest-physical page could not be provided; the VM must stop.

    The message names the guest page and why (host out of memory, swap I/O error, ...).
    """

    def __init__(self, gfn: int, why: str, *, host_failure: bool = False) -> None:
        super().__init__(f"guest page {gfn:#x} (GPA {gfn << PAGE_SHIFT:#x}): {why}")
        self.gfn = gfn
        self.why = why
        self.host_failure = host_failure  # the host failed (OOM, swap I/O), not the guest


class CompressionError(RuntimeError):
    """A compressed page could not be restored intact (it does not decompress, or fails its
    checksum). Declared here, where it is caught, so the p2m need not know the cache's module."""


class PageCache(Protocol):
    """What the p2m needs of a VM's compression cache (hvmodel/memory/compress.py)."""

    frames: list[int]      # the cache's own frames (VMM overhead)
    unzipped: int          # pages decompressed back

    def compress(self, data: bytes | memoryview) -> bytes | None:
        """The page compressed, or None if compressing does not pay."""
        ...

    def store(self, gfn: int, data: bytes | memoryview, blob: bytes) -> bool:
        """Keep ``blob`` for ``gfn``; False if the cache has no room."""
        ...

    def load(self, gfn: int, remove: bool = True) -> bytes:
        """``gfn``'s page, verified (CompressionError if damaged)."""
        ...

    def peek(self, gfn: int) -> bytes:
        """``gfn``'s page, verified, left in the cache."""
        ...

    def lru(self) -> int | None:
        """The page that leaves first when the cache is full."""
        ...

    def drop(self, gfn: int) -> None:
        """Forget ``gfn``'s page."""
        ...


class P2M:
    """Guest-physical page states and frames for one VM (numpy arrays)."""

    def __init__(self, pool: MachinePool, npages: int, owner: int) -> None:
        self.pool = pool
        self.npages = npages
        self.owner = owner
        self.state = np.zeros(npages, dtype=np.uint8)
        self.value = np.zeros(npages, dtype=np.int64)
        self.generation = 0
        # Large pages: one flag per 2 MiB region (only whole regions inside guest memory).
        self.large = np.zeros((npages + LARGE_FRAMES - 1) // LARGE_FRAMES, dtype=np.bool_)
        self.large_enabled = False   # this VM may get large pages (VM config)
        self.large_ok = True         # the host allows new ones now (its memory state is high)
        # Host hook: blocked(p2m) is true while this VM's allocations must wait (state low).
        self.blocked: Callable[["P2M"], bool] | None = None
        # Called as listener(gfn) after the gfn's frame or rights changed.
        self.listeners: list[Callable[[int], None]] = []
        # The VM's swap file, when it has one (the host creates it at power-on), and its
        # compression cache (memory/compress.py), when the host gives it one.
        self.swap: SwapDevice | None = None
        self.zip: PageCache | None = None
        # Host hooks: reclaim(n, p2m) frees up to n frames (returns how many) when an
        # allocation fails; unshared(frame, p2m, gfn) tells page sharing that gfn no
        # longer maps the shared frame.
        self.reclaim: Callable[[int, "P2M"], int] | None = None
        self.unshared: Callable[[int, "P2M", int], None] | None = None
        # verify_shared(frame) -> None, or why the shared frame fails its content checksum.
        self.verify_shared: Callable[[int], str | None] | None = None
        # Recently resolved gfns: a reclaim in the middle of a fill must not take them.
        self.recent: list[int] = []
        # Active-memory sampling (memory/alloc.py): the gfns being watched this period and
        # those an MMU had to map again since their translations were invalidated.
        self.watch: set[int] = set()
        self.watch_touched: set[int] = set()
        self.watch_regions: set[int] = set()   # 2 MiB regions holding watched gfns
        # Called as listener(region) when sampling stops watching pages of that region.
        self.watch_listeners: list[Callable[[int], None]] = []
        # esxtop-style counters this layer owns.
        self.first_touches = 0
        self.cow_breaks = 0
        self.swap_ins = 0
        self.swap_outs = 0
        self.balloon_violations = 0
        self.large_pages_backed = 0   # 2 MiB pages allocated for this VM
        self.large_breaks = 0         # 2 MiB pages broken into 4 KiB pages
        self.allocs_blocked = 0       # allocations that waited (host state low)
        # Emulated device pages above guest RAM (the local APIC): gfn -> the machine frame
        # where the vCPU maps the device's MMIO (the pool's device window).
        self.mmio: dict[int, int] = {}

    # -- queries --------------------------------------------------------------------

    def frame_of(self, gfn: int) -> int:
        """The machine frame backing ``gfn``, or -1 if it has none in RAM."""
        if gfn >= self.npages:
            return self.mmio.get(gfn, -1)
        st = self.state.item(gfn)
        if st == _PRIVATE or st == _SHARED:
            return self.value.item(gfn)
        return -1

    def count(self, state: P2MState) -> int:
        """How many guest pages are in ``state``."""
        return int(np.count_nonzero(self.state == state))

    def zero_pages(self) -> int:
        """Guest pages shared with the host's zero frame."""
        return int(np.count_nonzero((self.state == P2MState.SHARED) & (self.value == ZERO_FRAME)))

    # -- the resolver ------------------------------------------------------------------

    def resolve(self, gfn: int, write: bool) -> tuple[int, bool]:
        """Make ``gfn`` accessible for a read or a write: the EPT-violation path.

        Returns ``(frame, writable)``: first touch allocates, a write to a shared
        page breaks the sharing (copy-on-write), a swapped page is read back.
        Raises GuestMemoryError when the page cannot be provided (outside guest
        memory, host out of memory, a swap I/O error or a failed checksum).
        """
        if gfn >= self.npages:
            if gfn in self.mmio:
                return self.mmio[gfn], True
            raise GuestMemoryError(gfn, f"outside guest memory ({self.npages} pages)")
        st = self.state.item(gfn)
        if st == _PRIVATE:
            return self.value.item(gfn), True
        recent = self.recent
        recent.append(gfn)
        if len(recent) > 8:
            del recent[0]
        if st == P2MState.UNBACKED:
            self.first_touches += 1
            if self.large_enabled and self.large_ok:
                frame = self._alloc_large(gfn)
                if frame >= 0:
                    return frame, True
            frame = self._alloc(gfn)
            self.value[gfn] = frame
            self.state[gfn] = P2MState.PRIVATE
            return frame, True
        if st == _SHARED:
            frame = self.value.item(gfn)
            if not write:
                return frame, False
            return self._break_cow(gfn, frame), True
        if st == P2MState.SWAPPED:
            return self._swap_in(gfn), True
        if st == P2MState.COMPRESSED:
            return self._unzip(gfn), True
        if st == P2MState.BALLOONED:
            # The guest touched a page its balloon driver handed over: it gets a zeroed
            # frame (as ESX does) and the VM's balloon_violations counter grows.
            self.balloon_violations += 1
            frame = self._alloc(gfn)
            self.value[gfn] = frame
            self.state[gfn] = P2MState.PRIVATE
            return frame, True
        raise GuestMemoryError(gfn, f"state {P2MState(st).name} cannot be resolved yet")

    def _alloc_large(self, gfn: int) -> int:
        """Back gfn's whole 2 MiB region with a large page if it is untouched; gfn's frame or -1."""
        region = gfn // LARGE_FRAMES
        lo = region * LARGE_FRAMES
        hi = lo + LARGE_FRAMES
        if hi > self.npages or (self.state[lo:hi] != P2MState.UNBACKED).any():
            return -1
        first = self.pool.alloc_large(self.owner)
        if first < 0:
            return -1
        self.value[lo:hi] = np.arange(first, first + LARGE_FRAMES)
        self.state[lo:hi] = P2MState.PRIVATE
        self.large[region] = True
        self.large_pages_backed += 1
        # Reads may have mapped pages of the range to the zero frame: those go.
        for g in range(lo, hi):
            self.changed(g)
        return first + (gfn - lo)

    def break_large(self, region: int) -> None:
        """Break a 2 MiB page into 512 ordinary pages (same frames; 2 MiB mappings dropped)."""
        if not self.large[region]:
            return
        self.large[region] = False
        self.large_breaks += 1
        self.changed(region * LARGE_FRAMES)

    def _split(self, gfn: int) -> None:
        # Whatever is about to happen to gfn alone needs it out of any large page.
        if self.large[gfn // LARGE_FRAMES]:
            self.break_large(gfn // LARGE_FRAMES)

    def large_count(self) -> int:
        """2 MiB pages currently backing this VM."""
        return int(np.count_nonzero(self.large))

    def _alloc(self, gfn: int, owner: int | None = None, what: str = "", reclaim: bool = True) -> int:
        pool = self.pool
        if owner is None:   # a guest page (the VMM's own tables are never blocked)
            owner = self.owner
            if self.blocked is not None and self.blocked(self):
                self.allocs_blocked += 1
                raise AllocationBlocked(gfn)
        try:
            return pool.alloc(owner)
        except HostOutOfMemory as e:
            # Reclaim, then try once more even if nothing was freed: an allocation can
            # fail transiently (a frame still holding translated code, an injected fault).
            if reclaim and self.reclaim is not None:
                self.reclaim(1, self)
            try:
                return pool.alloc(owner)
            except HostOutOfMemory:
                raise GuestMemoryError(gfn, f"host out of memory{what}: {e}", host_failure=True) from None

    def alloc_vmm(self, gfn: int) -> int:
        """A frame for the VMM's own tables (nested, shadow) while serving ``gfn``.

        Never reclaims: the MMU is halfway through a fault, holding frames it resolved
        (fault injection found a reclaim here breaking the large page being mapped, and
        its 2 MiB leaf then mapping VMM frames to the guest). :meth:`topup` reclaims
        before the fault instead. Tries twice; raises GuestMemoryError naming ``gfn``.
        """
        return self._alloc(gfn, OWNER_VMM, " for the VMM's page tables", reclaim=False)

    def topup(self, n: int = 4) -> None:
        """An MMU starts serving a fault: make ``n`` frames allocatable first, reclaiming if
        needed, so its table allocations need not reclaim midway (KVM tops up its MMU
        memory caches before taking the fault the same way)."""
        if self.pool.allocatable >= n or self.reclaim is None:
            return
        if self.blocked is not None and self.blocked(self):
            return   # the host state holds this VM back: it stalls at its next allocation instead
        self.reclaim(n, self)

    def _break_cow(self, gfn: int, frame: int) -> int:
        """A write to a shared page: give this gfn a private copy."""
        pool = self.pool
        if self.verify_shared is not None:
            # The copy (or the frame itself) must not carry a corrupted shared page on.
            bad = self.verify_shared(frame)
            if bad:
                raise GuestMemoryError(gfn, bad, host_failure=True)
        self.cow_breaks += 1
        if frame != ZERO_FRAME and pool.refcount[frame] == 1:
            # The last sharer: no copy needed, the frame simply becomes private.
            pool.cow[frame] = False
            if self.unshared is not None:
                self.unshared(frame, self, gfn)
            new = frame
        else:
            new = self._alloc(gfn)
            if frame != ZERO_FRAME:
                src = frame << PAGE_SHIFT
                dst = new << PAGE_SHIFT
                pool.mv[dst:dst + PAGE_SIZE] = pool.mv[src:src + PAGE_SIZE]
                pool.put(frame)
                if self.unshared is not None:
                    self.unshared(frame, self, gfn)
        self.value[gfn] = new
        self.state[gfn] = P2MState.PRIVATE
        self.changed(gfn)
        return new

    def _swap_in(self, gfn: int) -> int:
        slot = int(self.value[gfn])
        frame = self._alloc(gfn)
        try:
            data = self.swap.read(slot)
        except SwapError as e:
            self.pool.put(frame)
            raise GuestMemoryError(gfn, f"cannot swap in: {e}", host_failure=True) from None
        off = frame << PAGE_SHIFT
        self.pool.mv[off:off + PAGE_SIZE] = data
        self.swap.free(slot)
        self.value[gfn] = frame
        self.state[gfn] = P2MState.PRIVATE
        self.swap_ins += 1
        return frame

    def _unzip(self, gfn: int) -> int:
        try:
            data = self.zip.load(gfn, remove=False)  # verified, still in the cache
        except CompressionError as e:
            raise GuestMemoryError(gfn, f"cannot decompress: {e}", host_failure=True) from None
        # The allocation may reclaim, and a full cache may even send this very page to
        # swap meanwhile: the bytes in hand are still its content.
        frame = self._alloc(gfn)
        if self.state[gfn] == P2MState.COMPRESSED:
            self.zip.drop(gfn)
            self.zip.unzipped += 1
        elif self.state[gfn] == P2MState.SWAPPED:
            self.swap.free(int(self.value[gfn]))
        off = frame << PAGE_SHIFT
        self.pool.mv[off:off + PAGE_SIZE] = data
        self.value[gfn] = frame
        self.state[gfn] = P2MState.PRIVATE
        return frame

    # -- changes the host makes (sharing, compressing, swapping) --------------------------

    def reclaim_page(self, gfn: int) -> str:
        """Take a private page out of RAM: compressed if it pays, else swapped.

        Returns "zip" or "swap". A full compression cache first sends its least recently
        used page to the swap file (ESXi).
        """
        self._split(gfn)
        if self.zip is None:
            self.swap_out(gfn)
            return "swap"
        frame = int(self.value[gfn])
        off = frame << PAGE_SHIFT
        data = bytes(self.pool.mv[off:off + PAGE_SIZE])
        blob = self.zip.compress(data)
        if blob is None:
            self.swap_out(gfn)
            return "swap"
        while not self.zip.store(gfn, data, blob):
            victim = self.zip.lru()
            if victim is None:
                self.swap_out(gfn)
                return "swap"
            self._zip_to_swap(victim)
        self.value[gfn] = 0
        self.state[gfn] = P2MState.COMPRESSED
        self.changed(gfn)
        self.pool.put(frame)
        return "zip"

    def _zip_to_swap(self, gfn: int) -> None:
        try:
            data = self.zip.load(gfn, remove=False)   # kept until the swap write succeeded
        except CompressionError as e:
            raise GuestMemoryError(gfn, f"cannot decompress: {e}", host_failure=True) from None
        try:
            slot = self.swap.write(data)
        except SwapError as e:
            raise GuestMemoryError(gfn, f"cannot swap out: {e}", host_failure=True) from None
        self.zip.drop(gfn)
        self.zip.unzipped += 1
        self.value[gfn] = slot
        self.state[gfn] = P2MState.SWAPPED
        self.swap_outs += 1

    def share(self, gfn: int, frame: int) -> None:
        """Map ``gfn`` to the shared (copy-on-write) ``frame``, dropping its own frame."""
        pool = self.pool
        self._split(gfn)
        old = int(self.value[gfn])
        if frame != ZERO_FRAME:
            pool.get(frame)
            pool.cow[frame] = True
        self.value[gfn] = frame
        self.state[gfn] = P2MState.SHARED
        self.changed(gfn)
        pool.put(old)

    def share_in_place(self, gfn: int) -> None:
        """``gfn``'s own frame becomes a shared, read-only frame (the first sharer)."""
        self._split(gfn)
        self.pool.cow[int(self.value[gfn])] = True
        self.state[gfn] = P2MState.SHARED
        self.changed(gfn)

    def balloon(self, gfn: int) -> bool:
        """The guest's balloon driver handed ``gfn`` over: free whatever backs it.

        Returns False for a page outside guest memory or already ballooned.
        """
        if gfn >= self.npages or self.state[gfn] == P2MState.BALLOONED:
            return False
        self._split(gfn)
        st = self.state[gfn]
        old = int(self.value[gfn])
        self.state[gfn] = P2MState.BALLOONED
        self.value[gfn] = 0
        if st in (P2MState.PRIVATE, P2MState.SHARED):
            self.changed(gfn)
            self.pool.put(old)
            if st == P2MState.SHARED and old != ZERO_FRAME and self.unshared is not None:
                self.unshared(old, self, gfn)
        elif st == P2MState.SWAPPED:
            self.swap.free(old)
        elif st == P2MState.COMPRESSED:
            self.zip.drop(gfn)
        return True

    def unballoon(self, gfn: int) -> bool:
        """The balloon driver gave ``gfn`` back: it reads as zero until touched again."""
        if gfn >= self.npages or self.state[gfn] != P2MState.BALLOONED:
            return False
        self.state[gfn] = P2MState.UNBACKED
        return True

    def swap_out(self, gfn: int) -> None:
        """Write a private page to the swap file and free its frame."""
        if self.state[gfn] != P2MState.PRIVATE:
            raise ValueError(f"gfn {gfn:#x} is not private")
        self._split(gfn)
        frame = int(self.value[gfn])
        off = frame << PAGE_SHIFT
        try:
            slot = self.swap.write(self.pool.mv[off:off + PAGE_SIZE])
        except SwapError as e:
            raise GuestMemoryError(gfn, f"cannot swap out: {e}", host_failure=True) from None
        self.value[gfn] = slot
        self.state[gfn] = P2MState.SWAPPED
        self.changed(gfn)
        self.pool.put(frame)
        self.swap_outs += 1

    # -- guest-physical access for the VMM (loading images, reports, the checker) ----

    def read_gpa(self, gpa: int, size: int) -> bytes:
        """Bytes of guest-physical memory; untouched pages read as zero. No side effects."""
        out = bytearray()
        pool = self.pool
        while size:
            n = min(size, (1 << PAGE_SHIFT) - (gpa & 0xFFF))
            gfn = gpa >> PAGE_SHIFT
            frame = self.frame_of(gfn)
            if frame >= 0:
                off = (frame << PAGE_SHIFT) | (gpa & 0xFFF)
                out += pool.mv[off:off + n]
            elif self.state[gfn] == P2MState.SWAPPED:
                page = self.swap.read(int(self.value[gfn]))
                out += page[gpa & 0xFFF:(gpa & 0xFFF) + n]
            elif self.state[gfn] == P2MState.COMPRESSED:
                page = self.zip.peek(gfn)
                out += page[gpa & 0xFFF:(gpa & 0xFFF) + n]
            else:
                out += bytes(n)
            gpa += n
            size -= n
        return bytes(out)

    def frame_for_write(self, gfn: int) -> int:
        """The frame to write when the VMM writes ``gfn`` on the guest's behalf.

        The one door for such writes (A/D updates, loading images, a debugger's stores,
        fault injection's guest-visible damage): the page is backed or swapped in, and a
        shared page gets its own copy first (copy-on-write), exactly as for a guest store.
        Writing a frame found any other way could change a page another VM maps.
        """
        return self.resolve(gfn, True)[0]

    @contextmanager
    def unblocked(self) -> Iterator[None]:
        """The VMM's own accesses (event delivery, a debugger, fault injection) cannot
        stall and restart like a guest instruction: inside this block they allocate past
        the ``low`` state's block (fault injection found a blocked push escaping delivery)."""
        blocked, self.blocked = self.blocked, None
        try:
            yield
        finally:
            self.blocked = blocked

    def write_gpa(self, gpa: int, data: bytes) -> None:
        """Write guest-physical memory as the VMM (backs pages as needed, breaks sharing)."""
        pos = 0
        while pos < len(data):
            n = min(len(data) - pos, (1 << PAGE_SHIFT) - (gpa & 0xFFF))
            with self.unblocked():
                frame = self.frame_for_write(gpa >> PAGE_SHIFT)
            off = (frame << PAGE_SHIFT) | (gpa & 0xFFF)
            self.pool.mv[off:off + n] = data[pos:pos + n]
            gpa += n
            pos += n

    def map_for(self, gfn: int, write: bool) -> tuple[int, bool]:
        """The frame an MMU should map for an access, and whether it may be written.

        An untouched page read maps the shared zero frame read-only; only a write
        allocates (first touch). Everything else is :meth:`resolve`.
        """
        if not write and gfn < self.npages and self.state.item(gfn) == _UNBACKED:
            return ZERO_FRAME, False
        return self.resolve(gfn, write)

    # -- changes ------------------------------------------------------------------------

    def set_watch(self, gfns: set[int]) -> None:
        """Active-memory sampling: watch ``gfns`` this period (empty: stop watching).

        Regions that stop being watched are announced, so an MMU can map a large page
        whole again."""
        old = self.watch_regions
        self.watch = gfns
        self.watch_touched = set()
        self.watch_regions = {g // LARGE_FRAMES for g in gfns}
        for region in old - self.watch_regions:
            for cb in self.watch_listeners:
                cb(region)

    def note_mapped(self, gfn: int) -> None:
        """An MMU (re)established a translation of ``gfn`` (its slow path)."""
        if gfn in self.watch:
            self.watch_touched.add(gfn)

    def changed(self, gfn: int) -> None:
        """Announce that ``gfn``'s translation changed: derived caches must drop it."""
        self.generation += 1
        for cb in self.listeners:
            cb(gfn)

    def release_all(self) -> None:
        """Return every frame to the pool and every swap slot (VM power-off)."""
        for gfn in np.flatnonzero((self.state == P2MState.PRIVATE) | (self.state == P2MState.SHARED)):
            gfn = int(gfn)
            frame = int(self.value[gfn])
            shared = self.state[gfn] == P2MState.SHARED
            self.state[gfn] = P2MState.UNBACKED
            self.pool.put(frame)
            if shared and frame != ZERO_FRAME and self.unshared is not None:
                self.unshared(frame, self, gfn)
        if self.swap is not None:
            for gfn in np.flatnonzero(self.state == P2MState.SWAPPED):
                self.swap.free(int(self.value[gfn]))
        self.state[:] = P2MState.UNBACKED
        self.value[:] = 0
        self.large[:] = False
        self.generation += 1
