"""A VM's swap file: a real file on disk, one 4 KiB slot per page, a checksum per slot.

Like ESXi's ``.vswp``: created at power-on with room for the VM's memory minus its
reservation (no file, no power-on), removed at power-off. Power-on checks that the
file system has the space (``statvfs``) and sizes the file; its blocks are written
as pages are swapped, so a disk that fills up later is a swap write error that
stops the VM with a message naming the page, never lost guest memory. Every slot written gets a 64-bit xxhash of its content; a
read whose data does not match is an error that names the slot, never guest
memory that is silently wrong.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import xxhash

from .pool import PAGE_SIZE


class SwapError(RuntimeError):
    """A swap slot could not be written or read back intact."""


class SwapDevice:
    """Slots of one swap file, with allocation and checksums."""

    def __init__(self, path: Path, nslots: int) -> None:
        self.path = Path(path)
        self.nslots = nslots
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as e:
            raise SwapError(f"cannot create swap file {self.path}: {e.strerror}") from None
        size = nslots * PAGE_SIZE
        try:
            st = os.statvfs(self.path.parent)
            free = st.f_bavail * st.f_frsize
            if size > free:
                raise OSError(28, f"needs {size >> 20} MiB, the file system has {free >> 20} MiB free")
            os.ftruncate(self.fd, size)
        except OSError as e:
            os.close(self.fd)
            self.path.unlink(missing_ok=True)
            raise SwapError(f"cannot make a {size >> 20} MiB swap file {self.path}: {e.strerror}") from None
        self._free = list(range(nslots - 1, -1, -1))
        self.checksum = np.zeros(nslots, dtype=np.uint64)
        self.in_use = np.zeros(nslots, dtype=np.bool_)
        self.reads = 0
        self.writes = 0

    @property
    def used(self) -> int:
        """Slots holding a page."""
        return self.nslots - len(self._free)

    def write(self, data: bytes | memoryview) -> int:
        """Store one page; returns its slot."""
        if not self._free:
            raise SwapError(f"swap file {self.path} is full ({self.nslots} slots)")
        slot = self._free.pop()
        try:
            n = os.pwrite(self.fd, data, slot * PAGE_SIZE)
        except OSError as e:
            self._free.append(slot)
            raise SwapError(f"write of swap slot {slot} failed: {e.strerror}") from None
        if n != PAGE_SIZE:
            self._free.append(slot)
            raise SwapError(f"short write of swap slot {slot} ({n} bytes)")
        self.checksum[slot] = xxhash.xxh3_64_intdigest(data)
        self.in_use[slot] = True
        self.writes += 1
        return slot

    def read(self, slot: int) -> bytes:
        """The page in ``slot``, verified against its checksum."""
        if not self.in_use[slot]:
            raise SwapError(f"swap slot {slot} holds no page")
        try:
            data = os.pread(self.fd, PAGE_SIZE, slot * PAGE_SIZE)
        except OSError as e:
            raise SwapError(f"read of swap slot {slot} failed: {e.strerror}") from None
        if len(data) != PAGE_SIZE:
            raise SwapError(f"short read of swap slot {slot} ({len(data)} bytes)")
        if xxhash.xxh3_64_intdigest(data) != int(self.checksum[slot]):
            raise SwapError(f"swap slot {slot} fails its checksum (the data on disk changed)")
        self.reads += 1
        return data

    def free(self, slot: int) -> None:
        """Give a slot back."""
        if self.in_use[slot]:
            self.in_use[slot] = False
            self._free.append(slot)

    def close(self) -> None:
        """Close and delete the file (power-off)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self.path.unlink(missing_ok=True)
