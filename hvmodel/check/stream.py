"""The memory-access stream of a lock-step check: every guest load and store, access by access.

Registers at checkpoints and memory at the end cannot see an access that went to the
wrong page when the guest overwrites what it read before the next checkpoint. So in
check runs -- and only there: nothing here is installed on a VM that is not being
checked -- the reference records every guest load and store, and every VMM mode checks
each of its own accesses against the reference's access with the same index, at the
moment it happens.

What the engine gives (measured on Unicorn 2.1.4, docs/ARCHITECTURE.md "Lock-step
checking"): ``UC_HOOK_MEM_WRITE`` and ``UC_HOOK_MEM_READ_AFTER`` callbacks receive the
*physical* address of the access in the vCPU's buffer, its size and its value (the value
being stored; the value loaded), with RIP on the accessing instruction. Under
``UC_TLB_CPU`` (the reference) that address is guest-physical; under ``UC_TLB_VIRTUAL``
it is a machine address. ``UC_HOOK_MEM_READ`` runs before the load and passes 0 as the
value, so the stream uses READ_AFTER. The reference's own page walks (QEMU's A/D
updates) and the VMM's Python accesses (event delivery) go through no hook on either
side.

A VMM mode's access agrees when instruction number, kind, size, value and page offset
are the reference's and its machine page backs the reference's guest-physical page in
the p2m *now*: the frame of a private or shared page, the zero frame for an untouched
one, the device window for the APIC. Now, because the p2m changes within a slice (first
touches, copy-on-write breaks), and because several guest pages can share one machine
frame, so that a machine address alone does not name a guest page.

Instruction fetches have no hook (``UC_HOOK_MEM_FETCH`` does not fire for them), and the
translation blocks a block hook sees are laid out differently in different runs (a VMM
drops translated code when frames move), so a sequence of fetched pages is not
comparable between runs. Fetches are checked where a VMM mode hands out a code
translation: at every FETCH fill, the machine page must back the guest-physical page
that the guest's own tables name for the address (a walk over the p2m alone, none of the
VMM's structures), with no more rights than those tables give. Data fills get the same
check: a translation the reference would give differently is wrong before it is used.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import numpy as np
from capstone import CS_ARCH_X86, CS_MODE_64, CS_OP_MEM, Cs
from capstone import x86_const as CX
from unicorn import UC_HOOK_MEM_READ_AFTER, UC_HOOK_MEM_WRITE, UC_MEM_READ_AFTER, UC_MEM_WRITE, UcError
from unicorn import x86_const as X
from unicorn.unicorn_py3.unicorn import HOOK_MEM_ACCESS_CFUNC, uclib

from ..machine.pool import ZERO_FRAME
from ..mmu.p2m import P2MState
from ..mmu.walk import ACC_FETCH, ACC_READ, ACC_WRITE, ADDR_MASK, PERM_RWX, PERM_W, walk
from ..vm.vcpu import GuestAccessFault
from .digest import UnreadablePage, read_page
from ..vm.vm import VM

ITEM = 5            # a record is 5 ints: instruction number, kind, address, size, value
_UNBACKED = int(P2MState.UNBACKED)
_PRIVATE = int(P2MState.PRIVATE)
_SHARED = int(P2MState.SHARED)
_KIND = {UC_MEM_WRITE: "write", UC_MEM_READ_AFTER: "read"}
_ACC = {ACC_READ: "read", ACC_WRITE: "write", ACC_FETCH: "fetch"}

_cs = Cs(CS_ARCH_X86, CS_MODE_64)
_cs.detail = True
_REGS = {getattr(CX, n): getattr(X, "UC_" + n) for n in dir(CX)
         if n.startswith("X86_REG_") and hasattr(X, "UC_" + n) and getattr(CX, n)}


def _install(vm: VM, ctx: np.ndarray, slow) -> tuple:
    """Hook ``vm``'s loads and stores with the compiled hook for its role (reference or mode);
    ``slow`` is the Python callback the hook calls for everything it does not decide. Also
    keeps the context's slice base current: the instruction counter restarts every slice."""
    from . import stream_hooks as H
    v = vm.vcpu
    cb = HOOK_MEM_ACCESS_CFUNC(slow)
    ctx[H.C_COUNTER] = v.h.value + v.offsets["emu_counter"]
    ctx[H.C_SLOW] = ctypes.cast(cb, ctypes.c_void_p).value
    fn = H.record_access if vm.p2m is None else H.verify_access
    for kind in (UC_HOOK_MEM_WRITE, UC_HOOK_MEM_READ_AFTER):
        hh = ctypes.c_size_t()
        err = uclib.uc_hook_add(v.h, ctypes.byref(hh), kind, ctypes.c_void_p(fn.address),
                                ctypes.c_void_p(ctx.ctypes.data), ctypes.c_uint64(1), ctypes.c_uint64(0))
        if err:
            raise UcError(err)
    run = v.run

    def run_slice(budget: int):
        ctx[H.C_BASE] = v.insns
        return run(budget)
    v.run = run_slice      # per instance, in check runs only
    return cb, fn


@dataclass
class AccessDivergence:
    """The first access of a VMM mode that differs from the reference's (or a bad fill)."""

    mode: str
    index: int                    # position in the checkpoint's stream (-1: a fill)
    insn: int                     # the number of the accessing instruction (1 = the first)
    what: str                     # how it differs
    rip: int = 0
    instruction: str = ""
    va: int | None = None         # the guest-virtual address, when it could be determined
    mine: tuple | None = None     # (kind, machine address, size, value) in the mode
    theirs: tuple | None = None   # (kind, guest-physical address, size, value) in the reference
    reached: str = ""             # what the mode's machine address is (which guest page, or whose)
    walk: list[str] = field(default_factory=list)   # the mode's walk of va, level by level


class ReferenceStream:
    """Records the reference's loads and stores, per checkpoint (compiled; grows by Python)."""

    def __init__(self, vm: VM) -> None:
        from . import stream_hooks as H
        self.vm = vm
        self.error: BaseException | None = None
        self.ctx = np.zeros(H.CTX_SLOTS, dtype=np.int64)
        self._grow(1 << 16)

        def full(_h, kind, addr, size, value, _ud) -> None:
            try:
                self._grow(2 * int(self.ctx[H.C_CAP]))
            except BaseException as exc:   # never unwind through C
                self.error = exc
        self._keep = _install(vm, self.ctx, full)

    def _grow(self, cap: int) -> None:
        from . import stream_hooks as H
        old = getattr(self, "buf", None)
        buf = np.zeros(cap * ITEM, dtype=np.int64)
        if old is not None:
            buf[:len(old)] = old
        self.buf = buf
        self.ctx[H.C_BUF] = buf.ctypes.data
        self.ctx[H.C_CAP] = cap

    def take(self) -> np.ndarray:
        """The records of the step just run, as one flat array (valid until the next step)."""
        from . import stream_hooks as H
        n = int(self.ctx[H.C_POS])
        self.ctx[H.C_POS] = 0
        return self.buf[:n * ITEM]


class StreamVerifier:
    """Checks a VMM mode's accesses against the reference's stream, and its fills against the
    guest's tables."""

    def __init__(self, vm: VM) -> None:
        from . import stream_hooks as H
        assert (H._UNBACKED, H._PRIVATE, H._SHARED) == (_UNBACKED, _PRIVATE, _SHARED) and ZERO_FRAME == 0
        self.vm = vm
        self.p2m = vm.p2m
        self.expected = np.zeros(0, dtype=np.int64)
        self.accesses = 0
        self.fills_checked = 0
        self.bad: AccessDivergence | None = None
        self.error: BaseException | None = None
        ctx = self.ctx = np.zeros(H.CTX_SLOTS, dtype=np.int64)
        ctx[H.C_STATE] = self.p2m.state.ctypes.data
        ctx[H.C_FRAME] = self.p2m.value.ctypes.data
        ctx[H.C_NPAGES] = self.p2m.npages

        def slow(_h, kind, addr, size, value, _ud) -> None:
            try:
                if self._check_slowly(int(ctx[H.C_POS]) - 1, kind, addr, size, value):
                    ctx[H.C_DONE] = 1
            except BaseException as exc:   # never unwind through C
                self.error = exc
                ctx[H.C_DONE] = 1
        self._keep = _install(vm, ctx, slow)
        translate = vm.mmu.translate

        def checked_translate(cr3: int, va: int, acc: int, user: bool, ctl: int) -> int:
            r = translate(cr3, va, acc, user, ctl)
            if self.bad is None and vm.vcpu.in_slice:
                try:
                    self._check_fill(cr3, va, acc, user, ctl, r)
                except BaseException as exc:
                    self.error = exc
                if self.bad is not None:
                    ctx[H.C_DONE] = 1
            return r
        # Per instance and only here: the fill hook of a VM that is not checked is untouched.
        vm.mmu.translate = checked_translate

    def begin(self, expected: np.ndarray) -> None:
        """Start a checkpoint: the reference's records for it."""
        from . import stream_hooks as H
        self.expected = expected
        ctx = self.ctx
        ctx[H.C_BUF] = expected.ctypes.data
        ctx[H.C_CAP] = len(expected) // ITEM
        ctx[H.C_POS] = 0
        ctx[H.C_DONE] = int(self.bad is not None)

    def end(self) -> AccessDivergence | None:
        """End a checkpoint: the first difference, including a stream that ended early."""
        from . import stream_hooks as H
        if self.error is not None:
            raise self.error
        seen = int(self.ctx[H.C_POS])
        self.accesses += seen
        if self.bad is None and seen < len(self.expected) // ITEM:
            e = [int(x) for x in self.expected[seen * ITEM:(seen + 1) * ITEM]]
            self.bad = AccessDivergence(self.vm.config.name, seen, e[0], "the reference made "
                                        f"{len(self.expected) // ITEM - seen} more access(es) in this "
                                        "checkpoint; the first one is missing here",
                                        theirs=(e[1], e[2], e[3], e[4]))
        return self.bad

    # -- what the compiled hook did not decide -----------------------------------------

    def _check_slowly(self, i: int, kind: int, addr: int, size: int, value: int) -> bool:
        """Access ``i`` of the checkpoint, which the compiled hook did not accept (an MMIO page,
        or a difference); True if it differs (then recorded)."""
        rec = [int(x) for x in self.expected[i * ITEM:(i + 1) * ITEM]]
        if len(rec) < ITEM:
            self._diverged(i, kind, addr, size, value, "an access the reference did not make")
        elif rec[1] != kind or rec[3] != size or rec[4] != value or (rec[2] ^ addr) & 0xFFF:
            what = [w for w, bad in (("kind", rec[1] != kind), ("size", rec[3] != size),
                                     ("value", rec[4] != value),
                                     ("page offset", (rec[2] ^ addr) & 0xFFF)) if bad]
            self._diverged(i, kind, addr, size, value, " and ".join(what) + " differ")
        elif rec[0] != self.vm.vcpu.now():
            self._diverged(i, kind, addr, size, value, f"made by instruction {self.vm.vcpu.now():,}, "
                                                       f"the reference's by instruction {rec[0]:,}")
        elif self._backing(rec[2] >> 12, kind == UC_MEM_WRITE) != addr >> 12:
            self._diverged(i, kind, addr, size, value, "a machine page that does not back the reference's "
                                                       "guest-physical page" + (" writably" if kind == UC_MEM_WRITE
                                                                                 else ""))
        return self.bad is not None

    def _backing(self, gfn: int, write: bool = False) -> int:
        """The machine frame an access to ``gfn`` may reach now (-1: none may). A write only
        ever reaches a private frame: a shared frame or the zero frame is never written."""
        p2m = self.p2m
        inside = gfn < p2m.npages
        st = p2m.state.item(gfn) if inside else -1
        if write and inside and st != _PRIVATE:
            return -1
        f = p2m.frame_of(gfn)
        if f >= 0:
            return f
        if st == _UNBACKED:
            return ZERO_FRAME
        return -1

    def _diverged(self, i: int, kind: int, addr: int, size: int, value: int, what: str) -> None:
        v = self.vm.vcpu
        rec = [int(x) for x in self.expected[i * ITEM:(i + 1) * ITEM]]
        theirs = (rec[1], rec[2], rec[3], rec[4]) if len(rec) == ITEM else None
        rip = v.rip
        insn, va = instruction_and_va(v, rip, (theirs[1] if theirs else addr) & 0xFFF)
        self.bad = AccessDivergence(self.vm.config.name, i, v.now(), what, rip, insn, va,
                                    (kind, addr, size, value), theirs, self.reached(addr))
        if va is not None:
            from .divergence import describe_walk
            self.bad.walk = describe_walk(self.vm, va)

    def reached(self, addr: int) -> str:
        """What a machine address is, in terms of this VM: which guest pages map its frame."""
        frame = addr >> 12
        p2m = self.p2m
        gfns = np.flatnonzero((p2m.value == frame) & ((p2m.state == P2MState.PRIVATE) | (p2m.state == P2MState.SHARED)))
        if frame == ZERO_FRAME:
            return f"machine {addr:#x} (the zero frame)"
        if len(gfns):
            pages = ", ".join(f"{int(g) << 12 | addr & 0xFFF:#x}" for g in gfns[:4])
            return f"machine {addr:#x} = guest-physical {pages}"
        for g, f in p2m.mmio.items():
            if f == frame:
                return f"machine {addr:#x} = the device window (guest-physical {g << 12 | addr & 0xFFF:#x})"
        owner = int(self.vm.pool.owner[frame]) if frame < self.vm.pool.nframes else None
        return f"machine {addr:#x}: a frame no page of this VM maps (pool owner {owner})"

    # -- the fill check -------------------------------------------------------------

    def _check_fill(self, cr3: int, va: int, acc: int, user: bool, ctl: int, r: int) -> None:
        """A translation the VMM hands to Unicorn must be what the guest's tables say."""
        self.fills_checked += 1
        try:
            g = walk(_GuestTables(self.vm), cr3, va, acc, user, ctl)
        except UnreadablePage as e:
            g, what = None, f"the guest's tables for {va:#x} cannot be read: {e}"
        else:
            what = ""
        if g is None:
            pass
        elif r < 0 or g < 0:
            if r != g:
                what = (f"the VMM {'refused' if r < 0 else 'gave'} a {_ACC[acc]} fill the guest's tables "
                        f"{'allow' if g >= 0 else 'refuse'} (VMM {~r if r < 0 else r:#x}, tables "
                        f"{~g if g < 0 else g:#x})")
        else:
            if (r >> 12) != self._backing((g & ADDR_MASK) >> 12, bool(r & PERM_W)):
                what = (f"a {_ACC[acc]} fill of {va:#x} maps machine {r & ADDR_MASK:#x}; the guest's tables "
                        f"name guest-physical {g & ADDR_MASK:#x}")
            elif r & PERM_RWX & ~g:
                what = (f"a {_ACC[acc]} fill of {va:#x} grants rights {r & PERM_RWX:#o}, the guest's tables "
                        f"only {g & PERM_RWX:#o}")
        if what:
            v = self.vm.vcpu
            insn, _ = instruction_and_va(v, v.rip, va & 0xFFF)
            self.bad = AccessDivergence(self.vm.config.name, -1, v.now(), what, v.rip, insn, va,
                                        reached=self.reached(r & ADDR_MASK) if r >= 0 else "")
            from .divergence import describe_walk
            self.bad.walk = describe_walk(self.vm, va)


class _GuestTables:
    """The guest's tables as the p2m holds them: no VMM structure is consulted, nothing is set."""

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        self.p2m = vm.p2m
        self.q = vm.p2m.pool.q

    def read_pte(self, gpa: int) -> int:
        gfn = gpa >> 12
        if gfn >= self.p2m.npages:
            return 0
        f = self.p2m.frame_of(gfn)
        if f >= 0:
            return self.q[(f << 9) | (gpa & 0xFFF) >> 3]
        return int.from_bytes(read_page(self.vm, gpa, 8), "little")   # untouched, swapped, compressed

    def write_pte(self, gpa: int, value: int) -> None:
        pass


def instruction_and_va(vcpu, rip: int, offset: int) -> tuple[str, int | None]:
    """The instruction at ``rip`` (capstone) and the guest-virtual address it accessed, chosen
    among its memory operands and implicit stack/string addresses by the page ``offset`` of
    the access (None when none fits)."""
    try:
        code = vcpu.vmem_read(rip, 16, ACC_FETCH, peek=True)
    except GuestAccessFault:
        return f"{rip:#x}: <not readable>", None
    insn = next(_cs.disasm(code, rip), None)
    if insn is None:
        return f"{rip:#x}: <undecodable {code.hex()}>", None
    text = f"{insn.address:#x}: {insn.mnemonic} {insn.op_str}".rstrip()
    cands: list[int] = []
    for op in insn.operands:
        if op.type == CS_OP_MEM:
            m = op.mem
            ea = m.disp + (insn.address + insn.size if m.base == CX.X86_REG_RIP else
                           vcpu.reg(_REGS[m.base]) if m.base in _REGS else 0)
            if m.index in _REGS:
                ea += vcpu.reg(_REGS[m.index]) * m.scale
            if m.segment == CX.X86_REG_FS:
                ea += vcpu.reg(X.UC_X86_REG_FS_BASE)
            elif m.segment == CX.X86_REG_GS:
                ea += vcpu.reg(X.UC_X86_REG_GS_BASE)
            cands.append(ea)
    rsp = vcpu.reg(X.UC_X86_REG_RSP)
    cands += [rsp + d for d in range(-16, 48, 8)]
    cands += [vcpu.reg(X.UC_X86_REG_RSI), vcpu.reg(X.UC_X86_REG_RDI)]
    for ea in cands:
        ea &= (1 << 64) - 1
        if ea & 0xFFF == offset:
            return text, ea
    return text, None


def format_divergence(d: AccessDivergence, ref_walk: list[str]) -> str:
    """The report of an access divergence: the access in both runs, the instruction, both walks."""
    head = (f"first differing access (#{d.index + 1} of the checkpoint)" if d.index >= 0
            else "first translation that differs from the guest's tables")
    lines = [f"  {d.mode} vs native: {head}, instruction {d.insn:,}: {d.what}",
             f"  instruction: {d.instruction}"]
    if d.va is not None:
        lines.append(f"  guest-virtual address {d.va:#x}")
    if d.mine is not None:
        k, a, s, val = d.mine
        lines.append(f"  {d.mode}: {_KIND.get(k, k)} of {s} bytes, value {val & ((1 << 8 * s) - 1):#x}, "
                     f"reached {d.reached or f'machine {a:#x}'}")
    elif d.reached:
        lines.append(f"  {d.mode}: {d.reached}")
    if d.theirs is not None:
        k, a, s, val = d.theirs
        lines.append(f"  native: {_KIND.get(k, k)} of {s} bytes, value {val & ((1 << 8 * s) - 1):#x}, "
                     f"at guest-physical {a:#x}")
    if d.walk or ref_walk:
        lines.append(f"  page walk of {d.va:#x}:" if d.va is not None else "  page walks:")
        lines.extend("    " + s for s in d.walk)
        lines.extend("    " + s for s in ref_walk)
    return "\n".join(lines)
