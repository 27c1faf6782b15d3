"""The delivery matrix: real events through a real guest IDT, checked against the delivery oracle.

For every case — an event source × IDT gate (interrupt or trap, DPL, IST, present, or an
invalid type) × CPL 0/3 — a guest kernel writes the gate into its IDT, poisons the top
of ten stacks (TSS.RSP0, TSS.IST1-7, the kernel stack and the user stack the event
interrupts), enters the event's CPL with ``iretq`` and raises the event with a real
instruction: ``int N`` (all 256 vectors), ``int3``, ``ud2``, a ``div`` by zero, a load
from a non-canonical address and a bad selector load (#GP), a load from an unmapped
page and a store to a read-only one (#PF), or it spins with IF = 1 until the local
APIC's timer (any vector 16-255) or the PIT through the 8259A (vector bases 0x08-0xf8)
interrupts it. One stub per vector tells the common handler which gate ran; the
handler records RSP, CS, SS, the six words at RSP and CR2 with moves only, RFLAGS
on its own stack, then which of the ten stacks lost their poison, and goes on with the
next case.

The host compares every record with :func:`hvmodel.check.delivery_oracle.deliver` in
every mode — ``native`` included: there, as in ``nested`` and ``shadow``, the VMM's
``vm/events.py`` delivers the event (Unicorn never does), so the oracle is the only
independent side. Cases where the reference disagrees with the oracle are listed
apart only if :data:`REFERENCE_DEVIATIONS` documents them (it is empty: none is known);
otherwise they are mismatches of the ``native`` mode like any other.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field
from collections.abc import Mapping
from functools import lru_cache
from typing import Callable, Iterable, Iterator

from ..guest.asm import build
from ..guest.prologue import KERNEL_CS, KERNEL_DS, USER_CS, USER_DS, descriptor_data, descriptor_tables
from ..host.host import Host, HostConfig
from ..vm.vm import VM, VMConfig
from . import delivery_oracle as d

MEMSIZE = 64 << 20
IDT = 0x9000
TSS = 0xA000
IDT_PRISTINE = 0xB000        # the default IDT, written by the host; the guest restores gates from it
RO_PAGE = 0xC000             # user, read-only: a store faults
USER_CODE = 0x5000           # user code page (the triggers)
USER_STACK_TOP = 0x7000      # user stack page 0x6000
UNMAPPED = 0x1FF000          # the last 4 KiB page of the first 2 MiB: not present
NONCANONICAL = 0x8000000000000000
BAD_SELECTOR = 0x1230        # beyond the GDT limit: mov ds faults with #GP(0x1230)
APIC = 0xFEE00000
CASE_TABLE = 0x2400000       # case descriptors, 64 bytes each
CASE_COUNT = 0x23FF000
RESULTS = 0x3000000          # records, 128 bytes each
BATCH = 20_000
INSNS_PER_CASE = 1_500

# The ten stacks: TSS.RSP0, IST1-7, the kernel stack of CPL-0 events, the user stack.
STACK_TOPS = tuple(0x81000 + 0x1000 * i for i in range(9)) + (USER_STACK_TOP,)
STACK_NAMES = ("rsp0",) + tuple(f"ist{i}" for i in range(1, 8)) + ("kernel", "user")
POISON = tuple(0xDEADBEEF00000000 | (0x5A5A << 16) | i for i in range(10))
POISON_WORDS = 16            # qwords poisoned below each top
# TSS.RSP0 and ISTn, half of them not 16-byte aligned (the CPU aligns them down).
TSS_RSP = (STACK_TOPS[0] - 8, 0x1E1000, 0x1E2000)   # RSP1/2: never used (no CPL 1/2 handler)
TSS_IST = tuple(STACK_TOPS[i] - (8 if i % 2 == 0 else 0) for i in range(1, 8))
TSS_VALUES = d.Tss(rsp=TSS_RSP, ist=TSS_IST)

# The default gates: interrupt gates, DPL 0, no IST; #DF on IST7, #NP through a trap gate.
DEFAULT_GATES = {v: d.Gate() for v in range(256)}
DEFAULT_GATES[d.DF] = d.Gate(ist=7)
DEFAULT_GATES[d.NP] = d.Gate(type=d.TRAP_GATE)
BAD_TYPE = 0xC  # a call gate: not an interrupt or trap gate, #GP in the IDT

# RFLAGS the event sees (bit 1 is always set): IF on except where noted, and a mix of
# arithmetic flags, DF, NT, AC and IOPL so that the frame shows each one.
RFLAGS_PATTERNS = (0x202, 0x4203, 0x40246, 0x3282, 0x602, 0x002, 0x4A97, 0x4C6)

SOURCE_INT, SOURCE_APIC, SOURCE_PIC = 0, 1, 2

# Event sources: name -> (event kind, trigger label, vector, needs IF).
SOURCES = {
    "int": (d.KIND_INT, "t_int", None, False),
    "int3": (d.KIND_INT3, "t_int3", d.BP, False),
    "ud2": (d.KIND_EXCEPTION, "t_ud2", d.UD, False),
    "div0": (d.KIND_EXCEPTION, "t_div", d.DE, False),
    "gp-noncanonical": (d.KIND_EXCEPTION, "t_load", d.GP, False),
    "gp-selector": (d.KIND_EXCEPTION, "t_sel", d.GP, False),
    "pf-unmapped": (d.KIND_EXCEPTION, "t_load", d.PF, False),
    "pf-readonly": (d.KIND_EXCEPTION, "t_store", d.PF, False),
    "apic": (d.KIND_EXTERNAL, "t_spin", None, True),
    "pic": (d.KIND_EXTERNAL, "t_spin", None, True),
}
APIC_VECTORS = tuple(range(16, 256))
PIC_BASES = tuple(range(8, 256, 8))


def _stubs() -> str:
    return "\n".join(f"stub_{v}:\n  mov r8d, {v:#x}\n  jmp common" for v in range(256))


def _guest_source() -> str:
    """The delivery kernel: identity paging, the ten stacks, the case loop, the handlers."""
    stack_table = "\n".join(f"  .quad {t:#x}, {p:#x}" for t, p in zip(STACK_TOPS, POISON))
    tss_fields = "\n".join(f"  movabs rax, {v:#x}\n  mov qword ptr [rdi+{off:#x}], rax"
                           for off, v in [(4 + 8 * i, r) for i, r in enumerate(TSS_RSP)]
                           + [(0x24 + 8 * i, s) for i, s in enumerate(TSS_IST)])
    int_table = "\n".join(f"  .byte 0xcd, {v:#x}" for v in range(256))
    return f"""
  mov rsp, 0x100000
  // identity paging: PML4 0x10000 -> PDPT 0x11000 -> PD 0x12000; the first 2 MiB in 4 KiB
  // pages through PT 0x13000 (supervisor; user code, user stack and a read-only user
  // page; the last page not present), the rest of the first GiB in 2 MiB pages, and the
  // local APIC's GiB (3-4 GiB) as one uncached 1 GiB page.
  mov rdi, 0x10000
  mov rax, 0x11007
  mov qword ptr [rdi], rax
  mov rdi, 0x11000
  mov rax, 0x12007
  mov qword ptr [rdi], rax
  mov rax, 0xC000009B
  mov qword ptr [rdi+24], rax
  mov rdi, 0x12000
  mov rax, 0x13007
  mov qword ptr [rdi], rax
  mov rax, 0x200083
  mov rcx, 511
pd_fill:
  add rdi, 8
  mov qword ptr [rdi], rax
  add rax, 0x200000
  dec rcx
  jnz pd_fill
  mov rdi, 0x13000
  mov rax, 0x3
  mov rcx, 511
pt_fill:
  mov qword ptr [rdi], rax
  add rax, 0x1000
  add rdi, 8
  dec rcx
  jnz pt_fill
  mov qword ptr [rdi], 0
  mov rdi, 0x13000 + 8*5
  mov rax, 0x5007
  mov qword ptr [rdi], rax
  mov rax, 0x6007
  mov qword ptr [rdi+8], rax
  mov rdi, 0x13000 + 8*{RO_PAGE >> 12}
  mov rax, {RO_PAGE | 5:#x}
  mov qword ptr [rdi], rax
  mov rax, 0x10000
  mov cr3, rax
  mov rax, cr4
  or rax, 0x20
  mov cr4, rax
  mov rax, cr0
  or eax, 0x80010000
  mov cr0, rax
{descriptor_tables('dm', idt=IDT, tss=TSS, rsp0=STACK_TOPS[0], es=True)}
  // TSS.RSP0-2 and IST1-7
  mov rdi, {TSS:#x}
{tss_fields}
  // the default IDT, from the host's copy
  cld
  mov rsi, {IDT_PRISTINE:#x}
  mov rdi, {IDT:#x}
  mov ecx, 512
  rep movsq
  // the triggers go to the user code page
  lea rsi, [rip + user_code]
  lea rcx, [rip + user_code_end]
  sub rcx, rsi
  mov rdi, {USER_CODE:#x}
  rep movsb
  // the local APIC: software-enabled, timer masked, divide by 1
  mov rdi, {APIC:#x}
  mov dword ptr [rdi+0xF0], 0x1FF
  mov dword ptr [rdi+0x320], 0x10000
  mov dword ptr [rdi+0x3E0], 0xB

  mov rsi, {CASE_TABLE:#x}
  mov r14, {RESULTS:#x}
  mov rdi, {CASE_COUNT:#x}
  mov r15, qword ptr [rdi]

case_loop:
  test r15, r15
  jz all_done
  cld
  // the case's gate
  movzx eax, byte ptr [rsi]
  shl rax, 4
  mov rdx, qword ptr [rsi+8]
  mov qword ptr [rax+{IDT:#x}], rdx
  mov rdx, qword ptr [rsi+16]
  mov qword ptr [rax+{IDT + 8:#x}], rdx
  // poison the top of every stack
  lea rbx, [rip + stack_table]
  mov r9d, 10
poison_loop:
  mov rdi, qword ptr [rbx]
  sub rdi, {8 * POISON_WORDS}
  mov rax, qword ptr [rbx+8]
  mov ecx, {POISON_WORDS}
  rep stosq
  add rbx, 16
  dec r9d
  jnz poison_loop
  // a known CR2: only a #PF may change it
  mov rax, qword ptr [rsi+56]
  mov cr2, rax
  movzx eax, byte ptr [rsi+2]
  cmp eax, {SOURCE_APIC}
  je setup_apic
  cmp eax, {SOURCE_PIC}
  je setup_pic
  jmp enter
setup_apic:
  movzx eax, byte ptr [rsi]
  mov rdi, {APIC:#x}
  mov dword ptr [rdi+0x320], eax
  mov dword ptr [rdi+0x380], 40
  // the VMM sees a newly armed APIC timer at its next exit; masking the PIC (a port
  // write that ends the slice) makes that now
  mov al, 0xff
  out 0x21, al
  jmp enter
setup_pic:
  // ICW1-4: vector base = the case's vector, then only IRQ0 unmasked; PIT channel 0 in
  // mode 0 (one interrupt at terminal count), count 1
  mov al, 0x11
  out 0x20, al
  mov al, byte ptr [rsi]
  out 0x21, al
  mov al, 4
  out 0x21, al
  mov al, 1
  out 0x21, al
  mov al, 0xfe
  out 0x21, al
  mov al, 0x30
  out 0x43, al
  mov al, 1
  out 0x40, al
  mov al, 0
  out 0x40, al
enter:
  lea rdi, [rip + kstack]
  mov qword ptr [rdi], rsp
  cmp byte ptr [rsi+1], 0
  je enter_k
  push {USER_DS:#x}
  push qword ptr [rsi+32]
  push qword ptr [rsi+40]
  push {USER_CS:#x}
  push qword ptr [rsi+24]
  jmp enter_go
enter_k:
  push {KERNEL_DS:#x}
  push qword ptr [rsi+32]
  push qword ptr [rsi+40]
  push {KERNEL_CS:#x}
  push qword ptr [rsi+24]
enter_go:
  mov rdi, qword ptr [rsi+48]
  mov rax, rdi
  xor ecx, ecx
  xor edx, edx
  mov r8, -1
  iretq

all_done:
  mov al, 0
  out 0xf4, al

{_stubs()}

common:
  // r8 = the vector whose gate ran. Only moves (no flags changed, no stack touched)
  // until RFLAGS is read on the kernel's own stack, which is not one of the ten.
  mov r9, rsp
  lea rax, [r8 + 0x10000]
  mov qword ptr [r14], rax
  mov qword ptr [r14+8], r9
  mov rax, cs
  mov qword ptr [r14+16], rax
  mov rax, ss
  mov qword ptr [r14+24], rax
  mov rax, qword ptr [r9]
  mov qword ptr [r14+40], rax
  mov rax, qword ptr [r9+8]
  mov qword ptr [r14+48], rax
  mov rax, qword ptr [r9+16]
  mov qword ptr [r14+56], rax
  mov rax, qword ptr [r9+24]
  mov qword ptr [r14+64], rax
  mov rax, qword ptr [r9+32]
  mov qword ptr [r14+72], rax
  mov rax, qword ptr [r9+40]
  mov qword ptr [r14+80], rax
  mov rax, cr2
  mov qword ptr [r14+88], rax
  lea rdi, [rip + kstack]
  mov rsp, qword ptr [rdi]
  pushfq
  pop rax
  mov qword ptr [r14+32], rax
  cli
  cld
  // which stacks lost their poison
  mov ax, {KERNEL_DS:#x}
  mov ss, ax
  mov ds, ax
  mov es, ax
  xor r10d, r10d
  xor r11d, r11d
  lea rbx, [rip + stack_table]
check_loop:
  mov rdi, qword ptr [rbx]
  sub rdi, {8 * POISON_WORDS}
  mov rax, qword ptr [rbx+8]
  mov ecx, {POISON_WORDS}
  repe scasq
  je check_clean
  bts r10, r11
check_clean:
  add rbx, 16
  inc r11
  cmp r11, 10
  jb check_loop
  mov qword ptr [r14+96], r10
  // the default gate back
  movzx eax, byte ptr [rsi]
  shl rax, 4
  mov rdx, qword ptr [rax+{IDT_PRISTINE:#x}]
  mov qword ptr [rax+{IDT:#x}], rdx
  mov rdx, qword ptr [rax+{IDT_PRISTINE + 8:#x}]
  mov qword ptr [rax+{IDT + 8:#x}], rdx
  // quiesce the interrupt sources
  movzx eax, byte ptr [rsi+2]
  cmp eax, {SOURCE_APIC}
  je done_apic
  cmp eax, {SOURCE_PIC}
  je done_pic
  jmp next_case
done_apic:
  mov rdi, {APIC:#x}
  mov dword ptr [rdi+0x320], 0x10000
  mov dword ptr [rdi+0xB0], 0
  jmp next_case
done_pic:
  mov al, 0x20
  out 0x20, al
  mov al, 0xff
  out 0x21, al
next_case:
  add rsi, 64
  sub r14, -128
  dec r15
  jmp case_loop

user_code:
t_int:
{int_table}
t_int3:
  int3
t_ud2:
  ud2
t_div:
  div rcx
t_load:
  mov rax, qword ptr [rdi]
t_store:
  mov qword ptr [rdi], rax
t_sel:
  mov ds, ax
t_spin:
  jmp t_spin
t_end:
  ud2
user_code_end:

{descriptor_data('dm', idt=IDT)}
kstack:
  .quad 0
stack_table:
{stack_table}
"""


_IMAGE = None


def guest_image():
    """The delivery kernel, built once per process."""
    global _IMAGE
    if _IMAGE is None:
        _IMAGE = build(_guest_source(), source_name="delivery-matrix")
    return _IMAGE


_NEXT_LABEL = {"t_int3": "t_ud2", "t_ud2": "t_div", "t_div": "t_load", "t_load": "t_store",
               "t_store": "t_sel", "t_sel": "t_spin", "t_spin": "t_end"}


@lru_cache(maxsize=None)
def _user_addr(label: str) -> int:
    sym = guest_image().symbols
    return USER_CODE + sym[label] - sym["user_code"]


def handler_address(vector: int) -> int:
    """The stub that handles ``vector`` (it tells the common handler which gate ran)."""
    return guest_image().symbols[f"stub_{vector}"]


def encode_gate(vector: int, gate: d.Gate) -> tuple[int, int]:
    """The 16-byte IDT entry for ``gate`` with ``vector``'s stub as handler, as two qwords."""
    h = handler_address(vector)
    access = gate.type | gate.dpl << 5 | int(gate.present) << 7
    lo = (h & 0xFFFF) | gate.selector << 16 | gate.ist << 32 | access << 40 | ((h >> 16) & 0xFFFF) << 48
    return lo, h >> 32


def pristine_idt() -> bytes:
    """The default IDT the guest starts from and restores each case's gate from."""
    return b"".join(struct.pack("<QQ", *encode_gate(v, DEFAULT_GATES[v])) for v in range(256))


class _CaseIdt(Mapping):
    """The default gates with one replaced (no 256-entry copy per case)."""

    def __init__(self, vector: int, gate: d.Gate) -> None:
        self.vector = vector
        self.gate = gate

    def __getitem__(self, v: int) -> d.Gate:
        return self.gate if v == self.vector else DEFAULT_GATES[v]

    def __iter__(self) -> Iterator[int]:
        return iter(range(256))

    def __len__(self) -> int:
        return 256


@dataclass(frozen=True)
class Case:
    """One combination: a source, its vector, the gate under test, the CPL and the interrupted state."""

    index: int
    source: str
    vector: int
    gate: d.Gate
    cpl: int

    @property
    def name(self) -> str:
        g = self.gate
        kind = {d.INTERRUPT_GATE: "intr", d.TRAP_GATE: "trap"}.get(g.type, f"type{g.type:#x}")
        return (f"{self.source} vector {self.vector:#x} cpl{self.cpl} {kind}-gate dpl{g.dpl} ist{g.ist}"
                + ("" if g.present else " not-present"))

    @property
    def rflags(self) -> int:
        flags = RFLAGS_PATTERNS[self.index % len(RFLAGS_PATTERNS)]
        if SOURCES[self.source][3]:
            flags |= d.RF_IF
        return flags

    @property
    def rsp(self) -> int:
        """The interrupted RSP: 16 or 24 below the stack top (aligned, or not)."""
        top = STACK_TOPS[9] if self.cpl == 3 else STACK_TOPS[8]
        return top - (16 if (self.index // 3) % 2 else 24)

    @property
    def cr2(self) -> int:
        return 0x7700000 + 0x1000 * (self.index % 4096) + 0x88

    def idt(self) -> Mapping[int, d.Gate]:
        """The IDT of this case: the defaults, with the gate under test at its vector."""
        return _CaseIdt(self.vector, self.gate)

    def event_and_cpu(self) -> tuple[d.Event, d.Cpu, int, int]:
        """The oracle's inputs, and the RDI/RAX value and RIP the trigger starts with."""
        kind, label, _, _ = SOURCES[self.source]
        rip = _user_addr(label)
        if self.source == "int":
            rip += 2 * self.vector
            nxt = rip + 2
        else:
            nxt = _user_addr(_NEXT_LABEL[label])
        aux = 0
        err = None
        cr2 = None
        user = self.cpl == 3
        if self.source == "gp-noncanonical":
            aux, err = NONCANONICAL, 0
        elif self.source == "gp-selector":
            aux, err = BAD_SELECTOR | self.cpl, BAD_SELECTOR
        elif self.source == "pf-unmapped":
            aux = UNMAPPED + 0x238
            err, cr2 = 4 if user else 0, aux
        elif self.source == "pf-readonly":
            aux = RO_PAGE + 0x5F0
            err, cr2 = (7 if user else 3), aux
        cs = USER_CS if user else KERNEL_CS
        ss = USER_DS if user else KERNEL_DS
        cpu = d.Cpu(cpl=self.cpl, rip=rip, next_rip=nxt, rsp=self.rsp, rflags=self.rflags, cs=cs, ss=ss)
        return d.Event(kind, self.vector, err, cr2), cpu, aux, rip

    def expected(self) -> d.Delivery:
        event, cpu, _, _ = self.event_and_cpu()
        return d.deliver(event, cpu, self.idt(), TSS_VALUES)

    def descriptor(self) -> bytes:
        """The 64 bytes the guest reads for this case."""
        _, cpu, aux, rip = self.event_and_cpu()
        lo, hi = encode_gate(self.vector, self.gate)
        src = {"apic": SOURCE_APIC, "pic": SOURCE_PIC}.get(self.source, SOURCE_INT)
        return struct.pack("<BBBBIQQQQQQQ", self.vector, self.cpl, src, 0, 0, lo, hi, rip, cpu.rsp,
                           cpu.rflags, aux, self.cr2)


def _gates(soft: bool) -> Iterator[d.Gate]:
    """Interrupt and trap gates × DPL (0-3 for software interrupts, else 0 and 3) × IST 0-7 ×
    present or not; and one invalid-type gate (a call gate) per DPL used."""
    dpls = (0, 1, 2, 3) if soft else (0, 3)
    for type_ in (d.INTERRUPT_GATE, d.TRAP_GATE):
        for dpl in dpls:
            for ist in range(8):
                for present in (True, False):
                    yield d.Gate(type=type_, dpl=dpl, ist=ist, present=present)
    for dpl in dpls:
        yield d.Gate(type=BAD_TYPE, dpl=dpl)


def _vectors(source: str) -> tuple[int, ...]:
    if source == "int":
        return tuple(range(256))
    if source == "apic":
        return APIC_VECTORS
    if source == "pic":
        return PIC_BASES
    return (SOURCES[source][2],)


def enumerate_cases(sources: Iterable[str] | None = None) -> list[Case]:
    """Every combination, in a fixed order (``index`` numbers them from 0); only those of
    ``sources`` if given (their indices stay those of the whole enumeration).

    Software interrupts vary DPL 0-3 (the DPL check compares it with the CPL); hardware
    exceptions and external interrupts, which the DPL never stops, use DPL 0 and 3.
    """
    cases = _all_cases()
    if sources is None:
        return list(cases)
    wanted = set(sources)
    return [c for c in cases if c.source in wanted]


@lru_cache(maxsize=1)
def _all_cases() -> tuple[Case, ...]:
    out: list[Case] = []
    for source in SOURCES:
        soft = SOURCES[source][0] in d.SOFTWARE_KINDS
        gates = tuple(_gates(soft))
        for vector in _vectors(source):
            for gate in gates:
                for cpl in (0, 3):
                    out.append(Case(len(out), source, vector, gate, cpl))
    return tuple(out)


def sample_cases(sample: int = 1, seed: int = 0) -> list[Case]:
    """About one case in ``sample`` of every source (at least one each), drawn with a fixed seed;
    ``sample`` 1 is every case. (Every Kth by index would keep one CPL only: CPL is the
    innermost dimension.)"""
    cases = enumerate_cases()
    if sample <= 1:
        return cases
    rng = random.Random(seed)
    picked: list[Case] = []
    for source in SOURCES:
        group = [c for c in cases if c.source == source]
        picked.extend(rng.sample(group, max(1, len(group) // sample)))
    return sorted(picked, key=lambda c: c.index)


@dataclass(frozen=True)
class Record:
    """What the guest's handler saw."""

    ran: bool
    vector: int
    rsp: int
    cs: int
    ss: int
    rflags: int
    frame: tuple[int, ...]
    cr2: int
    touched: int          # bit i: stack i lost its poison

    @classmethod
    def unpack(cls, raw: bytes, off: int) -> "Record":
        w = struct.unpack_from("<13Q", raw, off)
        return cls(bool(w[0] & 0x10000), w[0] & 0xFFFF, w[1], w[2], w[3], w[4], tuple(w[5:11]), w[11], w[12])


def _stack_bit(stack: str, cpl: int) -> int:
    if stack == d.STACK_CURRENT:
        return 8 if cpl == 0 else 9
    return STACK_NAMES.index(stack)


def differs(case: Case, exp: d.Delivery, got: Record) -> list[str]:
    """How a record differs from the oracle's delivery (empty when it agrees)."""
    if not got.ran:
        return ["no handler ran"]
    out = []
    if got.vector != exp.vector:
        out.append(f"handler {got.vector:#x} expected {exp.vector:#x} (chain "
                   + " -> ".join(f"{v:#x}" + ("" if e is None else f"({e:#x})") for v, e in exp.chain) + ")")
    if got.rsp != exp.rsp:
        out.append(f"RSP {got.rsp:#x} expected {exp.rsp:#x} ({exp.stack})")
    if got.cs != exp.cs:
        out.append(f"CS {got.cs:#x} expected {exp.cs:#x}")
    if got.ss != exp.ss:
        out.append(f"SS {got.ss:#x} expected {exp.ss:#x}")
    # pushfq shows neither RF nor VM
    want_flags = exp.rflags & ~(d.RF_RF | d.RF_VM)
    if got.rflags != want_flags:
        out.append(f"RFLAGS {got.rflags:#x} expected {want_flags:#x}")
    names = (["error code"] if exp.error_code is not None else []) + ["RIP", "CS", "RFLAGS", "RSP", "SS"]
    for name, want, have in zip(names, exp.frame, got.frame):
        if want is not None and have != want:
            out.append(f"pushed {name} {have:#x} expected {want:#x}")
    want_cr2 = exp.cr2 if exp.cr2 is not None else case.cr2
    if got.cr2 != want_cr2:
        out.append(f"CR2 {got.cr2:#x} expected {want_cr2:#x}")
    stack = _stack_bit(exp.stack, case.cpl)
    if got.touched != 1 << stack:
        written = [STACK_NAMES[i] for i in range(10) if got.touched >> i & 1]
        out.append(f"stacks written: {', '.join(written) or 'none'}, expected {STACK_NAMES[stack]}")
    return out


MAX_RESTARTS = 20   # guests restarted after a stop, per mode, before the rest is given up


def _new_vm(mode: str) -> VM:
    if mode == "native":
        return VM(VMConfig(name="native", memsize=MEMSIZE, mmu="native"), guest_image())
    host = Host(HostConfig(memsize=2 * MEMSIZE))
    return host.power_on(VMConfig(name=mode, memsize=MEMSIZE, mmu=mode), guest_image())


def _run_batch(batch: list[Case], mode: str, configure: Callable[[VM], None] | None,
               idt: bytes) -> tuple[list[Record], str | None]:
    """The records of the cases the guest got through, and why it stopped early (None: it did not)."""
    vm = _new_vm(mode)
    try:
        if configure is not None:
            configure(vm)
        vm.ram.write_gpa(IDT_PRISTINE, idt)
        vm.ram.write_gpa(CASE_COUNT, struct.pack("<Q", len(batch)))
        vm.ram.write_gpa(CASE_TABLE, b"".join(c.descriptor() for c in batch))
        res = vm.run(max_insns=INSNS_PER_CASE * len(batch) + 1_000_000)
        raw = vm.ram.read_gpa(RESULTS, 128 * len(batch))
    finally:
        vm.close()
    records = []
    for i in range(len(batch)):
        rec = Record.unpack(raw, 128 * i)
        if not rec.ran:
            break
        records.append(rec)
    if res.exit_status == 0 and len(records) == len(batch):
        return records, None
    return records, f"the guest stopped: {res.stop_reason}: {res.message}"


def run_cases(cases: list[Case], mode: str, configure: Callable[[VM], None] | None = None) -> list[Record | str]:
    """Run the cases under ``mode``: each case's record, or why it has none.

    A guest that stops (a triple fault, a hang) takes the case it was in with it; a new
    guest goes on from the next case, up to :data:`MAX_RESTARTS` times.
    """
    out: list[Record | str] = []
    idt = pristine_idt()
    restarts = 0
    pos = 0
    while pos < len(cases):
        batch = cases[pos:pos + BATCH]
        records, stopped = _run_batch(batch, mode, configure, idt)
        out.extend(records)
        pos += len(records)
        if stopped is None:
            continue
        out.append(stopped)
        pos += 1
        restarts += 1
        if restarts > MAX_RESTARTS:
            out.extend(["not run: too many guests stopped"] * (len(cases) - pos))
            break
    return out


# Cases where the reference (native) may legitimately differ from the oracle, by case
# name, with the reason. None is known: native delivers through vm/events.py like the
# other modes, so a native disagreement is an events.py bug, not an engine trait.
REFERENCE_DEVIATIONS: dict[str, str] = {}


@dataclass
class DeliveryResult:
    """Per mode: cases run and the mismatches against the oracle."""

    cases: int = 0
    mismatches: dict[str, list[str]] = field(default_factory=dict)
    reference_deviations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(self.mismatches.values())

    def lines(self) -> list[str]:
        out = []
        for mode, bad in self.mismatches.items():
            out.append(f"delivery matrix, {mode}: {self.cases} cases, {len(bad)} mismatches")
            out.extend("  " + b for b in bad[:20])
            if len(bad) > 20:
                out.append(f"  ... and {len(bad) - 20} more")
        if self.reference_deviations:
            out.append(f"reference (native) deviates from the oracle in {len(self.reference_deviations)} "
                       f"documented cases (not counted above):")
            out.extend("  " + r for r in self.reference_deviations[:20])
        return out


def run_matrix(modes: Iterable[str], *, sample: int = 1, configure: Callable[[VM], None] | None = None,
               cases: list[Case] | None = None) -> DeliveryResult:
    """Every ``sample``-th case under the reference and each mode, each checked against the oracle."""
    if cases is None:
        cases = sample_cases(sample)
    expected = [c.expected() for c in cases]
    result = DeliveryResult(cases=len(cases))
    for mode in ["native", *[m for m in modes if m != "native"]]:
        bad = []
        for case, exp, got in zip(cases, expected, run_cases(cases, mode, configure)):
            diff = [got] if isinstance(got, str) else differs(case, exp, got)
            if not diff:
                continue
            line = f"#{case.index} {case.name}: {'; '.join(diff)}"
            if mode == "native" and case.name in REFERENCE_DEVIATIONS:
                result.reference_deviations.append(f"{line} — {REFERENCE_DEVIATIONS[case.name]}")
            else:
                bad.append(line)
        result.mismatches[mode] = bad
    return result
