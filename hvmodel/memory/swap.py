"""Hypervisor swapping: which guest pages leave RAM for the VM's swap file.

The last resort of ESXi's reclamation (after sharing, ballooning and compression):
the VMM knows nothing about how the guest uses a page, so its victims are blind.
ESXi picks them at random; the ``clock`` policy is the alternative that uses the
accessed bits the MMUs see (EPT A bits under nested paging, installed shadow leaves
under shadow paging), clearing them as the hand passes so a page must be touched
again to survive the next round.

Victims are never pages the current fill is using (the p2m's ``recent`` list) nor
pages an MMU pins (the guest page tables a shadow MMU shadows). The random stream
is seeded, so a run stays a function of its inputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..mmu.p2m import P2MState

if TYPE_CHECKING:
    from ..vm.vm import VM

POLICIES = ("random", "clock")


class HypervisorSwap:
    """Victim selection and swap-out for one host."""

    def __init__(self, policy: str = "random", seed: int = 0) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown swap policy {policy!r} (have: {', '.join(POLICIES)})")
        self.policy = policy
        self.rng = np.random.default_rng(seed)
        self.hands: dict[int, int] = {}

    def victims(self, vm: "VM", n: int) -> list[int]:
        """Up to ``n`` private pages of ``vm`` to swap out."""
        p2m = vm.p2m
        if self.policy == "clock":
            return self._clock(vm, n)
        candidates = np.flatnonzero(p2m.state == P2MState.PRIVATE)
        if not len(candidates):
            return []
        picks = self.rng.permutation(candidates)
        out = []
        recent = set(p2m.recent)
        for g in picks:
            g = int(g)
            if g in recent or vm.mmu.pinned(g):
                continue
            out.append(g)
            if len(out) == n:
                break
        return out

    def _clock(self, vm: "VM", n: int) -> list[int]:
        p2m = vm.p2m
        total = p2m.npages
        hand = self.hands.get(vm.id, 0)
        recent = set(p2m.recent)
        out: list[int] = []
        for _ in range(2 * total):  # two sweeps: the second finds pages whose bit was cleared
            g = hand
            hand = (hand + 1) % total
            if p2m.state[g] != P2MState.PRIVATE or g in recent or vm.mmu.pinned(g):
                continue
            if vm.mmu.test_and_clear_accessed(g):
                continue
            out.append(g)
            if len(out) == n:
                break
        self.hands[vm.id] = hand
        return out

    def swap_out(self, vm: "VM", n: int) -> int:
        """Swap up to ``n`` pages of ``vm`` out; returns how many left RAM."""
        done = 0
        for g in self.victims(vm, n):
            vm.p2m.swap_out(g)
            done += 1
        return done

    def reclaim(self, vm: "VM", n: int) -> tuple[int, int]:
        """Take up to ``n`` pages of ``vm`` out of RAM, compressing those that allow it
        (when the VM has a compression cache) and swapping the rest; (zipped, swapped)."""
        zipped = swapped = 0
        for g in self.victims(vm, n):
            if vm.p2m.reclaim_page(g) == "zip":
                zipped += 1
            else:
                swapped += 1
        return zipped, swapped
