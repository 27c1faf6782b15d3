# ctxsw.asm -- context switches between 8 ring-3 processes, each with its own address
# space. Every process has its own PML4 (CR3): a copy of the kernel's PML4 entries (the
# shared kernel mapping: identity map, image, stacks, IDT/GDT/TSS) plus PML4[1], private
# to the process, mapping 32 data pages at the same virtual range USER_VA (32 distinct
# physical frames per process) and a user stack page. IRQ 0 (PIT mode 2, divisor 119:
# every 9,996 instructions) drives round-robin switching: the handler saves the
# interrupted process's registers (the whole interrupt frame) in its PCB, loads the next
# process's CR3 and frame and returns to it with iretq. Each process loops over its 32
# pages: it checks the qword it wrote there on its previous pass and writes the value of
# the current pass (tag(pid, page) | pass, at a (pid, page)-specific offset), so a page of
# the wrong address space or a stale translation shows up as a wrong value (the process
# reports it with int 0x80). After 2,000 switches the kernel verifies every process's
# pages through its CR3 and through the identity map, prints the counts and exits 0.
%include "runtime/boot.inc"
%include "runtime/pic_pit.inc"

%define NPROCS          8
%define PROC_PAGES      32
%define USER_VA         0x8000000000
%define USER_STACK_VA   0x80001ff000
%define USER_STACK_TOP  0x8000200000
%define TAG_MAGIC       0xc500000000000000
%define PIT_DIVISOR     119
%define TARGET_SWITCHES 2000
%define PCB_QWORDS      22
%define PCB_SIZE        176
%define USER_CS         SEL_UCODE | 3
%define USER_SS         SEL_UDATA | 3
%define SYS_FAIL        1

main:
    lea rsi, [rip + msg_start]
    call puts
    # the user code pages (in the shared kernel mapping) become user-accessible
    mov edi, PT0_BASE
    lea rsi, [rip + user_code_start]
    lea rdx, [rip + user_code_end]
cs_code_pages:
    mov rax, rsi
    shr rax, 12
    or qword ptr [rdi + rax*8], PTE_U
    add rsi, 0x1000
    cmp rsi, rdx
    jb cs_code_pages
    mov rax, cr3
    mov cr3, rax
    # ---- build the processes
    xor r12d, r12d
cs_build_proc:
    call alloc_frame
    lea rbx, [rip + proc_cr3]
    mov qword ptr [rbx + r12*8], rax
    # shared kernel mapping: copy the kernel's PML4 entries
    mov rdi, rax
    mov esi, PML4_BASE
    mov ecx, 512
    rep movsq
    xor r13d, r13d
cs_build_page:
    # a private frame for page r13, pre-set (through the identity map) to pass 0's value
    call alloc_frame
    mov r14, rax
    mov rax, r12
    shl rax, 5
    add rax, r13
    lea rbx, [rip + proc_phys]
    mov qword ptr [rbx + rax*8], r14
    mov rdi, r12
    mov rsi, r13
    call proc_off
    mov rbx, rax
    call proc_tag
    mov qword ptr [r14 + rbx], rax
    # map USER_VA + r13 * 4 KiB -> r14 in the process's tables (P|W|U)
    lea rbx, [rip + proc_cr3]
    mov rdi, qword ptr [rbx + r12*8]
    mov rsi, r13
    shl rsi, 12
    movabs rax, USER_VA
    add rsi, rax
    mov rdx, r14
    mov ecx, PTE_P | PTE_W | PTE_U
    call map_page
    test rax, rax
    jz cs_map_failed
    inc r13
    cmp r13, PROC_PAGES
    jb cs_build_page
    # a private user stack page
    call alloc_frame
    mov rdx, rax
    lea rbx, [rip + proc_cr3]
    mov rdi, qword ptr [rbx + r12*8]
    movabs rsi, USER_STACK_VA
    mov ecx, PTE_P | PTE_W | PTE_U
    call map_page
    test rax, rax
    jz cs_map_failed
    # the PCB: a ring-3 frame entering user_entry with RDI = pid
    mov rax, r12
    imul rax, rax, PCB_SIZE
    lea rbx, [rip + pcbs]
    add rbx, rax
    lea rax, [rip + user_entry]
    mov qword ptr [rbx + F_RIP], rax
    mov qword ptr [rbx + F_CS], USER_CS
    mov qword ptr [rbx + F_RFLAGS], 0x202
    movabs rax, USER_STACK_TOP
    mov qword ptr [rbx + F_RSP], rax
    mov qword ptr [rbx + F_SS], USER_SS
    mov qword ptr [rbx + F_RDI], r12
    mov qword ptr [rbx + F_R12], 1
    inc r12
    cmp r12, NPROCS
    jb cs_build_proc
    lea rsi, [rip + msg_built]
    call puts
    # ---- handlers: IRQ 0 switches, int 0x80 (DPL3) reports a failed user check
    mov edi, 0x20
    lea rsi, [rip + timer_handler]
    call set_handler
    mov edi, 0x80
    lea rsi, [rip + syscall_handler]
    call set_handler
    mov edi, 0x80
    mov esi, GATE_INT
    mov edx, 3
    xor ecx, ecx
    call set_gate_attr
    call pic_init
    mov edi, PIT_DIVISOR
    call pit_init
    # hvmodel bench: the measured region begins (POST code 1 to port 0x80)
    push rax
    mov al, 1
    out 0x80, al
    pop rax
    # ---- enter process 0
    mov qword ptr [rip + current], 0
    mov rax, qword ptr [rip + proc_cr3]
    mov cr3, rax
    mov qword ptr [rip + kernel_rsp], rsp
    lea rsi, [rip + pcbs]
    push qword ptr [rsi + F_SS]
    push qword ptr [rsi + F_RSP]
    push qword ptr [rsi + F_RFLAGS]
    push qword ptr [rsi + F_CS]
    push qword ptr [rsi + F_RIP]
    mov rdi, qword ptr [rsi + F_RDI]
    mov r12, qword ptr [rsi + F_R12]
    iretq

cs_map_failed:
    lea rsi, [rip + msg_map_failed]
    jmp fail

# ---- the timer lands here (via timer_handler) after TARGET_SWITCHES: ring 0, IF = 0
kernel_done:
    # hvmodel bench: the measured region ends (POST code 2 to port 0x80)
    push rax
    mov al, 2
    out 0x80, al
    pop rax
    mov eax, PML4_BASE
    mov cr3, rax
    lea rsi, [rip + msg_switches]
    call puts
    mov rax, qword ptr [rip + switches]
    call putdec
    call putnl
    cmp qword ptr [rip + switches], TARGET_SWITCHES
    jne cs_bad_switches
    xor r12d, r12d
    xor r15d, r15d
cs_verify_proc:
    # every process ran and completed at least one whole pass
    lea rbx, [rip + slices]
    cmp qword ptr [rbx + r12*8], 0
    je cs_no_progress
    mov rax, r12
    imul rax, rax, PCB_SIZE
    lea rbx, [rip + pcbs]
    mov r14, qword ptr [rbx + rax + F_R12]
    cmp r14, 2
    jb cs_no_progress
    lea rsi, [rip + msg_proc]
    call puts
    mov rax, r12
    call putdec
    lea rsi, [rip + msg_slices]
    call puts
    lea rbx, [rip + slices]
    mov rax, qword ptr [rbx + r12*8]
    call putdec
    lea rsi, [rip + msg_passes]
    call puts
    lea rax, [r14 - 1]
    call putdec
    call putnl
    lea rax, [r14 - 1]
    add r15, rax
    # through the process's own address space
    lea rbx, [rip + proc_cr3]
    mov rax, qword ptr [rbx + r12*8]
    mov cr3, rax
    # pages 0..k-1 hold pass r14, pages k..31 hold pass r14 - 1 (k: where it was stopped)
    xor r13d, r13d
    xor ebp, ebp
cs_verify_page:
    mov rdi, r12
    mov rsi, r13
    call proc_off
    mov rbx, rax
    call proc_tag
    mov rdx, rax
    # the value through USER_VA and through the identity map of the physical frame
    mov rax, r13
    shl rax, 12
    add rax, rbx
    movabs rcx, USER_VA
    mov r8, qword ptr [rcx + rax]
    mov rax, r12
    shl rax, 5
    add rax, r13
    lea rcx, [rip + proc_phys]
    mov rcx, qword ptr [rcx + rax*8]
    cmp r8, qword ptr [rcx + rbx]
    jne cs_bad_alias
    lea rax, [rdx + r14]
    cmp r8, rax
    je cs_page_current
    lea rax, [rdx + r14 - 1]
    cmp r8, rax
    jne cs_bad_final
    mov ebp, 1
    jmp cs_page_next
cs_page_current:
    test ebp, ebp
    jnz cs_bad_order
cs_page_next:
    inc r13
    cmp r13, PROC_PAGES
    jb cs_verify_page
    inc r12
    cmp r12, NPROCS
    jb cs_verify_proc
    mov eax, PML4_BASE
    mov cr3, rax
    lea rsi, [rip + msg_total]
    call puts
    mov rax, r15
    call putdec
    lea rsi, [rip + msg_total2]
    call puts
    jmp pass

cs_bad_switches:
    lea rsi, [rip + msg_bad_switches]
    jmp fail
cs_no_progress:
    lea rsi, [rip + msg_no_progress]
    jmp cs_report_proc
cs_bad_alias:
    lea rsi, [rip + msg_bad_alias]
    jmp cs_report_page
cs_bad_final:
    lea rsi, [rip + msg_bad_final]
    jmp cs_report_page
cs_bad_order:
    lea rsi, [rip + msg_bad_order]
cs_report_page:
    call puts
    lea rsi, [rip + msg_page]
    call puts
    mov rax, r13
    call putdec
    lea rsi, [rip + msg_value]
    call puts
    mov rax, r8
    call puthex
    lea rsi, [rip + msg_pass]
    call puts
    mov rax, r14
    call putdec
cs_report_proc:
    lea rsi, [rip + msg_of_proc]
    call puts
    mov rax, r12
    call putdec
    call putnl
    lea rsi, [rip + msg_final_failed]
    jmp fail

# timer_handler(rdi = frame on the TSS.RSP0 stack): round-robin switch
timer_handler:
    mov rbx, rdi
    cmp qword ptr [rbx + F_CS], USER_CS
    jne th_bad_cs
    # the running CR3 must be the current process's
    mov rdx, qword ptr [rip + current]
    lea rax, [rip + proc_cr3]
    mov rcx, cr3
    cmp rcx, qword ptr [rax + rdx*8]
    jne th_bad_cr3
    lea rax, [rip + slices]
    inc qword ptr [rax + rdx*8]
    # save the interrupted process's registers (the whole frame) in its PCB
    imul rax, rdx, PCB_SIZE
    lea rdi, [rip + pcbs]
    add rdi, rax
    mov rsi, rbx
    mov ecx, PCB_QWORDS
    rep movsq
    cmp qword ptr [rip + switches], TARGET_SWITCHES
    jae th_finish
    inc qword ptr [rip + switches]
    # next process: its CR3, then its registers into the frame
    inc edx
    and edx, NPROCS - 1
    mov qword ptr [rip + current], rdx
    lea rax, [rip + proc_cr3]
    mov rax, qword ptr [rax + rdx*8]
    mov cr3, rax
    imul rax, rdx, PCB_SIZE
    lea rsi, [rip + pcbs]
    add rsi, rax
    mov rdi, rbx
    mov ecx, PCB_QWORDS
    rep movsq
th_eoi:
    xor edi, edi
    call pic_eoi
    ret
th_finish:
    # return to kernel_done in ring 0 on the kernel stack, IF = 0
    lea rax, [rip + kernel_done]
    mov qword ptr [rbx + F_RIP], rax
    mov qword ptr [rbx + F_CS], SEL_KCODE
    mov qword ptr [rbx + F_RFLAGS], 2
    mov rax, qword ptr [rip + kernel_rsp]
    mov qword ptr [rbx + F_RSP], rax
    mov qword ptr [rbx + F_SS], SEL_KDATA
    jmp th_eoi
th_bad_cs:
    lea rsi, [rip + msg_bad_cs]
    jmp fail
th_bad_cr3:
    lea rsi, [rip + msg_bad_cr3]
    jmp fail

# syscall_handler(rdi = frame): int 0x80 from a process whose check failed
# (frame RDI = pid, R13 = page, R12 = pass, RDX = expected, R8 = value read)
syscall_handler:
    mov rbx, rdi
    lea rsi, [rip + msg_user_bad]
    call puts
    mov rax, qword ptr [rbx + F_RDI]
    call putdec
    lea rsi, [rip + msg_page]
    call puts
    mov rax, qword ptr [rbx + F_R13]
    call putdec
    lea rsi, [rip + msg_pass]
    call puts
    mov rax, qword ptr [rbx + F_R12]
    call putdec
    lea rsi, [rip + msg_expected]
    call puts
    mov rax, qword ptr [rbx + F_RDX]
    call puthex
    lea rsi, [rip + msg_value]
    call puts
    mov rax, qword ptr [rbx + F_R8]
    call puthex
    lea rsi, [rip + msg_after]
    call puts
    mov rax, qword ptr [rip + switches]
    call putdec
    call putnl
    lea rsi, [rip + msg_user_failed]
    jmp fail

current:    .quad 0
switches:   .quad 0
kernel_rsp: .quad 0
    .align 8
proc_cr3:   .space NPROCS * 8
slices:     .space NPROCS * 8
proc_phys:  .space NPROCS * PROC_PAGES * 8
pcbs:       .space NPROCS * PCB_SIZE

msg_start:        .asciz "ctxsw: 8 ring-3 processes, own CR3 each, 32 private pages at the same VA, PIT-driven round robin\n"
msg_built:        .asciz "address spaces built, entering process 0\n"
msg_switches:     .asciz "context switches: "
msg_proc:         .asciz "process "
msg_slices:       .asciz ": time slices "
msg_passes:       .asciz ", passes over its 32 pages "
msg_total:        .asciz "all pages verified through each CR3 and the identity map; total passes "
msg_total2:       .asciz "\n"
msg_map_failed:   .asciz "map_page failed while building a process"
msg_bad_switches: .asciz "wrong number of context switches"
msg_no_progress:  .asciz "a process never completed a pass"
msg_bad_alias:    .asciz "USER_VA and the identity map disagree"
msg_bad_final:    .asciz "page does not hold the process's pattern of pass n or n-1"
msg_bad_order:    .asciz "page of pass n after a page of pass n-1"
msg_page:         .asciz " page "
msg_value:        .asciz " value "
msg_pass:         .asciz " pass "
msg_of_proc:      .asciz " of process "
msg_final_failed: .asciz "final verification of the process pages"
msg_bad_cs:       .asciz "timer interrupt did not come from ring 3"
msg_bad_cr3:      .asciz "CR3 is not the current process's at the timer interrupt"
msg_user_bad:     .asciz "process "
msg_expected:     .asciz " expected "
msg_after:        .asciz " after switches "
msg_user_failed:  .asciz "a process read a wrong value from its own page"

# ---------------------------------------------------------------- ring 3 code
# (user-accessible pages of the shared kernel mapping; proc_off/proc_tag are also
# called by the kernel)
    .align 4096
user_code_start:

# proc_off(rdi = pid, rsi = page): RAX = offset of the page's qword, (pid*32 + page)*8
proc_off:
    mov rax, rdi
    shl rax, 5
    add rax, rsi
    shl rax, 3
    ret

# proc_tag(rdi = pid, rsi = page): RAX = TAG_MAGIC ^ pid << 48 ^ page << 32
proc_tag:
    push rcx
    mov rax, rdi
    shl rax, 48
    mov rcx, rsi
    shl rcx, 32
    xor rax, rcx
    movabs rcx, TAG_MAGIC
    xor rax, rcx
    pop rcx
    ret

# user_entry(rdi = pid): pass r12 checks tag | (r12 - 1) and writes tag | r12 on each page
user_entry:
    movabs r15, USER_VA
    mov r12d, 1
user_pass:
    xor r13d, r13d
user_page:
    mov rsi, r13
    call proc_tag
    lea rdx, [rax + r12 - 1]
    lea rcx, [rax + r12]
    call proc_off
    mov rbx, r13
    shl rbx, 12
    add rbx, r15
    add rbx, rax
    mov r8, qword ptr [rbx]
    cmp r8, rdx
    jne user_bad
    mov qword ptr [rbx], rcx
    inc r13
    cmp r13, PROC_PAGES
    jb user_page
    inc r12
    jmp user_pass
user_bad:
    mov eax, SYS_FAIL
    int 0x80
user_hang:
    jmp user_hang
user_code_end:
    .align 4096
