"""One virtual CPU: a Unicorn instance, its hooks, and a run loop that returns exits as values.

The TLB-fill hook is where the VMM lives (docs/ENGINE.md U1-U4): with
``UC_TLB_VIRTUAL`` every Unicorn TLB miss asks :meth:`VCpu._fill` for the
machine address and rights of a guest-virtual page, and the VM's MMU decides.
The hook is registered through a raw ctypes callback (no binding wrapper), reads
the control registers in one batched call into preallocated buffers, and keeps
everything else out of the way. A refused fill records the fault; the run loop
turns it into an exception exit.

In the reference mode (``native=True``) Unicorn's own x86 MMU walks the guest
tables over flat guest-physical memory and there is no fill hook at all.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

from unicorn import (UC_ARCH_X86, UC_HOOK_INSN, UC_HOOK_INSN_INVALID, UC_HOOK_INTR,
                     UC_HOOK_TLB_FILL, UC_MEM_FETCH, UC_MEM_READ, UC_MEM_WRITE, UC_MODE_64, UC_PROT_ALL,
                     UC_PROT_EXEC, UC_PROT_READ, UC_PROT_WRITE, UC_TLB_CPU, UC_TLB_VIRTUAL, Uc, UcError)
from unicorn import x86_const as X
from unicorn.unicorn_py3.unicorn import HOOK_TLB_FILL_CFUNC, uclib

from ..mmu.base import MMU
from ..mmu.p2m import AllocationBlocked
from ..mmu.walk import (ACC_FETCH, ACC_READ, ACC_WRITE, ADDR_MASK, CR0_PG, EFER_LMA, FAULT_GP, PERM_R, PERM_W, PERM_X,
                        WALK_1G, WALK_LARGE, paging_ctl, static_assert_layout, walk)
from .cpustate import CpuStateEditor, verify_offsets
from .cpuid import cpuid
from .exits import GP, PF, UD, ExitReason, VmExit

if TYPE_CHECKING:
    from ..devices.bus import IOBus

def engine_layout_problems(c) -> list[str]:
    """What does not match Unicorn in namespace ``c``: the fill hook hands ``r & 7`` to Unicorn
    as ``uc_tlb_entry.perms`` and turns Unicorn's access type into ``ACC_*`` by subtracting 16."""
    out = []
    for perm, prot in (("PERM_R", UC_PROT_READ), ("PERM_W", UC_PROT_WRITE), ("PERM_X", UC_PROT_EXEC)):
        if c[perm] != prot:
            out.append(f"{perm} must equal Unicorn's UC_PROT value {prot}")
    for acc, mem in (("ACC_READ", UC_MEM_READ), ("ACC_WRITE", UC_MEM_WRITE), ("ACC_FETCH", UC_MEM_FETCH)):
        if c[acc] != mem - 16:
            out.append(f"{acc} must be Unicorn's UC_MEM value {mem} - 16")
    return out


static_assert_layout(engine_layout_problems(globals()), __name__)

CPU_MODEL = X.UC_CPU_X86_DENVERTON  # NX, SMEP, SMAP, 1 GiB pages, MAXPHYADDR 40, no PKU

MSR_EFER = 0xC0000080
# uc_ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE): the binding has no wrapper (docs/ENGINE.md U5).
_CTL_TLB_FLUSH = (1 << 30) | 11
# Unicorn's TLB starts at 256 entries per privilege and doubles (up to 2^20) only at a
# flush that finds it more than 70 % used (docs/ENGINE.md U7, re-checked on 2.1.4: 4,096
# pages written in a loop cost 4,096 fills per pass until 4 flushes later, then 0). A
# workload that never flushes would thrash 256 entries forever, so the fill hook flushes
# once fills since the last flush reach twice the size it believes the TLB has.
_TLB_START = 256
_TLB_MIN = 64
_TLB_MAX = 1 << 20


def _tlb_size_after_flush(size: int, used: int) -> int:
    """QEMU's tlb_mmu_resize_locked (accel/tcg/cputlb.c), with ``used`` = fills since the
    last flush standing in for the entries in use: double above 70 %, shrink below 30 %
    (QEMU shrinks only once a 100 ms window has passed; assuming it did errs towards an
    early growth flush, which is cheap)."""
    if used * 10 > size * 7:
        return min(2 * size, _TLB_MAX)
    if used * 10 < size * 3:
        ceil = 1 << max(0, used - 1).bit_length()
        if used * 10 > ceil * 7:
            ceil *= 2
        return max(ceil, _TLB_MIN)
    return size


class _Msr(ctypes.Structure):
    _fields_ = (("rid", ctypes.c_uint32), ("val", ctypes.c_uint64))


class _Mmr(ctypes.Structure):
    _fields_ = (("selector", ctypes.c_uint16), ("base", ctypes.c_uint64),
                ("limit", ctypes.c_uint32), ("flags", ctypes.c_uint32))


class UnsupportedPagingMode(Exception):
    """The guest turned on a paging mode the VMM does not model (32-bit or PAE paging
    without long mode): stopping is better than walking its tables as 4-level ones."""


class GuestAccessFault(Exception):
    """A VMM access to guest-virtual memory faulted (walk fault code in ``fault``)."""

    def __init__(self, fault: int, va: int, acc: int) -> None:
        super().__init__(f"fault {fault:#x} at {va:#x}")
        self.fault = fault
        self.va = va
        self.acc = acc


class VCpu:
    """A vCPU: Unicorn instance + fill hook + I/O and exception hooks + run loop."""

    def __init__(self, mem_host_addr: int, mem_size: int, mem_q: memoryview, mem_mv: memoryview,
                 mmu: MMU, io: "IOBus", *, native: bool = False) -> None:
        self.offsets = verify_offsets()
        self.mmu = mmu
        self.io = io
        self.native = native
        self.q = mem_q
        self.mv = mem_mv
        uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.ctl_set_cpu_model(CPU_MODEL)
        uc.ctl_set_tlb_mode(UC_TLB_CPU if native else UC_TLB_VIRTUAL)
        uc.mem_map_ptr(0, mem_size, UC_PROT_ALL, mem_host_addr)
        self.uc = uc
        self.h = uc._uch
        self.state = CpuStateEditor(uc)
        self._counter = ctypes.c_uint64.from_address(self.h.value + self.offsets["emu_counter"])
        self._invalid_addr = ctypes.c_uint64.from_address(self.h.value + self.offsets["invalid_addr"])

        # One batched register read per fill, into preallocated buffers: CR0, CR3, CR4, CS,
        # RFLAGS, EFER, and the system-table registers GDTR, IDTR, TR, LDTR (read every
        # time, so a guest reloading them mid-slice is always seen; in C the four extra
        # registers cost next to nothing next to the call itself).
        ids = (X.UC_X86_REG_CR0, X.UC_X86_REG_CR3, X.UC_X86_REG_CR4, X.UC_X86_REG_CS,
               X.UC_X86_REG_EFLAGS, X.UC_X86_REG_MSR, X.UC_X86_REG_GDTR, X.UC_X86_REG_IDTR,
               X.UC_X86_REG_TR, X.UC_X86_REG_LDTR)
        self._nregs = len(ids)
        self._reg_ids = (ctypes.c_int32 * len(ids))(*ids)
        self._regs = (ctypes.c_uint64 * 5)()
        self._efer = _Msr(MSR_EFER, 0)
        self._tables = tuple(_Mmr() for _ in range(4))
        base = ctypes.addressof(self._regs)
        self._reg_ptrs = (ctypes.c_void_p * len(ids))(*(base + 8 * i for i in range(5)),
                                                      ctypes.addressof(self._efer),
                                                      *(ctypes.addressof(m) for m in self._tables))
        # TLB growth (see _TLB_START): fills since our last flush, and the size we believe
        # Unicorn's TLB has.
        self._since_flush = 0
        self._tlb_size = _TLB_START

        # What stopped the slice, set by hooks.
        self.pending: VmExit | None = None
        self.hook_error: BaseException | None = None
        self.insns = 0
        self._running = False
        self.tlb_fills = 0
        self.tlb_flushes = 0
        self.exits: dict[str, int] = {}
        # Per-frame "code was fetched from here" flags of the machine pool, if any.
        self.fetched = None
        self.pool = None
        # Regions (va >> 21, va >> 30) of guest large pages with pieces in Unicorn's TLB.
        self.large_2m: set[int] = set()
        self.large_1g: set[int] = set()
        # The INVLPG intercept (vm/intercept.py), which the VM gives a vCPU whose MMU asks for
        # it (it costs every instruction a code-hook check); nested keeps large-page pieces
        # coherent by write protection instead.
        self.invlpg = None
        # OUT to these ports ends the slice (the VM sets the timer/PIC ports).
        self.kick_ports: frozenset[int] = frozenset()
        self._stop_counter = -1

        if not native:
            self._fill_cb = HOOK_TLB_FILL_CFUNC(self._fill)
            hh = ctypes.c_size_t()
            err = uclib.uc_hook_add(self.h, ctypes.byref(hh), UC_HOOK_TLB_FILL,
                                    ctypes.cast(self._fill_cb, ctypes.c_void_p), None,
                                    ctypes.c_uint64(1), ctypes.c_uint64(0))
            if err:
                raise UcError(err)
        uc.hook_add(UC_HOOK_INTR, self._on_intr)
        uc.hook_add(UC_HOOK_INSN_INVALID, self._on_invalid)
        uc.hook_add(UC_HOOK_INSN, self._on_in, None, 1, 0, X.UC_X86_INS_IN)
        uc.hook_add(UC_HOOK_INSN, self._on_out, None, 1, 0, X.UC_X86_INS_OUT)
        uc.hook_add(UC_HOOK_INSN, self._on_cpuid, None, 1, 0, X.UC_X86_INS_CPUID)

    # -- the fill hook (hot path) -----------------------------------------------------

    def _fill(self, _h: int, vaddr: int, access: int, entry: ctypes._Pointer, _ud: int) -> bool:
        try:
            uclib.uc_reg_read_batch(self.h, self._reg_ids, self._reg_ptrs, self._nregs)
            cr0, cr3, cr4, cs, rflags = self._regs
            if cr0 & CR0_PG and not self._efer.val & EFER_LMA:
                raise UnsupportedPagingMode(
                    f"the guest enabled paging without long mode (CR0 {cr0:#x}, EFER {self._efer.val:#x}): "
                    "32-bit and PAE paging are not modelled, only 4-level paging in long mode")
            acc = access - 16
            user = cs & 3 == 3
            implicit = user and acc != ACC_FETCH and self._is_system_table(vaddr)
            if implicit:
                user = False
            ctl = paging_ctl(cr0, cr4, self._efer.val, rflags, user, implicit)
            r = self.mmu.translate(cr3, vaddr, acc, user, ctl)
            self.tlb_fills += 1
            if r < 0:
                self._record_fault(~r, acc)
                return False
            self._since_flush += 1
            if self.mmu.flush_pending or self._since_flush > 2 * self._tlb_size:
                # Before this entry goes in (Unicorn inserts it after we return), and
                # before its large-page region is recorded: a flush forgets regions.
                # A flush because fills are high lets Unicorn's TLB grow (_TLB_START).
                self.flush_tlb()
            e = entry[0]
            e.paddr = r & ADDR_MASK
            e.perms = r & 7
            if r & WALK_LARGE and self.invlpg is not None:
                # A 4 KiB piece of a guest large page: remember its region, so a guest
                # INVLPG anywhere in it can drop all of it (vm/intercept.py).
                if r & WALK_1G:
                    self.large_1g.add(vaddr >> 30)
                else:
                    self.large_2m.add(vaddr >> 21)
            if acc == ACC_FETCH:
                if self.fetched is not None:
                    self.fetched[r >> 12] = True
                if self.invlpg is not None:
                    self.invlpg.scan(vaddr, r & ADDR_MASK)
            return True
        except AllocationBlocked:
            # Refusing the fill restarts the instruction (x86 faults are precise); no
            # guest event is recorded, so the next slice simply runs it again.
            self.pending = VmExit(ExitReason.BLOCKED)
            self._stop(self.uc)
            # Not begun: the instruction runs whole later and counts then (otherwise every
            # stall would add one guest instruction — fault injection's reference runs saw
            # it). A data access comes from a counted instruction; a fetch fills while its
            # block is translated, before any of it is counted.
            if access != UC_MEM_FETCH:
                self._stop_counter -= 1
            return False
        except BaseException as exc:  # never let an exception unwind through C
            if self.hook_error is None:
                self.hook_error = exc
            self.uc.emu_stop()
            return False

    def _is_system_table(self, vaddr: int) -> bool:
        """Is this page part of the GDT, LDT, IDT or TSS? (implicit supervisor access)

        The four registers were read by this fill's batched read.
        """
        for m in self._tables:
            limit = m.limit
            if limit and m.base & ADDR_MASK <= vaddr <= m.base + limit:
                return True
        return False

    def _record_fault(self, fault: int, acc: int) -> None:
        self._stop_counter = self._counter.value
        if fault & FAULT_GP:
            self.pending = VmExit(ExitReason.EXCEPTION, vector=GP, error_code=0)
        else:
            # The exact address is stored by Unicorn only after this hook returns
            # (unicorn_vtlb.c raise_mmu_exception): run() fills in CR2.
            self.pending = VmExit(ExitReason.EXCEPTION, vector=PF, error_code=fault, cr2=-1)

    # -- other hooks ----------------------------------------------------------------------

    def _on_intr(self, uc: Uc, intno: int, _ud: object) -> None:
        err, soft = self.state.exception_info()
        if self.native and intno == PF and not soft:
            # The reference MMU raised the #PF itself; CR2 is already set by QEMU.
            # (`int 14` is a software interrupt: no error code, CR2 untouched.)
            self.pending = VmExit(ExitReason.EXCEPTION, vector=PF, error_code=err,
                                  cr2=uc.reg_read(X.UC_X86_REG_CR2))
        else:
            self.pending = VmExit(ExitReason.EXCEPTION, vector=intno,
                                  error_code=err if not soft else None, soft=soft)
        self._stop(uc)

    def _on_invalid(self, uc: Uc, _ud: object) -> bool:
        _, soft = self.state.exception_info()
        if soft:
            # `int 6` arrives here, as QEMU raises it like #UD, with RIP on the int: it
            # is a software interrupt (DPL check, trap: the frame has the next RIP).
            uc.reg_write(X.UC_X86_REG_RIP, self.state.exception_next_rip())
        self.pending = VmExit(ExitReason.EXCEPTION, vector=UD, soft=soft)
        self._stop(uc)
        return True

    def _on_in(self, uc: Uc, port: int, size: int, _ud: object) -> int:
        try:
            return self.io.read(port, size)
        except BaseException as exc:
            self._hook_failed(exc)
            return 0

    def _on_out(self, uc: Uc, port: int, size: int, value: int, _ud: object) -> None:
        try:
            self.io.write(port, size, value)
            if self.pending is None and port in self.kick_ports:
                # A timer or interrupt-controller write can move the next event:
                # end the slice so the run loop recomputes it.
                self.pending = VmExit(ExitReason.SLICE_END)
            if self.pending is not None:
                self._stop(uc)
        except BaseException as exc:
            self._hook_failed(exc)

    def _on_cpuid(self, uc: Uc, _ud: object) -> int:
        # The VMM answers every leaf (vm/cpuid.py); nonzero tells Unicorn to skip its own.
        try:
            regs = cpuid(uc.reg_read(X.UC_X86_REG_EAX), uc.reg_read(X.UC_X86_REG_ECX))
            for rid, val in zip((X.UC_X86_REG_RAX, X.UC_X86_REG_RBX, X.UC_X86_REG_RCX, X.UC_X86_REG_RDX), regs):
                uc.reg_write(rid, val)
        except BaseException as exc:
            self._hook_failed(exc)
        return 1

    def _stop(self, uc: Uc) -> None:
        # Unicorn may count the next instruction of the block before the stop takes
        # effect; the count at the hook is the exact number of instructions begun.
        self._stop_counter = self._counter.value
        uc.emu_stop()

    def _hook_failed(self, exc: BaseException) -> None:
        if self.hook_error is None:
            self.hook_error = exc
        self.uc.emu_stop()

    def request_exit(self, exit_: VmExit, *, before: bool = False) -> None:
        """Devices call this (through the VM) to end the slice after the current instruction.

        ``before``: called from a code hook (a breakpoint), the current instruction has
        not run yet, but Unicorn has already counted it.
        """
        self.pending = exit_
        self._stop(self.uc)
        if before:
            self._stop_counter -= 1

    # -- running -------------------------------------------------------------------------

    def run(self, budget: int) -> VmExit:
        """Run at most ``budget`` instructions; return why the slice ended."""
        self.pending = None
        self.hook_error = None
        self._stop_counter = -1
        rip = self.uc.reg_read(X.UC_X86_REG_RIP)
        error: UcError | None = None
        self._running = True
        pool = self.pool
        if pool is not None:
            pool.running += 1
        try:
            self.uc.emu_start(rip, 0, count=budget)
        except UcError as e:
            error = e
        finally:
            self._running = False
            if pool is not None:
                pool.running -= 1
        self.mmu.on_exit()
        if self.mmu.flush_pending:
            self.flush_tlb()
        counted = self._counter.value if self._stop_counter < 0 else self._stop_counter
        self.insns += min(counted, budget)
        if self.hook_error is not None:
            exc, self.hook_error = self.hook_error, None
            raise exc
        if self.pending is not None:
            ex = self.pending
            if ex.cr2 == -1:
                ex.cr2 = self._invalid_addr.value
        elif error is not None:
            ex = VmExit(ExitReason.ERROR, message=f"engine error at RIP {self.rip:#x}: {error}")
        elif counted > budget:
            ex = VmExit(ExitReason.SLICE_END)
        elif self._halted():
            ex = VmExit(ExitReason.HLT)
        else:
            ex = VmExit(ExitReason.ERROR, message=f"engine stopped without a reason at RIP {self.rip:#x}")
        name = ex.reason.value
        self.exits[name] = self.exits.get(name, 0) + 1
        return ex

    @property
    def in_slice(self) -> bool:
        """True while guest code runs: inside a hook, as opposed to the VMM between slices."""
        return self._running

    def now(self) -> int:
        """Instructions executed so far, including the slice in progress (for device clocks)."""
        if self._running:
            return self.insns + self._counter.value
        return self.insns

    def _halted(self) -> bool:
        try:
            return self.vmem_read(self.rip - 1, 1, ACC_FETCH, peek=True) == b"\xf4"
        except GuestAccessFault:
            return False

    def flush_tlb(self) -> None:
        """Drop every entry of Unicorn's TLB (safe inside the fill hook)."""
        uclib.uc_ctl(self.h, _CTL_TLB_FLUSH)
        self.tlb_flushes += 1
        self._tlb_size = _tlb_size_after_flush(self._tlb_size, self._since_flush)
        self._since_flush = 0
        self.large_2m.clear()
        self.large_1g.clear()
        self.mmu.flush_pending = False

    # -- registers ------------------------------------------------------------------------

    @property
    def rip(self) -> int:
        return self.uc.reg_read(X.UC_X86_REG_RIP)

    def reg(self, rid: int) -> int:
        """Read one register by Unicorn id."""
        return self.uc.reg_read(rid)

    def set_reg(self, rid: int, value: int) -> None:
        """Write one register by Unicorn id."""
        self.uc.reg_write(rid, value)

    def efer(self) -> int:
        return self.uc.reg_read(X.UC_X86_REG_MSR, MSR_EFER)

    def table_reg(self, rid: int) -> tuple[int, int, int, int]:
        """(selector, base, limit, flags) of GDTR/IDTR/TR/LDTR."""
        return self.uc.reg_read(rid)

    def cpl(self) -> int:
        return self.uc.reg_read(X.UC_X86_REG_CS) & 3

    # -- guest-virtual memory for the VMM (event delivery, reports) ---------------------

    def translate(self, va: int, acc: int, *, user: bool = False, implicit: bool = True,
                  peek: bool = False) -> int:
        """GVA → address in this vCPU's physical buffer, as a guest access would.

        Sets A/D bits like the hardware (delivery pushes do), unless ``peek``.
        Raises GuestAccessFault with the walk's fault code.
        """
        # The fill hook's batched read (not running a fill now: the buffers are free).
        uclib.uc_reg_read_batch(self.h, self._reg_ids, self._reg_ptrs, self._nregs)
        cr0, cr3, cr4, _, rflags = self._regs
        ctl = paging_ctl(cr0, cr4, self._efer.val, rflags, user, implicit)
        if peek:
            r = walk(PeekMemory(self), cr3, va, ACC_READ, user, ctl)
            if r >= 0:
                r = self._peek_phys(r)
        else:
            try:
                r = self.mmu.translate(cr3, va, acc, user, ctl)
            except AllocationBlocked:
                # The VMM's own access (an event's stack pushes, a report) cannot stall and
                # restart like a guest instruction (found by fault injection: a blocked
                # push escaped event delivery): it allocates past the low-state block.
                with self.mmu.p2m.unblocked():
                    r = self.mmu.translate(cr3, va, acc, user, ctl)
        if r < 0:
            raise GuestAccessFault(~r, va, acc)
        if not peek and self.mmu.flush_pending:
            self.flush_tlb()
        return (r & ADDR_MASK) | (va & 0xFFF)

    def _peek_phys(self, r: int) -> int:
        pa = self.mmu.peek_gpa(r & ADDR_MASK)
        return pa if pa < 0 else pa | (r & 7)

    def vmem_read(self, va: int, size: int, acc: int = ACC_READ, *, user: bool = False,
                  peek: bool = False) -> bytes:
        """Read guest-virtual memory, page by page."""
        out = bytearray()
        while size:
            n = min(size, 0x1000 - (va & 0xFFF))
            pa = self.translate(va, acc, user=user, peek=peek)
            out += self.mv[pa:pa + n]
            va += n
            size -= n
        return bytes(out)

    def vmem_write(self, va: int, data: bytes, *, user: bool = False) -> None:
        """Write guest-virtual memory as a guest store (A/D, copy-on-write, dirty)."""
        off = 0
        while off < len(data):
            n = min(len(data) - off, 0x1000 - (va & 0xFFF))
            pa = self.translate(va, ACC_WRITE, user=user)
            self.mv[pa:pa + n] = data[off:off + n]
            va += n
            off += n


class PeekMemory:
    """Read-only view for diagnostics: walks without setting A/D bits or resolving."""

    def __init__(self, vcpu: VCpu) -> None:
        self.vcpu = vcpu

    def read_pte(self, gpa: int) -> int:
        pa = self.vcpu.mmu.peek_gpa(gpa)
        if pa < 0:
            return 0
        return self.vcpu.q[pa >> 3]

    def write_pte(self, gpa: int, value: int) -> None:
        pass
