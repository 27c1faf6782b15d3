"""A witness VM for lock-step checks under memory pressure: memory that must never change.

The VMM modes of a check run the same guest in step, so a VMM write that lands in a
frame shared with the other mode writes what that mode was about to write anyway, and
no comparison with the reference can see it (the shared-frame bug of ``dedup-8vm``
hid this way). The witness is a third VM on the same host that never runs: after every
checkpoint the checker copies some of the first mode's pages into it at the same guest
pages, and the sharing scanner (same salt) merges them with the modes' identical pages.
Nothing may change the witness's memory but those copies: a page whose contents differ
from what was copied shows a write into a shared frame that bypassed copy-on-write.
"""

from __future__ import annotations

import numpy as np
import xxhash

from ..host import Host
from ..guest.image import GuestImage
from ..vm.vm import VM, VMConfig
from . import digest


class Witness:
    """The bystander VM and the contents it must still hold."""

    def __init__(self, host: Host, image: GuestImage, memsize: int, salt: str) -> None:
        self.vm = host.power_on(VMConfig(name="witness", memsize=memsize, mmu="nested", pshare_salt=salt,
                                         large_pages=False), image)
        self.host = host
        self.held: dict[int, int] = {}   # gfn -> xxh3 of what was copied there
        self.cursor = 0
        self.copies = 0

    def changed(self) -> str:
        """Why the witness's memory is not what was copied into it ("" if it is)."""
        if not self.held:
            return ""
        gfns = np.fromiter(self.held, dtype=np.int64)
        pages = digest.contents(self.vm, gfns)
        for g, page in zip(gfns, pages):
            if xxhash.xxh3_64_intdigest(page) != self.held[int(g)]:
                return (f"  the witness VM (it never runs) changed at guest page {int(g):#x}: a VMM write "
                        f"went into a frame shared with it, bypassing copy-on-write")
        return ""

    def copy_from(self, vm: VM, n: int) -> None:
        """Copy the next ``n`` pages ``vm`` holds into the witness, then let sharing merge them."""
        held = digest.held_pages(vm)
        if not len(held):
            return
        start = self.cursor % len(held)
        picks = np.concatenate([held[start:], held[:start]])[:n]
        self.cursor = start + len(picks)
        pages = digest.contents(vm, picks)
        for g, page in zip(picks, pages):
            data = page.tobytes()
            self.vm.ram.write_gpa(int(g) << 12, data)
            self.held[int(g)] = xxhash.xxh3_64_intdigest(data)
            self.copies += 1
        self.host.sharing.scan(self.vm, self.vm.p2m.npages)
