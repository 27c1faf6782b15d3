"""Ballooning, the host side: one :class:`Balloon` per VM (ESX's ``vmmemctl`` state).

A balloon driver inside the guest allocates guest pages it promises not to touch and
reports their guest page numbers through the back-door (``devices/backdoor.py``, the VMware
protocol, which also defines its status codes and capabilities); the host frees the machine frames behind them (``P2M.balloon``). Deflating
is the reverse: the driver unlocks a page (``P2M.unballoon``: it reads as zero until
the guest touches it again) and gives it back to its own allocator. The guest's own
memory manager picks the victims: it knows which pages are free, the host does not.

What the host controls:

``target``
    pages the host wants in the balloon; the host's memory policy sets it (a setter).
    The guest sees the *effective* target, ``min(target, max)`` (``MCTLTGT``).
``max``
    the most the balloon may hold (``MCTLMAX``): ``Mem.CtlMaxPercent`` (default 65) %
    of guest memory, and at most ``sched.mem.maxmemctl`` when that is set. The
    per-VM limit is given in **bytes** (``VMConfig.maxmemctl``, like ``memsize``;
    the .vmx option is in MB) and rounded down to pages. A LOCK beyond ``max`` is
    refused with ``PPN_NOTNEEDED`` ("would exceed limit").

Counters, with esxtop's names (pages; divide by 256 for MB): ``MCTL?`` (1 while a driver
is active: after a START that granted capabilities), ``MCTLSZ`` (pages locked),
``MCTLTGT`` (effective target), ``MCTLMAX``, plus ``balloon_violations`` (guest touches
of ballooned pages, counted by the p2m) and ``balloon_locks`` / ``balloon_unlocks`` /
``balloon_refused`` (LOCKs refused for any reason).

A page the guest touches after locking it stays in the balloon's books (the driver
still owns it and will UNLOCK it); the p2m has backed it again with a zeroed frame.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..devices.backdoor import HOST_CAPABILITIES, BalloonStatus
from ..machine.pool import PAGE_SHIFT

if TYPE_CHECKING:
    from ..mmu.p2m import P2M

CTL_MAX_PERCENT = 65  # Mem.CtlMaxPercent


class Balloon:
    """The host's view of one VM's balloon: target, limit, the locked pages."""

    def __init__(self, p2m: "P2M", *, max_percent: int = CTL_MAX_PERCENT,
                 maxmemctl: int | None = None) -> None:
        self.p2m = p2m
        self.npages = p2m.npages
        self._max_percent = max_percent
        self._maxmemctl = maxmemctl
        self._target = 0
        self.locked: set[int] = set()
        self.active = False           # MCTL?
        self.capabilities = 0         # granted at START
        self.guest_id: int | None = None
        self.guest_limit: int | None = None  # the guest's total pages (GET_TARGET's argument)
        self.locks = 0
        self.unlocks = 0
        self.refused = 0
        self.starts = 0
        self._max = self._compute_max()

    # -- limits and target ------------------------------------------------------------

    def _compute_max(self) -> int:
        m = self.npages * self._max_percent // 100
        if self._maxmemctl is not None:
            m = min(m, max(0, self._maxmemctl) >> PAGE_SHIFT)
        return m

    @property
    def max(self) -> int:
        """MCTLMAX: the most pages the balloon may hold."""
        return self._max

    @property
    def max_percent(self) -> int:
        """Mem.CtlMaxPercent (a host setting; the host may change it)."""
        return self._max_percent

    @max_percent.setter
    def max_percent(self, pct: int) -> None:
        if not 0 <= pct <= 100:
            raise ValueError(f"Mem.CtlMaxPercent must be 0..100, got {pct}")
        self._max_percent = pct
        self._max = self._compute_max()

    @property
    def maxmemctl(self) -> int | None:
        """sched.mem.maxmemctl in bytes, or None."""
        return self._maxmemctl

    @maxmemctl.setter
    def maxmemctl(self, nbytes: int | None) -> None:
        self._maxmemctl = nbytes
        self._max = self._compute_max()

    @property
    def target(self) -> int:
        """Pages the host asked for (before the limit)."""
        return self._target

    @target.setter
    def target(self, pages: int) -> None:
        if pages < 0:
            raise ValueError(f"balloon target must be >= 0 pages, got {pages}")
        self._target = int(pages)

    @property
    def effective_target(self) -> int:
        """MCTLTGT: what GET_TARGET tells the guest, min(target, max)."""
        return min(self._target, self._max)

    @property
    def size(self) -> int:
        """MCTLSZ: pages in the balloon."""
        return len(self.locked)

    # -- the driver's requests ------------------------------------------------------------

    def start(self, requested_caps: int) -> int:
        """START: (re)connect a driver; returns the capabilities granted.

        A driver sends START after it popped its balloon (a reset, a reload): every
        page the host still holds is given back to the guest, which may already be
        using them. A START asking for no capability (a driver unloading) leaves the
        balloon inactive.
        """
        self.starts += 1
        self.pop()
        self.capabilities = requested_caps & HOST_CAPABILITIES
        self.active = bool(self.capabilities)
        return self.capabilities

    def pop(self) -> None:
        """Forget every locked page (the guest freed them without unlocking)."""
        for gfn in sorted(self.locked):
            self.p2m.unballoon(gfn)
        self.locked.clear()

    def lock(self, gfn: int) -> BalloonStatus:
        """LOCK one guest page: its machine frame goes back to the host."""
        if gfn >= self.npages or gfn < 0:
            status = BalloonStatus.PPN_INVALID
        elif gfn in self.locked:
            status = BalloonStatus.PPN_LOCKED
        elif len(self.locked) >= self._max:
            status = BalloonStatus.PPN_NOTNEEDED  # would exceed the limit
        else:
            self.p2m.balloon(gfn)
            self.locked.add(gfn)
            self.locks += 1
            return BalloonStatus.SUCCESS
        self.refused += 1
        return status

    def unlock(self, gfn: int) -> BalloonStatus:
        """UNLOCK one guest page: the guest may use it again (it reads as zero)."""
        if gfn >= self.npages or gfn < 0:
            return BalloonStatus.PPN_INVALID
        if gfn not in self.locked:
            return BalloonStatus.PPN_UNLOCKED
        self.locked.discard(gfn)
        self.p2m.unballoon(gfn)  # False if the guest touched it meanwhile: it stays backed
        self.unlocks += 1
        return BalloonStatus.SUCCESS

    @property
    def generation(self) -> int:
        """Changes of the VM's p2m so far (a LOCK that freed a frame is one)."""
        return self.p2m.generation

    # -- reports ------------------------------------------------------------------------

    def counters(self) -> dict[str, object]:
        """esxtop's MEMCTL columns for this VM, in pages, and the balloon's own counts."""
        return {
            "MCTL?": int(self.active),
            "MCTLSZ": self.size,
            "MCTLTGT": self.effective_target,
            "MCTLMAX": self._max,
            "balloon_violations": self.p2m.balloon_violations,
            "balloon_locks": self.locks,
            "balloon_unlocks": self.unlocks,
            "balloon_refused": self.refused,
        }


__all__ = ["Balloon", "CTL_MAX_PERCENT"]
