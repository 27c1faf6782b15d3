"""A faulty run's outcome, judged against the fault-free reference run of the same inputs.

The reference is the same run with the same triggers armed *dry* (they count and end
slices where the faulty run does, but inject nothing), so any difference is the fault's.
Per VM:

``detected``          the VMM stopped the VM (host failure, guest memory) and the message
                      names the guest page — or the final read-back of its memory found a
                      swapped or compressed page failing its checksum (latent damage the
                      VMM catches whenever the page comes back)
``visible``           the VM ran on but diverged from the reference: the guest noticed
                      (another exit status or stop, events it received) or the
                      differential check did (memory, console, instruction count)
``recovered``         identical to the reference

and for the run as a whole, the worst of its VMs (visible > detected > recovered), or:

``not-fired``         no trigger hit (the run must then be identical: else ``nondeterministic``)
``crash``             a Python exception escaped the VMM (the traceback is kept)
``unnamed-stop``      the VMM stopped a VM without naming a page
``nondeterministic``  a difference without any fault having fired

A run is *unexpected* when its outcome is none of those its faults allow
(:meth:`hvmodel.inject.faults.Fault.expected`); ``not-fired`` is reported, not counted
as unexpected.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..inject.registry import parse_fault

if TYPE_CHECKING:
    from .digest import RunDigest

PAGE_RE = re.compile(r"guest page 0x[0-9a-f]+")
VMM_STOPS = frozenset({"host_failure", "guest_memory", "error"})
SEVERITY = ("recovered", "detected", "visible", "not-fired", "unnamed-stop", "nondeterministic", "crash")
BUGS = frozenset({"crash", "unnamed-stop", "nondeterministic"})


@dataclass
class Outcome:
    """The class of a run's outcome, why, and what its faults allow."""

    kind: str
    detail: str
    expected: frozenset[str] = field(default_factory=frozenset)

    @property
    def unexpected(self) -> bool:
        if self.kind == "not-fired":
            return False
        return self.kind in BUGS or self.kind not in self.expected

    def __str__(self) -> str:
        tag = "UNEXPECTED " if self.unexpected else ""
        allowed = "/".join(sorted(self.expected)) or "-"
        return f"{tag}{self.kind} (expected {allowed}): {self.detail}"


def expected_of(run: "RunDigest") -> frozenset[str]:
    """What the run's faults allow (the union over its armed faults)."""
    ctx = run.expect_context()
    out: set[str] = set()
    for text in fault_texts(run.argv):
        spec = parse_fault(text)
        out |= spec.fault.expected(spec, ctx)
    return frozenset(out)


def fault_texts(argv: list[str]) -> list[str]:
    """The ``--fault`` values of a run's arguments."""
    out = []
    for i, a in enumerate(argv):
        if a == "--fault" and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif a.startswith("--fault="):
            out.append(a.split("=", 1)[1])
    return out


def _vm_outcome(v, r) -> tuple[str, str]:
    if v.stop_reason in VMM_STOPS and v.stop_reason != r.stop_reason:
        if PAGE_RE.search(v.message):
            return "detected", f"{v.name} stopped: {v.message}"
        return "unnamed-stop", f"{v.name} stopped without naming a page: {v.stop_reason}: {v.message}"
    if v.bad_pages:
        return "detected", f"{v.name}: latent, found by the final read-back: {v.bad_pages[0]}"
    diff = v.same_as(r)
    if not diff:
        return "recovered", f"{v.name}: identical to the reference"
    guest = [d for d in diff if d.split()[0] in ("exit_status", "stop_reason", "events")]
    if guest:
        return "visible", f"{v.name}: the guest saw it: {'; '.join(guest)}" + (
            f" ({v.message})" if v.message and v.stop_reason != r.stop_reason else "")
    return "visible", f"{v.name}: the differential check saw it: {', '.join(diff)} differ from the reference"


def classify(run: "RunDigest", ref: "RunDigest") -> Outcome:
    """Judge ``run`` (faults armed) against ``ref`` (the same run with its faults dry)."""
    expected = expected_of(run)
    if run.error:
        return Outcome("crash", _last_line(run.error), expected)
    if ref.error:
        return Outcome("crash", "the reference run crashed: " + _last_line(ref.error), expected)
    if len(run.vms) != len(ref.vms):
        return Outcome("crash", f"{len(run.vms)} VMs vs {len(ref.vms)} in the reference", expected)
    fired = [f for f in run.fired if not f.get("dry")]
    results = [_vm_outcome(v, r) for v, r in zip(run.vms, ref.vms)]
    if not fired:
        diff = [d for k, d in results if k != "recovered"]
        if diff:
            return Outcome("nondeterministic", "no fault fired, yet: " + "; ".join(diff), expected)
        return Outcome("not-fired", "no trigger hit", expected)
    kind = max((k for k, _ in results), key=SEVERITY.index)
    detail = "; ".join(d for k, d in results if k == kind)
    where = fired[0]
    first = f"{where['fault']} at instruction {where['insns']:,} of {where['vm']}: {where['detail']}"
    return Outcome(kind, f"{detail} [{first}]", expected)


def _last_line(tb: str) -> str:
    lines = [x for x in tb.strip().splitlines() if x.strip()]
    return lines[-1] if lines else tb


__all__ = ["BUGS", "Outcome", "classify", "expected_of", "fault_texts"]
