"""The PIT + PIC timer in instruction time: interrupts arrive, halts skip time, runs repeat exactly."""

from __future__ import annotations

from conftest import run_asm
from paging_prologue import PROLOGUE

TIMER_GUEST = PROLOGUE + """
main:
  lea rax, [rip + tick]
  mov rdi, 0x9000 + 0x20*16
  call setgate
  // PIC: ICW1..4, master at 0x20, slave at 0x28, unmask IRQ0 only
  mov al, 0x11
  out 0x20, al
  out 0xa0, al
  mov al, 0x20
  out 0x21, al
  mov al, 0x28
  out 0xa1, al
  mov al, 4
  out 0x21, al
  mov al, 2
  out 0xa1, al
  mov al, 1
  out 0x21, al
  out 0xa1, al
  mov al, 0xfe
  out 0x21, al
  mov al, 0xff
  out 0xa1, al
  // PIT channel 0, lobyte/hibyte, mode 2, divisor 100 -> IRQ0 every 8,400 instructions
  mov al, 0x34
  out 0x43, al
  mov al, 100
  out 0x40, al
  mov al, 0
  out 0x40, al
  mov r12, 0
  sti
wait:
  hlt
  cmp r12, 10
  jb wait
  // busy loop: ticks also preempt running code
  mov rcx, 200000
busy:
  dec rcx
  jnz busy
  cmp r12, 20
  jb bad
  mov al, 0
  out 0xf4, al
bad:
  mov al, 1
  out 0xf4, al
tick:
  inc r12
  push rax
  mov al, 0x20
  out 0x20, al
  pop rax
  iretq
"""


def test_timer_interrupts_wake_hlt_and_preempt_busy_code():
    vm, r = run_asm(TIMER_GUEST)
    assert r.exit_status == 0, r.message
    delivered = r.counters["events_delivered"]["vector 0x20"]
    assert delivered >= 20
    assert r.counters["idle_instructions"] > 0


def test_two_runs_are_identical_to_the_instruction():
    _, a = run_asm(TIMER_GUEST)
    _, b = run_asm(TIMER_GUEST)
    assert a.counters == b.counters
    assert a.counters["instructions"] == b.counters["instructions"]


def test_halt_with_no_timer_is_a_deadlock_report():
    vm, r = run_asm("sti; hlt")
    assert r.stop_reason == "deadlock"
    assert "no timer" in r.message
