"""A run as a value: the ``hvmodel run`` arguments that define it, executing it, its digest.

With time counted in guest instructions, a run is a function of (image, scenario, seed,
armed faults) — all of which are in its ``hvmodel run`` arguments. So the arguments
*are* the run: the campaign executes exactly the argument list it prints as the
command that reproduces a run, the recording stores it, and replay runs it again.

A :class:`RunDigest` is what comparisons need from a finished run: per VM the exit,
the instruction count, hashes of the console and of every byte of guest-physical memory
(swapped and compressed pages read back through their checksums), the events the
guest received; the faults that fired and where; a checkpoint per host round.
"""

from __future__ import annotations

import shlex
import traceback
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import xxhash

from ..inject import Injector
from ..inject.faults import ExpectContext
from ..machine.pool import PAGE_SHIFT, PAGE_SIZE
from ..machine.swap import SwapError
from ..memory.compress import CompressionError
from ..mmu.p2m import P2MState

if TYPE_CHECKING:
    from ..host.host import Host
    from ..vm.vm import VM, VMResult

_CHUNK = 256   # pages hashed per numpy gather


@dataclass
class VMDigest:
    """One VM at the end of a run, reduced to what outcomes and replays compare."""

    name: str
    mmu: str
    exit_status: int | None
    stop_reason: str
    message: str
    instructions: int
    console_hash: str
    console_tail: str
    memory_hash: str
    bad_pages: list[str] = field(default_factory=list)   # pages the final read-back found damaged
    events: dict = field(default_factory=dict)            # events delivered to the guest, by vector
    swap: bool = False
    balloon: bool = False                                  # its balloon driver was active
    counters: dict = field(default_factory=dict)

    def same_as(self, other: "VMDigest") -> list[str]:
        """What differs from ``other`` (empty if nothing)."""
        out = []
        for k in ("exit_status", "stop_reason", "instructions", "console_hash", "memory_hash", "events"):
            a, b = getattr(self, k), getattr(other, k)
            if a != b:
                out.append(f"{k} {a} vs {b}" if k not in ("console_hash", "memory_hash") else f"{k.split('_')[0]}")
        return out


@dataclass
class RunDigest:
    """A finished run: its arguments, its VMs, what fired, its checkpoints, or its crash."""

    argv: list[str]
    vms: list[VMDigest] = field(default_factory=list)
    fired: list[dict] = field(default_factory=list)
    checkpoints: list = field(default_factory=list)
    error: str | None = None   # the traceback of an exception that escaped the VMM
    dry: bool = False

    @property
    def command(self) -> str:
        return command(self.argv)

    def expect_context(self) -> ExpectContext:
        return ExpectContext(swap=all(v.swap for v in self.vms) if self.vms else True,
                             balloon=any(v.balloon for v in self.vms))

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunDigest":
        d = dict(d)
        d["vms"] = [VMDigest(**v) for v in d.get("vms", [])]
        return cls(**d)


def command(argv: list[str]) -> str:
    """The shell command that runs ``argv`` (arguments of ``hvmodel run``)."""
    return "hvmodel run " + shlex.join(argv)


# -- digests ----------------------------------------------------------------------------------

def memory_digest(vm: "VM") -> tuple[str, list[str]]:
    """xxh3 of every byte of ``vm``'s guest-physical memory, and the pages that could not be
    read back intact (a swap slot, compressed page or shared frame failing its checksum)."""
    h = xxhash.xxh3_64()
    bad: list[str] = []
    if vm.p2m is None:
        ram = vm.ram
        for gpa in range(0, ram.size, _CHUNK * PAGE_SIZE):
            h.update(ram.read_gpa(gpa, min(_CHUNK * PAGE_SIZE, ram.size - gpa)))
        return h.hexdigest(), bad
    p2m, pool = vm.p2m, vm.pool
    sharing = vm.host.sharing if vm.host is not None else None
    frames = np.frombuffer(pool.buf, dtype=np.uint8).reshape(-1, PAGE_SIZE)  # the mmap, not a view that close() releases
    st, val = p2m.state, p2m.value
    for lo in range(0, p2m.npages, _CHUNK):
        hi = min(lo + _CHUNK, p2m.npages)
        chunk = np.zeros((hi - lo, PAGE_SIZE), dtype=np.uint8)
        s = st[lo:hi]
        inram = np.flatnonzero((s == P2MState.PRIVATE) | (s == P2MState.SHARED))
        chunk[inram] = frames[val[lo:hi][inram]]
        if sharing is not None:
            for i in np.flatnonzero(s == P2MState.SHARED):   # shared frames: their content checksum
                why = sharing.verify(int(val[lo + i]))
                if why is not None:
                    bad.append(f"guest page {lo + int(i):#x} (GPA {(lo + int(i)) << PAGE_SHIFT:#x}): {why}")
        for i in np.flatnonzero((s == P2MState.SWAPPED) | (s == P2MState.COMPRESSED)):
            gfn = lo + int(i)
            try:
                if st[gfn] == P2MState.SWAPPED:
                    page = p2m.swap.read(int(val[gfn]))
                else:
                    page = p2m.zip.peek(gfn)
            except (SwapError, CompressionError) as e:
                bad.append(f"guest page {gfn:#x} (GPA {gfn << PAGE_SHIFT:#x}): {e}")
                continue
            chunk[i] = np.frombuffer(page, dtype=np.uint8)
        h.update(chunk.tobytes())
    return h.hexdigest(), bad


def digest_vm(vm: "VM", result: "VMResult | None" = None, memory: tuple[str, list[str]] | None = None) -> VMDigest:
    """Reduce a VM (and its result, if the host kept one) to a :class:`VMDigest`."""
    r = result or vm.result()
    mem_hash, bad = memory if memory is not None else memory_digest(vm)
    console = r.console
    c = r.counters
    return VMDigest(
        name=r.name, mmu=vm.config.mmu, exit_status=r.exit_status, stop_reason=r.stop_reason,
        message=r.message, instructions=int(c.get("instructions", 0)),
        console_hash=xxhash.xxh3_64_hexdigest(console.encode()), console_tail=console[-300:],
        memory_hash=mem_hash, bad_pages=bad, events=dict(c.get("events_delivered", {})),
        swap=vm.swap is not None, balloon=bool(c.get("MCTL?", 0)),
        counters={k: v for k, v in c.items() if isinstance(v, (int, float))})


# -- a run --------------------------------------------------------------------------------------

class Session:
    """A built host, armed with the run's faults, recording checkpoints and early digests.

    ``hvmodel run`` and :func:`execute` both use it::

        s = Session(host, faults, seed, argv)
        results = host.run(max_insns, on_round=s.on_round)
        digest = s.finish(results)
    """

    def __init__(self, host: "Host", faults: list, seed: int, argv: list[str], *, dry: bool = False) -> None:
        self.host = host
        self.argv = list(argv)
        self.dry = dry
        self.injector = Injector(faults, seed, dry=dry).attach(host) if faults else None
        self.checkpoints: list = []
        self._early: dict[int, tuple[str, list[str]]] = {}
        self._round = 0
        # A VM that stops while others run gives its memory back: digest it first.
        host.before_power_off.append(lambda vm: self._early.setdefault(vm.id, memory_digest(vm)))

    def on_round(self, host: "Host") -> None:
        """Host.run's per-round callback: one checkpoint (guest instructions and RIP per VM)."""
        self._round += 1
        self.checkpoints.append([self._round, [[vm.config.name, vm.vcpu.insns, vm.vcpu.rip]
                                               for vm in host.vms]])

    def finish(self, results: list["VMResult"] | None, error: str | None = None) -> RunDigest:
        """Disarm and digest every VM (call before ``host.close()``)."""
        fired = [f.as_dict() for f in self.injector.log] if self.injector is not None else []
        if self.injector is not None:
            self.injector.detach()
        vms = []
        for i, vm in enumerate(self.host.vms):
            r = results[i] if results is not None else None
            if r is None and vm.id in self.host.final:
                r = self.host.final[vm.id]
            vms.append(digest_vm(vm, r, self._early.get(vm.id)))
        return RunDigest(argv=self.argv, vms=vms, fired=fired, checkpoints=self.checkpoints,
                         error=error, dry=self.dry)


def execute(argv: list[str], *, dry: bool = False, images: dict | None = None,
            on_round: Callable | None = None) -> RunDigest:
    """Run ``hvmodel run ARGV`` in this process (no console output) and digest it.

    ``dry`` arms the faults' triggers without injecting (the reference run). A bad
    argument raises :class:`hvmodel.cli.CliError`; an exception escaping the VMM is
    caught and kept, with its traceback, in ``RunDigest.error`` (a crash is an outcome).
    """
    from .. import cli
    args = cli.parse_run_args(argv)
    host = cli._build_host(args, echo=False, images=images)
    try:
        try:
            session = Session(host, args.fault or [], cli.run_seed(args, host), argv, dry=dry)
        except Exception as e:
            raise cli.CliError(str(e), cli.EXIT_USAGE) from None

        def rounds(h: "Host") -> None:
            session.on_round(h)
            if on_round is not None:
                on_round(h)
        results, error = None, None
        try:
            results = host.run(args.max_insns, on_round=rounds)
        except Exception:
            error = traceback.format_exc()
        try:
            return session.finish(results, error)
        except Exception:
            return RunDigest(argv=list(argv), error=(error or "") + traceback.format_exc(), dry=dry)
    finally:
        host.close()


__all__ = ["RunDigest", "Session", "VMDigest", "command", "digest_vm", "execute", "memory_digest"]
