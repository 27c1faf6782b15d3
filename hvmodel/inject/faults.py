"""The catalogue of named faults: what each one breaks, where, and the outcome it must have.

Each class registers itself (:func:`hvmodel.inject.registry.register`) with its name, site,
parameters and documented outcomes; docs/FAULTS.md lists them (``hvmodel faults`` prints
the same). The vocabulary — sites, triggers, outcomes — is in :mod:`hvmodel.inject.registry`.
"""

from __future__ import annotations

import os

import numpy as np
from unicorn import x86_const as X

from ..machine.pool import PAGE_SHIFT, PAGE_SIZE, HostOutOfMemory
from ..machine.swap import SwapError
from ..mmu.nested import EPT_R, EPT_RWX, EPT_W
from ..mmu.p2m import P2MState
from ..mmu.walk import ACC_READ, CTL_PG, paging_ctl, walk
from ..vm.exits import PF, VECTORS_WITH_ERROR_CODE, vector_name
from .registry import (OWNER_HOST, REQUIRED, Fault, FireContext, InjectError, NotYet, Param, param_bool, param_nonneg,
                       param_positive, param_str, param_va, register)


def _p2m(ctx: FireContext):
    if ctx.vm.p2m is None:
        raise InjectError(f"{ctx.vm.config.name}: the reference MMU (native) has no VMM to inject into")
    return ctx.vm.p2m


def _gfn_of_slot(p2m, slot: int) -> int:
    hit = np.flatnonzero((p2m.state == P2MState.SWAPPED) & (p2m.value == slot))
    return int(hit[0]) if len(hit) else -1


def _drop_translated_code(pool, frame: int) -> None:
    # Unicorn does not notice a frame rewritten from outside (docs/ENGINE.md U9): code
    # already translated from it would not see the change, as no CPU would fail to.
    # Slice faults run between slices, where dropping translated code is safe.
    if pool.fetched[frame]:
        for cb in pool.on_launder:
            cb()


def _flip(mv: memoryview, off: int, bit: int) -> None:
    mv[off] = mv[off] ^ (1 << bit)


# -- swap -------------------------------------------------------------------------------------

@register
class SwapReadError(Fault):
    name = "swap-read-error"
    site = "swap-read"
    summary = "a read of the VM's swap file fails (I/O error)"
    expected_doc = "detected: the swap-in fails and the VM stops, naming the guest page"
    params = (Param("gfn", param_nonneg, None, "only the read of this guest page"),
              Param("slot", param_nonneg, None, "only the read of this swap slot"))

    def matches(self, spec, args):
        slot = args["slot"]
        if spec.get("slot") is not None and slot != spec.get("slot"):
            return False
        return spec.get("gfn") is None or _gfn_of_slot(args["p2m"], slot) == spec.get("gfn")

    def expected(self, spec, ctx):
        return frozenset({"detected"})

    def act(self, spec, ctx):
        slot = ctx.args["slot"]
        raise SwapError(f"read of swap slot {slot} failed: I/O error (injected: swap-read-error)")


@register
class SwapWriteError(Fault):
    name = "swap-write-error"
    site = "swap-write"
    summary = "a write to the VM's swap file fails (I/O error, disk full)"
    expected_doc = ("detected: the VM whose page was being swapped out stops, naming the page "
                    "(README: a swap I/O error stops the VM) — whichever VM's allocation asked for it")

    def expected(self, spec, ctx):
        return frozenset({"detected"})

    def act(self, spec, ctx):
        raise SwapError("write of a swap slot failed: I/O error (injected: swap-write-error)")


@register
class SwapBitflip(Fault):
    name = "swap-bitflip"
    site = "swap-write"
    after = True
    summary = "a bit of a page on disk flips after it was swapped out"
    expected_doc = ("detected: the slot fails its checksum when read back and the VM stops naming the "
                    "page; a page never read back is found by the final verification")
    params = (Param("bit", param_nonneg, None, "bit number in the 4 KiB page (default: drawn under the seed)"),)

    def expected(self, spec, ctx):
        return frozenset({"detected"})

    def act(self, spec, ctx):
        dev = ctx.vm.swap
        slot = ctx.args["slot"]
        bit = spec.get("bit")
        bit = int(ctx.rng.integers(PAGE_SIZE * 8)) if bit is None else bit % (PAGE_SIZE * 8)
        pos = slot * PAGE_SIZE + bit // 8
        byte = os.pread(dev.fd, 1, pos)[0] ^ (1 << (bit % 8))
        os.pwrite(dev.fd, bytes([byte]), pos)
        return f"flipped bit {bit} of swap slot {slot} on disk"


# -- machine memory -------------------------------------------------------------------------------

@register
class FrameBitflip(Fault):
    name = "frame-bitflip"
    summary = "a bit flips in a machine frame (DRAM error), shared or not"
    expected_doc = ("a private frame: visible, as on hardware without ECC (the guest reads the bit; "
                    "the differential check sees the changed memory) — or recovered when the guest "
                    "overwrites the byte first. A shared frame: detected by its content checksum (scrub, "
                    "copy-on-write break), every VM mapping it stopped naming its page — or visible if a "
                    "guest reads the byte before the scrub reaches the frame. An explicit `frame`: "
                    "whichever of these its content decides (a VMM table, a free frame, the zero "
                    "frame — which is checksummed too)")
    params = (Param("gfn", param_nonneg, None, "flip in the frame backing this guest page"),
              Param("frame", param_nonneg, None, "flip in this machine frame"),
              Param("shared", param_bool, False, "pick a frame shared by page sharing (copy-on-write)"),
              Param("offset", param_nonneg, None, "byte in the frame (default: drawn under the seed)"),
              Param("bit", param_nonneg, None, "bit in the byte, 0-7 (default: drawn under the seed)"))

    def expected(self, spec, ctx):
        if spec.get("frame") is not None:
            return frozenset({"detected", "visible", "recovered"})   # whatever that frame holds
        if spec.get("shared"):
            return frozenset({"detected", "visible"})
        return frozenset({"visible", "recovered"})

    def act(self, spec, ctx):
        pool = ctx.vm.pool
        p2m = _p2m(ctx)
        what = ""
        if spec.get("frame") is not None:
            frame = spec.get("frame")
            if not 0 <= frame < pool.nframes:
                raise InjectError(f"frame-bitflip: frame {frame:#x} is outside the pool ({pool.nframes} frames)")
        elif spec.get("gfn") is not None:
            frame = p2m.frame_of(spec.get("gfn"))
            if frame < 0:
                raise NotYet()
            what = f" (guest page {spec.get('gfn'):#x})"
        elif spec.get("shared"):
            frames = sorted(ctx.host.sharing.mappers) if ctx.host is not None else []
            if not frames:
                raise NotYet()
            frame = int(ctx.rng.choice(frames))
            what = f" (shared by {len(ctx.host.sharing.mappers[frame])} guest pages)"
        else:
            gfns = np.flatnonzero(p2m.state == P2MState.PRIVATE)
            if not len(gfns):
                raise NotYet()
            gfn = int(ctx.rng.choice(gfns))
            frame = int(p2m.value[gfn])
            what = f" (guest page {gfn:#x})"
        off = spec.get("offset")
        off = int(ctx.rng.integers(PAGE_SIZE)) if off is None else off % PAGE_SIZE
        bit = spec.get("bit")
        bit = int(ctx.rng.integers(8)) if bit is None else bit % 8
        if not ctx.dry:
            _flip(pool.mv, (frame << PAGE_SHIFT) + off, bit)
            _drop_translated_code(pool, frame)
        return f"flipped bit {bit} of byte {off:#x} in frame {frame:#x}{what}"


@register
class AllocFail(Fault):
    name = "alloc-fail"
    site = "alloc"
    summary = "a machine-frame allocation fails"
    expected_doc = ("recovered: the p2m reclaims (compresses or swaps) and allocates again; with "
                    "count > 1 or p, when allocations keep failing: detected (host out of memory, the VM "
                    "stopped naming the page it needed)")

    def expected(self, spec, ctx):
        if spec.get("count") == 1:
            return frozenset({"recovered"})
        return frozenset({"recovered", "detected"})

    def act(self, spec, ctx):
        raise HostOutOfMemory("injected allocation failure (alloc-fail)")


@register
class HostOom(Fault):
    name = "host-oom"
    summary = "the host runs out of memory: its free frames are taken away from the VMs"
    expected_doc = ("recovered when the VMs have swap files (the VMM compresses and swaps to make "
                    "room; with an active balloon driver the host's balloon targets also change, "
                    "which its guest sees by design: visible); without swap: detected when a VM needs "
                    "a new frame (host out of memory, the VM stopped naming the page), recovered if "
                    "none does before the frames come back or the run ends")
    params = (Param("frames", param_nonneg, 0, "how many free frames to take (0: every free frame)"),
              Param("duration", param_nonneg, 0, "guest instructions until they are given back (0: never)"))

    def expected(self, spec, ctx):
        if not ctx.swap:
            return frozenset({"detected", "recovered"})
        return frozenset({"recovered", "visible"} if ctx.balloon else {"recovered"})

    def act(self, spec, ctx):
        pool = ctx.vm.pool
        want = spec.get("frames") or pool.free_frames
        taken: list[int] = []
        if spec.get("duration"):
            def give_back() -> None:
                for f in taken:
                    pool.put(f)
            ctx.later(ctx.vm.vcpu.insns + spec.get("duration"), give_back)
        if ctx.dry:
            return f"took {want} free frames from the pool"
        while len(taken) < want:
            try:
                taken.append(pool.alloc(OWNER_HOST))
            except HostOutOfMemory:
                break
        return f"took {len(taken)} free frames from the pool ({pool.free_frames} left)"


# -- translation structures -----------------------------------------------------------------------

@register
class PteCorrupt(Fault):
    name = "pte-corrupt"
    summary = "a bit flips in a guest page-table entry (in guest memory)"
    expected_doc = ("visible: the guest's next walk through the entry sees it as on hardware (a #PF, a "
                    "wrong mapping, a triple fault), or the differential check sees the changed table")
    params = (Param("va", param_va, "rsp", "the guest-virtual address whose walk has the entry: a number, "
                                      "`rip` (the next instruction) or `rsp` (where the next push goes)"),
              Param("level", param_nonneg, 0, "table level of the entry: 4 = PML4 ... 1 = PT, 0 = the leaf"),
              Param("bit", param_nonneg, 0, "bit of the 64-bit entry to flip (0 = present)"))

    def check(self, spec):
        if spec.get("level") > 4 or spec.get("bit") > 63:
            raise InjectError("pte-corrupt: level is 0-4, bit is 0-63")

    def expected(self, spec, ctx):
        return frozenset({"visible"})

    def act(self, spec, ctx):
        from ..vm.vcpu import PeekMemory
        vm = ctx.vm
        p2m = _p2m(ctx)
        v = vm.vcpu
        cr0, cr3, cr4 = v.reg(X.UC_X86_REG_CR0), v.reg(X.UC_X86_REG_CR3), v.reg(X.UC_X86_REG_CR4)
        ctl = paging_ctl(cr0, cr4, v.efer(), v.reg(X.UC_X86_REG_EFLAGS), False)
        if not ctl & CTL_PG:
            raise NotYet()   # paging is off: there is no guest table yet
        va = spec.get("va")
        if va == "rip":
            va = v.reg(X.UC_X86_REG_RIP)
        elif va == "rsp":
            va = (v.reg(X.UC_X86_REG_RSP) - 8) & (2**64 - 1)
        trace: list = []
        walk(PeekMemory(v), cr3, va, ACC_READ, False, ctl, trace)
        level = spec.get("level")
        hits = [t for t in trace if t[0] == level] if level else trace[-1:]
        if not hits:
            raise NotYet()
        lvl, egpa, e = hits[0]
        frame = p2m.frame_of(egpa >> PAGE_SHIFT)
        if frame < 0:
            raise NotYet()   # the table page is not in RAM now (a memory error needs a frame)
        new = e ^ (1 << spec.get("bit"))
        detail = f"level-{lvl} entry for va {va:#x} at gpa {egpa:#x}: {e:#x} -> {new:#x} (bit {spec.get('bit')})"
        if ctx.dry:
            return detail
        # Damage the guest sees is written as the VMM writes for the guest: a shared table
        # page is un-shared first, so no other VM mapping the same frame is touched.
        with p2m.unblocked():
            frame = p2m.frame_for_write(egpa >> PAGE_SHIFT)
        ctx.vm.pool.q[((frame << PAGE_SHIFT) | (egpa & 0xFFF)) >> 3] = new
        # Like a memory error the table walker meets at once: derived caches of that
        # table (EPT leaf, shadow pages, Unicorn's TLB) are dropped, so the next access
        # walks the damaged entry.
        p2m.changed(egpa >> PAGE_SHIFT)
        return detail


def _leaf_readable(mmu, gfn: int) -> bool:
    path = mmu.entries(gfn)
    return bool(path and path[-1].leaf and path[-1].value & EPT_R)


def _ept_entry(mmu, gfn: int, level: int):
    """The nested entry at ``level`` on gfn's path (``MMU.entries``) — the 2 MiB leaf when the
    path ends there and level 1 is asked — or None if the path does not reach it."""
    path = mmu.entries(gfn)
    for t in path:
        if t.level == level:
            return t
    if level == 1 and path and path[-1].leaf:
        return path[-1]
    return None


@register
class EptCorrupt(Fault):
    name = "ept-corrupt"
    needs = "nested"
    summary = "a nested (EPT) entry is damaged: misconfigured (write without read) or cleared"
    expected_doc = ("recovered: the next nested walk through it takes an EPT violation (or "
                    "misconfiguration) exit and the VMM rebuilds the entry from the p2m, its owner. "
                    "`clear` may also be visible, as on hardware: a translation Unicorn's TLB cached "
                    "from the lost entry outlives it, because the VMM's next change of that page finds "
                    "no entry to invalidate and so asks for no flush (KVM too flushes only what its "
                    "rmap finds); a misconfigured entry is still found, invalidated and flushed")
    params = (Param("gfn", param_nonneg, None, "the guest page whose nested path has the entry (default: "
                                          "a mapped page, drawn under the seed)"),
              Param("kind", param_str, "misconfig", "`misconfig` (W without R) or `clear`"),
              Param("level", param_positive, 1, "nested level: 1 = the leaf ... 4 = the root's entry "
                                           "(levels above 1: clear only)"))

    def check(self, spec):
        if spec.get("kind") not in ("misconfig", "clear") or spec.get("level") > 4:
            raise InjectError("ept-corrupt: kind is misconfig or clear, level is 1-4")
        if spec.get("kind") == "misconfig" and spec.get("level") != 1:
            raise InjectError("ept-corrupt: a misconfiguration is injected in a leaf (level 1)")

    def expected(self, spec, ctx):
        return frozenset({"recovered", "visible"} if spec.get("kind") == "clear" else {"recovered"})

    def act(self, spec, ctx):
        mmu = ctx.vm.mmu
        p2m = _p2m(ctx)
        gfn = spec.get("gfn")
        if gfn is None:
            backed = np.flatnonzero((p2m.state == P2MState.PRIVATE) | (p2m.state == P2MState.SHARED))
            mapped = [int(g) for g in backed if _leaf_readable(mmu, int(g))]
            if not mapped:
                raise NotYet()
            gfn = int(ctx.rng.choice(mapped))
        entry = _ept_entry(mmu, gfn, spec.get("level"))
        q = ctx.vm.pool.q
        if entry is None or not q[entry.index] & EPT_RWX:
            raise NotYet()
        old = q[entry.index]
        new = 0 if spec.get("kind") == "clear" else (old | EPT_W) & ~EPT_R
        if not ctx.dry:
            q[entry.index] = new
        return f"level-{spec.get('level')} nested entry of guest page {gfn:#x}: {old:#x} -> {new:#x}"


@register
class ShadowDrop(Fault):
    name = "shadow-drop"
    needs = "shadow"
    summary = "a shadow page-table entry is lost (cleared behind the shadow MMU's back)"
    expected_doc = ("recovered: the next fill through it misses, the VMM takes a hidden fault, walks "
                    "the guest's tables and installs the entry again")
    params = (Param("level", param_nonneg, 0, "shadow page level 1-4 to drop from (0: any)"),)

    def expected(self, spec, ctx):
        return frozenset({"recovered"})

    def act(self, spec, ctx):
        pool = ctx.vm.pool
        level = spec.get("level")
        pages = [t for t in ctx.vm.mmu.tables() if not level or t.level == level]
        entries = []
        for sp in pages:
            q = np.frombuffer(pool.buf, dtype="<u8", count=512, offset=sp.frame << PAGE_SHIFT)
            entries.extend((sp, int(i)) for i in np.flatnonzero(q))
        if not entries:
            raise NotYet()
        sp, i = entries[int(ctx.rng.integers(len(entries)))]
        slot = ((sp.frame << PAGE_SHIFT) | i << 3) >> 3
        old = pool.q[slot]
        if not ctx.dry:
            pool.q[slot] = 0
        return f"dropped entry {i} ({old:#x}) of the level-{sp.level} shadow page for gfn {sp.gfn:#x}"


@register
class LostTlbFlush(Fault):
    name = "lost-tlb-flush"
    site = "tlb-flush"
    summary = "a TLB flush the VMM asks for does not happen (Unicorn keeps its entries)"
    expected_doc = ("visible, as on hardware when a flush is missed: the guest goes on using a stale "
                    "translation (to a frame that was swapped out, shared or reused); its own checks or "
                    "the differential check see it — or recovered if the stale entry is never used")

    def expected(self, spec, ctx):
        return frozenset({"visible", "recovered"})

    def act(self, spec, ctx):
        return "flush skipped: Unicorn's TLB keeps its entries"


# -- compression, ballooning ---------------------------------------------------------------------

@register
class CompressCorrupt(Fault):
    name = "compress-corrupt"
    site = "compress"
    after = True
    summary = "a bit flips in a compressed page in the compression cache"
    expected_doc = ("detected: the page fails to decompress or its checksum when it is needed (a guest "
                    "access, or the cache sending it to swap) and the VM stops naming the page; a page "
                    "never needed again is found by the final verification — or recovered when the bit "
                    "changes nothing that decompresses (measured: a code length of an unused symbol in "
                    "the stream's Huffman table; the page comes back intact, checksum and all)")
    params = (Param("gfn", param_nonneg, None, "only when this guest page is compressed"),)

    def matches(self, spec, args):
        return args["stored"] and (spec.get("gfn") is None or args["gfn"] == spec.get("gfn"))

    def expected(self, spec, ctx):
        return frozenset({"detected", "recovered"})

    def act(self, spec, ctx):
        gfn = ctx.args["gfn"]
        zip_ = ctx.vm.p2m.zip
        frame, slot, _, length, _ = zip_.entries[gfn]
        pos = int(ctx.rng.integers(length))
        bit = int(ctx.rng.integers(8))
        _flip(ctx.vm.pool.mv, (frame << PAGE_SHIFT) + slot * 1024 + pos, bit)
        return f"flipped bit {bit} of byte {pos} of guest page {gfn:#x}'s compressed copy ({length} bytes)"


@register
class BalloonLie(Fault):
    name = "balloon-lie"
    summary = "the guest's balloon driver reports (LOCKs) a page the guest still uses"
    expected_doc = ("visible, as on ESX: the host frees the page's frame; the guest's next touch gets a "
                    "zeroed page (balloon_violations counts it) and its data is gone — or recovered if the "
                    "guest rewrites the page before it reads it")
    params = (Param("gfn", param_nonneg, None, "the page reported (default: a page holding data, drawn "
                                          "under the seed)"),)

    def expected(self, spec, ctx):
        return frozenset({"visible", "recovered"})

    def act(self, spec, ctx):
        p2m = _p2m(ctx)
        gfn = spec.get("gfn")
        if gfn is None:
            # A page the guest still uses: private, holding something other than zeros.
            private = np.flatnonzero(p2m.state == P2MState.PRIVATE)
            frames = np.frombuffer(ctx.vm.pool.buf, dtype=np.uint64).reshape(-1, PAGE_SIZE // 8)
            cand = private[frames[p2m.value[private]].any(axis=1)]
            if not len(cand):
                raise NotYet()
            gfn = int(cand[int(ctx.rng.integers(len(cand)))])
        if ctx.dry:
            return f"LOCK of guest page {gfn:#x} it still uses"
        balloon = ctx.vm.balloon
        status = type(balloon).lock(balloon, gfn)   # the host side of a LOCK, not counted as an event
        return f"LOCK of guest page {gfn:#x} it still uses: {status.name}"


# -- events for the guest -------------------------------------------------------------------------

@register
class SpuriousInterrupt(Fault):
    name = "spurious-interrupt"
    summary = "a spurious interrupt: the 8259A answers an INTA with its IRQ 7 (or 15) vector"
    expected_doc = ("visible: delivered through the guest's IDT as on hardware (no ISR bit is set: the "
                    "guest must recognise it) at the first slice boundary from the trigger on where "
                    "RFLAGS.IF = 1 — a CPU with interrupts off starts no INTA, so a guest that never "
                    "enables them never gets one (not fired)")
    params = (Param("irq", param_nonneg, 7, "7 (master) or 15 (slave)"),)

    def check(self, spec):
        if spec.get("irq") not in (7, 15):
            raise InjectError("spurious-interrupt: irq is 7 or 15 (the 8259A's spurious lines)")

    def expected(self, spec, ctx):
        return frozenset({"visible"})

    def act(self, spec, ctx):
        vm = ctx.vm
        if not vm.vcpu.reg(X.UC_X86_REG_RFLAGS) & 0x200:
            raise NotYet()   # no INTA while interrupts are off
        pic = vm.pic
        chip = pic.master if spec.get("irq") == 7 else pic.slave
        vector = chip.vector_base + 7
        if not ctx.dry:
            vm._deliver(vector, external=True)   # the VM's one event path (IDT, #DF, triple fault)
        return f"delivered vector {vector:#x} (spurious IRQ {spec.get('irq')}) at RIP {vm.vcpu.rip:#x}"


@register
class InjectException(Fault):
    name = "inject-exception"
    positional = "vector"
    summary = "an exception for the guest, as if the next instruction raised it"
    expected_doc = ("visible: delivered through the guest's IDT (handler, #DF, or a triple fault "
                    "that stops the VM as hardware would)")
    params = (Param("vector", param_nonneg, REQUIRED, "the vector, 0-31"),
              Param("error_code", param_nonneg, None, "error code (vectors that push one; default 0)"),
              Param("cr2", param_nonneg, 0, "CR2 for a #PF"))

    def check(self, spec):
        if spec.get("vector") > 31:
            raise InjectError("inject-exception: the vector is an exception, 0-31")

    def expected(self, spec, ctx):
        return frozenset({"visible"})

    def act(self, spec, ctx):
        vm = ctx.vm
        vec = spec.get("vector")
        err = spec.get("error_code")
        if vec in VECTORS_WITH_ERROR_CODE and err is None:
            err = 0
        rip = vm.vcpu.rip
        if not ctx.dry:
            vm._deliver(vec, err, cr2=spec.get("cr2") if vec == PF else None)  # the VM's one event path
        return f"delivered {vector_name(vec)}" + (f"(err={err:#x})" if err is not None else "") + \
            f" at RIP {rip:#x}"
