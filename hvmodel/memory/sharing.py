"""Transparent page sharing (ESX TPS), with salts, as a host-wide scanner.

The scanner visits each VM's guest pages at a configured rate, in the VM's own
cursor order. For a private page it computes a 64-bit content hash (xxh3) and
looks it up under the VM's salt:

* a *shared* frame with that key: compare the whole page; equal → map the page to
  that frame, copy-on-write, and free its own frame; different → a hash collision,
  left alone (counted);
* a *hint* (an earlier unmatched page) with that key: re-hash the hinted page — if it
  changed, the hint is stale and is replaced by this page; if not and the bytes
  match, the hinted page's frame becomes the shared frame and this page maps it;
* nothing: this page becomes the hint. Hints are not write-protected (ESX).

Large pages: the 4 KiB pages of a 2 MiB page are hashed like any other, but while
the host is in the ``high`` state (``break_large`` false) nothing in a large page is
shared — a match is only counted (``lpage_shareable``). From ``clear`` on, a match
breaks the large page (p2m.break_large) and the page is shared (ESXi 5.5+).

An all-zero page is mapped to the host's zero frame. A write to a shared page breaks
sharing in the p2m (a private copy; every cached translation of that page is
invalidated through the p2m's listeners).

Salting (``Mem.ShareForceSalting``): pages are shared only when content *and* salt
match. 0 = no salting (all VMs share one salt); 1 = the salt is
``sched.mem.pshare.salt``, VMs without one share salt 0; 2 (the default) = the
VM's ``sched.mem.pshare.salt`` if set, else its UUID — effectively intra-VM
sharing only. A VM with ``sched.mem.pshare.enable = false`` is not scanned.

Counters use KSM's names where they fit (pages_shared, pages_sharing,
pages_unshared, pages_volatile, full_scans, general_profit) and esxtop's per VM
(SHRD, ZERO, SHRDSVD, COWH).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import xxhash

from ..machine.pool import PAGE_SHIFT, PAGE_SIZE, ZERO_FRAME, MachinePool
from ..mmu.p2m import P2MState

if TYPE_CHECKING:
    from ..vm.vm import VM

ZERO_PAGE = bytes(PAGE_SIZE)
_PRIVATE = int(P2MState.PRIVATE)   # a plain int: IntEnum comparisons cost ~1 us each
ZERO_HASH = xxhash.xxh3_64_intdigest(ZERO_PAGE)
RMAP_ITEM_BYTES = 64  # KSM's general_profit charges each tracked item


@dataclass
class SharingConfig:
    """Host-wide page-sharing settings, by their ESXi names."""

    force_salting: int = 2          # Mem.ShareForceSalting
    scan_time_min: float = 60.0     # Mem.ShareScanTime: minutes to scan a whole VM
    rate_max: int = 1024            # Mem.ShareRateMax: pages per second per VM

    def validate(self) -> None:
        if self.force_salting not in (0, 1, 2):
            raise ValueError(f"Mem.ShareForceSalting must be 0, 1 or 2, got {self.force_salting}")
        if self.scan_time_min <= 0 or self.rate_max <= 0:
            raise ValueError("Mem.ShareScanTime and Mem.ShareRateMax must be positive")


class PageSharing:
    """The content-based sharing scanner of one host."""

    def __init__(self, pool: MachinePool, config: SharingConfig | None = None) -> None:
        self.pool = pool
        self.config = config or SharingConfig()
        self.config.validate()
        self.shared: dict[tuple, int] = {}          # (salt, hash) -> shared frame
        self.frame_key: dict[int, tuple] = {}       # shared frame -> its key
        self.mappers: dict[int, list] = {}          # shared frame -> [(p2m, gfn)] mapping it
        self.hints: dict[tuple, tuple] = {}         # (salt, hash) -> (vm, gfn)
        self.last_hash: dict[tuple, int] = {}       # (vm id, gfn) -> hash at the previous visit
        self.cursor: dict[int, int] = {}            # vm id -> next gfn to visit
        self.credit: dict[int, float] = {}          # vm id -> pages the scan rate allows now
        self.break_large = False   # the host sets it outside the high state
        # Counters.
        self.pages_scanned = 0
        self.collisions = 0
        self.pages_volatile = 0
        self.full_scans = 0
        self.zero_shares = 0
        self.shares = 0
        self.lpage_shareable = 0   # matches found in large pages while they may not be broken
        # Content checksums: a shared frame's key holds the xxh3 of the content it was
        # shared with (the zero frame: ZERO_HASH). verify() checks it on a copy-on-write
        # break, when the last user takes the frame back, and in scrub() rounds.
        self.on_corrupt = None        # host hook: on_corrupt(frame, why, [(p2m, gfn), ...])
        self.scrub_cursor = 0
        self.frames_scrubbed = 0
        self.checksum_failures = 0

    # -- salts ------------------------------------------------------------------------

    def salt_of(self, vm: "VM") -> object:
        """The salt a VM's pages are shared under (Mem.ShareForceSalting rules)."""
        mode = self.config.force_salting
        salt = vm.config.pshare_salt
        if mode == 0:
            return 0
        if mode == 1:
            return salt if salt is not None else 0
        return salt if salt is not None else ("uuid", vm.uuid)

    # -- the scan ---------------------------------------------------------------------

    def pages_for(self, vm: "VM", guest_seconds: float) -> int:
        """How many pages the configured rate lets the scanner visit in this VM now."""
        per_s = min(self.config.rate_max, vm.p2m.npages / (self.config.scan_time_min * 60.0))
        c = self.credit.get(vm.id, 0.0) + per_s * guest_seconds
        n = int(c)
        self.credit[vm.id] = c - n
        return n

    def scan(self, vm: "VM", npages: int) -> int:
        """Visit the next ``npages`` pages of ``vm``; returns how many were shared."""
        if not vm.config.pshare_enable or npages <= 0:
            return 0
        p2m = vm.p2m
        total = p2m.npages
        cur = self.cursor.get(vm.id, 0)
        salt = self.salt_of(vm)
        shared = 0
        mv = self.pool.mv
        state, value, large = p2m.state, p2m.value, p2m.large
        keep_large = not self.break_large
        pinned = vm.mmu.pinned
        for _ in range(min(npages, total)):
            gfn = cur
            cur += 1
            if cur >= total:
                cur = 0
                self.full_scans += 1
            if state.item(gfn) != _PRIVATE or pinned(gfn):
                continue
            off = value.item(gfn) << PAGE_SHIFT
            # Full compares below go through bytes: comparing two memoryviews is
            # element by element in CPython (12 us a page), bytes is a memcmp (0.5 us).
            page = mv[off:off + PAGE_SIZE]
            h = xxhash.xxh3_64_intdigest(page)
            self.pages_scanned += 1
            prev = self.last_hash.get((vm.id, gfn))
            self.last_hash[(vm.id, gfn)] = h
            if prev is not None and prev != h:
                self.pages_volatile += 1
            held = keep_large and large[gfn >> 9]  # a piece of a 2 MiB page that must stay whole
            if h == ZERO_HASH and page.tobytes() == ZERO_PAGE:
                if held:
                    self.lpage_shareable += 1
                    continue
                p2m.share(gfn, ZERO_FRAME)
                self.zero_shares += 1
                shared += 1
                continue
            key = (salt, h)
            target = self.shared.get(key)
            if target is not None:
                toff = target << PAGE_SHIFT
                if mv[toff:toff + PAGE_SIZE].tobytes() == page.tobytes():
                    if held:
                        self.lpage_shareable += 1
                        continue
                    p2m.share(gfn, target)
                    self.mappers[target].append((p2m, gfn))
                    self.shares += 1
                    shared += 1
                else:
                    self.collisions += 1
                continue
            hint = self.hints.get(key)
            if hint is not None and hint[0] is vm and hint[1] == gfn:
                continue  # its own hint from an earlier pass: still unmatched
            if hint is not None and (held or keep_large and hint[0].p2m.large[hint[1] >> 9]):
                self.lpage_shareable += 1  # a match, but one side is a large page in high
                continue
            if hint is not None and self._promote(hint, key, page):
                target = self.shared[key]
                p2m.share(gfn, target)
                self.mappers[target].append((p2m, gfn))
                self.shares += 1
                shared += 1
                continue
            self.hints[key] = (vm, gfn)
        self.cursor[vm.id] = cur
        return shared

    def _promote(self, hint: tuple, key: tuple, page: memoryview) -> bool:
        """A later match for a hint: re-check the hinted page; make it the shared frame."""
        hvm, hgfn = hint
        del self.hints[key]
        p2m = hvm.p2m
        if hvm.stopped or p2m.state.item(hgfn) != _PRIVATE:
            return False
        frame = int(p2m.value[hgfn])
        off = frame << PAGE_SHIFT
        hpage = self.pool.mv[off:off + PAGE_SIZE]
        if xxhash.xxh3_64_intdigest(hpage) != key[1] or hpage.tobytes() != page.tobytes():
            return False  # the hint is stale: its page changed since it was hashed
        p2m.share_in_place(hgfn)
        self.shared[key] = frame
        self.frame_key[frame] = key
        self.mappers[frame] = [(p2m, hgfn)]
        return True

    # -- content checksums -----------------------------------------------------------

    def verify(self, frame: int) -> str | None:
        """None if shared ``frame`` still holds what it was shared with, else why not."""
        if frame == ZERO_FRAME:
            want = ZERO_HASH
        else:
            key = self.frame_key.get(frame)
            if key is None:
                return None   # not (or no longer) a shared frame
            want = key[1]
        off = frame << PAGE_SHIFT
        if xxhash.xxh3_64_intdigest(self.pool.mv[off:off + PAGE_SIZE]) == want:
            return None
        self.checksum_failures += 1
        return f"shared frame {frame:#x} fails its content checksum (changed since it was shared)"

    def scrub(self, n: int) -> list[tuple[int, str]]:
        """Verify the zero frame and up to ``n`` shared frames, round-robin; return the bad ones.

        A bad frame is reported through ``on_corrupt`` with every guest page mapping it,
        so the host can stop those VMs before more of them read it.
        """
        frames = [ZERO_FRAME]
        shared = list(self.mappers)
        if shared and n > 0:
            start = self.scrub_cursor % len(shared)
            frames += (shared[start:] + shared[:start])[:n]
            self.scrub_cursor = start + n
        bad = []
        for frame in frames:
            why = self.verify(frame)
            self.frames_scrubbed += 1
            if why is None:
                continue
            bad.append((frame, why))
            if self.on_corrupt is not None:
                users = list(self.mappers.get(frame, ()))
                self.on_corrupt(frame, why, users)
        return bad

    def unshared(self, frame: int, p2m, gfn: int) -> None:
        """p2m hook: ``gfn`` stopped mapping the shared ``frame`` (copy-on-write, power-off).

        With one user left the frame is private again: its last user goes back to the
        PRIVATE state (its read-only translations simply fault once on a write).
        """
        users = self.mappers.get(frame)
        if users is None:
            return
        try:
            users.remove((p2m, gfn))
        except ValueError:
            pass
        if len(users) > 1:
            return
        why = self.verify(frame) if users else None  # the last user must not inherit damage
        del self.mappers[frame]
        key = self.frame_key.pop(frame, None)
        if key is not None and self.shared.get(key) == frame:
            del self.shared[key]
        for p, g in users:
            if p.state[g] == P2MState.SHARED and int(p.value[g]) == frame:
                p.state[g] = P2MState.PRIVATE
                self.pool.cow[frame] = False
        if why is not None and self.on_corrupt is not None:
            self.on_corrupt(frame, why, users)

    def forget_vm(self, vm: "VM") -> None:
        """A VM powered off: drop its hints and scan state."""
        self.hints = {k: v for k, v in self.hints.items() if v[0] is not vm}
        self.last_hash = {k: v for k, v in self.last_hash.items() if k[0] != vm.id}
        self.cursor.pop(vm.id, None)
        self.credit.pop(vm.id, None)

    # -- counters -----------------------------------------------------------------------

    def counters(self, vms: list["VM"]) -> dict[str, int]:
        """KSM-style host counters."""
        pool = self.pool
        frames = np.fromiter(self.shared.values(), dtype=np.int64, count=len(self.shared))
        refs = pool.refcount[frames].astype(np.int64) if len(frames) else np.zeros(0, np.int64)
        pages_shared = int(np.count_nonzero(refs >= 2))
        pages_sharing = int((refs[refs >= 2] - 1).sum()) if len(refs) else 0
        zero = sum(vm.p2m.zero_pages() for vm in vms)
        items = len(self.hints) + sum(vm.p2m.count(P2MState.SHARED) for vm in vms)
        return {
            "pages_shared": pages_shared,
            "pages_sharing": pages_sharing,
            "pages_unshared": len(self.hints),
            "pages_volatile": self.pages_volatile,
            "pages_zero": zero,
            "full_scans": self.full_scans,
            "pages_scanned": self.pages_scanned,
            "hash_collisions": self.collisions,
            "lpage_shareable": self.lpage_shareable,
            "frames_scrubbed": self.frames_scrubbed,
            "shared_checksum_failures": self.checksum_failures,
            "general_profit": (pages_sharing + zero) * PAGE_SIZE - items * RMAP_ITEM_BYTES,
        }
