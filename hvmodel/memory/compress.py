"""The compression cache: pages chosen for swapping are compressed first, when it pays.

ESXi compresses a page picked for swapping and keeps it in a per-VM cache if it
compresses to 2 KiB or less; the cache is carved in 1 KiB slots (a page that
saves 75 % or more takes one slot, 50–75 % two), and holds at most
``Mem.MemZipMaxPct`` (10 %) of the VM's memory. When the cache is full its least
recently used page leaves for the swap file. Decompressing is about an order of
magnitude faster than reading disk, which is the point.

The cache lives in machine frames taken from the pool (4 slots a frame), so what
it saves is real: a page compressed into one slot frees a whole frame for a
quarter of one. Every entry keeps a 64-bit checksum of the page; a page that does
not decompress to it stops the VM with a message naming the page.

The codec is zlib (level 1, fast) from the standard library.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict

import xxhash

from ..machine.pool import OWNER_VMM, PAGE_SHIFT, PAGE_SIZE, HostOutOfMemory, MachinePool
from ..mmu.p2m import CompressionError

SLOT = 1024
SLOTS_PER_FRAME = PAGE_SIZE // SLOT
MAX_COMPRESSED = 2 * SLOT


class CompressionCache:
    """One VM's compressed pages, in 1 KiB slots of pool frames, LRU (the p2m's
    :class:`~hvmodel.mmu.p2m.PageCache`)."""

    def __init__(self, pool: MachinePool, max_frames: int) -> None:
        self.pool = pool
        self.max_frames = max_frames
        self.frames: list[int] = []
        self.free_slots: list[tuple[int, int]] = []     # (frame, first slot) of free 1 KiB slots
        self.free_pairs: list[tuple[int, int]] = []     # aligned free pairs (slot 0 or 2 of a frame)
        self.used: dict[int, int] = {}                   # frame -> slots in use (an empty frame goes back)
        self.entries: OrderedDict[int, tuple] = OrderedDict()   # gfn -> (frame, slot, nslots, length, checksum)
        self.zipped = 0        # pages compressed into the cache
        self.unzipped = 0      # pages decompressed back
        self.rejected = 0      # pages that did not compress to 2 KiB

    # -- capacity -------------------------------------------------------------------------

    @property
    def slots_used(self) -> int:
        return sum(e[2] for e in self.entries.values())

    def _take(self, nslots: int) -> tuple[int, int] | None:
        where = self._find(nslots)
        if where is not None:
            self.used[where[0]] = self.used.get(where[0], 0) + nslots
        return where

    def _find(self, nslots: int) -> tuple[int, int] | None:
        if nslots == 1 and self.free_slots:
            return self.free_slots.pop()
        if nslots == 1 and self.free_pairs:
            frame, slot = self.free_pairs.pop()
            self.free_slots.append((frame, slot + 1))
            return frame, slot
        if nslots == 2 and self.free_pairs:
            return self.free_pairs.pop()
        if len(self.frames) >= self.max_frames:
            return None
        try:
            frame = self.pool.alloc(OWNER_VMM)
        except HostOutOfMemory:
            return None  # no frame for the cache right now: the page goes to swap instead
        self.frames.append(frame)
        self.free_pairs.append((frame, 2))
        if nslots == 1:
            self.free_slots.append((frame, 1))
        return frame, 0

    def _give(self, frame: int, slot: int, nslots: int) -> None:
        left = self.used[frame] - nslots
        if left:
            self.used[frame] = left
            (self.free_pairs if nslots == 2 else self.free_slots).append((frame, slot))
            return
        # The frame holds nothing any more: it goes back to the pool (the cache shrinks
        # as pages leave it, so CACHESZ is what the cache really holds).
        del self.used[frame]
        self.free_slots = [w for w in self.free_slots if w[0] != frame]
        self.free_pairs = [w for w in self.free_pairs if w[0] != frame]
        self.frames.remove(frame)
        self.pool.put(frame)

    # -- pages ------------------------------------------------------------------------------

    def compress(self, data: bytes | memoryview) -> bytes | None:
        """The page compressed, or None if it does not fit in 2 KiB."""
        blob = zlib.compress(data, 1)
        if len(blob) > MAX_COMPRESSED:
            self.rejected += 1
            return None
        return blob

    def store(self, gfn: int, data: bytes | memoryview, blob: bytes) -> bool:
        """Keep ``blob`` (from :meth:`compress`) for ``gfn``; False if the cache has no room."""
        nslots = 1 if len(blob) <= SLOT else 2
        where = self._take(nslots)
        if where is None:
            return False
        frame, slot = where
        off = (frame << PAGE_SHIFT) + slot * SLOT
        self.pool.mv[off:off + len(blob)] = blob
        self.entries[gfn] = (frame, slot, nslots, len(blob), xxhash.xxh3_64_intdigest(data))
        self.zipped += 1
        return True

    def load(self, gfn: int, remove: bool = True) -> bytes:
        """Decompress ``gfn``'s page, verifying its checksum; remove it unless told not to."""
        frame, slot, nslots, length, csum = entry = self.entries[gfn]
        if remove:
            del self.entries[gfn]
            self._give(frame, slot, nslots)
        data = self._decode(entry)
        if remove:
            self.unzipped += 1
        return data

    def peek(self, gfn: int) -> bytes:
        """``gfn``'s page, verified, without removing it (reports, the checker)."""
        return self._decode(self.entries[gfn])

    def _decode(self, entry: tuple) -> bytes:
        frame, slot, _, length, csum = entry
        off = (frame << PAGE_SHIFT) + slot * SLOT
        try:
            data = zlib.decompress(bytes(self.pool.mv[off:off + length]))
        except zlib.error as e:
            raise CompressionError(f"compressed page does not decompress: {e}") from None
        if len(data) != PAGE_SIZE or xxhash.xxh3_64_intdigest(data) != csum:
            raise CompressionError("compressed page fails its checksum")
        return data

    def lru(self) -> int | None:
        """The least recently stored page (the next to leave for swap), or None."""
        return next(iter(self.entries), None)

    def drop(self, gfn: int) -> None:
        """Forget ``gfn``'s page (power-off, ballooning)."""
        frame, slot, nslots, _, _ = self.entries.pop(gfn)
        self._give(frame, slot, nslots)

    def release(self) -> None:
        """Give the cache's frames back to the pool."""
        for f in self.frames:
            self.pool.put(f)
        self.frames.clear()
        self.entries.clear()
        self.free_slots.clear()
        self.free_pairs.clear()
        self.used.clear()

    def counters(self) -> dict[str, float]:
        """esxtop's compression view for this VM, in pages: CACHESZ the cache's size (its
        frames), CACHEUSD what its compressed pages use of it (1 KiB slots, 4 a page)."""
        return {"CACHESZ": len(self.frames), "CACHEUSD": self.slots_used * SLOT / PAGE_SIZE,
                "ZIP": self.zipped, "UNZIP": self.unzipped, "zip_rejected": self.rejected,
                "zipped_pages": len(self.entries)}
