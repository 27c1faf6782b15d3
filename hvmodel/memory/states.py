"""Host memory states: how much free machine memory the host has, against minFree.

ESXi 6.x names five states by free memory as a percentage of ``minFree``, and
each state turns on more reclamation:

=====  =============  ===========================================================
state  free ≥         actions
=====  =============  ===========================================================
high   400 %          none besides the background sharing scan
clear  100 %          break large pages, run page sharing actively
soft    64 %          + ballooning
hard    32 %          + compression and hypervisor swapping (ballooning stops)
low     16 %          + block allocations of VMs above their target
=====  =============  ===========================================================

How the thresholds are read (the source is secondary, so this is a choice,
documented and configurable): each percentage is the *lower bound* of its state —
esxtop showed "clear" at 255 % of minFree, inside 100–400 %. Below 16 % the host
stays ``low``. Moving to a *lower* state happens as soon as free memory falls
under the current state's bound; moving back *up* needs free memory above the
higher state's bound by ``hysteresis`` (10 % by default), so the state does not
flap at a boundary.

``minFree`` follows ESXi's sliding scale — 6 % of the first 4 GiB, 4 % of 4–12
GiB, 2 % of 12–28 GiB, 1 % of the rest — computed on the model's host size, or a
fixed percentage (``Mem.MemMinFreePct``; 0 = the sliding scale).
"""

from __future__ import annotations

from dataclasses import dataclass, field

GIB = 1 << 30
STATES = ("high", "clear", "soft", "hard", "low")
DEFAULT_BOUNDS = {"high": 4.00, "clear": 1.00, "soft": 0.64, "hard": 0.32, "low": 0.16}


def min_free(host_bytes: int, pct: float = 0.0) -> int:
    """ESXi's minFree for a host of ``host_bytes``: the sliding scale, or ``pct`` % if set."""
    if pct:
        return int(host_bytes * pct / 100)
    bands = ((4 * GIB, 0.06), (8 * GIB, 0.04), (16 * GIB, 0.02))  # widths of the 0-4, 4-12, 12-28 GiB bands
    left = host_bytes
    total = 0.0
    for width, rate in bands:
        part = min(left, width)
        total += part * rate
        left -= part
        if left <= 0:
            break
    total += max(0, left) * 0.01
    return int(total)


@dataclass
class MemoryStates:
    """The host's current state, with hysteresis."""

    min_free_bytes: int
    bounds: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_BOUNDS))
    hysteresis: float = 0.10
    state: str = "high"
    transitions: int = 0
    worst: str = "high"      # the lowest state since the last take_worst() (timeline points)

    def update(self, free_bytes: int) -> str:
        """Re-evaluate the state for ``free_bytes`` of free machine memory; returns it."""
        ratio = free_bytes / max(1, self.min_free_bytes)
        order = STATES
        i = order.index(self.state)
        # Down: as soon as free memory is under the current state's lower bound.
        while i < len(order) - 1 and ratio < self.bounds[order[i]]:
            i += 1
        # Up: only with a margin above the higher state's bound.
        while i > 0 and ratio >= self.bounds[order[i - 1]] * (1 + self.hysteresis):
            i -= 1
        new = order[i]
        if new != self.state:
            self.transitions += 1
            self.state = new
            if i > order.index(self.worst):
                self.worst = new
        return new

    def take_worst(self) -> str:
        """The lowest state reached since the last call (a state can fall and recover
        inside one round-robin round); starts again from the current state."""
        w, self.worst = self.worst, self.state
        return w

    def at_least(self, state: str) -> bool:
        """Is the host in ``state`` or a worse one?"""
        return STATES.index(self.state) >= STATES.index(state)
