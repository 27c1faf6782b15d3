"""The access matrix through real guest instructions, after kvm-unit-tests x86/access.c.

For every legal combination of the permission oracle (:mod:`hvmodel.check.oracle`:
PTE/PDE bits, CR0.WP, EFER.NXE, CR4.SMEP/SMAP, EFLAGS.AC, the access and its
privilege), a guest kernel — real x86-64 instructions — writes the paging entries
for a test address with ordinary stores, sets the control registers with
``mov cr0``/``mov cr4``/``wrmsr``, invalidates, performs the access (``mov`` load or
store, or ``call`` for a fetch; from ring 3 through ``iretq`` for user accesses),
catches the #PF if there is one, and records the outcome: fault, error code, CR2,
and the final PTE and PDE. The VMM feeds the cases in through a table in guest
memory and reads the results back.

Each VMM mode is compared with the oracle, and so is the reference MMU (Unicorn's
own walker, ``native``). Where the reference disagrees with the oracle the case is
listed separately with a reason: that is QEMU's behaviour against the SDM, not a
bug of ours.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable, Iterable

from ..guest.asm import build
from ..guest.prologue import SETGATE, descriptor_data, descriptor_tables
from ..host.host import Host, HostConfig
from ..vm.vm import VM, VMConfig
from . import oracle as o

MEMSIZE = 64 << 20
CASE_TABLE = 0x2400000      # 36 MiB: case descriptors, 64 bytes each
CASE_COUNT = 0x23FF000      # u64: number of cases in the table
RESULTS = 0x3000000         # 48 MiB: results, 64 bytes each
BATCH = 20_000              # cases per guest run (tables fit below RESULTS)
USER_STUB = 0x5000          # user code page (US = 1)
USER_STACK_TOP = 0x7000     # user stack page 0x6000 (US = 1)

F_USER, F_WRITE, F_FETCH, F_TWICE, F_NX, F_WP, F_SMEP, F_SMAP, F_AC = (1 << i for i in range(9))

VA = o.DEFAULT_VA
A4 = 0x10000 + 8 * ((VA >> 39) & 511)   # the guest's own PML4 holds the test PML4E
_, A3, A2, A1 = o.entry_addresses(VA)
RET_4K = o.DATA_PHYS | (VA & 0xFFF)
RET_2M = o.DATA_PHYS | (VA & 0x1FFFFF)


def _guest_source() -> str:
    """The matrix kernel: identity-mapped supervisor memory, one user page pair, the case loop."""
    return f"""
  mov rsp, 0x100000
  // identity map: PML4 0x10000 -> PDPT 0x11000 -> PD 0x12000; the first 2 MiB through
  // PT 0x13000 (4 KiB pages, supervisor except the user stub/stack pages); 2 MiB pages
  // for the rest of the first GiB, supervisor only.
  mov rdi, 0x10000
  mov rax, 0x11007
  mov qword ptr [rdi], rax
  mov rdi, 0x11000
  mov rax, 0x12007
  mov qword ptr [rdi], rax
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
  mov rcx, 512
pt_fill:
  mov qword ptr [rdi], rax
  add rax, 0x1000
  add rdi, 8
  dec rcx
  jnz pt_fill
  mov rdi, 0x13000 + 8*5
  mov rax, 0x5007
  mov qword ptr [rdi], rax
  mov rax, 0x6007
  mov qword ptr [rdi+8], rax
  mov rax, 0x10000
  mov cr3, rax
  mov rax, cr4
  or rax, 0x20
  mov cr4, rax
  mov rax, cr0
  or eax, 0x80010000
  mov cr0, rax
{descriptor_tables('mx')}  // every vector -> unexpected; 14 -> pf_handler; 0x80 (DPL 3) -> sys_handler
  xor r12, r12
gate_loop:
  lea rax, [rip + unexpected]
  mov rdi, r12
  shl rdi, 4
  add rdi, 0x9000
  call setgate
  inc r12
  cmp r12, 256
  jb gate_loop
  lea rax, [rip + pf_handler]
  mov rdi, 0x9000 + 14*16
  call setgate
  lea rax, [rip + sys_handler]
  mov rdi, 0x9000 + 0x80*16
  call setgate
  mov rdi, 0x9000 + 0x80*16
  mov byte ptr [rdi+5], 0xEE
  // the user stub goes to its user page
  lea rsi, [rip + user_stub]
  lea rcx, [rip + user_stub_end]
  sub rcx, rsi
  mov rdi, {USER_STUB:#x}
  rep movsb

  mov rsi, {CASE_TABLE:#x}
  mov r14, {RESULTS:#x}
  mov rdi, {CASE_COUNT:#x}
  mov r15, qword ptr [rdi]
  movabs rbp, {VA:#x}

case_loop:
  test r15, r15
  jz all_done
  mov rdi, {RET_4K:#x}
  mov byte ptr [rdi], 0xc3
  mov rdi, {RET_2M:#x}
  mov byte ptr [rdi], 0xc3
  mov rdi, {A4:#x}
  mov rax, qword ptr [rsi]
  mov qword ptr [rdi], rax
  mov rdi, {A3:#x}
  mov rax, qword ptr [rsi+8]
  mov qword ptr [rdi], rax
  mov rdi, {A2:#x}
  mov rax, qword ptr [rsi+16]
  mov qword ptr [rdi], rax
  mov rdi, {A1:#x}
  mov rax, qword ptr [rsi+24]
  mov qword ptr [rdi], rax
  mov r13, qword ptr [rsi+32]
  // EFER.NXE
  mov ecx, 0xC0000080
  rdmsr
  and eax, 0xfffff7ff
  test r13, {F_NX}
  jz set_efer
  or eax, 0x800
set_efer:
  wrmsr
  // CR0.WP
  mov rax, cr0
  and eax, 0xfffeffff
  test r13, {F_WP}
  jz set_cr0
  or eax, 0x10000
set_cr0:
  mov cr0, rax
  // CR4.SMEP / SMAP
  mov rax, cr4
  and eax, 0xffcfffff
  test r13, {F_SMEP}
  jz no_smep
  or eax, 0x100000
no_smep:
  test r13, {F_SMAP}
  jz set_cr4
  or eax, 0x200000
set_cr4:
  mov cr4, rax
  mov rax, cr3
  mov cr3, rax
  invlpg [rbp]
  clac
  test r13, {F_AC}
  jz ac_done
  stac
ac_done:
  lea rdi, [rip + rsp_save]
  mov qword ptr [rdi], rsp
  lea rdi, [rip + phase]
  mov qword ptr [rdi], 1
  test r13, {F_TWICE}
  jz after_twice
  mov rcx, qword ptr [rbp]
after_twice:
  lea rdi, [rip + phase]
  mov qword ptr [rdi], 2
  xor ebx, ebx
  test r13, {F_WRITE}
  jz not_write
  mov ebx, 1
not_write:
  test r13, {F_FETCH}
  jz not_fetch
  mov ebx, 2
not_fetch:
  mov rax, rbp
  test r13, {F_USER}
  jnz go_user
  cmp rbx, 1
  je k_write
  cmp rbx, 2
  je k_fetch
  mov rcx, qword ptr [rax]
  jmp success
k_write:
  mov qword ptr [rax], rcx
  jmp success
k_fetch:
  call rax
  jmp success
go_user:
  push 0x1b
  push {USER_STACK_TOP:#x}
  pushfq
  push 0x23
  push {USER_STUB:#x}
  iretq
success:
  mov qword ptr [r14], 0
  mov qword ptr [r14+8], 0
  mov qword ptr [r14+16], 0
after_access:
  clac
  mov rdi, {A1:#x}
  mov rax, qword ptr [rdi]
  mov qword ptr [r14+24], rax
  mov rdi, {A2:#x}
  mov rax, qword ptr [rdi]
  mov qword ptr [r14+32], rax
  add rsi, 64
  add r14, 64
  dec r15
  jmp case_loop

all_done:
  mov al, 0
  out 0xf4, al

pf_handler:
  pop rdx
  mov rcx, cr2
  lea rdi, [rip + phase]
  cmp qword ptr [rdi], 1
  je pf_twice
  mov qword ptr [r14], 1
  mov qword ptr [r14+8], rdx
  mov qword ptr [r14+16], rcx
  lea rdi, [rip + rsp_save]
  mov rsp, qword ptr [rdi]
  jmp after_access
pf_twice:
  lea rdi, [rip + rsp_save]
  mov rsp, qword ptr [rdi]
  jmp after_twice

sys_handler:
  lea rdi, [rip + rsp_save]
  mov rsp, qword ptr [rdi]
  jmp success

unexpected:
  mov al, 0x7f
  out 0xf4, al

{SETGATE}
user_stub:
  cmp rbx, 1
  je us_write
  cmp rbx, 2
  je us_fetch
  mov rcx, qword ptr [rax]
  int 0x80
us_write:
  mov qword ptr [rax], rcx
  int 0x80
us_fetch:
  call rax
  int 0x80
user_stub_end:

{descriptor_data('mx')}
rsp_save:
  .quad 0
phase:
  .quad 0
"""


_IMAGE = None


def guest_image():
    """The matrix kernel, built once per process."""
    global _IMAGE
    if _IMAGE is None:
        _IMAGE = build(_guest_source(), source_name="access-matrix")
    return _IMAGE


def _descriptor(case: o.Case) -> bytes:
    f = case.flags
    pml4e, pdpte, pde, pte = o.initial_entries(case)
    bits = 0
    for flag, bit in ((o.AC_ACCESS_USER, F_USER), (o.AC_ACCESS_WRITE, F_WRITE), (o.AC_ACCESS_FETCH, F_FETCH),
                      (o.AC_ACCESS_TWICE, F_TWICE), (o.AC_CPU_EFER_NX, F_NX), (o.AC_CPU_CR0_WP, F_WP),
                      (o.AC_CPU_CR4_SMEP, F_SMEP), (o.AC_CPU_CR4_SMAP, F_SMAP),
                      (o.AC_CPU_EFLAGS_AC, F_AC)):
        if f & flag:
            bits |= bit
    return struct.pack("<QQQQQ24x", pml4e, pdpte, pde, pte or 0, bits)


@dataclass(frozen=True)
class Outcome:
    """What one access did, as the guest recorded it."""

    fault: bool
    error_code: int
    cr2: int
    pte: int | None
    pde: int


def run_cases(cases: list[o.Case], mode: str, configure: Callable[[VM], None] | None = None,
              insns: list[int] | None = None) -> list[Outcome]:
    """Run the cases in one guest under ``mode``; the outcomes in case order. ``insns``, if
    given, receives the instructions each guest run took."""
    outcomes: list[Outcome] = []
    for start in range(0, len(cases), BATCH):
        batch = cases[start:start + BATCH]
        image = guest_image()
        if mode == "native":
            vm = VM(VMConfig(name="native", memsize=MEMSIZE, mmu="native"), image)
        else:
            host = Host(HostConfig(memsize=2 * MEMSIZE))
            vm = host.power_on(VMConfig(name=mode, memsize=MEMSIZE, mmu=mode), image)
        if configure is not None:
            configure(vm)
        vm.ram.write_gpa(CASE_COUNT, struct.pack("<Q", len(batch)))
        vm.ram.write_gpa(CASE_TABLE, b"".join(_descriptor(c) for c in batch))
        res = vm.run(max_insns=400 * len(batch) + 1_000_000)
        if res.exit_status != 0:
            raise RuntimeError(f"matrix guest under {mode} did not finish: {res.stop_reason}: {res.message}")
        if insns is not None:
            insns.append(vm.vcpu.insns)
        raw = vm.ram.read_gpa(RESULTS, 64 * len(batch))
        for i, case in enumerate(batch):
            fault, err, cr2, pte, pde = struct.unpack_from("<QQQQQ", raw, 64 * i)
            outcomes.append(Outcome(bool(fault), err, cr2, None if case.has(o.AC_PDE_PSE) else pte, pde))
        vm.close()
    return outcomes


def differs(exp: o.Expected, got: Outcome) -> list[str]:
    """How an outcome differs from the oracle's expectation (empty when it agrees)."""
    out = []
    if got.fault != exp.fault:
        out.append(f"fault {got.fault} expected {exp.fault}")
    elif exp.fault:
        if got.error_code != exp.error_code:
            out.append(f"error code {got.error_code:#x} expected {exp.error_code:#x}")
        if got.cr2 != exp.cr2:
            out.append(f"CR2 {got.cr2:#x} expected {exp.cr2:#x}")
    if exp.pte is not None and got.pte != exp.pte:
        out.append(f"PTE {got.pte:#x} expected {exp.pte:#x}")
    if (got.pde & ~exp.pde_ignore_mask) != (exp.pde & ~exp.pde_ignore_mask):
        out.append(f"PDE {got.pde:#x} expected {exp.pde:#x}")
    return out


def reference_reason(case: o.Case, exp: o.Expected, got: Outcome) -> str:
    """Why QEMU's walker may legitimately differ from the oracle for this case."""
    return "QEMU behaviour differs from the oracle's reading of the SDM (unclassified)"


@dataclass
class MatrixResult:
    """Per mode: combinations run and mismatches against the oracle."""

    combinations: int = 0
    mismatches: dict[str, list[str]] = field(default_factory=dict)
    reference_deviations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(self.mismatches.values())

    def lines(self) -> list[str]:
        out = []
        for mode, bad in self.mismatches.items():
            out.append(f"access matrix, {mode}: {self.combinations} combinations, {len(bad)} mismatches")
            out.extend("  " + b for b in bad[:20])
        if self.reference_deviations:
            out.append(f"reference (native) disagrees with the oracle in {len(self.reference_deviations)} "
                       f"combinations (QEMU vs the SDM; not counted above):")
            out.extend("  " + d for d in self.reference_deviations[:20])
        return out


def run_matrix(modes: Iterable[str], *, sample: int = 1, configure: Callable[[VM], None] | None = None,
               cases: list[o.Case] | None = None) -> MatrixResult:
    """Every ``sample``-th legal combination under each mode and the reference."""
    if cases is None:
        cases = [c for c in o.enumerate_cases() if c.index % sample == 0]
    expected = [o.expected(c, VA) for c in cases]
    result = MatrixResult(combinations=len(cases))
    ref = run_cases(cases, "native")
    ref_ok = []
    for case, exp, got in zip(cases, expected, ref):
        d = differs(exp, got)
        if d:
            result.reference_deviations.append(f"#{case.index} {case.name}: {'; '.join(d)} — "
                                               f"{reference_reason(case, exp, got)}")
        ref_ok.append(not d)
    for mode in modes:
        outs = run_cases(cases, mode, configure)
        bad = []
        for case, exp, got, r, rok in zip(cases, expected, outs, ref, ref_ok):
            d = differs(exp, got)
            if not d and rok and got != r:
                d = [f"differs from the reference: {got} vs {r}"]
            if d:
                bad.append(f"#{case.index} {case.name}: {'; '.join(d)}")
        result.mismatches[mode] = bad
    return result
