"""A finished run, reduced to what comparisons need: :class:`RunDigest`.

Per VM: the exit,
the instruction count, hashes of the console and of every byte of guest-physical memory
(swapped and compressed pages read back through their checksums), the events the
guest received; the faults that fired and where; a checkpoint per host round.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import xxhash

from ..inject.registry import ExpectContext
from ..machine.pool import PAGE_SHIFT, PAGE_SIZE
from ..machine.swap import SwapError
from ..mmu.p2m import CompressionError, P2MState
from .spec import command

if TYPE_CHECKING:
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


__all__ = ["RunDigest", "VMDigest", "digest_vm", "memory_digest"]
