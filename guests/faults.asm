# faults.asm -- 200 consecutive faults: #DE (div by zero), #GP (non-canonical load)
# and #PF (not-present page) in turn. #DE/#GP handlers resume at a recovery address;
# the #PF handler maps the page and retries. Checks each count, the faulting RIPs, the
# #GP error code 0, CR2, and that no double fault (vector 8) ever appears.
%include "runtime/boot.inc"

%define NFAULTS  200
%define PF_BASE  0x50000000000

main:
    lea rsi, [rip + msg_start]
    call puts
    mov edi, 0
    lea rsi, [rip + de_handler]
    call set_handler
    mov edi, 13
    lea rsi, [rip + gp_handler]
    call set_handler
    mov edi, 14
    lea rsi, [rip + pf_handler]
    call set_handler
    xor r12d, r12d
f_loop:
    mov rax, r12
    xor edx, edx
    mov ecx, 3
    div rcx
    cmp edx, 1
    je f_gp
    ja f_pf
    # ---- #DE
    lea rax, [rip + f_de_insn]
    mov qword ptr [rip + expect_rip], rax
    lea rax, [rip + f_de_done]
    mov qword ptr [rip + fixup_rip], rax
    mov eax, 1
    xor edx, edx
    xor ecx, ecx
f_de_insn:
    div ecx
    lea rsi, [rip + msg_no_de]
    jmp fail
f_de_done:
    jmp f_next
f_gp:
    lea rax, [rip + f_gp_insn]
    mov qword ptr [rip + expect_rip], rax
    lea rax, [rip + f_gp_done]
    mov qword ptr [rip + fixup_rip], rax
    movabs rbx, 0x8000000000000000
f_gp_insn:
    mov rax, qword ptr [rbx]
    lea rsi, [rip + msg_no_gp]
    jmp fail
f_gp_done:
    jmp f_next
f_pf:
    mov rax, r12
    shl rax, 12
    movabs rbx, PF_BASE
    add rbx, rax
    mov qword ptr [rip + expect_cr2], rbx
    mov rcx, qword ptr [rip + pf_count]
    mov rax, qword ptr [rbx]
    cmp qword ptr [rip + pf_count], rcx
    je f_pf_nofault
    test rax, rax
    jnz f_pf_bad
f_next:
    inc r12
    cmp r12, NFAULTS
    jb f_loop
    # totals
    lea rsi, [rip + msg_de]
    call puts
    mov rax, qword ptr [rip + de_count]
    call putdec
    lea rsi, [rip + msg_gp]
    call puts
    mov rax, qword ptr [rip + gp_count]
    call putdec
    lea rsi, [rip + msg_pf]
    call puts
    mov rax, qword ptr [rip + pf_count]
    call putdec
    call putnl
    cmp qword ptr [rip + de_count], 67
    jne f_bad_totals
    cmp qword ptr [rip + gp_count], 67
    jne f_bad_totals
    cmp qword ptr [rip + pf_count], 66
    jne f_bad_totals
    mov rax, qword ptr [rip + de_count]
    add rax, qword ptr [rip + gp_count]
    add rax, qword ptr [rip + pf_count]
    cmp rax, NFAULTS
    jne f_bad_totals
    jmp pass
f_bad_totals:
    lea rsi, [rip + msg_bad_totals]
    jmp fail
f_pf_nofault:
    lea rsi, [rip + msg_no_pf]
    jmp fail
f_pf_bad:
    lea rsi, [rip + msg_pf_data]
    jmp fail

# check_rip(rdi = frame): the fault must be at expect_rip; then resume at fixup_rip
fixup_resume:
    mov rax, qword ptr [rdi + F_RIP]
    cmp rax, qword ptr [rip + expect_rip]
    jne f_bad_rip
    mov rax, qword ptr [rip + fixup_rip]
    mov qword ptr [rdi + F_RIP], rax
    ret
f_bad_rip:
    lea rsi, [rip + msg_bad_rip]
    jmp fail

de_handler:
    inc qword ptr [rip + de_count]
    jmp fixup_resume

gp_handler:
    inc qword ptr [rip + gp_count]
    cmp qword ptr [rdi + F_ERR], 0
    jne gp_bad_err
    jmp fixup_resume
gp_bad_err:
    lea rsi, [rip + msg_gp_err]
    jmp fail

pf_handler:
    inc qword ptr [rip + pf_count]
    mov rsi, cr2
    cmp rsi, qword ptr [rip + expect_cr2]
    jne pf_bad_cr2
    cmp qword ptr [rdi + F_ERR], 0
    jne pf_bad_err
    and rsi, -4096
    call alloc_frame
    mov rdx, rax
    mov edi, PML4_BASE
    mov ecx, PTE_P | PTE_W
    call map_page
    ret
pf_bad_cr2:
    lea rsi, [rip + msg_pf_cr2]
    jmp fail
pf_bad_err:
    lea rsi, [rip + msg_pf_err]
    jmp fail

de_count:   .quad 0
gp_count:   .quad 0
pf_count:   .quad 0
expect_rip: .quad 0
fixup_rip:  .quad 0
expect_cr2: .quad 0

msg_start:      .asciz "faults: 200 consecutive #DE/#GP/#PF, each handled and resumed\n"
msg_de:         .asciz "#DE "
msg_gp:         .asciz ", #GP "
msg_pf:         .asciz ", #PF "
msg_no_de:      .asciz "div by zero did not fault"
msg_no_gp:      .asciz "non-canonical load did not fault"
msg_no_pf:      .asciz "not-present page did not fault"
msg_pf_data:    .asciz "fresh page does not read as zero"
msg_bad_rip:    .asciz "fault reported at the wrong RIP"
msg_gp_err:     .asciz "#GP error code is not 0"
msg_pf_cr2:     .asciz "#PF CR2 is not the address touched"
msg_pf_err:     .asciz "#PF error code is not 0 (read, not present, supervisor)"
msg_bad_totals: .asciz "fault totals wrong (expected 67 #DE, 67 #GP, 66 #PF = 200)"
