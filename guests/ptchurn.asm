# ptchurn.asm -- page-table churn, as fork/exec/munmap cause it: 20,000 iterations of
# map (write a 4 KiB PTE into an existing page table, pointing at one of 4 physical
# frames in turn), touch (write a value through the mapping, read it back, and check
# through the identity map that it landed in that frame and that the previous
# iteration's frame kept its own value), unmap (clear the PTE) and invlpg. Every 500
# iterations the freshly unmapped page is accessed again and must fault: #PF with
# CR2 = the address, error code 0 (read) or 2 (write) in turn, at the expected RIP, and
# a faulting write must not reach the frame. A neighbouring page in the same page table
# stays mapped throughout and is checked every iteration.
%include "runtime/boot.inc"

%define CHURN_VA     0x8000000000
%define NEIGHBOUR_VA 0x8000001000
%define NFRAMES      4
%define ITERS        20000
%define FAULT_EVERY  500
%define NFAULTS      40
%define VALUE_MAGIC  0xc4a5e00000000000
%define NEIGHBOUR_V  0x6e6569676862

main:
    lea rsi, [rip + msg_start]
    call puts
    mov edi, 14
    lea rsi, [rip + pf_handler]
    call set_handler
    # the page table: created once (with the neighbour's mapping), then only its
    # CHURN_VA entry changes
    call alloc_frame
    mov rdx, rax
    mov r8, rax
    movabs rax, NEIGHBOUR_V
    mov qword ptr [r8], rax
    mov edi, PML4_BASE
    movabs rsi, NEIGHBOUR_VA
    mov ecx, PTE_P | PTE_W
    call map_page
    test rax, rax
    jz pc_map_failed
    mov edi, PML4_BASE
    movabs rsi, CHURN_VA
    xor edx, edx
    call pt_walk
    test rax, rax
    jz pc_map_failed
    mov r15, rax
    cmp qword ptr [r15], 0
    jne pc_map_failed
    # the frames the churned PTE points at
    xor ebx, ebx
pc_frames:
    call alloc_frame
    lea rcx, [rip + frames]
    mov qword ptr [rcx + rbx*8], rax
    inc ebx
    cmp ebx, NFRAMES
    jb pc_frames
    lea rsi, [rip + msg_pte]
    call puts
    mov rax, r15
    call puthex
    call putnl
    # ---- the loop: r12 = iteration, r14 = countdown to the next fault check
    # hvmodel bench: the measured region begins (POST code 1 to port 0x80)
    push rax
    mov al, 1
    out 0x80, al
    pop rax
    xor r12d, r12d
    mov r14d, FAULT_EVERY
pc_loop:
    # rbx = frame (r12 mod 4), rcx = offset in the page, r13 = address, rdx = value
    mov eax, r12d
    and eax, NFRAMES - 1
    lea rbx, [rip + frames]
    mov rbx, qword ptr [rbx + rax*8]
    mov rcx, r12
    shl rcx, 3
    and ecx, 0xff8
    movabs r13, CHURN_VA
    add r13, rcx
    movabs rdx, VALUE_MAGIC
    xor rdx, r12
    # map
    lea rax, [rbx + PTE_P + PTE_W]
    mov qword ptr [r15], rax
    # touch: write, read back, and find it in the frame through the identity map
    mov qword ptr [r13], rdx
    mov r8, qword ptr [r13]
    cmp r8, rdx
    jne pc_bad_readback
    mov r8, qword ptr [rbx + rcx]
    cmp r8, rdx
    jne pc_bad_frame
    # the previous iteration's frame still holds the previous value
    test r12, r12
    jz pc_no_prev
    lea rax, [r12 - 1]
    and eax, NFRAMES - 1
    lea r9, [rip + frames]
    mov r9, qword ptr [r9 + rax*8]
    lea rax, [r12 - 1]
    shl rax, 3
    and eax, 0xff8
    mov r8, qword ptr [r9 + rax]
    movabs rax, VALUE_MAGIC
    lea r10, [r12 - 1]
    xor rax, r10
    cmp r8, rax
    jne pc_bad_prev
pc_no_prev:
    # the neighbour in the same page table is untouched
    movabs rax, NEIGHBOUR_VA
    mov r8, qword ptr [rax]
    movabs rax, NEIGHBOUR_V
    cmp r8, rax
    jne pc_bad_neighbour
    # unmap
    mov qword ptr [r15], 0
    invlpg [r13]
    dec r14d
    jnz pc_next
    mov r14d, FAULT_EVERY
    call fault_check
pc_next:
    inc r12
    cmp r12, ITERS
    jb pc_loop
    # hvmodel bench: the measured region ends (POST code 2 to port 0x80)
    push rax
    mov al, 2
    out 0x80, al
    pop rax
    # ---- done
    lea rsi, [rip + msg_iters]
    call puts
    mov rax, r12
    call putdec
    lea rsi, [rip + msg_faults]
    call puts
    mov rax, qword ptr [rip + pf_count]
    call putdec
    lea rsi, [rip + msg_faults2]
    call puts
    cmp qword ptr [rip + pf_count], NFAULTS
    jne pc_bad_count
    cmp qword ptr [rip + fault_checks], NFAULTS
    jne pc_bad_count
    jmp pass

# fault_check: r13 (unmapped just now) must fault; read on even checks, write on odd
fault_check:
    mov qword ptr [rip + expect_cr2], r13
    test qword ptr [rip + fault_checks], 1
    jnz fc_write
    mov qword ptr [rip + expect_err], 0
    lea rax, [rip + fc_read_insn]
    mov qword ptr [rip + expect_rip], rax
    lea rax, [rip + fc_faulted]
    mov qword ptr [rip + pf_resume], rax
fc_read_insn:
    mov rax, qword ptr [r13]
    jmp pc_no_fault
fc_write:
    mov qword ptr [rip + expect_err], 2
    lea rax, [rip + fc_write_insn]
    mov qword ptr [rip + expect_rip], rax
    lea rax, [rip + fc_faulted]
    mov qword ptr [rip + pf_resume], rax
    mov rax, rdx
    not rax
fc_write_insn:
    mov qword ptr [r13], rax
    jmp pc_no_fault
fc_faulted:
    # exactly one fault per check, and a faulting write did not reach the frame
    mov rax, qword ptr [rip + fault_checks]
    inc rax
    cmp qword ptr [rip + pf_count], rax
    jne pc_bad_count
    mov qword ptr [rip + fault_checks], rax
    mov r8, qword ptr [rbx + rcx]
    cmp r8, rdx
    jne pc_bad_frame
    ret

# pf_handler(rdi = frame): only the fault checks may fault
pf_handler:
    mov rbx, rdi
    inc qword ptr [rip + pf_count]
    mov rax, qword ptr [rbx + F_RIP]
    cmp rax, qword ptr [rip + expect_rip]
    jne pf_unexpected
    mov rax, cr2
    mov qword ptr [rip + last_cr2], rax
    mov rax, qword ptr [rbx + F_ERR]
    mov qword ptr [rip + last_err], rax
    mov rax, cr2
    cmp rax, qword ptr [rip + expect_cr2]
    jne pf_bad_cr2
    mov rax, qword ptr [rbx + F_ERR]
    cmp rax, qword ptr [rip + expect_err]
    jne pf_bad_err
    # one fault per check: the next one must set expect_rip again
    mov qword ptr [rip + expect_rip], 0
    mov rax, qword ptr [rip + pf_resume]
    mov qword ptr [rbx + F_RIP], rax
    ret
pf_unexpected:
    mov rdi, rbx
    jmp default_handler
pf_bad_cr2:
    lea rsi, [rip + msg_bad_cr2]
    jmp pf_report
pf_bad_err:
    lea rsi, [rip + msg_bad_err]
pf_report:
    mov r12, qword ptr [rbx + F_R12]
    call puts
    lea rsi, [rip + msg_cr2]
    call puts
    mov rax, qword ptr [rip + last_cr2]
    call puthex
    lea rsi, [rip + msg_err]
    call puts
    mov rax, qword ptr [rip + last_err]
    call puthex
    jmp pc_report

pc_map_failed:
    lea rsi, [rip + msg_map_failed]
    jmp fail
pc_no_fault:
    lea rsi, [rip + msg_no_fault]
    jmp pc_report_value
pc_bad_readback:
    lea rsi, [rip + msg_bad_readback]
    jmp pc_report_value
pc_bad_frame:
    lea rsi, [rip + msg_bad_frame]
    jmp pc_report_value
pc_bad_prev:
    lea rsi, [rip + msg_bad_prev]
    jmp pc_report_value
pc_bad_neighbour:
    lea rsi, [rip + msg_bad_neighbour]
pc_report_value:
    call puts
    lea rsi, [rip + msg_read]
    call puts
    mov rax, r8
    call puthex
    lea rsi, [rip + msg_expected]
    call puts
    mov rax, rdx
    call puthex
    jmp pc_report
pc_bad_count:
    lea rsi, [rip + msg_bad_count]
    call puts
    lea rsi, [rip + msg_faults]
    call puts
    mov rax, qword ptr [rip + pf_count]
    call putdec
pc_report:
    lea rsi, [rip + msg_at_iter]
    call puts
    mov rax, r12
    call putdec
    call putnl
    lea rsi, [rip + msg_failed]
    jmp fail

    .align 8
frames:       .space NFRAMES * 8
pf_count:     .quad 0
fault_checks: .quad 0
expect_cr2:   .quad 0
expect_err:   .quad 0
expect_rip:   .quad 0
pf_resume:    .quad 0
last_cr2:     .quad 0
last_err:     .quad 0

msg_start:         .asciz "ptchurn: 20000 x map/touch/unmap/invlpg of one PTE over 4 frames, #PF check every 500\n"
msg_pte:           .asciz "churned PTE at "
msg_iters:         .asciz "iterations: "
msg_faults:        .asciz ", #PF after unmap: "
msg_faults2:       .asciz " (expected 40), CR2, error codes and frames ok\n"
msg_map_failed:    .asciz "could not set up the churned page table"
msg_no_fault:      .asciz "access after unmap + invlpg did not fault"
msg_bad_readback:  .asciz "value read back through the mapping is wrong"
msg_bad_frame:     .asciz "frame (through the identity map) does not hold the value"
msg_bad_prev:      .asciz "previous iteration's frame lost its value (stale translation?)"
msg_bad_neighbour: .asciz "neighbouring page in the same table changed"
msg_bad_count:     .asciz "wrong #PF count"
msg_bad_cr2:       .asciz "#PF CR2 is not the unmapped address"
msg_bad_err:       .asciz "#PF error code is not 0 (read) / 2 (write)"
msg_read:          .asciz ": read "
msg_expected:      .asciz " expected "
msg_cr2:           .asciz ": cr2 "
msg_err:           .asciz " err "
msg_at_iter:       .asciz " at iteration "
msg_failed:        .asciz "ptchurn check failed"
