# tlbthrash.asm -- TLB thrash with a static address space: a working set of 4,096
# distinct 4 KiB pages (16 MiB at THRASH_VA, mapped once with 4 KiB PTEs onto the
# guest-physical range 16-32 MiB, 8 page tables) and no page-table change afterwards.
# 100 passes each write one qword to every page in turn (4 KiB stride, at a page-specific
# offset); the value is TAG_MAGIC | page << 32 | pass. The last pass first checks that every page holds
# the previous pass's value, then writes; at the end every page is read back through the
# 4 KiB mapping and through the identity map of its frame. Needs >= 32 MiB of memory.
%include "runtime/boot.inc"

%define THRASH_VA   0x8000000000
%define THRASH_PA   0x1000000
%define NPAGES      4096
%define NPASSES     100
%define TAG_MAGIC   0x7b5a000000000000
%define MIN_MEM     0x2000000

main:
    lea rsi, [rip + msg_start]
    call puts
    cmp qword ptr [rip + mem_size], MIN_MEM
    jb tt_small
    # ---- map THRASH_VA + i * 4 KiB -> THRASH_PA + i * 4 KiB, 4 KiB PTEs
    xor r12d, r12d
tt_map:
    mov rsi, r12
    shl rsi, 12
    mov rdx, rsi
    add rdx, THRASH_PA
    movabs rax, THRASH_VA
    add rsi, rax
    mov edi, PML4_BASE
    mov ecx, PTE_P | PTE_W
    call map_page
    test rax, rax
    jz tt_map_failed
    inc r12
    cmp r12, NPAGES
    jb tt_map
    lea rsi, [rip + msg_mapped]
    call puts
    # ---- passes: r12 = pass, r13 = page, r15 = THRASH_VA
    # hvmodel bench: the measured region begins (POST code 1 to port 0x80)
    push rax
    mov al, 1
    out 0x80, al
    pop rax
    movabs r15, THRASH_VA
    movabs r14, TAG_MAGIC
    xor r12d, r12d
tt_pass:
    cmp r12, NPASSES - 1
    je tt_last_pass
    xor r13d, r13d
tt_page:
    # address = THRASH_VA + page * 4 KiB + (page * 8 mod 4 KiB); value = tag | pass
    mov rbx, r13
    shl rbx, 12
    lea rcx, [r13*8]
    and ecx, 0xff8
    add rbx, rcx
    mov rax, r13
    shl rax, 32
    or rax, r14
    or rax, r12
    mov qword ptr [r15 + rbx], rax
    inc r13
    cmp r13, NPAGES
    jb tt_page
    inc r12
    jmp tt_pass
tt_last_pass:
    # the last pass checks each page's previous value before writing the final one
    xor r13d, r13d
tt_last_page:
    mov rbx, r13
    shl rbx, 12
    lea rcx, [r13*8]
    and ecx, 0xff8
    add rbx, rcx
    mov rdx, r13
    shl rdx, 32
    or rdx, r14
    lea rax, [r12 - 1]
    or rdx, rax
    mov r8, qword ptr [r15 + rbx]
    cmp r8, rdx
    jne tt_bad_prev
    inc rdx
    mov qword ptr [r15 + rbx], rdx
    inc r13
    cmp r13, NPAGES
    jb tt_last_page
    inc r12
    # hvmodel bench: the measured region ends (POST code 2 to port 0x80)
    push rax
    mov al, 2
    out 0x80, al
    pop rax
    # ---- final check through the 4 KiB mapping and the identity map
    xor r13d, r13d
tt_verify:
    mov rbx, r13
    shl rbx, 12
    lea rcx, [r13*8]
    and ecx, 0xff8
    add rbx, rcx
    mov rdx, r13
    shl rdx, 32
    or rdx, r14
    or rdx, NPASSES - 1
    mov r8, qword ptr [r15 + rbx]
    cmp r8, rdx
    jne tt_bad_final
    mov r8, qword ptr [rbx + THRASH_PA]
    cmp r8, rdx
    jne tt_bad_phys
    inc r13
    cmp r13, NPAGES
    jb tt_verify
    lea rsi, [rip + msg_passes]
    call puts
    mov rax, r12
    call putdec
    lea rsi, [rip + msg_over]
    call puts
    mov rax, r13
    call putdec
    lea rsi, [rip + msg_pages]
    call puts
    jmp pass

tt_small:
    lea rsi, [rip + msg_small]
    jmp fail
tt_map_failed:
    lea rsi, [rip + msg_map_failed]
    jmp fail
tt_bad_prev:
    lea rsi, [rip + msg_bad_prev]
    jmp tt_report
tt_bad_final:
    lea rsi, [rip + msg_bad_final]
    jmp tt_report
tt_bad_phys:
    lea rsi, [rip + msg_bad_phys]
tt_report:
    call puts
    lea rsi, [rip + msg_page]
    call puts
    mov rax, r13
    call putdec
    lea rsi, [rip + msg_read]
    call puts
    mov rax, r8
    call puthex
    lea rsi, [rip + msg_expected]
    call puts
    mov rax, rdx
    call puthex
    call putnl
    lea rsi, [rip + msg_failed]
    jmp fail

msg_start:      .asciz "tlbthrash: 4096 distinct 4 KiB pages (16 MiB, 4 KiB PTEs, static tables), 100 passes\n"
msg_mapped:     .asciz "working set mapped\n"
msg_passes:     .asciz "passes: "
msg_over:       .asciz " over "
msg_pages:      .asciz " pages, every page verified through its 4 KiB mapping and the identity map\n"
msg_small:      .asciz "needs at least 32 MiB of guest memory"
msg_map_failed: .asciz "map_page failed"
msg_bad_prev:   .asciz "page lost the previous pass's value"
msg_bad_final:  .asciz "final value through the 4 KiB mapping is wrong"
msg_bad_phys:   .asciz "final value through the identity map is wrong"
msg_page:       .asciz ": page "
msg_read:       .asciz " read "
msg_expected:   .asciz " expected "
msg_failed:     .asciz "tlbthrash check failed"
