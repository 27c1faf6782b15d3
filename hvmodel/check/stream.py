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


def _hook(vm: VM, kind: int, fn) -> object:
    cb = HOOK_MEM_ACCESS_CFUNC(fn)
    hh = ctypes.c_size_t()
    err = uclib.uc_hook_add(vm.vcpu.h, ctypes.byref(hh), kind, ctypes.cast(cb, ctypes.c_void_p), None,
                            ctypes.c_uint64(1), ctypes.c_uint64(0))
    if err:
        raise UcError(err)
    return cb


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
    """Records the reference's loads and stores, per checkpoint."""

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        self.items: list[int] = []
        self.error: BaseException | None = None
        now = vm.vcpu.now
        extend = self.items.extend

        def on_access(_h, kind, addr, size, value, _ud):
            try:
                extend((now(), kind, addr, size, value))
            except BaseException as exc:  # never unwind through C
                self.error = exc
        self._cbs = [_hook(vm, UC_HOOK_MEM_WRITE, on_access), _hook(vm, UC_HOOK_MEM_READ_AFTER, on_access)]

    def take(self) -> list[int]:
        """The records since the last call (the list is reused: copy before the next step)."""
        items = self.items[:]
        self.items.clear()
        return items


class StreamVerifier:
    """Checks a VMM mode's accesses against the reference's stream, and its fills against the
    guest's tables."""

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        self.p2m = vm.p2m
        self.expected: list[int] = []
        self.accesses = 0
        self.fills_checked = 0
        self.bad: AccessDivergence | None = None
        self.error: BaseException | None = None
        on_access, self._begin, self._position = self._make_hook()
        self._cbs = [_hook(vm, UC_HOOK_MEM_WRITE, on_access), _hook(vm, UC_HOOK_MEM_READ_AFTER, on_access)]
        translate = vm.mmu.translate

        def checked_translate(cr3: int, va: int, acc: int, user: bool, ctl: int) -> int:
            r = translate(cr3, va, acc, user, ctl)
            if self.bad is None and vm.vcpu.in_slice:
                try:
                    self._check_fill(cr3, va, acc, user, ctl, r)
                except BaseException as exc:
                    self.error = exc
            return r
        # Per instance and only here: the fill hook of a VM that is not checked is untouched.
        vm.mmu.translate = checked_translate

    def begin(self, expected: list[int]) -> None:
        """Start a checkpoint: the reference's records for it."""
        self.expected = expected
        self._begin(expected)

    @property
    def pos(self) -> int:
        return self._position()

    def end(self) -> AccessDivergence | None:
        """End a checkpoint: the first difference, including a stream that ended early."""
        if self.error is not None:
            raise self.error
        pos = self.pos
        self.accesses += pos // ITEM
        if self.bad is None and pos < len(self.expected):
            e = self.expected[pos:pos + ITEM]
            self.bad = AccessDivergence(self.vm.config.name, pos // ITEM, e[0], "the reference made "
                                        f"{(len(self.expected) - pos) // ITEM} more access(es) in this "
                                        "checkpoint; the first one is missing here",
                                        theirs=(e[1], e[2], e[3], e[4]))
        return self.bad

    # -- the access hook ------------------------------------------------------------

    def _make_hook(self):
        """The access hook and its state, as closures: the hot path of a check run reads
        cells, not attributes. The common case (agreement with a private, shared or untouched
        page) is decided inline over the p2m's own arrays; anything else is looked at slowly."""
        exp: list[int] = []
        pos = 0
        done = False
        now = self.vm.vcpu.now
        state = self.p2m.state.item
        frame = self.p2m.value.item
        slow = self._check_slowly

        def on_access(_h, kind, addr, size, value, _ud) -> None:
            nonlocal pos, done
            j = pos
            pos = j + ITEM
            if done:
                return
            try:
                g = exp[j + 2]
                if exp[j + 1] == kind and exp[j + 4] == value and exp[j + 3] == size and not (g ^ addr) & 0xFFF \
                        and exp[j] == now():
                    st = state(g >> 12)
                    if kind != UC_MEM_WRITE:
                        if (st == _PRIVATE or st == _SHARED) and frame(g >> 12) == addr >> 12 \
                                or st == _UNBACKED and addr >> 12 == ZERO_FRAME:
                            return
                    elif st == _PRIVATE and frame(g >> 12) == addr >> 12:
                        return
            except IndexError:
                pass       # past the reference's records, or a gfn outside RAM (the APIC)
            try:
                done = slow(j, kind, addr, size, value)
            except BaseException as exc:   # never unwind through C
                self.error = exc
                done = True

        def begin(expected: list[int]) -> None:
            nonlocal exp, pos, done
            exp, pos, done = expected, 0, self.bad is not None

        def position() -> int:
            return pos

        return on_access, begin, position

    def _check_slowly(self, j: int, kind: int, addr: int, size: int, value: int) -> bool:
        """The access the fast path did not accept; True if it differs (then recorded)."""
        exp = self.expected
        if j + ITEM > len(exp):
            self._diverged(j, kind, addr, size, value, "an access the reference did not make")
        elif exp[j + 1] != kind or exp[j + 3] != size or exp[j + 4] != value or (exp[j + 2] ^ addr) & 0xFFF:
            what = [w for w, bad in (("kind", exp[j + 1] != kind), ("size", exp[j + 3] != size),
                                     ("value", exp[j + 4] != value),
                                     ("page offset", (exp[j + 2] ^ addr) & 0xFFF)) if bad]
            self._diverged(j, kind, addr, size, value, " and ".join(what) + " differ")
        elif exp[j] != self.vm.vcpu.now():
            self._diverged(j, kind, addr, size, value, f"made by instruction {self.vm.vcpu.now():,}, "
                                                       f"the reference's by instruction {exp[j]:,}")
        elif self._backing(exp[j + 2] >> 12, kind == UC_MEM_WRITE) != addr >> 12:
            self._diverged(j, kind, addr, size, value, "a machine page that does not back the reference's "
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

    def _diverged(self, j: int, kind: int, addr: int, size: int, value: int, what: str) -> None:
        v = self.vm.vcpu
        exp = self.expected[j:j + ITEM]
        theirs = (exp[1], exp[2], exp[3], exp[4]) if len(exp) == ITEM else None
        rip = v.rip
        insn, va = instruction_and_va(v, rip, (theirs[1] if theirs else addr) & 0xFFF)
        self.bad = AccessDivergence(self.vm.config.name, j // ITEM, v.now(), what, rip, insn, va,
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
