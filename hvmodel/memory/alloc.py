"""Allocation: how much machine memory each VM should have (its target).

ESX's proportional-share allocation (Waldspurger, OSDI 2002):

* a VM has **shares** ``S`` (``sched.mem.shares``: low / normal / high = 5 / 10 / 20 per
  MB of configured memory, or a number), a **reservation** (``sched.mem.min``, never
  reclaimed) and a **limit** (``sched.mem.max``, never exceeded);
* the **idle memory tax** charges idle pages more: with ``Mem.IdleTax`` τ (75 %),
  k = 1 / (1 − τ) and active fraction f, a VM's shares-per-page ratio is
  ρ = S / (P · (f + k (1 − f)));
* **min-funding revocation** takes memory from the VM with the lowest ρ. Repeated
  until the host fits, that equalises ρ: the targets are where every VM's ρ is the same,
  clamped to [reservation, limit] by water-filling.

How f and P relate (a reading of the paper, documented because it matters): sampling
measures the active fraction of the VM's *guest memory*, so a VM has A = f_sampled ·
(configured pages) active pages whatever it is given; of an allocation P the active
fraction is f = A / P (1 if P ≤ A). Then ρ(P) = S / (A + k(P − A)) for P ≥ A and S / P
below, and the P that gives a level ρ = 1/λ is P = Sλ while Sλ ≤ A, else A + (Sλ − A)/k:
active pages are paid for at 1, idle ones at k. (Treating f as a constant fraction of
any P would tax a busy VM's untouched memory as if it were part of what it uses.)

The active fraction comes from **statistical sampling**: each period, n random guest
pages have their translations invalidated; the fraction touched again by the end of
the period estimates f. A fast and a slow moving average smooth it and the larger
is used — quick to rise, slow to fall.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SHARES_PER_MB = {"low": 5, "normal": 10, "high": 20}


def shares_of(setting: str | int, memsize_mb: float) -> float:
    """``sched.mem.shares`` → shares: low/normal/high per MB of configured memory, or a number."""
    if isinstance(setting, str) and setting in SHARES_PER_MB:
        return SHARES_PER_MB[setting] * memsize_mb
    try:
        value = float(setting)
    except (TypeError, ValueError):
        raise ValueError(f"sched.mem.shares must be low, normal, high or a number, got {setting!r}") from None
    if value <= 0:
        raise ValueError(f"sched.mem.shares must be positive, got {setting!r}")
    return value


def idle_tax_k(tau: float) -> float:
    """k = 1 / (1 − τ): the cost of an idle page in active pages (τ = 0.75 → 4)."""
    if not 0 <= tau < 1:
        raise ValueError(f"Mem.IdleTax must be in [0, 100) %, got {tau * 100:g} %")
    return 1.0 / (1.0 - tau)


def rho(shares: float, pages: float, active: float, tau: float) -> float:
    """Shares per page with the idle memory tax: ρ = S / (P · (f + k(1 − f)))."""
    k = idle_tax_k(tau)
    return shares / (max(pages, 1e-9) * (active + k * (1.0 - active)))


@dataclass
class Claim:
    """What the allocator knows about one VM (sizes in pages)."""

    shares: float
    active: float            # estimated active fraction of its guest memory, in [0, 1]
    reservation: int = 0
    limit: int = 0           # maximum pages (its memsize, or sched.mem.max)
    size: int = 0            # configured pages (0: the limit)


def targets(claims: list[Claim], available: int, tau: float = 0.75) -> list[int]:
    """Pages each VM should have so that ρ is equal where no bound binds (water-filling)."""
    n = len(claims)
    if not n:
        return []
    k = idle_tax_k(tau)
    shares = np.array([c.shares for c in claims], dtype=np.float64)
    act = np.array([c.active * (c.size or c.limit) for c in claims], dtype=np.float64)
    lo = np.array([c.reservation for c in claims], dtype=np.float64)
    hi = np.array([max(c.limit, c.reservation) for c in claims], dtype=np.float64)

    def alloc(lam: float) -> np.ndarray:
        # The allocation at which each VM's ρ is 1/λ: S·λ pages while all of them are
        # active, then one page per k of shares·λ beyond its active pages.
        x = shares * lam
        p = np.where(x <= act, x, act + (x - act) / k)
        return np.clip(p, lo, hi)

    # Water-filling: find the level λ with Σ alloc_i(λ) = available (the sum grows with
    # λ, so bisection finds it).
    def total(lam: float) -> float:
        return float(alloc(lam).sum())

    if total(0.0) >= available:
        out = lo.copy()                      # the reservations alone use everything
    elif total(1e18) <= available:
        out = hi.copy()                      # everyone gets its limit
    else:
        a, b = 0.0, 1.0
        while total(b) < available:
            b *= 2
        for _ in range(100):
            m = (a + b) / 2
            if total(m) < available:
                a = m
            else:
                b = m
        out = alloc(b)
    return [int(x) for x in np.floor(out + 1e-6)]


@dataclass
class ActivitySampler:
    """Active-memory estimation for one VM by sampling (ESX's statistical sampling)."""

    samples: int = 100               # pages per period (the paper's n)
    fast_alpha: float = 0.5
    slow_alpha: float = 0.1
    fast: float = 1.0                # start as "all active": no tax before any evidence
    slow: float = 1.0
    chosen: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    periods: int = 0
    last: float = 1.0

    def begin(self, vm, rng: np.random.Generator) -> None:
        """Pick the period's sample and invalidate its translations.

        The p2m's change notification zaps every cached translation of a sampled page
        (EPT leaf, shadow leaves, TLB), so the MMU's slow path sees the next access.
        """
        p2m = vm.p2m
        npages = p2m.npages
        self.chosen = rng.choice(npages, size=min(self.samples, npages), replace=False)
        p2m.set_watch({int(g) for g in self.chosen})
        for g in p2m.watch:
            p2m.changed(g)

    def end(self, vm) -> float:
        """Count the sampled pages touched since :meth:`begin`; update the averages."""
        if not len(self.chosen):
            return self.estimate
        p2m = vm.p2m
        touched = len(p2m.watch_touched)
        # The watch stays until the next begin() replaces it: ending and beginning
        # in one step keeps large pages that stay watched split (memory/p2m.set_watch).
        f = touched / len(self.chosen)
        self.last = f
        self.fast += self.fast_alpha * (f - self.fast)
        self.slow += self.slow_alpha * (f - self.slow)
        self.periods += 1
        self.chosen = np.zeros(0, dtype=np.int64)
        return self.estimate

    @property
    def estimate(self) -> float:
        """The active fraction used for the idle tax: the larger of the two averages."""
        return max(self.fast, self.slow)
