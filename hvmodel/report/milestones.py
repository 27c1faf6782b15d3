"""Milestones of a run's memory reclamation, read off the host's timeline.

The plot (``run --plot``) shows the whole picture; this is the same story in a few lines
of text: when the host first entered each memory state, and for each VM when the host
first gave it a balloon target, when its balloon, compression cache and swap file first
held pages (and the host state at that moment), and how its target moved — the idle
memory tax at work. ``run --stats`` prints it for multi-VM runs; ``--json`` carries it.
"""

from __future__ import annotations

from typing import Any

from ..machine.pool import PAGE_SIZE

MIB = 1 << 20
_FIRSTS = (("balloon_target", "balloon target set"), ("ballooned", "balloon holds pages"),
           ("compressed", "pages compressed"), ("swapped", "pages swapped"))


def milestones(timeline: list[dict]) -> dict[str, Any]:
    """``{"states": {state: first time}, "vms": {name: {...}}}`` from ``Host.timeline``."""
    states: dict[str, float] = {}
    vms: dict[str, dict[str, Any]] = {}
    for point in timeline:
        t, state = point["time_s"], point["state"]
        states.setdefault(state, t)
        for name, v in point["vms"].items():
            m = vms.setdefault(name, {"first": {}, "target_start_mb": v["target"] * PAGE_SIZE / MIB,
                                      "peak": {}})
            for key, _ in _FIRSTS:
                if v.get(key, 0) > 0 and key not in m["first"]:
                    m["first"][key] = {"time_s": t, "state": state}
                m["peak"][key] = max(m["peak"].get(key, 0), v.get(key, 0))
            if all(w.get("running", True) for w in point["vms"].values()):
                # The last word while every VM still ran (a VM that powers off frees memory
                # and the others' targets jump).
                m["target_end_mb"] = v["target"] * PAGE_SIZE / MIB
                m["active_end"] = v.get("active", 1.0)
    return {"states": states, "vms": vms}


def format_milestones(ms: dict[str, Any]) -> str:
    """The milestones as text, one line per fact."""
    lines = ["Reclamation, in guest time:"]
    order = ("high", "clear", "soft", "hard", "low")
    lines.append("  host first " + ", ".join(f"{s} at {ms['states'][s]:.2f} s"
                                             for s in order if s in ms["states"]))
    for name, m in ms["vms"].items():
        parts = []
        for key, label in _FIRSTS:
            f = m["first"].get(key)
            if f is not None:
                parts.append(f"{label} at {f['time_s']:.2f} s ({f['state']})")
        peaks = ", ".join(f"{k} {m['peak'][k] * PAGE_SIZE / MIB:.1f} MiB" for k in ("ballooned", "compressed", "swapped")
                          if m["peak"].get(k))
        lines.append(f"  {name}: target {m['target_start_mb']:.1f} → {m.get('target_end_mb', 0):.1f} MiB "
                     f"(active {m.get('active_end', 1.0):.2f}, while all VMs ran); " + ("; ".join(parts) or "nothing reclaimed")
                     + (f"; peak {peaks}" if peaks else ""))
    return "\n".join(lines)
