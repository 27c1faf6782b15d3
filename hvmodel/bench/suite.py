"""``hvmodel bench``: the whole suite, its JSON shape and its table.

JSON (``--json``)::

    {"W1": {"title": ..., "native": {"ips": ...}, "nested": {"ips": ..., "ratio": ...},
            "shadow": {...}}, ..., "W5": {"pages_per_s": ..., "shared_fraction": ...},
     "W6": {"out_mb_per_s": ..., "in_mb_per_s": ...}, "meta": {...}}

``ratio`` = the mode's region time / the reference's region time in the same
repetition, median over repetitions (``ratio_min``/``ratio_max`` give the spread).
"""

from __future__ import annotations

import platform
import sys
from typing import Callable

import unicorn

from .runner import MODES, ModeResult, run_workload
from .scans import MIB, sharing_scan, swap_roundtrip
from .workloads import WORKLOADS

ALL = tuple(w.name for w in WORKLOADS) + ("W5", "W6")


def run_suite(*, quick: bool = False, reps: int | None = None, only: tuple[str, ...] = ALL,
              progress: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Run the selected workloads; returns the JSON-shaped result."""
    reps = reps if reps is not None else (1 if quick else 5)
    out: dict[str, dict] = {}
    for w in WORKLOADS:
        if w.name not in only:
            continue
        res: dict[str, ModeResult] = run_workload(w, reps, quick, MODES, progress)
        out[w.name] = {"title": w.title,
                       **{m: r.summary(native=m == "native") for m, r in res.items()}}
    if "W5" in only:
        if progress:
            progress("W5 sharing scan")
        out["W5"] = {"title": "sharing scan: 8 VMs with identical content",
                     **(sharing_scan(8, 4 * MIB) if quick else sharing_scan(8, 64 * MIB))}
    if "W6" in only:
        if progress:
            progress("W6 swap")
        out["W6"] = {"title": "swap-out and swap-in",
                     **(swap_roundtrip(2 * MIB) if quick else swap_roundtrip(16 * MIB))}
    out["meta"] = {"quick": quick, "reps": reps, "python": platform.python_version(),
                   "unicorn": unicorn.__version__, "machine": platform.machine()}
    return out


def format_table(res: dict[str, dict]) -> str:
    """The human-readable report."""
    meta = res.get("meta", {})
    lines = [f"hvmodel bench ({'quick smoke run: sizes reduced, not comparable to the targets; ' if meta.get('quick') else ''}"
             f"{meta.get('reps')} repetitions, modes alternating; ratio = mode time / native time "
             f"in the same repetition: median [min-max])"]
    for name, r in res.items():
        if name in ("meta", "W5", "W6"):
            continue
        lines.append(f"{name} {r['title']}: {r['native']['instructions']:,} instructions in the region")
        lines.append(f"  {'mode':<7} {'M insn/s':>9} {'ratio':>22} {'fills/1k':>9}  counters (region)")
        for m in MODES:
            d = r[m]
            ratio = "1.00" if m == "native" else f"{d['ratio']:.2f} [{d['ratio_min']:.2f}-{d['ratio_max']:.2f}]"
            counters = " ".join(f"{k}={v:,}" for k, v in d["counters"].items()) or "-"
            lines.append(f"  {m:<7} {d['ips'] / 1e6:>9.2f} {ratio:>22} {d['fills_per_1k']:>9.2f}  {counters}")
    if "W5" in res:
        r = res["W5"]
        lines.append(f"W5 {r['title']}: {r['vms']} VMs x {r['pages'] // r['vms']:,} pages, "
                     f"{r['pages_hashed']:,} pages hashed in {r['seconds']:.3f} s = "
                     f"{r['pages_per_s']:,} pages/s (hashing alone {r['hash_only_pages_per_s']:,} pages/s); shared {r['shared_fraction']:.4f} of the pages "
                     f"(ideal {r['ideal_fraction']:.4f}, {r['frames_backing']:,} frames back them)")
    if "W6" in res:
        r = res["W6"]
        lines.append(f"W6 {r['title']} of {r['mib']:g} MiB: out {r['out_mb_per_s']:,} MB/s "
                     f"({r['out_seconds']:.3f} s), in {r['in_mb_per_s']:,} MB/s ({r['in_seconds']:.3f} s)")
    return "\n".join(lines)


def progress_to_stderr(msg: str) -> None:
    print(f"  ... {msg}", file=sys.stderr, flush=True)
