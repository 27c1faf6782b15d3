# bench/compute.asm -- benchmark W1 (hvmodel bench): compute inside a small working set.
# 64 data pages at DATA_VA, mapped once with 4 KiB PTEs onto guest-physical 16 MiB (the
# boot identity map is not used by the loop). ITERS iterations of an ALU + load/store
# loop body (14 instructions: index arithmetic, a load, multiply/xor/rotate/add, a store)
# that visits the 64 pages in turn at a drifting offset: >= 50 M instructions with a
# working set far inside Unicorn's TLB, so translation costs nothing once filled.
# The measured region is bracketed by POST-code writes (port 0x80: 1 = begin, 2 = end).
# Afterwards the guest sums the 64 pages through DATA_VA and through the identity map;
# both sums must agree. It prints the loop's checksum and the sum: `hvmodel bench`
# requires every MMU mode to print the same console as the reference.
%include "runtime/boot.inc"

%define DATA_VA     0x8000000000
%define DATA_PA     0x1000000
%define NPAGES      64
%define ITERS       3600000
%define MIN_MEM     0x2000000
%define MULT        0x9e3779b97f4a7c15

main:
    lea rsi, [rip + msg_start]
    call puts
    cmp qword ptr [rip + mem_size], MIN_MEM
    jb cp_small
    xor r12d, r12d
cp_map:
    mov rsi, r12
    shl rsi, 12
    mov rdx, rsi
    add rdx, DATA_PA
    movabs rax, DATA_VA
    add rsi, rax
    mov edi, PML4_BASE
    mov ecx, PTE_P | PTE_W
    call map_page
    test rax, rax
    jz cp_map_failed
    inc r12
    cmp r12, NPAGES
    jb cp_map
    movabs r15, DATA_VA
    movabs r14, MULT
    xor ebx, ebx
    mov rax, r14
    mov r9d, ITERS
    push rax
    mov al, 1
    out 0x80, al
    pop rax
    # ---- the measured loop: rbx = iteration, rax = running checksum
cp_loop:
    mov rcx, rbx
    and ecx, NPAGES - 1
    shl rcx, 12
    mov rdx, rbx
    shr rdx, 3
    and edx, 0xff8
    add rcx, rdx
    mov r8, qword ptr [r15 + rcx]
    imul r8, r14
    xor r8, rax
    rol r8, 13
    add rax, r8
    mov qword ptr [r15 + rcx], r8
    inc rbx
    cmp rbx, r9
    jb cp_loop
    push rax
    mov al, 2
    out 0x80, al
    pop rax
    mov r13, rax
    # ---- the 64 pages summed through DATA_VA and through the identity map
    xor ecx, ecx
    xor r10d, r10d
    xor r11d, r11d
    mov edx, DATA_PA
cp_sum:
    add r10, qword ptr [r15 + rcx*8]
    add r11, qword ptr [rdx + rcx*8]
    inc rcx
    cmp rcx, NPAGES * 512
    jb cp_sum
    cmp r10, r11
    jne cp_bad_sum
    lea rsi, [rip + msg_iters]
    call puts
    mov rax, rbx
    call putdec
    lea rsi, [rip + msg_checksum]
    call puts
    mov rax, r13
    call puthex
    lea rsi, [rip + msg_sum]
    call puts
    mov rax, r10
    call puthex
    call putnl
    jmp pass

cp_small:
    lea rsi, [rip + msg_small]
    jmp fail
cp_map_failed:
    lea rsi, [rip + msg_map_failed]
    jmp fail
cp_bad_sum:
    lea rsi, [rip + msg_bad_sum]
    jmp fail

msg_start:      .asciz "compute: ALU + load/store loop over 64 pages (4 KiB PTEs)\n"
msg_iters:      .asciz "iterations "
msg_checksum:   .asciz ", checksum "
msg_sum:        .asciz ", page sum "
msg_small:      .asciz "needs at least 32 MiB of guest memory"
msg_map_failed: .asciz "map_page failed"
msg_bad_sum:    .asciz "the pages differ through DATA_VA and through the identity map"
