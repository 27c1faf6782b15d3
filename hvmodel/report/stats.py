"""esxtop's memory view of a host: a header and one row per VM, as text or a rich table.

Column names are esxtop's (MB, like esxtop): MEMSZ configured memory; GRANT guest
memory backed by machine memory; CNSM machine memory the VM consumes (a shared
frame counts 1/n for each of its n users); SHRD guest memory shared (zero pages
included); ZERO shared with the zero frame; SHRDSVD memory saved by sharing;
COWH hint pages (hashed, unshared); SWCUR swapped now; SWTGT what the host would
have to swap from the VM for every VM to fit its memsize-proportional share;
SWR/s SWW/s swap-in and swap-out rate in MB per guest second; OVHD the VMM's
overhead (nested tables or shadow pages, and the compression cache); CACHESZ the
compression cache's size and CACHEUSD what its compressed pages use of it. Header:
PMEM, and PSHARE shared / common / saving.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..host.host import NS_PER_INSN
from ..machine.pool import PAGE_SIZE

if TYPE_CHECKING:
    from ..host.host import Host

MB = 1 << 20
COLUMNS = ("NAME", "MEMSZ", "GRANT", "CNSM", "SHRD", "ZERO", "SHRDSVD", "COWH", "SWCUR", "SWTGT",
           "SWR/s", "SWW/s", "OVHD", "CACHESZ", "CACHEUSD", "STATE")


def _mb(pages: float) -> float:
    return pages * PAGE_SIZE / MB


def rows(host: "Host") -> list[dict[str, object]]:
    """One esxtop row per VM (values in MB, rates in MB per guest second)."""
    vms = [vm for vm in host.vms if vm.p2m is not None]
    total_mem = sum(vm.p2m.npages for vm in vms) or 1
    usable = host.pool.nframes - 1 - sum(vm.mmu.overhead_frames() for vm in vms)
    hints: dict[int, int] = {}
    for vm, _g in host.sharing.hints.values():
        hints[vm.id] = hints.get(vm.id, 0) + 1
    out = []
    for vm in vms:
        c = vm.memory_counters()
        secs = max(vm.clock(), 1) * NS_PER_INSN * 1e-9
        share = usable * vm.p2m.npages / total_mem
        out.append({
            "NAME": vm.config.name,
            "MEMSZ": _mb(vm.p2m.npages),
            "GRANT": _mb(c["GRANT"]),
            "CNSM": _mb(c["CNSM"]),
            "SHRD": _mb(c["SHRD"]),
            "ZERO": _mb(c["ZERO"]),
            "SHRDSVD": _mb(c["SHRDSVD"]),
            "COWH": _mb(hints.get(vm.id, 0)),
            "SWCUR": _mb(c["SWCUR"]),
            "SWTGT": _mb(max(0.0, c["CNSM"] + c["SWCUR"] - share)),
            "SWR/s": _mb(c["SWR"]) / secs,
            "SWW/s": _mb(c["SWW"]) / secs,
            "OVHD": _mb(c["OVHD"]),
            "CACHESZ": _mb(c.get("CACHESZ", 0)),
            "CACHEUSD": _mb(c.get("CACHEUSD", 0)),
            "STATE": vm.stop_reason or "running",
        })
    return out


def header(host: "Host") -> str:
    """PMEM and PSHARE lines."""
    p = host.pool
    hc = host.counters()
    ps = hc["PSHARE"]
    return (f"PMEM  /MB: {p.nframes * PAGE_SIZE / MB:8.1f} total, {p.used_frames * PAGE_SIZE / MB:8.1f} used, "
            f"{p.free_frames * PAGE_SIZE / MB:8.1f} free\n"
            f"PSHARE/MB: {_mb(ps['shared']):8.1f} shared, {_mb(ps['common']):8.1f} common, "
            f"{_mb(ps['saving']):8.1f} saving   (KSM: pages_shared {hc['pages_shared']}, "
            f"pages_sharing {hc['pages_sharing']}, pages_unshared {hc['pages_unshared']}, "
            f"full_scans {hc['full_scans']})")


def table(host: "Host") -> str:
    """The whole view as plain text."""
    rs = rows(host)
    lines = [header(host), ""]
    widths = {c: max(len(c), 8) for c in COLUMNS}
    widths["NAME"] = max([len("NAME")] + [len(str(r["NAME"])) for r in rs])
    widths["STATE"] = max([len("STATE")] + [len(str(r["STATE"])) for r in rs])
    lines.append("  ".join(c.rjust(widths[c]) if c not in ("NAME", "STATE") else c.ljust(widths[c])
                           for c in COLUMNS))
    for r in rs:
        cells = []
        for c in COLUMNS:
            v = r[c]
            cells.append(str(v).ljust(widths[c]) if c in ("NAME", "STATE") else f"{v:{widths[c]}.1f}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


def rich_table(host: "Host"):
    """The view as a rich renderable (``hvmodel run --top``)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text
    t = Table(title=None, expand=False)
    for c in COLUMNS:
        t.add_column(c, justify="left" if c in ("NAME", "STATE") else "right")
    for r in rows(host):
        t.add_row(*[str(r[c]) if c in ("NAME", "STATE") else f"{r[c]:.1f}" for c in COLUMNS])
    return Group(Text(header(host)), t)
