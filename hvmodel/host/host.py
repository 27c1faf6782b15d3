"""The host: owns the machine pool and the VMs, admits them, schedules them, manages memory.

It sits below the run layer and above the memory policies and the VMs
(docs/ARCHITECTURE.md, "Layers"). The host runs its VMs' vCPUs round-robin in instruction slices
(``quantum``) and between slices runs the memory policy:

* **page sharing** at the configured rate (``Mem.ShareScanTime``,
  ``Mem.ShareRateMax``), in guest time — 10 ns per instruction;
* **reclamation** when free machine memory falls under the low watermark: sharing
  is tried first (a full scan of the VM that holds the most memory), then
  hypervisor swapping of that VM's pages;
* **laundering** of frames that held translated code (machine/pool.py).

An allocation that fails in the middle of a fill also reclaims (swapping), so an
overcommitted host keeps running as long as the swap files have room.

Admission (ESXi): a VM powers on only if its swap file — guest memory minus its
reservation — can be created. Its memory may exceed what is free: that is
overcommitment.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..guest.image import GuestImage
from ..machine.pool import PAGE_SIZE, ZERO_FRAME, MachinePool
from ..machine.swap import SwapDevice, SwapError
from ..memory.alloc import ActivitySampler, Claim, shares_of, targets
from ..memory.compress import CompressionCache
from ..memory.sharing import PageSharing, SharingConfig
from ..memory.states import MemoryStates, min_free
from ..memory.swap import HypervisorSwap
from ..mmu.p2m import P2M, GuestMemoryError, P2MState
from ..vm.exits import ExitReason, VmExit
from ..vm.vm import DEFAULT_MAX_INSNS, MIB, VM, VMConfig, VMError, VMResult

DEFAULT_HOST_MEM = 256 * MIB
DEFAULT_QUANTUM = 200_000          # instructions per VM per round-robin turn
NS_PER_INSN = 10                   # guest time (docs/GUEST-ABI.md)


class AdmissionError(VMError):
    """The host cannot power on a VM."""


@dataclass
class HostConfig:
    """Host-wide settings (ESXi advanced-setting names in the scenario files)."""

    memsize: int = DEFAULT_HOST_MEM
    sharing: SharingConfig = field(default_factory=SharingConfig)
    swap_dir: Path | None = None     # where the .vswp files go (default: a temporary folder)
    swap_policy: str = "random"      # ESXi picks victims at random; "clock" uses accessed bits
    seed: int = 0                    # the seed of every random choice the host makes
    quantum: int = DEFAULT_QUANTUM
    swap: bool = True                # give VMs swap files (overcommitment)
    min_free_pct: float = 0.0        # Mem.MemMinFreePct: 0 = ESXi's sliding scale
    idle_tax_pct: float = 75.0       # Mem.IdleTax
    sample_period_s: float = 0.05    # Mem.SamplePeriod in guest seconds (ESXi: 60; scaled to short runs)
    sample_pages: int = 100          # pages sampled per period (the paper's n)
    zip_max_pct: float = 10.0        # Mem.MemZipMaxPct: compression cache cap, % of VM memory
    zip_enable: bool = True          # Mem.MemZipEnable
    large_pages: bool = True         # Mem.AllocGuestLargePage: 2 MiB machine pages when possible
    share_scrub_pages: int = 1024    # shared frames whose content checksum each policy call verifies


class Host:
    """A machine pool and the VMs placed on it."""

    def __init__(self, config: HostConfig | None = None) -> None:
        self.config = config or HostConfig()
        try:
            self.pool = MachinePool(self.config.memsize)
        except ValueError as e:
            raise VMError(str(e)) from None
        self.vms: list[VM] = []
        self.sharing = PageSharing(self.pool, self.config.sharing)
        self.swapper = HypervisorSwap(self.config.swap_policy, self.config.seed)
        self._own_swap_dir = self.config.swap_dir is None
        self.swap_dir = Path(self.config.swap_dir) if self.config.swap_dir else None
        # Host memory states from free memory against minFree (memory/states.py).
        self.states = MemoryStates(min_free(self.config.memsize, self.config.min_free_pct))
        mf = self.states.min_free_bytes // PAGE_SIZE
        # In-fill reclaim frees at least this many frames at a time.
        self.low_water = max(16, int(mf * self.states.bounds["hard"]))
        self.high_water = max(2 * self.low_water, int(mf * self.states.bounds["soft"]))
        self.reclaims = 0
        self.timeline: list[dict] = []
        self.samplers: dict[int, ActivitySampler] = {}
        self.next_sample: dict[int, int] = {}
        self.rng = np.random.default_rng(self.config.seed)
        self.targets: dict[int, int] = {}
        self.balloon_set: dict[int, int] = {}   # balloon targets the host itself set
        self.final: dict[int, VMResult] = {}     # results of VMs powered off (memory released)
        # Called with a VM that stopped while others run, just before its memory is released
        # (fault-injection digests read its final memory here).
        self.before_power_off: list = []
        self.sharing.on_corrupt = self._corrupt

    # -- admission --------------------------------------------------------------------

    def overhead_frames(self, memsize: int) -> int:
        """VMM frames a fully touched VM of ``memsize`` bytes needs (nested tables)."""
        pages = memsize // PAGE_SIZE
        return (pages + 511) // 512 + 8

    def power_on(self, config: VMConfig, image: GuestImage) -> VM:
        """Admit and create a VM; without swap its memory must fit in the host."""
        name = config.name
        if any(vm.config.name == name for vm in self.vms):
            config.name = name = f"{name}-{len(self.vms) + 1}"
        native = config.mmu == "native"
        swap = None
        if not native:
            pages = config.memsize // PAGE_SIZE
            if self.config.swap:
                swap = self._swap_file(name, pages)
            else:
                committed = sum(vm.p2m.npages + self.overhead_frames(vm.config.memsize)
                                for vm in self.vms if vm.p2m is not None)
                need = pages + self.overhead_frames(config.memsize)
                usable = self.pool.nframes - 1
                if committed + need > usable:
                    raise AdmissionError(
                        f"cannot power on {name}: it needs {need * PAGE_SIZE // MIB} MiB of machine memory "
                        f"(guest memory {config.memsize // MIB} MiB + overhead), the host has "
                        f"{(usable - committed) * PAGE_SIZE // MIB} MiB left of "
                        f"{self.config.memsize // MIB} MiB and no swap to overcommit with")
        try:
            vm = VM(config, image, self.pool, vm_id=len(self.vms) + 1, swap=swap, host=self)
        except BaseException:
            if swap is not None:
                swap.close()
            raise
        if vm.p2m is not None and swap is not None and self.config.zip_enable:
            cap = int(vm.p2m.npages * self.config.zip_max_pct / 100)
            vm.p2m.zip = CompressionCache(self.pool, max_frames=max(1, cap // 4))
        self.vms.append(vm)
        return vm

    def _swap_file(self, name: str, pages: int) -> SwapDevice:
        if self.swap_dir is None:
            self.swap_dir = Path(tempfile.mkdtemp(prefix="hvmodel-swap-"))
        try:
            self.swap_dir.mkdir(parents=True, exist_ok=True)
            return SwapDevice(self.swap_dir / f"{name}.vswp", pages)
        except (SwapError, OSError) as e:
            raise AdmissionError(f"cannot power on {name}: no swap file: {e}") from None

    def attach(self, p2m: P2M) -> None:
        """Wire a VM's p2m to the host's reclaim and sharing hooks (VM calls this)."""
        p2m.reclaim = self._reclaim_now
        p2m.unshared = self.sharing.unshared
        p2m.verify_shared = self._verify_shared
        p2m.blocked = self._blocked
        p2m.large_ok = self.states.state == "high"
        p2m.large_enabled = p2m.large_enabled and self.config.large_pages

    def _blocked(self, p2m: P2M) -> bool:
        """In the ``low`` state a VM above its target may not allocate until memory is freed.

        Asked at every allocation, from free memory *now* (the state can fall inside a
        slice); a blocked VM stalls until the host's policy has reclaimed memory."""
        if self.states.update(self.pool.free_frames * PAGE_SIZE) != "low":
            return False
        target = self.targets.get(p2m.owner)
        if target is None:
            return False
        return self._consumed(p2m) > target

    # -- running ----------------------------------------------------------------------

    def run(self, max_insns: int = DEFAULT_MAX_INSNS, on_round=None) -> list[VMResult]:
        """Run every VM round-robin until all have stopped; results in power-on order.

        ``on_round(host)``, if given, is called after every round (live displays).
        """
        # Rounds end at common points of guest time, so a VM that halts (its clock jumps
        # to the next timer tick) and a busy one advance together.
        quantum = self.config.quantum
        round_end = 0
        while any(vm.running for vm in self.vms):
            round_end += quantum
            for vm in self.vms:
                if not vm.running or vm.clock() >= round_end:
                    continue
                before = vm.clock()
                while vm.running and vm.clock() < round_end:
                    ex = vm.step(max_insns, max(1, round_end - vm.clock()))
                    if ex is not None and ex.reason is ExitReason.BLOCKED:
                        # Its allocation waits for memory: the rest of the round is a stall.
                        vm.idle_insns += round_end - vm.clock()
                        break
                self.policy(vm, vm.clock() - before)
            self._record()
            if any(v.running for v in self.vms):
                for vm in self.vms:
                    if vm.stopped:
                        self._power_off(vm)
            if on_round is not None:
                on_round(self)
        return [self.final.get(vm.id) or vm.result() for vm in self.vms]

    def _power_off(self, vm: VM) -> None:
        """A VM stopped while others run: keep its result, give its memory back (ESXi frees a
        powered-off VM's memory; the last VMs keep theirs until close() for reports)."""
        if vm.id in self.final:
            return
        r = vm.result()
        if vm.triple_fault_report:
            r.message = vm.triple_fault_report
        self.final[vm.id] = r
        for cb in self.before_power_off:
            cb(vm)
        vm.close()

    def policy(self, vm: VM, insns: int) -> None:
        """Memory policy after one VM's slice of ``insns`` instructions of guest time.

        The host state (memory/states.py) decides what runs: the sharing scan always,
        faster from ``clear`` on; compression and swapping from ``hard`` on, until free
        memory is back at the ``soft`` bound.
        """
        if vm.p2m is None:
            return
        seconds = insns * NS_PER_INSN * 1e-9
        self.sharing.scrub(self.config.share_scrub_pages)
        self._sample(vm)
        state = self.states.update(self.pool.free_frames * PAGE_SIZE)
        self._compute_targets()
        # Large pages: new ones only in high; from clear on, sharing may break them.
        self.sharing.break_large = state != "high"
        for v in self.vms:
            if v.p2m is not None:
                v.p2m.large_ok = state == "high"
        boost = 1 if state == "high" else 8   # "clear" and worse: sharing runs actively
        for v in self.vms:
            if v.running and v.p2m is not None:
                self.sharing.scan(v, boost * self.sharing.pages_for(v, seconds / max(1, len(self.vms))))
        self._balloon(state)
        if self.states.at_least("hard"):
            want = int(self.states.min_free_bytes * self.states.bounds["soft"]) // PAGE_SIZE
            self.reclaim(max(want - self.pool.free_frames, self.low_water))
            self.states.update(self.pool.free_frames * PAGE_SIZE)
        self.pool.launder()

    # -- allocation: sampling, targets, ballooning -------------------------------------------

    def _sample(self, vm: VM) -> None:
        """Active-memory sampling, one period per ``sample_period_s`` of the VM's guest time."""
        period = max(1, int(self.config.sample_period_s * 1e9 / NS_PER_INSN))
        s = self.samplers.get(vm.id)
        if s is None:
            s = self.samplers[vm.id] = ActivitySampler(samples=self.config.sample_pages)
            s.begin(vm, self.rng)
            self.next_sample[vm.id] = vm.clock() + period
            return
        if vm.clock() >= self.next_sample[vm.id]:
            s.end(vm)
            s.begin(vm, self.rng)
            self.next_sample[vm.id] = vm.clock() + period

    def consumed(self, vm: VM) -> int:
        """Machine pages the VM holds: private ones, and shared ones except those mapping the
        zero frame (a shared frame counts once per user; a zero page costs nothing)."""
        return self._consumed(vm.p2m)

    @staticmethod
    def _consumed(p2m: P2M) -> int:
        st = p2m.state
        shared = st == P2MState.SHARED
        return int(np.count_nonzero(st == P2MState.PRIVATE)) + \
            int(np.count_nonzero(shared & (p2m.value != ZERO_FRAME)))

    def _compute_targets(self) -> None:
        """Proportional-share targets with the idle memory tax (memory/alloc.py)."""
        vms = [v for v in self.vms if v.p2m is not None and v.running]
        if not vms:
            return
        overhead = sum(v.mmu.overhead_frames() for v in vms)
        available = self.pool.nframes - 1 - overhead - self.states.min_free_bytes // PAGE_SIZE
        claims = []
        for v in vms:
            mb = v.p2m.npages * PAGE_SIZE / (1 << 20)
            s = self.samplers.get(v.id)
            claims.append(Claim(shares=shares_of(v.config.shares, mb),
                                active=s.estimate if s is not None else 1.0,
                                reservation=v.config.reservation // PAGE_SIZE,
                                limit=(v.config.limit or v.config.memsize) // PAGE_SIZE,
                                size=v.p2m.npages))
        for v, t in zip(vms, targets(claims, max(0, available), self.config.idle_tax_pct / 100)):
            self.targets[v.id] = t

    def _balloon(self, state: str) -> None:
        """Balloon targets: inflate in ``soft`` toward each VM's target, stop in ``hard``/``low``
        (hold), deflate when memory is plentiful (``high``)."""
        for v in self.vms:
            b = v.balloon
            if b is None or v.stopped:
                continue
            if state == "soft":
                excess = self.consumed(v) - self.targets.get(v.id, v.p2m.npages)
                want = max(b.target, min(b.max, b.size + max(0, excess)))
                if want != b.target:
                    b.target = want
                    self.balloon_set[v.id] = want
            elif state == "high" and self.balloon_set.get(v.id):
                # Memory is plentiful again: deflate what the host asked for (a target
                # set by someone else — a test, a user — is left alone).
                b.target = 0
                self.balloon_set[v.id] = 0

    def reclaim(self, n: int) -> int:
        """Free up to ``n`` frames: sharing first, then swapping (between slices)."""
        freed = 0
        for vm in self._by_consumption():
            # Sharing first, but bounded: a few pages per page wanted, not a full scan
            # every time memory is tight (that would hash the same pages over and over).
            before = self.pool.free_frames
            self.sharing.scan(vm, min(vm.p2m.npages, 4 * n))
            freed += self.pool.free_frames - before
            if freed >= n:
                return freed
        return freed + self._swap(n - freed)

    def _reclaim_now(self, n: int, requester: P2M) -> int:
        """An allocation failed inside a fill: swap something out right away."""
        self.reclaims += 1
        return self._swap(max(n, self.low_water))

    def _swap(self, n: int) -> int:
        """Take ``n`` pages out of RAM: compressed where it pays, swapped otherwise."""
        done = 0
        for vm in self._by_consumption():
            if vm.p2m.swap is None:
                continue
            try:
                z, s = self.swapper.reclaim(vm, n - done)
            except GuestMemoryError as e:
                # A swap write or decompression failed: that VM's page is lost, stop it —
                # not the VM whose allocation asked for the reclaim.
                self._fail_vm(vm, str(e))
                continue
            done += z + s
            if done >= n:
                break
        return done

    # -- damaged memory ---------------------------------------------------------------------

    def _fail_vm(self, vm: VM, message: str) -> None:
        """Stop ``vm`` because the host lost or damaged its memory (``message`` names the page)."""
        if vm.stopped:
            return
        if vm.vcpu._running:
            # Inside this VM's own fill (an in-fill reclaim): end the slice now.
            vm.vcpu.request_exit(VmExit(ExitReason.ERROR, message=message))
        vm._stop("host_failure", message, status=None)

    def _verify_shared(self, frame: int) -> str | None:
        """p2m hook before a copy-on-write break: a damaged shared frame stops all its users."""
        why = self.sharing.verify(frame)
        if why is not None:
            self._corrupt(frame, why, list(self.sharing.mappers.get(frame, ())))
        return why

    def _corrupt(self, frame: int, why: str, users: list) -> None:
        """A shared frame failed its checksum: stop every VM that maps it, naming its page."""
        by_p2m = {id(v.p2m): v for v in self.vms if v.p2m is not None}
        if frame == ZERO_FRAME:
            # Every untouched or zero-shared page reads through the zero frame.
            for v in by_p2m.values():
                st, val = v.p2m.state, v.p2m.value
                hit = np.flatnonzero(((st == P2MState.SHARED) & (val == ZERO_FRAME)) | (st == P2MState.UNBACKED))
                if len(hit):
                    users = users + [(v.p2m, int(hit[0]))]
        for p2m, gfn in users:
            v = by_p2m.get(id(p2m))
            if v is not None:
                self._fail_vm(v, str(GuestMemoryError(gfn, why, host_failure=True)))

    def _by_consumption(self) -> list[VM]:
        """VMs to reclaim from, first the one furthest above its target (min-funding revocation)."""
        vms = [v for v in self.vms if v.p2m is not None and not v.stopped]
        return sorted(vms, key=lambda v: -(self.consumed(v) - self.targets.get(v.id, v.p2m.npages)))

    # -- reports ----------------------------------------------------------------------------

    def _record(self) -> None:
        """One point of the timeline per round-robin round (plots, reports)."""
        point = {"time_s": max((v.clock() for v in self.vms), default=0) * NS_PER_INSN * 1e-9,
                 "state": self.states.take_worst(), "free": self.pool.free_frames, "vms": {}}
        for v in self.vms:
            if v.p2m is None:
                continue
            p = v.p2m
            b = v.balloon
            point["vms"][v.config.name] = {
                "consumed": int(np.count_nonzero(p.state == P2MState.PRIVATE)),
                "shared": p.count(P2MState.SHARED),
                "ballooned": p.count(P2MState.BALLOONED),
                "compressed": p.count(P2MState.COMPRESSED),
                "swapped": p.count(P2MState.SWAPPED),
                "target": self.targets.get(v.id, 0),
                "balloon_target": b.target if b is not None else 0,
                "active": self.samplers[v.id].estimate if v.id in self.samplers else 1.0,
                "running": v.running,
            }
        self.timeline.append(point)

    def counters(self) -> dict[str, object]:
        """Host-wide counters: PMEM, PSHARE (esxtop) and KSM's names."""
        p = self.pool
        vms = [vm for vm in self.vms if vm.p2m is not None]
        ksm = self.sharing.counters(vms)
        shared = sum(vm.p2m.count(P2MState.SHARED) for vm in vms)
        common = ksm["pages_shared"] + (1 if ksm["pages_zero"] else 0)
        return {
            "memsize": self.config.memsize,
            "frames": p.nframes,
            "frames_used": p.used_frames,
            "frames_free": p.free_frames,
            "frame_allocs": p.allocs,
            "frame_frees": p.frees,
            "PSHARE": {"shared": shared, "common": common, "saving": shared - common},
            **ksm,
            "reclaims_in_fill": self.reclaims,
            "launders": p.launders,
            "state": self.states.state,
            "minfree_bytes": self.states.min_free_bytes,
            "state_transitions": self.states.transitions,
            "zipped": sum(vm.p2m.zip.zipped for vm in vms if vm.p2m.zip is not None),
            "zip_saved_frames": sum(len(vm.p2m.zip.entries) - len(vm.p2m.zip.frames)
                                    for vm in vms if vm.p2m.zip is not None),
        }

    def close(self) -> None:
        """Power everything off: frames back to the pool, swap files deleted."""
        for vm in self.vms:
            vm.close()
        if self._own_swap_dir and self.swap_dir is not None:
            shutil.rmtree(self.swap_dir, ignore_errors=True)

    def __enter__(self) -> "Host":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
