"""Named faults as values: parameters, specs (``--fault`` syntax), the registry and the Fault base.

A fault is armed by name with parameters (``swap-read-error:nth=2``, or
``@pytest.mark.fault("swap-read-error", nth=2)``). Every fault has a *site*, the kind of
event where it acts:

* site faults act inside the VMM at the event itself — a swap read or write, a frame
  allocation, a TLB flush, a page compressed — through a wrapper the injector installs
  only while the fault is armed (the fill path is untouched otherwise);
* slice faults act between slices of guest execution (``site = "slice"``), where the VMM
  may change anything safely: a bit flipped in a frame, a corrupted guest or nested
  table entry, a lost shadow entry, memory taken from the host, an event for the guest.

When a fault fires is the trigger's business (hvmodel/inject/arm.py: ``at``, ``nth``,
``p``, ``count``, ``on``, ``vm``); this module says what happens then, and what the run
must look like afterwards. Expected outcomes, per fault (docs/FAULTS.md has the table):

``recovered``  the run is exactly the fault-free run (same instructions, console, exit
               status and final memory): the VMM repaired what the fault broke — or the
               fault was masked (the guest overwrote what it changed)
``detected``   the VMM stopped the VM with a message naming the guest page
``visible``    the guest saw the fault as it would on hardware (its own checks or death,
               an event it received, or memory the differential check finds changed)

Anything else — a Python traceback, a stop that names no page, a divergence where the
fault allows none, a difference without the fault firing — is a bug the outcome checker
reports (hvmodel/run/outcome.py). The faults themselves are in :mod:`hvmodel.inject.faults`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    from ..host.host import Host
    from ..vm.vm import VM

OUTCOMES = ("recovered", "detected", "visible")
# Event kinds a trigger can count. "slice" is a slice boundary of the fault's VM.
EVENTS = ("slice", "swap-read", "swap-write", "alloc", "tlb-flush", "compress", "balloon-lock")
OWNER_HOST = -2   # pool owner of frames host-oom takes away from the VMs


class InjectError(ValueError):
    """A fault that cannot be armed: unknown name or parameter, bad value, wrong VM or mode."""


class NotYet(Exception):
    """A slice fault found nothing to act on yet (no shared frame, paging off, ...):
    it stays armed and tries again at the VM's next slice boundary."""


# -- parameters ---------------------------------------------------------------------------

def _int(v: object) -> int:
    if isinstance(v, bool):
        raise ValueError("a number, not a boolean")
    if isinstance(v, int):
        return v
    try:
        return int(str(v).replace("_", ""), 0)
    except ValueError:
        raise ValueError("not a whole number") from None


def param_nonneg(v: object) -> int:
    n = _int(v)
    if n < 0:
        raise ValueError("must be >= 0")
    return n


def param_positive(v: object) -> int:
    n = _int(v)
    if n < 1:
        raise ValueError("must be >= 1")
    return n


def _prob(v: object) -> float:
    p = float(v)
    if not 0 < p <= 1:
        raise ValueError("a probability in (0, 1]")
    return p


def param_bool(v: object) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ValueError("true or false")


def param_str(v: object) -> str:
    return str(v)


def _at(v: object) -> int | str:
    """``N`` or ``LO..HI`` (drawn under the seed when the fault is armed)."""
    if isinstance(v, str) and ".." in v:
        lo, hi = (param_nonneg(x) for x in v.split("..", 1))
        if hi < lo:
            raise ValueError(f"empty range {v}")
        return f"{lo}..{hi}"
    return param_nonneg(v)


def _event(v: object) -> str:
    s = str(v)
    if s not in EVENTS:
        raise ValueError(f"an event kind: {', '.join(EVENTS)}")
    return s


def param_va(v: object) -> int | str:
    if str(v) in ("rip", "rsp"):
        return str(v)
    return param_nonneg(v)


def _vm(v: object) -> str:
    return str(v)


@dataclass(frozen=True)
class Param:
    """One parameter of a fault: name, converter (raises ValueError), default, meaning."""

    name: str
    conv: Callable[[object], object]
    default: object
    doc: str


# The trigger's parameters, accepted by every fault (hvmodel/inject/arm.py reads them).
TRIGGER_PARAMS = (
    Param("at", _at, 0, "guest instruction N of the fault's VM from which events count; or LO..HI, "
                        "drawn under the run's seed. A slice fault with only `at` fires exactly at N"),
    Param("nth", param_positive, None, "fire at the Kth counted event (default 1)"),
    Param("p", _prob, None, "instead of nth: fire at each counted event with probability p (seeded)"),
    Param("count", param_nonneg, 1, "how many times the fault fires (0: no limit)"),
    Param("on", _event, None, "slice faults: the event kind whose Kth occurrence arms the fault for the "
                              "next slice boundary (default: slice boundaries themselves)"),
    Param("vm", _vm, None, "the VM, by name or number (default: any VM for site faults, the first VM "
                           "for slice faults)"),
)


@dataclass
class FaultSpec:
    """A named fault with its parameters, converted and checked."""

    name: str
    params: dict = field(default_factory=dict)

    def get(self, key: str) -> object:
        """A parameter's value, or its default."""
        if key in self.params:
            return self.params[key]
        return FAULTS[self.name].param(key).default

    def text(self) -> str:
        """The spec in ``--fault`` syntax: ``name:k=v,k=v``."""
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={_fmt(v)}" for k, v in self.params.items())

    @property
    def fault(self) -> "Fault":
        return FAULTS[self.name]


def _fmt(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def make_spec(name: str, positional: tuple = (), **params: object) -> FaultSpec:
    """Build and check a spec: ``make_spec("inject-exception", (13,), at=1000)``."""
    fault = FAULTS.get(name)
    if fault is None:
        raise InjectError(f"unknown fault {name!r}; named faults: {', '.join(FAULTS)}")
    if positional:
        if fault.positional is None or len(positional) > 1:
            raise InjectError(f"fault {name}: takes no positional value (use key=value)")
        if fault.positional in params:
            raise InjectError(f"fault {name}: {fault.positional} given twice")
        params = {fault.positional: positional[0], **params}
    out = {}
    for k, v in params.items():
        p = fault.param(k)
        if p is None:
            raise InjectError(f"fault {name}: unknown parameter {k!r} (accepted: "
                              f"{', '.join(x.name for x in fault.all_params())})")
        try:
            out[k] = p.conv(v)
        except (ValueError, TypeError) as e:
            raise InjectError(f"fault {name}: {k}={v!r}: {e}") from None
    for p in fault.params:
        if p.default is REQUIRED and p.name not in out:
            raise InjectError(f"fault {name}: parameter {p.name} is required ({p.doc})")
    if "nth" in out and "p" in out:
        raise InjectError(f"fault {name}: give nth or p, not both")
    if "on" in out and fault.site != "slice":
        raise InjectError(f"fault {name}: acts at each {fault.site} event; `on` is for slice faults")
    spec = FaultSpec(name, out)
    fault.check(spec)
    return spec


def parse_fault(text: str) -> FaultSpec:
    """``name``, ``name:k=v,k=v`` or ``name:VALUE,k=v`` (the fault's positional parameter)."""
    name, _, rest = text.strip().partition(":")
    positional: list[str] = []
    params: dict[str, str] = {}
    for item in rest.split(","):
        item = item.strip()
        if not item:
            continue
        k, eq, v = item.partition("=")
        if eq:
            params[k.strip()] = v.strip()
        else:
            positional.append(item)
    return make_spec(name, tuple(positional), **params)


REQUIRED = object()


@dataclass
class ExpectContext:
    """What an expected outcome may depend on: the run's configuration."""

    swap: bool = True        # every VM has a swap file
    balloon: bool = False    # some VM's balloon driver is active (host targets reach the guest)


@dataclass
class FireContext:
    """What an action gets when its fault fires."""

    vm: "VM"
    host: "Host | None"
    rng: np.random.Generator
    args: dict
    later: Callable[[int, Callable[[], None]], None]   # run a callback at guest instruction N of vm
    dry: bool = False   # choose the target (and raise NotYet) exactly as for real, but break nothing


# -- the registry ---------------------------------------------------------------------------

FAULTS: dict[str, "Fault"] = {}


def register(cls: type) -> type:
    FAULTS[cls.name] = cls()
    return cls


class Fault:
    """Base of every named fault (class attributes document it; see docs/FAULTS.md)."""

    name = ""
    site = "slice"          # an EVENTS kind
    after = False           # site faults: act after the event (the write happened) instead of before
    needs: str | None = None    # "nested" or "shadow": the MMU mode the fault's VM must use
    positional: str | None = None
    summary = ""
    expected_doc = ""
    params: tuple[Param, ...] = ()

    def all_params(self) -> tuple[Param, ...]:
        return TRIGGER_PARAMS + self.params

    def param(self, name: str) -> Param | None:
        return next((p for p in self.all_params() if p.name == name), None)

    def check(self, spec: FaultSpec) -> None:
        """Extra consistency checks of a spec (InjectError)."""

    def matches(self, spec: FaultSpec, args: dict) -> bool:
        """Does a site event (its ``args``) count for this armed fault? (VM already matched.)"""
        return True

    def expected(self, spec: FaultSpec, ctx: ExpectContext) -> frozenset[str]:
        raise NotImplementedError

    def act(self, spec: FaultSpec, ctx: FireContext) -> str:
        """Do the damage; return what was done (for the run's event log).

        Slice faults are also called dry (``ctx.dry``): they must then choose exactly as
        they would (same draws, same NotYet) and return before changing anything, so the
        reference run ends its slices where the faulty run does.
        """
        raise NotImplementedError


def describe(name: str | None = None) -> str:
    """The registry as text: every fault (or one), its site, parameters and expected outcome."""
    if name is not None and name not in FAULTS:
        raise InjectError(f"unknown fault {name!r}; named faults: {', '.join(FAULTS)}")
    out = []
    for f in FAULTS.values():
        if name is not None and f.name != name:
            continue
        where = "between slices" if f.site == "slice" else f"at each {f.site} event"
        needs = f", {f.needs} paging only" if f.needs else ""
        out.append(f"{f.name} — {f.summary} (acts {where}{needs})")
        out.append(f"  expected: {f.expected_doc}")
        for p in f.params:
            d = "required" if p.default is REQUIRED else "optional" if p.default is None else \
                f"default {_fmt(p.default)}"
            out.append(f"  {p.name}: {p.doc} ({d})")
    if name is None:
        out.append("every fault also takes: " + "; ".join(f"{p.name} ({p.doc})" for p in TRIGGER_PARAMS))
    return "\n".join(out)


__all__ = ["EVENTS", "FAULTS", "OUTCOMES", "OWNER_HOST", "REQUIRED", "TRIGGER_PARAMS", "ExpectContext", "Fault",
           "FaultSpec", "FireContext", "InjectError", "NotYet", "Param", "describe", "make_spec", "parse_fault",
           "register"]
