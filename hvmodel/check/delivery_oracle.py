"""An independent oracle for event delivery in 64-bit mode (Intel SDM vol. 3 §6.12-6.15, §17.3.1.1).

This module does NOT use :mod:`hvmodel.vm.events` or :mod:`hvmodel.mmu.walk`: it restates
from the SDM what the processor does when an exception or interrupt arrives in IA-32e
mode, so that a delivery bug in the VMM cannot be on both sides of a comparison (in the
reference mode, ``native``, events are delivered by the same VMM code as in ``nested``
and ``shadow``: Unicorn never delivers an event itself).

What the oracle takes
---------------------
* an :class:`Event`: a software interrupt ``int N`` (``KIND_INT``), ``int3``
  (``KIND_INT3``), a hardware exception (``KIND_EXCEPTION``, with its own error code
  and CR2 for #PF) or an external interrupt (``KIND_EXTERNAL``);
* the interrupted state (:class:`Cpu`): CPL, RIP of the instruction (for an external
  interrupt: the instruction that runs next), RIP of the next instruction, RSP,
  RFLAGS, CS and SS selectors;
* the IDT as a mapping vector → :class:`Gate` (type, DPL, IST, present) and the
  TSS's RSP0-2 and IST1-7 (:class:`Tss`).

The rules
---------
1. **Gate checks** (SDM "INT n/INTO/INT3/INT1" operation, IA-32e mode), in this order:
   the gate must lie inside the IDT limit and be a 64-bit interrupt (0xE) or trap (0xF)
   gate, else #GP; for a software interrupt (``int N``, ``int3``; never for hardware
   exceptions or external interrupts) the gate's DPL must be >= CPL, else #GP; the gate
   must be present, else #NP. The error code of such a fault names the IDT entry:
   ``vector * 8 + 2`` (bit 1, IDT), plus bit 0 (EXT) when the event being delivered
   was not a software interrupt — an external interrupt or a hardware exception
   (§6.13). The DPL check's #GP never has EXT (the event is a software interrupt).
2. **A fault while delivering** is itself delivered (§6.15, "Interrupt 8"): if the event
   being delivered was a hardware exception, the two classes decide — benign first:
   the second is delivered; contributory (#DE, #TS, #NP, #SS, #GP, #CP) followed by
   contributory: #DF; #PF followed by contributory or #PF: #DF; otherwise the second is
   delivered. Software and external interrupts are not exceptions: a fault delivering
   them is simply delivered. A contributory fault or #PF while delivering #DF is a
   shutdown (triple fault).
3. **The stack** (§6.14.2, §6.14.4, §6.14.5): the handler's code segment decides the new
   CPL (here always the kernel's DPL-0, non-conforming code segment, so CPL 0). With
   IST != 0 the new RSP is TSS.ISTn, whatever the CPL; otherwise on a CPL change it is
   TSS.RSPn for the new CPL, else the current RSP. In 64-bit mode the new RSP is always
   aligned down to 16 bytes before the pushes.
4. **The frame**, from high to low addresses: SS, RSP (the old ones, even without a
   privilege change), RFLAGS, CS, RIP, and the error code for hardware exceptions with
   one (#DF 8, #TS 10, #NP 11, #SS 12, #GP 13, #PF 14, #AC 17, #CP 21; never for
   ``int N`` and external interrupts, whatever the vector). The final RSP is the
   address of the lowest word.
5. **The pushed RIP**: a fault (and a fault raised while delivering anything) pushes
   the RIP of the instruction that caused it, a trap (``int N``, ``int3``) the next one,
   an external interrupt the instruction it interrupted; #DF is an abort: the saved
   CS:RIP are undefined (the oracle leaves them unchecked).
6. **The pushed RFLAGS** (§17.3.1.1): RF is 1 for every fault-class exception (except
   #DB, not raised here); 0 for software interrupts; the current value otherwise.
7. **The handler's state** (§6.12.1.3, §6.14.3): CS = the gate's selector with RPL =
   new CPL; on a CPL change SS is a NULL selector with RPL = new CPL, else unchanged;
   RFLAGS loses TF, NT, RF and VM, and IF only through an interrupt gate.
8. **#PF** loads CR2 with the faulting address; nothing else changes CR2.

Not modelled (never raised by the delivery matrix): a gate selector other than the
kernel's code segment (descriptor checks and their #GP/#NP/#TS), faults on the stack
pushes (#SS/#PF while pushing), TSS limit faults, IDT limits below 4095, #DB.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

INTERRUPT_GATE = 0xE
TRAP_GATE = 0xF

KIND_INT = "int"            # int N (CD ib): a software interrupt
KIND_INT3 = "int3"          # int3 (CC): a software interrupt, vector 3
KIND_EXCEPTION = "exception"  # an exception the processor detected
KIND_EXTERNAL = "external"  # an interrupt from the PIC or the local APIC

SOFTWARE_KINDS = frozenset({KIND_INT, KIND_INT3})

# SDM table 6-1.
DE, DB, NMI, BP, OF, BR, UD, NM, DF, TS, NP, SS_, GP, PF, MF, AC, MC, XM, VE, CP = (
    0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 16, 17, 18, 19, 20, 21)
ERROR_CODE_VECTORS = frozenset({DF, TS, NP, SS_, GP, PF, AC, CP})
FAULT_VECTORS = frozenset({DE, BR, UD, NM, TS, NP, SS_, GP, PF, MF, AC, XM, VE, CP})
TRAP_VECTORS = frozenset({BP, OF})
ABORT_VECTORS = frozenset({DF, MC})
# SDM table 6-4: the classes for double faults.
CONTRIBUTORY_VECTORS = frozenset({DE, TS, NP, SS_, GP, CP})
PAGE_FAULT_VECTORS = frozenset({PF, VE})

RF_TF = 1 << 8
RF_IF = 1 << 9
RF_NT = 1 << 14
RF_RF = 1 << 16
RF_VM = 1 << 17

KERNEL_CS = 0x08
STACK_CURRENT = "current"


@dataclass(frozen=True)
class Gate:
    """One IDT entry as the oracle sees it (its handler is the entry's vector)."""

    type: int = INTERRUPT_GATE
    dpl: int = 0
    ist: int = 0
    present: bool = True
    selector: int = KERNEL_CS


@dataclass(frozen=True)
class Tss:
    """The 64-bit TSS's stack pointers: RSP0-2 and IST1-7."""

    rsp: tuple[int, int, int]
    ist: tuple[int, int, int, int, int, int, int]


@dataclass(frozen=True)
class Event:
    """What happened: the kind, the vector, and for an exception its error code and CR2."""

    kind: str
    vector: int
    error_code: int | None = None
    cr2: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in (KIND_INT, KIND_INT3, KIND_EXCEPTION, KIND_EXTERNAL):
            raise ValueError(f"unknown event kind {self.kind!r}")
        if self.kind == KIND_INT3 and self.vector != BP:
            raise ValueError("int3 is vector 3")


@dataclass(frozen=True)
class Cpu:
    """The interrupted state."""

    cpl: int
    rip: int        # the instruction that raised the event (external: the one that runs next)
    next_rip: int   # the instruction after it
    rsp: int
    rflags: int
    cs: int
    ss: int


@dataclass(frozen=True)
class Delivery:
    """The expected outcome of one event."""

    vector: int                      # the handler that runs (its IDT entry)
    chain: tuple[tuple[int, int | None], ...]  # (vector, error code) raised, in order
    shutdown: bool = False           # a triple fault: no handler runs
    error_code: int | None = None    # pushed by the handler's event, if any
    stack: str = STACK_CURRENT       # "rsp0", "ist1".."ist7" or "current"
    rsp: int = 0                     # the handler's RSP = the frame's lowest word
    frame: tuple[int | None, ...] = field(default=())  # words from RSP up; None: undefined (#DF CS:RIP)
    cpl: int = 0
    cs: int = 0
    ss: int = 0
    rflags: int = 0                  # the handler's RFLAGS
    cr2: int | None = None           # CR2 the handler sees, when the event chain sets it


def _is_software(kind: str) -> bool:
    return kind in SOFTWARE_KINDS


def _causes_double_fault(first: int, second: int) -> bool:
    """SDM table 6-5, for a hardware exception ``first`` and a fault ``second`` raised delivering it."""
    if first in CONTRIBUTORY_VECTORS:
        return second in CONTRIBUTORY_VECTORS
    if first in PAGE_FAULT_VECTORS:
        return second in CONTRIBUTORY_VECTORS or second in PAGE_FAULT_VECTORS
    return False


def _gate_fault(kind: str, vector: int, cpl: int, gate: Gate | None) -> tuple[int, int] | None:
    """The fault the gate checks raise for this event, as (vector, error code), or None."""
    ext = 0 if _is_software(kind) else 1
    idt_code = vector * 8 + 2
    if gate is None or gate.type not in (INTERRUPT_GATE, TRAP_GATE):
        return GP, idt_code | ext
    if _is_software(kind) and gate.dpl < cpl:
        return GP, idt_code
    if not gate.present:
        return NP, idt_code | ext
    return None


def deliver(event: Event, cpu: Cpu, idt: Mapping[int, Gate], tss: Tss) -> Delivery:
    """What the processor does for ``event`` in state ``cpu`` with this IDT and TSS."""
    chain: list[tuple[int, int | None]] = []
    kind, vector = event.kind, event.vector
    error_code = event.error_code if kind == KIND_EXCEPTION else None
    if kind == KIND_EXCEPTION:
        if vector in ERROR_CODE_VECTORS and error_code is None:
            error_code = 0
        if vector not in ERROR_CODE_VECTORS:
            error_code = None
    cr2 = event.cr2 if kind == KIND_EXCEPTION and vector == PF else None
    nested = False   # the event being delivered is a fault raised while delivering another
    while True:
        chain.append((vector, error_code))
        fault = _gate_fault(kind, vector, cpu.cpl, idt.get(vector))
        if fault is None:
            break
        if kind == KIND_EXCEPTION and vector == DF:
            return Delivery(vector=DF, chain=tuple(chain + [fault]), shutdown=True, cr2=cr2)
        if kind == KIND_EXCEPTION and _causes_double_fault(vector, fault[0]):
            chain.append(fault)
            vector, error_code = DF, 0
        else:
            vector, error_code = fault
        kind = KIND_EXCEPTION
        nested = True

    gate = idt[vector]
    new_cpl = 0  # the kernel's code segment: DPL 0, not conforming
    if gate.ist:
        stack = f"ist{gate.ist}"
        top = tss.ist[gate.ist - 1]
    elif new_cpl != cpu.cpl:
        stack = f"rsp{new_cpl}"
        top = tss.rsp[new_cpl]
    else:
        stack = STACK_CURRENT
        top = cpu.rsp
    top &= ~0xF

    # The pushed RIP and RF.
    if kind == KIND_EXCEPTION and vector in ABORT_VECTORS:
        rip = None
    elif nested or kind == KIND_EXTERNAL or (kind == KIND_EXCEPTION and vector in FAULT_VECTORS):
        rip = cpu.rip
    else:  # traps: int N, int3, and trap-class exceptions
        rip = cpu.next_rip
    pushed_flags = cpu.rflags
    if kind == KIND_EXCEPTION and vector in FAULT_VECTORS:
        pushed_flags |= RF_RF
    elif _is_software(kind):
        pushed_flags &= ~RF_RF
    old_cs = None if rip is None else cpu.cs

    frame: list[int | None] = [rip, old_cs, pushed_flags, cpu.rsp, cpu.ss]
    if kind == KIND_EXCEPTION and vector in ERROR_CODE_VECTORS:
        frame.insert(0, error_code)
    else:
        error_code = None
    rsp = top - 8 * len(frame)

    flags = cpu.rflags & ~(RF_TF | RF_NT | RF_RF | RF_VM)
    if gate.type == INTERRUPT_GATE:
        flags &= ~RF_IF
    ss = new_cpl if new_cpl != cpu.cpl else cpu.ss
    return Delivery(vector=vector, chain=tuple(chain), error_code=error_code, stack=stack, rsp=rsp,
                    frame=tuple(frame), cpl=new_cpl, cs=(gate.selector & ~3) | new_cpl, ss=ss,
                    rflags=flags, cr2=cr2)
