"""The benchmark workloads W1-W4: guests that run under every MMU mode.

Each workload is a guest kernel whose measured region is bracketed by POST-code writes
to port 0x80 (1 = begin, 2 = end), so boot, set-up and the final verification are
not timed — only the work the definition names. The definitions are fixed by issue 9
so they cannot be tuned away:

* **W1 compute** — an ALU + load/store loop inside 64 pages, >= 50 M instructions
  (``guests/bench/compute.asm``);
* **W2 TLB thrash** — one write to each of 4,096 distinct pages (4 KiB stride), 100
  passes, no page-table change (``guests/tlbthrash.asm``; its last pass also reads each
  page first, to check the previous pass);
* **W3 context switches** — 8 ring-3 processes with their own CR3, switched by the
  timer every 9,996 instructions (PIT divisor 119: the PIT ticks every 84 instructions,
  so 10,000 is not reachable), each touching its 32 pages over and over in its slice,
  2,000 switches (``guests/ctxsw.asm``);
* **W4 page-table churn** — map a page (write a PTE), touch it, unmap it, ``invlpg``,
  20,000 iterations, with a #PF check every 500 (``guests/ptchurn.asm``).

``--quick`` shrinks the sizes (rewriting the guests' ``%define`` lines) for a smoke
run; its numbers say nothing about the targets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..guest.asm import build
from ..guest.image import GuestBuildError, GuestImage

GUESTS = Path(__file__).resolve().parents[2] / "guests"
MIB = 1 << 20


@dataclass(frozen=True)
class Workload:
    """One guest workload: where its guest is, how much memory, its sizes."""

    name: str
    title: str
    guest: Path
    memsize: int
    min_region_insns: int                               # the definition's floor (full size)
    quick: dict[str, str] = field(default_factory=dict)  # %define overrides for --quick

    def image(self, quick: bool) -> GuestImage:
        """Build the guest, with the quick sizes if asked."""
        text = self.guest.read_text()
        if quick:
            text = override_defines(text, self.quick, self.guest.name)
        return build(text, source_name=self.guest.name)


def override_defines(text: str, values: dict[str, str], name: str) -> str:
    """Replace the value of ``%define NAME value`` lines; every name must exist once."""
    for key, value in values.items():
        pat = re.compile(rf"^(\s*%define\s+{re.escape(key)}\s+)\S.*$", re.M)
        text, n = pat.subn(lambda m: m.group(1) + value, text)
        if n != 1:
            raise GuestBuildError(f"{name}: expected one %define {key}, found {n}")
    return text


WORKLOADS: tuple[Workload, ...] = (
    Workload("W1", "compute: ALU + load/store loop in 64 pages", GUESTS / "bench" / "compute.asm",
             32 * MIB, 50_000_000, {"ITERS": "200000"}),
    Workload("W2", "TLB thrash: 4,096 pages x 100 passes, static tables", GUESTS / "tlbthrash.asm",
             32 * MIB, 4096 * 100, {"NPASSES": "4"}),
    Workload("W3", "context switches: 8 processes, own CR3, timer every 9,996 insns",
             GUESTS / "ctxsw.asm", 8 * MIB, 2000 * 9_996, {"TARGET_SWITCHES": "40"}),
    Workload("W4", "page-table churn: map, touch, unmap, invlpg x 20,000", GUESTS / "ptchurn.asm",
             8 * MIB, 20_000, {"ITERS": "1000", "NFAULTS": "2"}),
)
