"""Scenario files: a host and its VMs in TOML, with VMware's setting names.

```toml
[host]
memsize = "96M"                    # machine memory
"Mem.ShareForceSalting" = 1        # 0, 1 or 2 (default 2: intra-VM sharing only)
"Mem.ShareScanTime" = 0.02         # minutes to scan a whole VM (default 60)
"Mem.ShareRateMax" = 1000000       # pages per second per VM (default 1024)
swap_policy = "random"             # or "clock"
seed = 0

[[vm]]
name = "web"
guest = "guests/dedup.asm"         # relative to the scenario file
memsize = "32M"
mmu = "nested"                     # or "shadow"
count = 8                          # 8 identical VMs: web-1 ... web-8
"sched.mem.pshare.enable" = true
"sched.mem.pshare.salt" = "common"
"sched.mem.shares" = "high"        # low / normal / high (5/10/20 per MB) or a number
"sched.mem.min" = "8M"             # reservation
"sched.mem.max" = "32M"            # limit
"sched.mem.maxmemctl" = "16M"      # balloon cap
```

Host keys also: ``Mem.IdleTax`` (%), ``Mem.SamplePeriod`` (guest seconds),
``Mem.MemMinFreePct``, ``Mem.MemZipMaxPct``, ``Mem.MemZipEnable``,
``Mem.AllocGuestLargePage`` (1 = 2 MiB machine pages when possible, the default; 0 = 4 KiB only).

Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..memory.sharing import SharingConfig
from .host import HostConfig
from ..vm.vm import MMU_MODES, VMConfig


class ScenarioError(ValueError):
    """A scenario file that cannot be used, with the reason."""


@dataclass
class VMSpec:
    """One VM of a scenario: its configuration and guest image path."""

    config: VMConfig
    guest: Path


_HOST_KEYS = {"memsize", "Mem.ShareForceSalting", "Mem.ShareScanTime", "Mem.ShareRateMax", "swap_policy",
              "seed", "quantum", "swap_dir", "Mem.IdleTax", "Mem.SamplePeriod", "Mem.MemMinFreePct",
              "Mem.MemZipMaxPct", "Mem.MemZipEnable", "Mem.AllocGuestLargePage"}
_VM_KEYS = {"name", "guest", "memsize", "mmu", "count", "sched.mem.pshare.enable", "sched.mem.pshare.salt",
            "shadow_max_pages", "sched.mem.shares", "sched.mem.min", "sched.mem.max", "sched.mem.maxmemctl"}


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def size_bytes(text: str) -> int:
    """``64M``, ``64MiB``, ``1g``, ``4096`` → bytes (binary units); ValueError otherwise."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 64M, 1G, 4096)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def parse_size(value: object, where: str) -> int:
    """``"32M"``, ``"1G"`` or a number of bytes, for scenario values."""
    if isinstance(value, int):
        return value
    try:
        return size_bytes(str(value))
    except ValueError as e:
        raise ScenarioError(f"{where}: {e}") from None


def read_toml(p: Path, what: str, error: type[Exception]) -> dict:
    """A TOML file's table, or ``error`` saying "<what> <path>: why" (unreadable, not TOML)."""
    try:
        return tomllib.loads(p.read_text())
    except OSError as e:
        raise error(f"{what} {p}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise error(f"{what} {p}: not valid TOML: {e}") from None


def load(path: str | Path) -> tuple[HostConfig, list[VMSpec]]:
    """Read a scenario file."""
    p = Path(path)
    data = read_toml(p, "scenario", ScenarioError)
    unknown = set(data) - {"host", "vm"}
    if unknown:
        raise ScenarioError(f"scenario {p}: unknown section(s) {', '.join(sorted(unknown))}")
    h = data.get("host", {})
    bad = set(h) - _HOST_KEYS
    if bad:
        raise ScenarioError(f"scenario {p}: unknown [host] key(s) {', '.join(sorted(bad))}")
    sharing = SharingConfig(
        force_salting=int(h.get("Mem.ShareForceSalting", 2)),
        scan_time_min=float(h.get("Mem.ShareScanTime", 60.0)),
        rate_max=int(h.get("Mem.ShareRateMax", 1024)))
    try:
        sharing.validate()
    except ValueError as e:
        raise ScenarioError(f"scenario {p}: {e}") from None
    host = HostConfig(memsize=parse_size(h.get("memsize", "256M"), f"{p} [host] memsize"),
                      sharing=sharing, swap_policy=str(h.get("swap_policy", "random")),
                      seed=int(h.get("seed", 0)))
    if "quantum" in h:
        host.quantum = int(h["quantum"])
    if "Mem.IdleTax" in h:
        host.idle_tax_pct = float(h["Mem.IdleTax"])
        if not 0 <= host.idle_tax_pct < 100:
            raise ScenarioError(f"scenario {p}: Mem.IdleTax must be in [0, 100), got {host.idle_tax_pct}")
    if "Mem.SamplePeriod" in h:
        host.sample_period_s = float(h["Mem.SamplePeriod"])   # guest seconds
    if "Mem.MemMinFreePct" in h:
        host.min_free_pct = float(h["Mem.MemMinFreePct"])
    if "Mem.MemZipMaxPct" in h:
        host.zip_max_pct = float(h["Mem.MemZipMaxPct"])
    if "Mem.MemZipEnable" in h:
        host.zip_enable = bool(h["Mem.MemZipEnable"])
    if "Mem.AllocGuestLargePage" in h:
        host.large_pages = bool(h["Mem.AllocGuestLargePage"])
    if "swap_dir" in h:
        host.swap_dir = (p.parent / h["swap_dir"]).resolve()
    specs: list[VMSpec] = []
    vms = data.get("vm", [])
    if not vms:
        raise ScenarioError(f"scenario {p}: no [[vm]] entries")
    for i, v in enumerate(vms):
        where = f"{p} vm #{i + 1}"
        bad = set(v) - _VM_KEYS
        if bad:
            raise ScenarioError(f"{where}: unknown key(s) {', '.join(sorted(bad))}")
        if "guest" not in v:
            raise ScenarioError(f"{where}: 'guest' is required")
        mmu = str(v.get("mmu", "nested"))
        if mmu not in MMU_MODES or mmu == "native":
            raise ScenarioError(f"{where}: mmu must be nested or shadow, got {mmu!r}")
        count = int(v.get("count", 1))
        if count < 1:
            raise ScenarioError(f"{where}: count must be at least 1")
        name = str(v.get("name", f"vm{i + 1}"))
        for k in range(count):
            cfg = VMConfig(name=name if count == 1 else f"{name}-{k + 1}",
                           memsize=parse_size(v.get("memsize", "64M"), f"{where} memsize"), mmu=mmu,
                           pshare_enable=bool(v.get("sched.mem.pshare.enable", True)),
                           pshare_salt=(str(v["sched.mem.pshare.salt"]) if "sched.mem.pshare.salt" in v
                                        else None),
                           shadow_max_pages=v.get("shadow_max_pages"),
                           shares=v.get("sched.mem.shares", "normal"),
                           reservation=(parse_size(v["sched.mem.min"], f"{where} sched.mem.min")
                                        if "sched.mem.min" in v else 0),
                           limit=(parse_size(v["sched.mem.max"], f"{where} sched.mem.max")
                                  if "sched.mem.max" in v else 0),
                           maxmemctl=(parse_size(v["sched.mem.maxmemctl"], f"{where} sched.mem.maxmemctl")
                                      if "sched.mem.maxmemctl" in v else None))
            try:
                from ..memory.alloc import shares_of
                shares_of(cfg.shares, 1)
            except ValueError as e:
                raise ScenarioError(f"{where}: {e}") from None
            specs.append(VMSpec(cfg, (p.parent / v["guest"]).resolve()))
    return host, specs
