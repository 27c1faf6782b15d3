"""Running the guest workloads (W1-W4) under the reference and the VMM modes, alternating.

A repetition runs every mode once, in a rotated order (native, nested, shadow; then
nested, shadow, native; ...), so slow phases of a shared machine hit every mode alike.
Each run is a fresh host with one VM, driven exactly as ``hvmodel run`` drives it
(``Host.run``: round-robin quanta, the memory policy between them). Only the guest's
measured region is timed: the bench attaches a POST-code device on port 0x80 that
takes the time and the VM's counters when the guest writes 1 (begin) and 2 (end).

The ratio of a mode is *its region time / the reference's region time in the same
repetition*; the report gives the median over repetitions and the spread (min-max).
The runs must agree with each other or the bench fails: every mode exits 0, prints the
reference's console, and executes the same number of instructions in the region.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

from ..guest.image import GuestImage
from ..host.host import Host, HostConfig
from ..vm.vm import VM, VMConfig
from .workloads import Workload

MODES = ("native", "nested", "shadow")
PORT_POST = 0x80
MARK_BEGIN = 1
MARK_END = 2
MAX_INSNS = 400_000_000


class BenchError(RuntimeError):
    """A workload did not run as defined (a mode failed, disagreed, or missed a marker)."""


class RegionMarker:
    """The POST-code port as a stopwatch: times the guest's measured region."""

    ports = (PORT_POST,)

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        self.t0 = self.t1 = 0.0
        self.i0 = self.i1 = -1
        self.c0: dict[str, int] = {}
        self.c1: dict[str, int] = {}

    def read(self, port: int, size: int) -> int:
        return 0xFF

    def write(self, port: int, size: int, value: int) -> None:
        # Counters are taken outside the timed window: before the start, after the stop.
        if value == MARK_BEGIN:
            self.c0 = flat_counters(self.vm.counters())
            self.i0 = self.vm.clock()
            self.t0 = time.perf_counter()
        elif value == MARK_END:
            self.t1 = time.perf_counter()
            self.i1 = self.vm.clock()
            self.c1 = flat_counters(self.vm.counters())

    @property
    def complete(self) -> bool:
        return self.i0 >= 0 and self.i1 >= self.i0


def flat_counters(c: dict[str, object]) -> dict[str, int]:
    """The integer counters of a VM, with dict-valued ones flattened as ``name.key``."""
    out: dict[str, int] = {}
    for k, v in c.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, int):
            out[k] = v
        elif isinstance(v, dict):
            for kk, vv in v.items():
                if isinstance(vv, int):
                    out[f"{k}.{kk}"] = vv
    return out


@dataclass
class Sample:
    """One run of one workload in one mode: the measured region."""

    seconds: float
    insns: int
    counters: dict[str, int]     # deltas over the region
    console: str


def run_once(w: Workload, image: GuestImage, mode: str) -> Sample:
    """Run the workload once in ``mode`` on a fresh host; return its measured region."""
    host = Host(HostConfig())
    try:
        vm = host.power_on(VMConfig(name=f"{w.name}-{mode}", memsize=w.memsize, mmu=mode), image)
        marker = RegionMarker(vm)
        vm.io.attach(marker)
        r = host.run(MAX_INSNS)[0]
        if r.exit_status != 0:
            raise BenchError(f"{w.name} under {mode}: {r.stop_reason}: {r.message}\n{r.console}")
        if not marker.complete:
            raise BenchError(f"{w.name} under {mode}: the guest did not mark its measured region "
                             f"(POST codes 1 and 2 on port 0x80)")
        deltas = {k: v - marker.c0.get(k, 0) for k, v in marker.c1.items()}
        return Sample(marker.t1 - marker.t0, marker.i1 - marker.i0, deltas, r.console)
    finally:
        host.close()


@dataclass
class ModeResult:
    """Every repetition of one mode of one workload."""

    samples: list[Sample] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)   # vs native, same repetition

    @property
    def insns(self) -> int:
        return self.samples[0].insns

    @property
    def ips(self) -> float:
        """Guest instructions per second in the region (median over repetitions)."""
        return statistics.median(s.insns / s.seconds for s in self.samples)

    def summary(self, native: bool) -> dict[str, object]:
        last = self.samples[-1]
        d: dict[str, object] = {
            "ips": round(self.ips),
            "seconds": [round(s.seconds, 6) for s in self.samples],
            "instructions": self.insns,
            "fills_per_1k": round(1000 * last.counters.get("tlb_fills", 0) / max(1, last.insns), 3),
        }
        if not native:
            d["ratio"] = round(statistics.median(self.ratios), 3)
            d["ratio_min"] = round(min(self.ratios), 3)
            d["ratio_max"] = round(max(self.ratios), 3)
        d["counters"] = {k: v for k, v in last.counters.items() if v and k in REPORTED}
        return d


# The counters that say what a mode spent its time on (region deltas).
REPORTED = ("tlb_fills", "tlb_flushes", "walks", "walk_refs", "ntlb_hits", "ept_violations",
            "shadow_hits", "hidden_faults", "tracing_faults", "guest_walks", "root_switches",
            "root_reloads", "resyncs", "oos_events", "zaps", "shadow_pages_created",
            "invlpg_exits", "guest_page_faults", "exits.slice_end", "exits.exception")


def run_workload(w: Workload, reps: int, quick: bool, modes: tuple[str, ...] = MODES,
                 progress=None) -> dict[str, ModeResult]:
    """All repetitions of one workload, modes alternating; checks that the modes agree."""
    image = w.image(quick)
    results = {m: ModeResult() for m in modes}
    for rep in range(reps):
        order = modes[rep % len(modes):] + modes[:rep % len(modes)]
        for mode in order:
            s = run_once(w, image, mode)
            results[mode].samples.append(s)
            if progress is not None:
                progress(f"{w.name} rep {rep + 1}/{reps} {mode}: {s.seconds:.3f} s, {s.insns:,} insns")
        ref = results["native"].samples[rep]
        for mode in modes:
            s = results[mode].samples[rep]
            if s.console != ref.console:
                raise BenchError(f"{w.name}: the console under {mode} differs from the reference's:\n"
                                 f"--- native\n{ref.console}\n--- {mode}\n{s.console}")
            if s.insns != ref.insns:
                raise BenchError(f"{w.name}: {mode} ran {s.insns:,} instructions in the region, "
                                 f"the reference {ref.insns:,}")
            results[mode].ratios.append(s.seconds / ref.seconds)
    if not quick and results["native"].insns < w.min_region_insns:
        raise BenchError(f"{w.name}: the region ran {results['native'].insns:,} instructions, "
                         f"the definition needs at least {w.min_region_insns:,}")
    return results
