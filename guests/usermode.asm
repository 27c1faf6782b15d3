# usermode.asm -- ring 3: the kernel enters user mode with iretq (CS 0x23, SS 0x1b,
# IF = 1). The user program reads/writes its own pages, runs a loop long enough to be
# preempted by >= 10 PIT interrupts (divisor 100: IRQ 0 every 8,400 instructions),
# takes #PF 0x7 (write to its read-only page) and #PF 0x5 (read of a supervisor page),
# which the kernel redirects to recovery labels, calls the kernel through int 0x80 (a
# DPL3 gate) and gets results in RAX, and leaves with syscall 3. Every entry from ring 3
# must run on the TSS.RSP0 stack. Ring 3 loads DS and ES itself (the CPU reads the GDT,
# a supervisor page, on the user's behalf).
%include "runtime/boot.inc"
%include "runtime/pic_pit.inc"

%define USER_RW     0x20000
%define USER_RO     0x21000
%define SUPER_PAGE  0x22000
%define USER_STACK  0x23000
%define USER_CS     SEL_UCODE | 3
%define USER_SS     SEL_UDATA | 3
%define USER_LOOPS  200000
%define MIN_TICKS   10

main:
    lea rsi, [rip + msg_start]
    call puts
    # user pages: RW, RO (with a known value), stack; SUPER_PAGE stays supervisor
    mov rax, USER_RO
    mov qword ptr [rax], 0x600d
    mov rax, SUPER_PAGE
    mov qword ptr [rax + 0x20], 0x5eca
    mov edi, PT0_BASE
    or qword ptr [rdi + (USER_RW >> 12) * 8], PTE_U
    mov qword ptr [rdi + (USER_RO >> 12) * 8], USER_RO | PTE_P | PTE_U
    or qword ptr [rdi + (USER_STACK >> 12) * 8], PTE_U
    # user code pages
    lea rsi, [rip + user_code_start]
    lea rdx, [rip + user_code_end]
um_code_pages:
    mov rax, rsi
    shr rax, 12
    or qword ptr [rdi + rax*8], PTE_U
    add rsi, 0x1000
    cmp rsi, rdx
    jb um_code_pages
    mov rax, cr3
    mov cr3, rax
    # handlers and gates
    mov edi, 14
    lea rsi, [rip + pf_handler]
    call set_handler
    mov edi, 0x80
    lea rsi, [rip + syscall_handler]
    call set_handler
    mov edi, 0x20
    lea rsi, [rip + timer_handler]
    call set_handler
    mov edi, 0x80
    mov esi, GATE_INT
    mov edx, 3
    xor ecx, ecx
    call set_gate_attr
    call pic_init
    mov edi, 100
    call pit_init
    lea rsi, [rip + msg_enter]
    call puts
    # enter ring 3
    mov qword ptr [rip + kernel_rsp], rsp
    push USER_SS
    push USER_STACK + 0x1000
    push 0x202
    push USER_CS
    lea rax, [rip + user_entry]
    push rax
    iretq

# syscall 3 lands here, in ring 0 (IF = 0) on the kernel stack
user_done:
    lea rsi, [rip + msg_back]
    call puts
    lea rsi, [rip + msg_ticks]
    call puts
    mov rax, qword ptr [rip + user_ticks]
    call putdec
    lea rsi, [rip + msg_of]
    call puts
    mov rax, qword ptr [rip + ticks]
    call putdec
    lea rsi, [rip + msg_sys]
    call puts
    mov rax, qword ptr [rip + syscalls]
    call putdec
    lea rsi, [rip + msg_pfs]
    call puts
    mov rax, qword ptr [rip + ro_faults]
    call putdec
    mov al, 47
    call putc
    mov rax, qword ptr [rip + sup_faults]
    call putdec
    lea rsi, [rip + msg_rsp0]
    call puts
    mov rax, qword ptr [rip + rsp0_checks]
    call putdec
    call putnl
    cmp qword ptr [rip + user_ticks], MIN_TICKS
    jb um_few_ticks
    cmp qword ptr [rip + ro_faults], 1
    jne um_bad_pf
    cmp qword ptr [rip + sup_faults], 1
    jne um_bad_pf
    cmp qword ptr [rip + syscalls], 3
    jne um_bad_sys
    jmp pass
um_few_ticks:
    lea rsi, [rip + msg_few_ticks]
    jmp fail
um_bad_pf:
    lea rsi, [rip + msg_bad_pf]
    jmp fail
um_bad_sys:
    lea rsi, [rip + msg_bad_sys]
    jmp fail

# check_ring3_entry(rdi = frame): the frame comes from CPL 3 and we run on the RSP0 stack
check_ring3_entry:
    mov rax, qword ptr [rdi + F_CS]
    cmp rax, USER_CS
    jne cr_bad_cs
    mov rax, qword ptr [rdi + F_SS]
    cmp rax, USER_SS
    jne cr_bad_cs
    cmp rsp, RSP0_BASE
    jb cr_bad_rsp
    cmp rsp, RSP0_TOP
    jae cr_bad_rsp
    inc qword ptr [rip + rsp0_checks]
    ret
cr_bad_cs:
    lea rsi, [rip + msg_bad_cs]
    jmp fail
cr_bad_rsp:
    lea rsi, [rip + msg_bad_rsp]
    call puts
    mov rax, rsp
    call puthex
    call putnl
    lea rsi, [rip + msg_bad_rsp2]
    jmp fail

timer_handler:
    inc qword ptr [rip + ticks]
    call check_ring3_entry
    inc qword ptr [rip + user_ticks]
    push rdi
    xor edi, edi
    call pic_eoi
    pop rdi
    ret

syscall_handler:
    call check_ring3_entry
    inc qword ptr [rip + syscalls]
    mov rax, qword ptr [rdi + F_RAX]
    cmp rax, 1
    je sys_double
    cmp rax, 2
    je sys_ticks
    cmp rax, 3
    je sys_exit
    cmp rax, 4
    je sys_fail
    lea rsi, [rip + msg_bad_sysno]
    jmp fail
sys_double:
    mov rax, qword ptr [rdi + F_RDI]
    lea rax, [rax + rax + 1]
    mov qword ptr [rdi + F_RAX], rax
    ret
sys_ticks:
    mov rax, qword ptr [rip + user_ticks]
    mov qword ptr [rdi + F_RAX], rax
    ret
sys_exit:
    lea rax, [rip + user_done]
    mov qword ptr [rdi + F_RIP], rax
    mov qword ptr [rdi + F_CS], SEL_KCODE
    mov qword ptr [rdi + F_RFLAGS], 2
    mov rax, qword ptr [rip + kernel_rsp]
    mov qword ptr [rdi + F_RSP], rax
    mov qword ptr [rdi + F_SS], SEL_KDATA
    ret
sys_fail:
    lea rsi, [rip + msg_user_fail]
    call puts
    mov rax, qword ptr [rdi + F_RDI]
    call putdec
    call putnl
    lea rsi, [rip + msg_user_failed]
    jmp fail

pf_handler:
    mov rbx, rdi
    call check_ring3_entry
    mov rax, qword ptr [rbx + F_RIP]
    lea rdx, [rip + user_ro_write]
    cmp rax, rdx
    je pf_ro
    lea rdx, [rip + user_sup_read]
    cmp rax, rdx
    je pf_sup
    jmp default_handler
pf_ro:
    cmp qword ptr [rbx + F_ERR], 7
    jne pf_bad_err
    mov rax, cr2
    cmp rax, USER_RO + 0x10
    jne pf_bad_cr2
    inc qword ptr [rip + ro_faults]
    lea rax, [rip + user_ro_done]
    mov qword ptr [rbx + F_RIP], rax
    ret
pf_sup:
    cmp qword ptr [rbx + F_ERR], 5
    jne pf_bad_err
    mov rax, cr2
    cmp rax, SUPER_PAGE + 0x20
    jne pf_bad_cr2
    inc qword ptr [rip + sup_faults]
    lea rax, [rip + user_sup_done]
    mov qword ptr [rbx + F_RIP], rax
    ret
pf_bad_err:
    lea rsi, [rip + msg_pf_err]
    call puts
    mov rax, qword ptr [rbx + F_ERR]
    call puthex
    call putnl
    lea rsi, [rip + msg_pf_err2]
    jmp fail
pf_bad_cr2:
    lea rsi, [rip + msg_pf_cr2]
    jmp fail

kernel_rsp:  .quad 0
ticks:       .quad 0
user_ticks:  .quad 0
syscalls:    .quad 0
ro_faults:   .quad 0
sup_faults:  .quad 0
rsp0_checks: .quad 0

msg_start:      .asciz "usermode: ring 3 with timer preemption, #PF 0x7/0x5, int 0x80\n"
msg_enter:      .asciz "entering ring 3\n"
msg_back:       .asciz "back in ring 0\n"
msg_ticks:      .asciz "timer ticks in ring 3: "
msg_of:         .asciz " of "
msg_sys:        .asciz ", syscalls: "
msg_pfs:        .asciz ", #PF ro/super: "
msg_rsp0:       .asciz ", ring-3 entries on the RSP0 stack: "
msg_few_ticks:  .asciz "user loop was preempted fewer than 10 times"
msg_bad_pf:     .asciz "expected exactly one #PF 0x7 and one #PF 0x5"
msg_bad_sys:    .asciz "expected 3 syscalls"
msg_bad_cs:     .asciz "entry from ring 3 with unexpected CS/SS in the frame"
msg_bad_rsp:    .asciz "handler not on the TSS.RSP0 stack: rsp "
msg_bad_rsp2:   .asciz "ring 3 -> 0 entry did not switch to TSS.RSP0"
msg_bad_sysno:  .asciz "unknown syscall number"
msg_user_fail:  .asciz "user check failed: "
msg_user_failed: .asciz "a ring-3 check failed"
msg_pf_err:     .asciz "wrong #PF error code "
msg_pf_err2:    .asciz "user #PF error code mismatch"
msg_pf_cr2:     .asciz "user #PF CR2 mismatch"

# ---------------------------------------------------------------- ring 3 code
    .align 4096
user_code_start:
user_entry:
    mov ax, USER_SS                    # a segment load in ring 3 reads the GDT: a supervisor access
    mov ds, ax
    mov es, ax
    mov rbx, USER_RW
    movabs rax, 0x0123456789abcdef
    mov qword ptr [rbx], rax
    cmp qword ptr [rbx], rax
    jne user_fail1
    mov rcx, USER_RO
    cmp qword ptr [rcx], 0x600d
    jne user_fail2
    push rax
    pop rdx
    cmp rdx, rax
    jne user_fail2
    mov ecx, USER_LOOPS
user_loop:
    add qword ptr [rbx + 8], 1
    xor rax, rcx
    dec ecx
    jnz user_loop
    cmp qword ptr [rbx + 8], USER_LOOPS
    jne user_fail3
    mov eax, 2
    int 0x80
    cmp rax, MIN_TICKS
    jb user_fail4
    mov rcx, USER_RO
user_ro_write:
    mov qword ptr [rcx + 0x10], rax
    jmp user_fail5
user_ro_done:
    mov rcx, SUPER_PAGE
user_sup_read:
    mov rax, qword ptr [rcx + 0x20]
    jmp user_fail6
user_sup_done:
    mov rcx, USER_RO
    cmp qword ptr [rcx + 0x10], 0
    jne user_fail5
    mov eax, 1
    mov edi, 20
    int 0x80
    cmp rax, 41
    jne user_fail7
    mov eax, 3
    int 0x80
    mov edi, 8
    jmp user_fail
user_fail1:
    mov edi, 1
    jmp user_fail
user_fail2:
    mov edi, 2
    jmp user_fail
user_fail3:
    mov edi, 3
    jmp user_fail
user_fail4:
    mov edi, 4
    jmp user_fail
user_fail5:
    mov edi, 5
    jmp user_fail
user_fail6:
    mov edi, 6
    jmp user_fail
user_fail7:
    mov edi, 7
user_fail:
    mov eax, 4
    int 0x80
user_hang:
    jmp user_hang
user_code_end:
    .align 4096
