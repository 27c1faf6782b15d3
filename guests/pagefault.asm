# pagefault.asm -- demand paging: a #PF handler maps a fresh frame for every
# not-present page; main touches 1,000 distinct unmapped pages (even pages written
# first, odd pages read first), checks CR2 and the error code of every fault and that
# exactly 1,000 faults happened (intermediate tables are allocated by map_page inside
# the handler, so they cause no faults of their own), then re-reads every page.
%include "runtime/boot.inc"

%define DEMAND_BASE 0x40000000000
%define NPAGES      1000
%define STRIDE      0x3000
%define PATTERN     0x5ca1ab1e00000000

main:
    lea rsi, [rip + msg_start]
    call puts
    mov edi, 14
    lea rsi, [rip + pf_handler]
    call set_handler
    xor r12d, r12d
pf_loop:
    # r13 = the address touched: page r12 * STRIDE plus an offset inside it
    mov rax, r12
    imul rax, rax, STRIDE
    movabs r13, DEMAND_BASE
    add r13, rax
    mov rax, r12
    shl rax, 3
    and eax, 0xff8
    add r13, rax
    movabs r14, PATTERN
    xor r14, r13
    test r12d, 1
    jnz pf_read_first
    # write first: error code must be W (0x2)
    mov qword ptr [rip + expect_err], 2
    mov qword ptr [r13], r14
    call pf_check
    cmp qword ptr [r13], r14
    jne pf_bad_data
    jmp pf_next
pf_read_first:
    # read first: error code 0, the page reads as zero; then write (no fault)
    mov qword ptr [rip + expect_err], 0
    mov rax, qword ptr [r13]
    call pf_check
    test rax, rax
    jnz pf_bad_zero
    mov qword ptr [r13], r14
pf_next:
    inc r12
    cmp r12, NPAGES
    jb pf_loop
    # no further faults: re-read every page
    xor r12d, r12d
pf_reread:
    mov rax, r12
    imul rax, rax, STRIDE
    movabs r13, DEMAND_BASE
    add r13, rax
    mov rax, r12
    shl rax, 3
    and eax, 0xff8
    add r13, rax
    movabs r14, PATTERN
    xor r14, r13
    cmp qword ptr [r13], r14
    jne pf_bad_data
    inc r12
    cmp r12, NPAGES
    jb pf_reread
    mov rax, qword ptr [rip + pf_count]
    cmp rax, NPAGES
    jne pf_bad_count
    lea rsi, [rip + msg_faults]
    call puts
    call putdec
    lea rsi, [rip + msg_pages]
    call puts
    jmp pass

# after each first touch: exactly one more fault, at r13, with the expected error code
pf_check:
    push rax
    mov rax, r12
    inc rax
    cmp qword ptr [rip + pf_count], rax
    jne pf_bad_count
    cmp qword ptr [rip + last_cr2], r13
    jne pf_bad_cr2
    mov rax, qword ptr [rip + expect_err]
    cmp qword ptr [rip + last_err], rax
    jne pf_bad_err
    pop rax
    ret

pf_bad_count:
    lea rsi, [rip + msg_bad_count]
    jmp pf_report
pf_bad_cr2:
    lea rsi, [rip + msg_bad_cr2]
    jmp pf_report
pf_bad_err:
    lea rsi, [rip + msg_bad_err]
    jmp pf_report
pf_bad_zero:
    lea rsi, [rip + msg_bad_zero]
    jmp pf_report
pf_bad_data:
    lea rsi, [rip + msg_bad_data]
pf_report:
    call puts
    lea rsi, [rip + msg_page]
    call puts
    mov rax, r12
    call putdec
    lea rsi, [rip + msg_addr]
    call puts
    mov rax, r13
    call puthex
    lea rsi, [rip + msg_cr2]
    call puts
    mov rax, qword ptr [rip + last_cr2]
    call puthex
    lea rsi, [rip + msg_err]
    call puts
    mov rax, qword ptr [rip + last_err]
    call puthex
    lea rsi, [rip + msg_count]
    call puts
    mov rax, qword ptr [rip + pf_count]
    call putdec
    call putnl
    lea rsi, [rip + msg_failed]
    jmp fail

# pf_handler(rdi = frame): only faults inside the demand region are expected
pf_handler:
    mov rbx, rdi
    mov rax, cr2
    mov qword ptr [rip + last_cr2], rax
    mov rcx, qword ptr [rbx + F_ERR]
    mov qword ptr [rip + last_err], rcx
    inc qword ptr [rip + pf_count]
    movabs rdx, DEMAND_BASE
    cmp rax, rdx
    jb pf_unexpected
    test ecx, 1
    jnz pf_unexpected
    call alloc_frame
    mov rdx, rax
    mov rsi, cr2
    and rsi, -4096
    mov edi, PML4_BASE
    mov ecx, PTE_P | PTE_W
    call map_page
    test rax, rax
    jz pf_unexpected
    ret
pf_unexpected:
    mov rdi, rbx
    jmp default_handler

pf_count:   .quad 0
last_cr2:   .quad 0
last_err:   .quad 0
expect_err: .quad 0

msg_start:     .asciz "pagefault: demand-mapping 1000 pages, checking CR2 and error codes\n"
msg_faults:    .asciz "page faults handled: "
msg_pages:     .asciz " (expected 1000), CR2 and error codes ok, data ok\n"
msg_bad_count: .asciz "wrong fault count"
msg_bad_cr2:   .asciz "CR2 is not the address touched"
msg_bad_err:   .asciz "wrong #PF error code"
msg_bad_zero:  .asciz "fresh page does not read as zero"
msg_bad_data:  .asciz "data read back is wrong"
msg_page:      .asciz " at page "
msg_addr:      .asciz " addr "
msg_cr2:       .asciz " cr2 "
msg_err:       .asciz " err "
msg_count:     .asciz " faults "
msg_failed:    .asciz "pagefault check failed"
