"""Event delivery through the guest IDT: what the CPU does on an exception or interrupt.

Unicorn never delivers an event itself (docs/ENGINE.md U10), so the VMM does it the
way the hardware would in 64-bit mode (Intel SDM vol. 3 §6.12-6.15) — in every MMU mode,
the reference (``native``) included; ``check/delivery_matrix.py`` checks it against an
independent oracle (``check/delivery_oracle.py``) for that reason:

1. read the 16-byte gate from the IDT (a supervisor, implicit access);
2. check it: an interrupt (0xE) or trap (0xF) gate, present, and for a software
   ``int N``/``int3`` a DPL that allows the current CPL; a fault here names the IDT
   entry (``vector * 8 + 2``) with EXT set unless the event was a software interrupt;
3. pick the stack: TSS.ISTn when the gate names an IST, else TSS.RSPn when the
   privilege changes, else the current one; align it to 16 bytes;
4. push SS, RSP, RFLAGS (RF set for a fault-class exception, §17.3.1.1), CS, RIP and
   the error code (exceptions only, never ``int N``), setting A/D bits on the way;
5. load CS (and a NULL SS on a privilege change) — through the CPU-state blob,
   since Unicorn cannot change the CPL otherwise — and clear QEMU's remembered
   exception so the next fault is not taken for a double fault (docs/ENGINE.md U11);
6. RIP = handler; RFLAGS loses TF, NT, RF, and IF for interrupt gates.

A fault while delivering is a fault of the instruction (for ``int N`` the int itself,
whose start RIP no longer shows). Delivering an exception, it becomes #DF where the two
are contributory (or involve #PF) as the SDM's double-fault table says, else it is
delivered instead; delivering a software or external interrupt it is simply delivered,
whatever the vector's number. A fault while delivering #DF is a triple fault and stops
the VM.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from unicorn import x86_const as X

from ..mmu.walk import ACC_FETCH, ACC_READ, FAULT_GP
from .cpustate import SegmentCache, descriptor_cache
from .exits import (BP, CONTRIBUTORY, DF, FAULT_VECTORS, GP, NP, PF, TS, VECTORS_WITH_ERROR_CODE,
                    vector_name)
from .vcpu import GuestAccessFault, VCpu

RFLAGS_TF = 1 << 8
RFLAGS_IF = 1 << 9
RFLAGS_NT = 1 << 14
RFLAGS_RF = 1 << 16
RFLAGS_VM = 1 << 17

GATE_INTERRUPT = 0xE
GATE_TRAP = 0xF


class DeliveryFault(Exception):
    """An exception raised while delivering another one."""

    def __init__(self, vector: int, error_code: int | None = 0, cr2: int | None = None) -> None:
        super().__init__(f"{vector_name(vector)} during delivery")
        self.vector = vector
        self.error_code = error_code
        self.cr2 = cr2


@dataclass
class TripleFault(Exception):
    """Delivery of #DF faulted: the guest is dead."""

    chain: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return "triple fault: " + " -> ".join(self.chain)


def _is_double(first: int, second: int) -> bool:
    """Does ``second``, raised while delivering ``first``, make a #DF? (SDM table 6-5)"""
    if first == PF:
        return second == PF or second in CONTRIBUTORY
    if first in CONTRIBUTORY:
        return second in CONTRIBUTORY
    return False


class EventInjector:
    """Delivers exceptions and interrupts to one vCPU through its guest's IDT."""

    def __init__(self, vcpu: VCpu) -> None:
        self.vcpu = vcpu
        self.delivered: dict[int, int] = {}
        # (vector, error code, cr2, RIP of the event) per delivered event, when keep_log
        self.log: list[tuple[int, int | None, int | None, int]] = []
        self.keep_log = False

    def deliver(self, vector: int, error_code: int | None = None, *, cr2: int | None = None,
                soft: bool = False, external: bool = False) -> None:
        """Deliver one event; raise TripleFault if that proves impossible.

        ``soft``: ``int N``/``int3`` (RIP is already past the instruction); ``external``:
        an interrupt from the PIC or APIC; otherwise a hardware exception.
        """
        chain = [self._describe(vector, error_code, cr2)]
        rip = self.vcpu.rip if self.keep_log else 0
        first = vector
        fault_rip = None   # set once a fault raised while delivering replaces the event
        while True:
            exception = not (soft or external)
            if not exception or vector not in VECTORS_WITH_ERROR_CODE:
                error_code = None
            elif error_code is None:
                error_code = 0
            try:
                if vector == PF and cr2 is not None:
                    self.vcpu.set_reg(X.UC_X86_REG_CR2, cr2)
                self._deliver_once(vector, error_code, soft, external, fault_rip)
                self.delivered[vector] = self.delivered.get(vector, 0) + 1
                if self.keep_log:
                    self.log.append((vector, error_code, cr2, rip))
                return
            except DeliveryFault as f:
                chain.append(self._describe(f.vector, f.error_code, f.cr2))
                # Only an exception can make a double fault (SDM table 6-5): a fault while
                # delivering `int N` or an external interrupt is delivered as it is, whatever
                # the vector's number.
                if exception and vector == DF:
                    raise TripleFault(chain) from None
                if exception and _is_double(vector, f.vector):
                    vector, error_code, cr2 = DF, 0, None
                    chain.append(self._describe(DF, 0, None))
                    if f.vector == PF:
                        self.vcpu.set_reg(X.UC_X86_REG_CR2, f.cr2)
                else:
                    vector, error_code, cr2 = f.vector, f.error_code, f.cr2
                if fault_rip is None:
                    # A fault reports the instruction that caused it: for `int N` that is
                    # the int itself, not the next instruction RIP already points to.
                    fault_rip = self._soft_start(first) if soft else self.vcpu.rip
                soft = external = False

    def _soft_start(self, vector: int) -> int:
        """The address of the `int3` (CC) or `int N` (CD ib) that raised ``vector``.

        Unicorn reports a software interrupt with RIP past it and keeps no record of
        where it began; the only one-byte form is int3, vector 3 (a prefixed `int N` is
        taken as two bytes).
        """
        rip = self.vcpu.rip
        if vector == BP:
            try:
                if self.vcpu.vmem_read(rip - 1, 1, ACC_FETCH, peek=True) == b"\xcc":
                    return rip - 1
            except GuestAccessFault:
                pass
        return rip - 2

    @staticmethod
    def _describe(vector: int, error_code: int | None, cr2: int | None) -> str:
        s = vector_name(vector)
        if error_code is not None:
            s += f"(err={error_code:#x})"
        if cr2 is not None:
            s += f"[cr2={cr2:#x}]"
        return s

    # -- one attempt ------------------------------------------------------------------

    def _read(self, va: int, size: int) -> bytes:
        try:
            return self.vcpu.vmem_read(va, size, ACC_READ)
        except GuestAccessFault as f:
            raise self._fault(f) from None

    def _push(self, rsp: int, data: bytes) -> None:
        """Write a stack frame as successive pushes would: the highest page first.

        The first push that faults decides CR2, so a fault is reported at the highest
        qword of the page that failed, as the CPU's first failing push would be.
        """
        end = rsp + len(data)
        while end > rsp:
            start = max(rsp, (end - 1) & ~0xFFF)
            try:
                self.vcpu.vmem_write(start, data[start - rsp:end - rsp])
            except GuestAccessFault as f:
                f.va = end - 8
                raise self._fault(f) from None
            end = start

    @staticmethod
    def _fault(f: GuestAccessFault) -> DeliveryFault:
        if f.fault & FAULT_GP:
            return DeliveryFault(GP, 0)
        return DeliveryFault(PF, f.fault, f.va)

    def _deliver_once(self, vector: int, error_code: int | None, soft: bool, external: bool,
                      fault_rip: int | None) -> None:
        vcpu = self.vcpu
        # EXT (bit 0 of the error code of a fault raised here): the event came from outside
        # the program — an external interrupt or an exception, anything but `int N`/`int3`.
        ext = 0 if soft else 1
        idt_err = vector * 8 + 2 + ext
        _, idt_base, idt_limit, _ = vcpu.table_reg(X.UC_X86_REG_IDTR)
        if vector * 16 + 15 > idt_limit:
            raise DeliveryFault(GP, idt_err)
        lo, hi = struct.unpack("<QQ", self._read(idt_base + vector * 16, 16))
        gate_type = (lo >> 40) & 0xF
        gate_dpl = (lo >> 45) & 3
        cpl = vcpu.cpl()
        if gate_type not in (GATE_INTERRUPT, GATE_TRAP):
            raise DeliveryFault(GP, idt_err)
        if soft and gate_dpl < cpl:
            raise DeliveryFault(GP, idt_err)
        if not (lo >> 47) & 1:
            raise DeliveryFault(NP, idt_err)
        handler = (lo & 0xFFFF) | ((lo >> 48) << 16) | ((hi & 0xFFFFFFFF) << 32)
        selector = (lo >> 16) & 0xFFFF
        ist = (lo >> 32) & 7

        # The target code segment decides the new CPL.
        if selector & ~3 == 0 or selector & 4:
            raise DeliveryFault(GP, (selector & ~3) + ext)
        _, gdt_base, gdt_limit, _ = vcpu.table_reg(X.UC_X86_REG_GDTR)
        if (selector | 7) > gdt_limit:
            raise DeliveryFault(GP, (selector & ~3) + ext)
        desc = struct.unpack("<Q", self._read(gdt_base + (selector & ~7), 8))[0]
        is_code = (desc >> 43) & 1 and (desc >> 44) & 1
        if not is_code or not (desc >> 53) & 1:  # a 64-bit code segment
            raise DeliveryFault(GP, (selector & ~3) + ext)
        if not (desc >> 47) & 1:
            raise DeliveryFault(NP, (selector & ~3) + ext)
        conforming = (desc >> 42) & 1
        new_cpl = cpl if conforming else (desc >> 45) & 3
        if new_cpl > cpl:
            raise DeliveryFault(GP, (selector & ~3) + ext)

        rsp = vcpu.reg(X.UC_X86_REG_RSP)
        old_ss = vcpu.reg(X.UC_X86_REG_SS)
        if new_cpl < cpl or ist:
            _, tss_base, tss_limit, _ = vcpu.table_reg(X.UC_X86_REG_TR)
            off = 0x24 + 8 * (ist - 1) if ist else 4 + 8 * new_cpl
            if off + 7 > tss_limit:
                raise DeliveryFault(TS, (vcpu.table_reg(X.UC_X86_REG_TR)[0] & ~3) + ext)
            new_rsp = struct.unpack("<Q", self._read(tss_base + off, 8))[0]
        else:
            new_rsp = rsp
        new_rsp &= ~0xF
        rflags = vcpu.reg(X.UC_X86_REG_RFLAGS)
        old_cs = vcpu.reg(X.UC_X86_REG_CS)
        pushed_flags = rflags
        if not (soft or external) and vector in FAULT_VECTORS:
            pushed_flags |= RFLAGS_RF  # SDM §17.3.1.1: a fault pushes RF = 1
        frame = [vcpu.rip if fault_rip is None else fault_rip, old_cs, pushed_flags, rsp, old_ss]
        if error_code is not None:
            frame.insert(0, error_code)
        new_rsp -= 8 * len(frame)
        self._push(new_rsp, struct.pack(f"<{len(frame)}Q", *frame))

        # Commit: from here on nothing can fault.
        new_cs = (selector & ~3) | new_cpl
        if new_cpl != cpl:
            vcpu.state.edit(cpl=new_cpl, cs=descriptor_cache(new_cs, desc),
                            ss=SegmentCache(new_cpl, 0, 0, new_cpl << 13))
        elif new_cs != old_cs:
            vcpu.state.edit(cs=descriptor_cache(new_cs, desc))
        else:
            vcpu.state.edit()  # only forget the exception (docs/ENGINE.md U11)
        rflags &= ~(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM)
        if gate_type == GATE_INTERRUPT:
            rflags &= ~RFLAGS_IF
        vcpu.set_reg(X.UC_X86_REG_RSP, new_rsp)
        vcpu.set_reg(X.UC_X86_REG_RFLAGS, rflags)
        vcpu.set_reg(X.UC_X86_REG_RIP, handler)
