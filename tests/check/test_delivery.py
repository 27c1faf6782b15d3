"""Event delivery against its own oracle: the oracle by hand, the guest matrix in every mode,
proof that it catches delivery bugs the lock-step check cannot (native included), and
regressions for the delivery bugs it found."""

from __future__ import annotations

import functools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from unicorn import x86_const as X

from hvmodel.check import delivery_matrix as m
from hvmodel.check import delivery_oracle as d
from hvmodel.cli import main

MODES = ("native", "nested", "shadow")

TSS = d.Tss(rsp=(0x80FF8, 0x1E1000, 0x1E2000), ist=(0x82000, 0x82FF8, 0x84000, 0x84FF8, 0x86000,
                                                     0x86FF8, 0x88000))
IDT = {v: d.Gate() for v in range(256)}


def _idt(**gates: d.Gate) -> dict[int, d.Gate]:
    idt = dict(IDT)
    idt.update({int(k[1:]): g for k, g in gates.items()})
    return idt


USER = d.Cpu(cpl=3, rip=0x5100, next_rip=0x5102, rsp=0x6FE8, rflags=0x4203, cs=0x23, ss=0x1B)
KERNEL = d.Cpu(cpl=0, rip=0x5100, next_rip=0x5103, rsp=0x88FE8, rflags=0x246, cs=0x08, ss=0x10)


# -- the oracle, by hand (SDM vol. 3 §6.12-6.15, §17.3.1.1) ----------------------------

def test_int_from_ring3_through_an_interrupt_gate_switches_to_rsp0():
    r = d.deliver(d.Event(d.KIND_INT, 0x80), USER, _idt(v128=d.Gate(dpl=3)), TSS)
    # RSP0 0x80ff8 aligned down to 0x80ff0, five words below it
    assert (r.vector, r.stack, r.rsp) == (0x80, "rsp0", 0x80FF0 - 40)
    assert r.frame == (0x5102, 0x23, 0x4203, 0x6FE8, 0x1B)      # next RIP, RF 0
    assert (r.cpl, r.cs, r.ss, r.error_code) == (0, 0x08, 0, None)  # SS = NULL, RPL 0
    assert r.rflags == 0x0003                                     # IF and NT cleared


def test_a_trap_gate_keeps_if():
    r = d.deliver(d.Event(d.KIND_INT, 0x80), USER, _idt(v128=d.Gate(type=d.TRAP_GATE, dpl=3)), TSS)
    assert r.rflags == 0x0203


def test_page_fault_on_an_ist_stack_without_privilege_change():
    ev = d.Event(d.KIND_EXCEPTION, d.PF, error_code=2, cr2=0x1FF238)
    r = d.deliver(ev, KERNEL, _idt(v14=d.Gate(ist=4)), TSS)
    # IST4 0x84ff8 -> 0x84ff0; six words: the error code first
    assert (r.stack, r.rsp) == ("ist4", 0x84FF0 - 48)
    assert r.frame == (2, 0x5100, 0x08, 0x246 | d.RF_RF, 0x88FE8, 0x10)  # faulting RIP, RF 1
    assert (r.ss, r.cr2, r.error_code) == (0x10, 0x1FF238, 2)


def test_same_privilege_without_ist_aligns_the_current_stack():
    r = d.deliver(d.Event(d.KIND_EXCEPTION, d.UD), KERNEL, IDT, TSS)
    assert (r.stack, r.rsp) == ("current", 0x88FE0 - 40)
    assert r.frame[3:] == (0x88FE8, 0x10)


def test_int_with_dpl_below_cpl_is_gp_reporting_the_int():
    r = d.deliver(d.Event(d.KIND_INT, 13), USER, IDT, TSS)
    assert r.chain == ((13, None), (13, 13 * 8 + 2))           # no EXT: a software interrupt
    assert (r.vector, r.error_code, r.stack) == (d.GP, 0x6A, "rsp0")
    assert r.frame[:2] == (0x6A, 0x5100)                       # RIP of the int itself
    assert r.frame[3] == 0x4203 | d.RF_RF                      # #GP is a fault


def test_int3_checks_dpl_too():
    cpu = d.Cpu(cpl=3, rip=0x5200, next_rip=0x5201, rsp=0x6FE0, rflags=0x202, cs=0x23, ss=0x1B)
    r = d.deliver(d.Event(d.KIND_INT3, 3), cpu, IDT, TSS)
    assert (r.vector, r.error_code, r.frame[1]) == (d.GP, 3 * 8 + 2, 0x5200)
    ok = d.deliver(d.Event(d.KIND_INT3, 3), cpu, _idt(v3=d.Gate(dpl=3)), TSS)
    assert (ok.vector, ok.frame[0]) == (3, 0x5201)


def test_hardware_exceptions_and_interrupts_ignore_the_dpl():
    assert d.deliver(d.Event(d.KIND_EXCEPTION, d.DE), USER, IDT, TSS).vector == d.DE
    assert d.deliver(d.Event(d.KIND_EXTERNAL, 0x30), USER, IDT, TSS).vector == 0x30


def test_not_present_gate_of_an_exception_is_np_with_ext():
    r = d.deliver(d.Event(d.KIND_EXCEPTION, d.UD), KERNEL, _idt(v6=d.Gate(present=False)), TSS)
    assert (r.vector, r.error_code) == (d.NP, 6 * 8 + 3)


def test_not_present_gate_of_an_int_is_np_without_ext():
    r = d.deliver(d.Event(d.KIND_INT, 0x40), KERNEL, _idt(v64=d.Gate(present=False)), TSS)
    assert (r.vector, r.error_code, r.frame[1]) == (d.NP, 0x40 * 8 + 2, 0x5100)


def test_bad_gate_type_is_gp_and_is_checked_before_the_dpl():
    r = d.deliver(d.Event(d.KIND_INT, 0x40), USER, _idt(v64=d.Gate(type=0xC, present=False)), TSS)
    assert (r.vector, r.error_code) == (d.GP, 0x40 * 8 + 2)
    r = d.deliver(d.Event(d.KIND_EXTERNAL, 0x40), USER, _idt(v64=d.Gate(type=0x6)), TSS)
    assert (r.vector, r.error_code, r.frame[1]) == (d.GP, 0x40 * 8 + 3, 0x5100)


def test_contributory_then_contributory_is_a_double_fault_with_undefined_cs_rip():
    idt = _idt(v13=d.Gate(present=False), v8=d.Gate(ist=7))
    r = d.deliver(d.Event(d.KIND_EXCEPTION, d.GP, error_code=0), USER, idt, TSS)
    assert r.chain == ((13, 0), (11, 13 * 8 + 3), (8, 0))
    assert (r.vector, r.error_code, r.stack) == (d.DF, 0, "ist7")
    assert r.frame[:3] == (0, None, None)                      # CS:RIP undefined (abort)
    assert r.frame[3] == 0x4203                                # an abort leaves RF alone


def test_page_fault_then_np_is_a_double_fault_and_cr2_stays():
    ev = d.Event(d.KIND_EXCEPTION, d.PF, error_code=4, cr2=0x1FF000)
    r = d.deliver(ev, USER, _idt(v14=d.Gate(present=False)), TSS)
    assert (r.vector, r.cr2) == (d.DF, 0x1FF000)


def test_benign_then_contributory_is_delivered_serially():
    r = d.deliver(d.Event(d.KIND_EXCEPTION, d.UD), USER, _idt(v6=d.Gate(type=0)), TSS)
    assert (r.vector, r.error_code) == (d.GP, 0x33)


def test_software_and_external_vectors_below_32_are_not_exceptions():
    # int 14 / int 8 are no #PF / #DF: no error code, and a fault delivering them is no #DF
    r = d.deliver(d.Event(d.KIND_INT, d.PF), USER, _idt(v14=d.Gate(dpl=3)), TSS)
    assert (r.vector, r.error_code, len(r.frame)) == (14, None, 5)
    r = d.deliver(d.Event(d.KIND_INT, d.DF), KERNEL, _idt(v8=d.Gate(present=False)), TSS)
    assert (r.vector, r.error_code, r.shutdown) == (d.NP, 0x42, False)
    r = d.deliver(d.Event(d.KIND_EXTERNAL, d.DF), KERNEL, _idt(v8=d.Gate(present=False)), TSS)
    assert (r.vector, r.error_code) == (d.NP, 0x43)
    r = d.deliver(d.Event(d.KIND_EXTERNAL, d.GP), USER, IDT, TSS)
    assert (r.vector, r.error_code, r.frame[0]) == (13, None, 0x5100)


def test_a_fault_delivering_df_is_a_shutdown():
    idt = _idt(v13=d.Gate(present=False), v8=d.Gate(present=False))
    r = d.deliver(d.Event(d.KIND_EXCEPTION, d.GP), KERNEL, idt, TSS)
    assert r.shutdown and r.chain[-1] == (d.NP, 8 * 8 + 3)


@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from([d.KIND_INT, d.KIND_EXCEPTION, d.KIND_EXTERNAL]), vector=st.integers(0, 255),
       gtype=st.sampled_from([d.INTERRUPT_GATE, d.TRAP_GATE]), dpl=st.integers(0, 3), ist=st.integers(0, 7),
       cpl=st.sampled_from([0, 3]), rsp=st.integers(0x1000, 0xFFFF).map(lambda x: x * 8),
       rflags=st.integers(0, 0x3FFFFF).map(lambda x: (x | 2) & ~(0x8 | 0x20 | 0x8000)))
def test_every_delivery_keeps_the_invariants(kind, vector, gtype, dpl, ist, cpl, rsp, rflags):
    cpu = d.Cpu(cpl=cpl, rip=0x5000, next_rip=0x5002, rsp=rsp, rflags=rflags, cs=0x23 if cpl else 8,
                ss=0x1B if cpl else 0x10)
    r = d.deliver(d.Event(kind, vector), cpu, _idt(**{f"v{vector}": d.Gate(gtype, dpl, ist)}), TSS)
    assert not r.shutdown
    assert (r.rsp + 8 * len(r.frame)) % 16 == 0                 # pushed from a 16-aligned RSP
    assert r.frame[-2:] == (rsp, cpu.ss)                         # old RSP and SS, always
    assert r.rflags & (d.RF_TF | d.RF_NT | d.RF_RF) == 0
    # IF stays only through a trap gate (every default gate here is an interrupt gate)
    trap = r.vector == vector and gtype == d.TRAP_GATE
    assert bool(r.rflags & d.RF_IF) == (bool(rflags & d.RF_IF) and trap)
    assert (r.cs, r.cpl) == (0x08, 0) and r.ss == (0 if cpl else 0x10)
    assert len(r.frame) == 5 + (r.error_code is not None)


# -- the enumeration ----------------------------------------------------------------------

def test_case_counts():
    cases = m.enumerate_cases()
    assert len(cases) == 104_412
    by = {}
    for c in cases:
        by[c.source] = by.get(c.source, 0) + 1
    assert by == {"int": 256 * 264, "int3": 264, "ud2": 132, "div0": 132, "gp-noncanonical": 132,
                  "gp-selector": 132, "pf-unmapped": 132, "pf-readonly": 132, "apic": 240 * 132,
                  "pic": 31 * 132}
    assert not any(c.expected().shutdown for c in cases)
    assert [c.index for c in cases] == list(range(len(cases)))


def test_sample_takes_every_source_and_both_cpls():
    cases = m.sample_cases(25)
    assert {c.source for c in cases} == set(m.SOURCES)
    assert {c.cpl for c in cases} == {0, 3}
    assert m.sample_cases(25) == cases                           # a fixed seed


# -- the guest matrix, every mode ---------------------------------------------------------

@functools.cache
def _sampled_run():
    return m.run_matrix(["nested", "shadow"], sample=40)


def test_sampled_delivery_matrix_agrees_with_the_oracle_in_every_mode():
    res = _sampled_run()
    assert res.cases >= 2500
    assert res.ok, "\n".join(res.lines())
    assert set(res.mismatches) == set(MODES)
    assert res.reference_deviations == []
    assert res.lines() == [f"delivery matrix, {mode}: {res.cases} cases, 0 mismatches" for mode in MODES]


def test_the_cli_prints_cases_and_mismatches_per_mode(capsys):
    assert main(["check", "--delivery", "--sample", "400", "--mmu", "shadow"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [ln.split(":")[0] for ln in out] == ["delivery matrix, native", "delivery matrix, shadow"]
    assert all(ln.endswith(" cases, 0 mismatches") for ln in out)


# -- seeded delivery bugs: the matrix must fail in every mode, the reference included ------

def _ist_ignored(vm):
    """events.py reads every gate's IST field as 0."""
    ev = vm.events
    read = ev._read

    def patched(va, size):
        data = read(va, size)
        idt = vm.vcpu.table_reg(X.UC_X86_REG_IDTR)[1]
        if size == 16 and idt <= va < idt + 4096:
            data = data[:4] + bytes([data[4] & ~7]) + data[5:]
        return data
    ev._read = patched


def _trap_pushes_fault_rip(vm):
    """events.py pushes the RIP of `int N` itself, as for a fault."""
    ev = vm.events
    once = ev._deliver_once

    def patched(vector, error_code, soft, external, fault_rip):
        if soft and fault_rip is None:
            fault_rip = ev._soft_start(vector)
        return once(vector, error_code, soft, external, fault_rip)
    ev._deliver_once = patched


def _rsp0_ignored(vm):
    """events.py keeps the current RSP on a privilege change (reads RSP instead of TSS.RSP0)."""
    ev = vm.events
    read = ev._read

    def patched(va, size):
        if size == 8 and va == vm.vcpu.table_reg(X.UC_X86_REG_TR)[1] + 4:
            return struct.pack("<Q", vm.vcpu.reg(X.UC_X86_REG_RSP))
        return read(va, size)
    ev._read = patched


@pytest.mark.parametrize("bug,expect", [(_ist_ignored, "RSP"), (_trap_pushes_fault_rip, "pushed RIP"),
                                        (_rsp0_ignored, "expected rsp0")])
def test_a_seeded_delivery_bug_fails_in_every_mode(bug, expect):
    cases = m.sample_cases(150, seed=1)
    res = m.run_matrix(["nested", "shadow"], cases=cases, configure=bug)
    assert not res.ok
    for mode in MODES:
        assert res.mismatches[mode], f"{mode} did not see {bug.__name__}"
        assert any(expect in line for line in res.mismatches[mode])


# -- regressions: the delivery bugs the matrix found in vm/events.py and vm/vcpu.py -------

def _case(source: str, vector: int, cpl: int, **gate) -> m.Case:
    want = d.Gate(**gate)
    return next(c for c in m.enumerate_cases([source]) if c.vector == vector and c.cpl == cpl and c.gate == want)


def _agree(cases: list[m.Case]) -> None:
    res = m.run_matrix(["nested", "shadow"], cases=cases)
    assert res.ok, "\n".join(res.lines())


def test_a_fault_delivering_a_software_or_external_interrupt_is_no_double_fault():
    # was: `int 0`/`int 13`/`int 14` whose gate faulted became #DF (their vectors were taken
    # for contributory exceptions and #PF); `int 8` or a PIC interrupt on vector 8 with a
    # not-present gate was a triple fault that stopped the VM
    cases = [_case("int", 0, 3), _case("int", 13, 3), _case("int", 14, 3, type=d.TRAP_GATE),
             _case("int", 8, 0, present=False), _case("int", 8, 3, dpl=3, ist=2, present=False),
             _case("pic", 8, 0, present=False), _case("int", 11, 3, dpl=3, present=False)]
    assert [c.expected().vector for c in cases] == [d.GP, d.GP, d.GP, d.NP, d.NP, d.NP, d.DF]
    _agree(cases)


def test_the_gp_of_a_refused_int_reports_the_int_itself():
    # was: the RIP after the int (RIP already points past a software interrupt)
    cases = [_case("int", 0x80, 3), _case("int3", 3, 3), _case("int", 0x40, 0, present=False)]
    assert [c.expected().frame[1] for c in cases] == [c.event_and_cpu()[1].rip for c in cases]
    _agree(cases)


def test_a_bad_gate_of_an_exception_sets_ext_in_the_error_code():
    # was: #NP(vector*8+2) for a hardware exception; EXT was set only for external interrupts
    cases = [_case("ud2", 6, 3, present=False), _case("div0", 0, 0, type=m.BAD_TYPE)]
    assert [c.expected().chain[1] for c in cases] == [(d.NP, 0x33), (d.GP, 0x3)]
    _agree(cases)


def test_a_fault_pushes_rf_set():
    # was: RFLAGS pushed as it was; SDM §17.3.1.1: every fault-class exception pushes RF = 1
    cases = [_case("pf-unmapped", 14, 3), _case("gp-selector", 13, 0, ist=3),
             _case("apic", 0x40, 3, present=False)]
    assert all(c.expected().frame[3] & d.RF_RF for c in cases)
    _agree(cases)


def test_int_6_is_a_software_interrupt():
    # was: Unicorn reports `int 6` as an invalid instruction, and it was delivered as #UD:
    # no DPL check, and the int's own RIP pushed
    cases = [_case("int", 6, 3), _case("int", 6, 3, dpl=3), _case("int", 6, 0, type=d.TRAP_GATE, ist=5)]
    assert [c.expected().vector for c in cases] == [d.GP, 6, 6]
    _agree(cases)


def test_int_14_in_the_reference_is_no_page_fault():
    # was (native only): every vector-14 interrupt was taken for the reference MMU's #PF,
    # so `int 14` pushed an error code
    cases = [_case("int", 14, 3, dpl=3), _case("int", 14, 0, ist=1)]
    assert all(c.expected().error_code is None for c in cases)
    res = m.run_matrix([], cases=cases)
    assert res.ok, "\n".join(res.lines())
