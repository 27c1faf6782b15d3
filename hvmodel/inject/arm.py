"""Arming faults: when and where they fire, and the injector that hooks them into a host.

A trigger counts *events* of one kind in the fault's VM, from guest instruction ``at`` on:

* ``at=N`` alone: a slice fault fires exactly at guest instruction N (the injector ends
  the VM's slice there); a site fault fires at the first event of its kind from N on.
  ``at=LO..HI`` draws N under the run's seed.
* ``nth=K``: the Kth counted event; ``p=P``: each counted event with probability P (a
  seeded stream per armed fault, so the same seed fires at the same events);
  ``count=C``: fire C times (0: no limit) — the Kth event and the following ones, or the
  first C successes of the coin.
* ``on=KIND`` (slice faults): count events of KIND (a swap read, a TLB flush, ...); the
  fault acts at the VM's next slice boundary after its trigger hits.
* ``vm=NAME`` (or number): the fault's VM; site faults default to any VM, slice faults
  to the first.

Everything is a function of the run's inputs: triggers count guest instructions and VMM
events, never wall-clock time, and draw from ``numpy.random.default_rng([seed, i])``
(``i`` = the fault's position in the list), so a run with the same (image, scenario,
seed, faults) fires the same faults at the same instructions.

Hooks, and why the fill path stays fast: a VM gets ``vm.inject = injector`` (one check
per slice in ``VM.step``); site faults replace the method they watch (``SwapDevice.read``,
``MachinePool.alloc``, ``VCpu.flush_tlb`` ...) on that one instance while armed, and
:meth:`Injector.detach` puts the originals back. Nothing is wrapped that no armed fault
listens to.

``dry=True`` arms the same triggers (and ends slices at the same instructions) but does
nothing when they hit: the reference run that outcomes are classified against.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..machine.pool import HostOutOfMemory
from ..mmu.p2m import GuestMemoryError
from .registry import EVENTS, OWNER_HOST, FaultSpec, FireContext, InjectError, NotYet

if TYPE_CHECKING:
    from ..host.host import Host
    from ..vm.vm import VM

# Event kinds that are counted once the operation happened (a slot was written, a page
# stored); the others before it (so a fault can make it fail).
AFTER_KINDS = frozenset({"swap-write", "compress"})
# A slice fault that found nothing to act on (NotYet) tries again this many instructions later.
RETRY_EVERY = 10_000


@dataclass
class Firing:
    """One fault firing, as the run's event log records it."""

    fault: str
    index: int        # position of the fault in the armed list
    vm: str
    insns: int        # guest instructions of that VM when it fired
    detail: str
    dry: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


class Trigger:
    """When an armed fault fires: ``at``, ``nth`` / ``p``, ``count`` (module docstring)."""

    def __init__(self, spec: FaultSpec, rng: np.random.Generator) -> None:
        at = spec.get("at")
        if isinstance(at, str):
            lo, hi = (int(x) for x in at.split(".."))
            at = int(rng.integers(lo, hi + 1))
        self.at: int = at
        self.p: float | None = spec.get("p")
        self.nth: int = spec.get("nth") or 1
        self.count: int = spec.get("count")
        self.rng = rng
        self.seen = 0
        self.fired = 0

    @property
    def exhausted(self) -> bool:
        return bool(self.count) and self.fired >= self.count

    def hit(self, now: int) -> bool:
        """Count one event at guest instruction ``now``; True if the fault fires on it."""
        if self.exhausted or now < self.at:
            return False
        self.seen += 1
        ok = self.rng.random() < self.p if self.p is not None else self.seen >= self.nth
        if ok:
            self.fired += 1
        return ok


class ArmedFault:
    """A fault spec with its trigger, its random stream and the VM(s) it applies to."""

    def __init__(self, spec: FaultSpec, index: int, seed: int) -> None:
        self.spec = spec
        self.index = index
        self.fault = spec.fault
        # Separate streams: the trigger's draws must not depend on what the action drew.
        self.trigger = Trigger(spec, np.random.default_rng([seed, index]))
        self.rng = np.random.default_rng([seed, index, 1])
        self.on: str = self.fault.site if self.fault.site != "slice" else (spec.get("on") or "slice")
        self.target: "VM | None" = None       # slice faults: the VM they act on
        self.pending: set[int] = set()        # VM ids where a slice fault is due at the next boundary

    @property
    def is_slice(self) -> bool:
        return self.fault.site == "slice"

    def for_vm(self, vm: "VM") -> bool:
        """Does an event in ``vm`` concern this fault?"""
        if self.is_slice:
            return vm is self.target
        want = self.spec.get("vm")
        return want is None or _vm_is(vm, want)


def _vm_is(vm: "VM", want: str) -> bool:
    return vm.config.name == want or str(vm.id) == want


class Injector:
    """Armed faults on one host (or on VMs armed one by one), and the log of what fired."""

    def __init__(self, specs: list[FaultSpec], seed: int = 0, *, dry: bool = False) -> None:
        self.specs = list(specs)
        self.seed = seed
        self.dry = dry
        self.armed = [ArmedFault(s, i, seed) for i, s in enumerate(self.specs)]
        self.log: list[Firing] = []
        self.host: "Host | None" = None
        self.vms: list["VM"] = []
        self.current: "VM | None" = None    # the VM whose slice ran last (allocations count for it)
        self._undo: list[Callable[[], None]] = []
        self._later: list[tuple["VM", int, Callable[[], None]]] = []
        self._validated = False
        self._listeners: dict[tuple[str, bool], list[ArmedFault]] = {}
        for a in self.armed:
            if a.on != "slice":
                key = (a.on, a.fault.after if not a.is_slice else a.on in AFTER_KINDS)
                self._listeners.setdefault(key, []).append(a)

    # -- arming -------------------------------------------------------------------------

    def attach(self, host: "Host", *, validate: bool = True) -> "Injector":
        """Arm ``host`` and every VM it has (VMs powered on later: :meth:`arm_vm`).

        ``validate=False`` defers the check of the specs against the VMs to the first
        slice boundary (VMs still to come may be the ones the faults name).
        """
        self.host = host
        if "alloc" in self._kinds():
            self._wrap(host.pool, "alloc", self._alloc_wrapper(host.pool.alloc))
            self._wrap(host.pool, "alloc_large", self._alloc_large_wrapper(host.pool.alloc_large))
        for vm in host.vms:
            self.arm_vm(vm)
        if validate:
            self.validate()
        return self

    def arm_vm(self, vm: "VM") -> None:
        """Arm one VM (a VM powered on after :meth:`attach`)."""
        if vm.p2m is None or not self.armed:
            return   # the reference MMU: nothing of the VMM to break (validate() says so if named)
        self.vms.append(vm)
        self._validated = False
        vm.inject = self
        self._undo.append(lambda: setattr(vm, "inject", None))
        kinds = self._kinds()
        if vm.swap is not None and kinds & {"swap-read", "swap-write"}:
            self._wrap_swap(vm)
        if "tlb-flush" in kinds:
            self._wrap(vm.vcpu, "flush_tlb", self._flush_wrapper(vm, vm.vcpu.flush_tlb))
        if "compress" in kinds and vm.p2m.zip is not None:
            self._wrap(vm.p2m.zip, "store", self._store_wrapper(vm, vm.p2m.zip.store))
        if "balloon-lock" in kinds and vm.balloon is not None:
            lock = vm.balloon.lock
            self._wrap(vm.balloon, "lock",
                       lambda gfn: (self._site("balloon-lock", vm, False, {"gfn": gfn}), lock(gfn))[1])

    def validate(self) -> None:
        """Resolve each fault's VM and check it can act there; InjectError if not."""
        vms = self.vms if self.host is None else [v for v in self.host.vms]
        vmm = [v for v in vms if v.p2m is not None]
        names = ", ".join(v.config.name for v in vms) or "none"
        for a in self.armed:
            want = a.spec.get("vm")
            if want is not None:
                match = [v for v in vms if _vm_is(v, want)]
                if not match:
                    raise InjectError(f"fault {a.spec.name}: no VM {want!r} (VMs: {names})")
                if match[0].p2m is None:
                    raise InjectError(f"fault {a.spec.name}: VM {want!r} runs the reference MMU (native): "
                                      f"there is no VMM to inject into")
                chosen = match
            else:
                chosen = vmm[:1] if a.is_slice else vmm
            if not chosen:
                raise InjectError(f"fault {a.spec.name}: no VM to arm it on (VMs: {names})")
            need = a.fault.needs
            if need is not None and not any(v.config.mmu == need for v in chosen):
                raise InjectError(f"fault {a.spec.name} needs a VM under {need} paging; "
                                  f"{chosen[0].config.name} runs {chosen[0].config.mmu} (use --mmu {need})")
            if a.is_slice:
                a.target = chosen[0]
        self._validated = True

    def detach(self) -> None:
        """Disarm: every wrapped method back, ``vm.inject`` cleared."""
        while self._undo:
            self._undo.pop()()

    # -- the VM.step hook -------------------------------------------------------------------

    def at_slice(self, vm: "VM") -> int | None:
        """A slice boundary of ``vm``: fire what is due; return where the next slice must end."""
        if not self._validated:
            self.validate()
        self.current = vm
        now = vm.vcpu.insns
        if self._later:
            due = [x for x in self._later if x[0] is vm and x[1] <= now]
            self._later = [x for x in self._later if x not in due]
            for _, _, cb in due:
                cb()
        for a in self.armed:
            if not a.is_slice or a.target is not vm or vm.stopped:
                continue
            if vm.id in a.pending:
                a.pending.discard(vm.id)
                self._fire(a, vm, {})
            elif a.on == "slice" and a.trigger.hit(now):
                self._fire(a, vm, {})
        cut = [a.trigger.at - now for a in self.armed
               if a.is_slice and a.target is vm and a.on == "slice" and not a.trigger.exhausted
               and a.trigger.at > now]
        cut += [t - now for v, t, _ in self._later if v is vm and t > now]
        if any(vm.id in a.pending for a in self.armed if a.is_slice):
            cut.append(RETRY_EVERY)
        return min(cut) if cut else None

    # -- events -------------------------------------------------------------------------------

    def _kinds(self) -> set[str]:
        return {a.on for a in self.armed}

    def _site(self, kind: str, vm: "VM", after: bool, args: dict) -> bool:
        """One event of ``kind`` in ``vm``; fire what its triggers say. True if a fault acted."""
        acted = False
        for a in self._listeners.get((kind, after), ()):
            if not a.for_vm(vm) or not (a.is_slice or a.fault.matches(a.spec, args)):
                continue
            if not a.trigger.hit(vm.vcpu.now()):
                continue
            if a.is_slice:
                a.pending.add(vm.id)   # acts at the VM's next slice boundary
            else:
                acted = self._fire(a, vm, args) or acted
        return acted

    def _fire(self, a: ArmedFault, vm: "VM", args: dict) -> bool:
        rec = Firing(a.spec.name, a.index, vm.config.name, vm.vcpu.now(), "", dry=self.dry)
        if self.dry and not a.is_slice:
            rec.detail = "dry run: not injected"
            self.log.append(rec)
            return False
        ctx = FireContext(vm, self.host, a.rng, args, lambda t, cb: self._later.append((vm, t, cb)),
                          dry=self.dry)
        try:
            rec.detail = a.fault.act(a.spec, ctx)
            if self.dry:
                rec.detail = "dry run, not injected: " + rec.detail
        except NotYet:
            # Nothing to act on yet: try again soon (a dry run decides exactly the same).
            a.pending.add(vm.id)
            return False
        except GuestMemoryError as e:
            # The damage made the VMM lose a page while acting between slices.
            rec.detail = f"stopped the VM: {e}"
            self.log.append(rec)
            vm._stop("host_failure" if e.host_failure else "guest_memory", str(e), status=None)
            return True
        except Exception as e:
            if isinstance(e, InjectError):
                raise
            rec.detail = f"raised {type(e).__name__}: {e}"   # the injected error itself
            self.log.append(rec)
            raise
        self.log.append(rec)
        return True

    # -- wrappers (installed only for event kinds an armed fault counts) -------------------------

    def _wrap(self, obj: object, attr: str, fn: Callable) -> None:
        had = attr in vars(obj)
        old = vars(obj).get(attr)
        setattr(obj, attr, fn)
        self._undo.append(lambda: setattr(obj, attr, old) if had else delattr(obj, attr))

    def _wrap_swap(self, vm: "VM") -> None:
        dev = vm.swap
        read, write = dev.read, dev.write

        def swap_read(slot: int) -> bytes:
            self._site("swap-read", vm, False, {"slot": slot, "p2m": vm.p2m})
            return read(slot)

        def swap_write(data) -> int:
            self._site("swap-write", vm, False, {})
            slot = write(data)
            self._site("swap-write", vm, True, {"slot": slot})
            return slot

        self._wrap(dev, "read", swap_read)
        self._wrap(dev, "write", swap_write)

    def _alloc_wrapper(self, alloc: Callable[[int], int]) -> Callable[[int], int]:
        def pool_alloc(owner: int) -> int:
            # Allocations count for the VM that ran last (its fills, or the policy after it).
            if self.current is not None and owner != OWNER_HOST:
                self._site("alloc", self.current, False, {"owner": owner})
            return alloc(owner)
        return pool_alloc

    def _alloc_large_wrapper(self, alloc_large: Callable[[int], int]) -> Callable[[int], int]:
        def pool_alloc_large(owner: int) -> int:
            # A failed 2 MiB allocation is "no aligned run free" (-1): the p2m backs the
            # page with 4 KiB frames instead.
            if self.current is not None:
                try:
                    self._site("alloc", self.current, False, {"owner": owner, "large": True})
                except HostOutOfMemory:
                    return -1
            return alloc_large(owner)
        return pool_alloc_large

    def _flush_wrapper(self, vm: "VM", flush: Callable[[], None]) -> Callable[[], None]:
        vcpu = vm.vcpu

        def flush_tlb() -> None:
            if self._site("tlb-flush", vm, False, {}):
                # Lost: the VMM's books say flushed, Unicorn's TLB keeps every entry.
                vcpu.tlb_flushes += 1
                vcpu.large_2m.clear()
                vcpu.large_1g.clear()
                vcpu.mmu.flush_pending = False
                return
            flush()
        return flush_tlb

    def _store_wrapper(self, vm: "VM", store: Callable) -> Callable:
        def zip_store(gfn: int, data, blob: bytes) -> bool:
            ok = store(gfn, data, blob)
            self._site("compress", vm, True, {"gfn": gfn, "stored": ok})
            return ok
        return zip_store


__all__ = ["AFTER_KINDS", "ArmedFault", "EVENTS", "Firing", "Injector", "Trigger"]
