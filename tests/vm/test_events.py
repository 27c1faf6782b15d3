"""Event delivery: exceptions through the guest IDT, CPL changes, #DF and triple faults."""

from __future__ import annotations

from conftest import run_asm
from paging_prologue import PROLOGUE


def test_hundred_consecutive_divide_errors_are_each_delivered_as_de():
    # Without clearing QEMU's hidden old_exception the 2nd #DE would arrive as #DF.
    vm, r = run_asm(PROLOGUE + """
main:
  lea rax, [rip + de_handler]
  mov rdi, 0x9000
  call setgate
  mov r12, 0
  mov r13, 100
again:
  xor ecx, ecx
  mov eax, 1
  div ecx
  dec r13
  jnz again
  cmp r12, 100
  jne bad
  mov al, 0
  out 0xf4, al
bad:
  mov al, 1
  out 0xf4, al
de_handler:
  inc r12
  add qword ptr [rsp], 2
  iretq
""")
    assert r.exit_status == 0, r.message
    assert r.counters["events_delivered"] == {"#DE": 100}


def test_page_fault_error_code_and_cr2_reach_the_handler():
    vm, r = run_asm(PROLOGUE + """
main:
  lea rax, [rip + pf_handler]
  mov rdi, 0x9000 + 14*16
  call setgate
  // unmap the 2 MiB page at 0x40000000 -> PDE 512 is outside the PD; use PDE 100 (0xC800000)
  mov rdi, 0x12000 + 100*8
  mov qword ptr [rdi], 0
  mov rbx, 0xC800123
  invlpg [rbx]
  mov byte ptr [rbx], 1
  mov al, 0
  out 0xf4, al
pf_handler:
  pop rax
  cmp rax, 2
  jne bad
  mov rax, cr2
  cmp rax, rbx
  jne bad
  mov al, 0
  out 0xf4, al
bad:
  mov al, 1
  out 0xf4, al
""")
    assert r.exit_status == 0, r.message
    assert r.counters["guest_page_faults"] == 1


def test_int80_from_ring3_switches_to_tss_rsp0_and_returns():
    vm, r = run_asm(PROLOGUE + """
main:
  lea rax, [rip + sys_handler]
  mov rdi, 0x9000 + 0x80*16
  call setgate
  mov rdi, 0x9000 + 0x80*16
  mov byte ptr [rdi+5], 0xEE
  mov rax, 0x80000
  push 0x1b
  push rax
  push 0x2
  push 0x23
  lea rax, [rip + user]
  push rax
  iretq
user:
  mov rax, 7
  int 0x80
  cmp rax, 8
  jne user_bad
  mov rax, 1000
  int 0x80
user_bad:
  jmp user_bad
sys_handler:
  mov rbx, rsp
  cmp rbx, 0x7f000
  jae bad
  cmp rbx, 0x7e000
  jb bad
  mov rcx, qword ptr [rsp + 8]
  cmp rcx, 0x23
  jne bad
  cmp rax, 1000
  je done
  inc rax
  iretq
done:
  mov al, 0
  out 0xf4, al
bad:
  mov al, 1
  out 0xf4, al
""")
    assert r.exit_status == 0, r.message
    assert r.counters["events_delivered"] == {"vector 0x80": 2}


def test_fault_without_idt_entry_is_a_triple_fault_with_report():
    vm, r = run_asm(PROLOGUE + """
main:
  mov rdi, 0x9000
  mov rcx, 512
clr:
  mov qword ptr [rdi], 0
  add rdi, 8
  dec rcx
  jnz clr
  ud2
""")
    assert r.stop_reason == "triple_fault"
    assert r.exit_status is None
    assert "#UD" in r.message and "#DF" in r.message
    assert "ud2" in vm.triple_fault_report
    assert f"RIP {vm.vcpu.rip:#x}" in vm.triple_fault_report


def test_cli_hlt_powers_off_with_status_zero():
    vm, r = run_asm("cli; hlt")
    assert r.stop_reason == "power_off" and r.exit_status == 0
    assert "cli; hlt" in r.message


def test_endless_loop_stops_at_instruction_limit():
    vm, r = run_asm("spin: jmp spin", max_insns=10_000)
    assert r.stop_reason == "instruction_limit"
    assert r.counters["instructions"] == 10_000


def test_fault_pushing_on_a_bad_stack_becomes_df_on_its_ist_stack():
    vm, r = run_asm(PROLOGUE + """
main:
  lea rax, [rip + de_handler]
  mov rdi, 0x9000
  call setgate
  lea rax, [rip + df_handler]
  mov rdi, 0x9000 + 8*16
  call setgate
  mov rdi, 0x9000 + 8*16
  mov byte ptr [rdi+4], 1
  mov rax, 0x70000
  mov rdi, 0xA024
  mov qword ptr [rdi], rax
  mov rdi, 0x12000 + 100*8
  mov qword ptr [rdi], 0
  mov rsp, 0xC800800
  xor ecx, ecx
  div ecx
  mov al, 2
  out 0xf4, al
de_handler:
  mov al, 3
  out 0xf4, al
df_handler:
  mov rax, rsp
  cmp rax, 0x70000
  jae bad
  cmp rax, 0x6f000
  jb bad
  mov rax, qword ptr [rsp]
  cmp rax, 0
  jne bad
  mov rax, cr2
  cmp rax, 0xC8007f8
  jne bad
  mov al, 0
  out 0xf4, al
bad:
  mov al, 1
  out 0xf4, al
""")
    assert r.exit_status == 0, r.message
    assert r.counters["events_delivered"] == {"#DF": 1}
