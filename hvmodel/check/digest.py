"""Digests of guest-physical memory for lock-step checkpoints (xxh3 over whole pages).

At every checkpoint each VMM mode's memory is compared with the reference's over the
guest pages the mode holds contents for (private, shared -- the zero frame included --,
swapped, compressed): a wrong frame written by the VMM on the guest's behalf (an A/D
update, an event frame, a swap-in, a copy-on-write copy) shows there before the guest
reads it. Pages a mode never backed read as zero there; they are compared byte by byte,
with all the others, at the end of the check.
"""

from __future__ import annotations

import numpy as np
import xxhash

from ..mmu.p2m import P2MState
from ..vm.vm import VM

_IN_RAM = (int(P2MState.PRIVATE), int(P2MState.SHARED))
_AWAY = (int(P2MState.SWAPPED), int(P2MState.COMPRESSED))
_HELD = (int(P2MState.PRIVATE), int(P2MState.SHARED), int(P2MState.SWAPPED), int(P2MState.COMPRESSED))


class UnreadablePage(Exception):
    """A mode cannot give back the contents of one of its guest pages (a swap slot or a
    compressed page that fails): a divergence to report, not a crash of the checker."""

    def __init__(self, vm: VM, gfn: int, why: BaseException) -> None:
        super().__init__(f"{vm.config.name}: guest page {gfn:#x} cannot be read back: "
                         f"{type(why).__name__}: {why}")
        self.gfn = gfn


def read_page(vm: VM, gpa: int, size: int = 4096) -> bytes:
    """Bytes of a mode's guest-physical memory, wherever the page is (UnreadablePage if the
    VMM cannot produce them)."""
    try:
        return vm.p2m.read_gpa(gpa, size)
    except Exception as e:   # whatever the swap device or the compression cache raised
        raise UnreadablePage(vm, gpa >> 12, e) from None


def _pages(buf) -> np.ndarray:
    return np.frombuffer(buf, dtype=np.uint8).reshape(-1, 4096)


def held_pages(vm: VM) -> np.ndarray:
    """The guest pages a VMM mode holds contents for, in order."""
    st = vm.p2m.state
    return np.flatnonzero(np.isin(st, _HELD))


def contents(vm: VM, gfns: np.ndarray) -> np.ndarray:
    """The pages ``gfns`` of ``vm`` as one (n, 4096) array (a copy)."""
    if vm.p2m is None:
        return _pages(vm.ram.buf)[gfns]
    p2m = vm.p2m
    st = p2m.state[gfns]
    in_ram = np.isin(st, _IN_RAM)
    # Pages without a frame read as the zero frame (untouched, ballooned: as the guest
    # would read them); those in the swap file or the compression cache are read there.
    out = _pages(vm.pool.buf)[p2m.value[gfns] * in_ram]
    for i in np.flatnonzero(np.isin(st, _AWAY)):
        out[i] = np.frombuffer(read_page(vm, int(gfns[i]) << 12), dtype=np.uint8)
    return out


def digest(vm: VM, gfns: np.ndarray) -> int:
    """xxh3 of the pages ``gfns`` of ``vm``, in order -- streamed, one update per run of pages
    whose frames are contiguous too (a large page is one run), so nothing is copied."""
    h = xxhash.xxh3_64()
    gfns = np.asarray(gfns, dtype=np.int64)
    if not len(gfns):
        return h.intdigest()
    if vm.p2m is None:
        mv, frames, away = vm.ram.mv, gfns, None
    else:
        st = vm.p2m.state[gfns]
        frames = vm.p2m.value[gfns] * np.isin(st, _IN_RAM)   # without a frame: the zero frame
        away = np.isin(st, _AWAY)
        mv = memoryview(vm.pool.buf)
    # a run breaks where the frame is not the previous one's successor, or the page is away
    brk = np.ones(len(gfns), dtype=bool)
    brk[1:] = np.diff(frames) != 1
    if away is not None:
        brk |= away
        brk[1:] |= away[:-1]
    starts = np.flatnonzero(brk)
    ends = np.append(starts[1:], len(gfns))
    for s0, e0 in zip(starts.tolist(), ends.tolist()):
        if away is not None and away[s0]:
            h.update(read_page(vm, int(gfns[s0]) << 12))
        else:
            f = int(frames[s0])
            h.update(mv[f << 12:(f + e0 - s0) << 12])
    return h.intdigest()


def first_difference(ref: VM, vm: VM, gfns: np.ndarray) -> tuple[int, int, int] | None:
    """(gpa, mode's qword, reference's qword) where two VMs' pages first differ, or None."""
    a = contents(ref, gfns).view("<u8")
    b = contents(vm, gfns).view("<u8")
    diff = np.flatnonzero(a.reshape(-1) != b.reshape(-1))
    if not len(diff):
        return None
    i = int(diff[0])
    gpa = (int(gfns[i // 512]) << 12) | (i % 512) * 8
    return gpa, int(b.reshape(-1)[i]), int(a.reshape(-1)[i])
