"""The host-side workloads: W5 (a page-sharing scan) and W6 (swap-out and swap-in).

Both build the VMs' memory directly through the p2m (the VMs never run: executing
8 x 64 MiB of guest stores would measure the guest, not the scan) and then time the
real code paths: ``PageSharing.scan`` (memory/sharing.py) for W5,
``HypervisorSwap.swap_out`` (memory/swap.py) onto the VM's swap file
(machine/swap.py) and the p2m resolver's swap-in for W6. Both verify afterwards that
every guest page still holds what was written, bit for bit.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import xxhash

from ..guest.image import DEFAULT_LOAD_ADDR, GuestImage
from ..host.host import Host, HostConfig
from ..machine.pool import PAGE_SHIFT, PAGE_SIZE
from ..memory.sharing import SharingConfig
from ..mmu.p2m import P2MState
from ..vm.vm import VM, VMConfig
from .runner import BenchError

MIB = 1 << 20
# The VMs of W5/W6 never run; this is only what power-on loads.
_IDLE = GuestImage(code=b"\xfa\xf4", load_addr=DEFAULT_LOAD_ADDR, entry=DEFAULT_LOAD_ADDR,
                   source_name="idle")


def _content(npages: int, seed: int) -> bytes:
    """Pseudo-random pages (no two alike, none zero, incompressible)."""
    rng = np.random.default_rng(seed)
    return rng.integers(1, 1 << 63, size=npages * PAGE_SIZE // 8, dtype=np.uint64).tobytes()


def _fill(vm: VM, data: bytes) -> None:
    vm.p2m.write_gpa(0, data)
    vm.p2m.recent.clear()  # write_gpa resolved these pages as if in a fill: not special


def _verify(vm: VM, data: bytes, what: str) -> None:
    if vm.p2m.read_gpa(0, len(data)) != data:
        raise BenchError(f"{what}: guest memory of {vm.config.name} changed")


def sharing_scan(nvms: int = 8, vm_mem: int = 64 * MIB) -> dict[str, object]:
    """W5: ``nvms`` VMs with identical content, one full sharing scan of each.

    Returns pages hashed per second over the whole scan (hash, compare, remap), the rate
    of the hashing alone on the same frames, and the fraction of the identical pages
    shared; the ideal is (N - 1) / N.
    """
    pages = vm_mem >> PAGE_SHIFT
    overhead = pages // 512 + 16
    # Inter-VM sharing (no salt), and 4 KiB backing (Mem.AllocGuestLargePage = 0): in the
    # high state, as here, ESXi hashes the pieces of 2 MiB pages but does not share them.
    cfg = HostConfig(memsize=nvms * (pages + overhead) * PAGE_SIZE + 16 * MIB, swap=False,
                     sharing=SharingConfig(force_salting=0), large_pages=False)
    data = _content(pages, seed=5)
    with Host(cfg) as host:
        vms = [host.power_on(VMConfig(name=f"w5-{i}", memsize=vm_mem, mmu="nested"), _IDLE)
               for i in range(nvms)]
        for vm in vms:
            _fill(vm, data)
        # The hashing alone, as the scan does it (xxh3 of each frame through the pool's
        # memoryview), over the same frames: what the scan would cost if remapping and
        # its bookkeeping were free.
        mv = host.pool.mv
        offs = [int(f) << PAGE_SHIFT for vm in vms for f in vm.p2m.value[:pages]]
        t0 = time.perf_counter()
        for off in offs:
            xxhash.xxh3_64_intdigest(mv[off:off + PAGE_SIZE])
        hash_seconds = time.perf_counter() - t0
        sharing = host.sharing
        before = sharing.pages_scanned
        t0 = time.perf_counter()
        for vm in vms:
            sharing.scan(vm, pages)
        seconds = time.perf_counter() - t0
        hashed = sharing.pages_scanned - before
        backed = np.concatenate([vm.p2m.value[(vm.p2m.state == P2MState.PRIVATE) |
                                              (vm.p2m.state == P2MState.SHARED)] for vm in vms])
        if len(backed) != nvms * pages:
            raise BenchError(f"W5: {nvms * pages - len(backed)} guest pages lost their frame")
        frames = len(np.unique(backed))
        shared_pages = sum(vm.p2m.count(P2MState.SHARED) for vm in vms)
        for vm in vms:
            _verify(vm, data, "W5")
    return {
        "vms": nvms,
        "pages": nvms * pages,
        "pages_hashed": hashed,
        "seconds": round(seconds, 4),
        "pages_per_s": round(hashed / seconds),
        "hash_only_pages_per_s": round(len(offs) / hash_seconds),
        "shared_fraction": round(1 - frames / (nvms * pages), 4),
        "ideal_fraction": round((nvms - 1) / nvms, 4),
        "pages_shared_state": shared_pages,
        "frames_backing": frames,
    }


def swap_roundtrip(size: int = 16 * MIB) -> dict[str, object]:
    """W6: swap ``size`` bytes of a VM out to its swap file and back in."""
    pages = size >> PAGE_SHIFT
    data = _content(pages, seed=6)
    with tempfile.TemporaryDirectory(prefix="hvmodel-bench-") as tmp:
        cfg = HostConfig(memsize=size + 16 * MIB, swap_dir=Path(tmp), zip_enable=False)
        with Host(cfg) as host:
            vm = host.power_on(VMConfig(name="w6", memsize=size, mmu="nested"), _IDLE)
            _fill(vm, data)
            p2m = vm.p2m
            t0 = time.perf_counter()
            out = host.swapper.swap_out(vm, pages)
            t_out = time.perf_counter() - t0
            if out != pages:
                raise BenchError(f"W6: swapped out {out} of {pages} pages")
            t0 = time.perf_counter()
            for gfn in range(pages):
                p2m.resolve(gfn, True)   # the EPT-violation path: read the slot back
            t_in = time.perf_counter() - t0
            if p2m.count(P2MState.PRIVATE) != pages:
                raise BenchError("W6: not every page came back from swap")
            _verify(vm, data, "W6")
    mb = size / MIB
    return {"mib": mb, "out_seconds": round(t_out, 4), "in_seconds": round(t_in, 4),
            "out_mb_per_s": round(mb / t_out, 1), "in_mb_per_s": round(mb / t_in, 1)}
