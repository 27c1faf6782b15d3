# memtest.asm -- writes qword = address XOR PATTERN over all guest memory above the
# runtime's area (HEAP_BASE .. RDI at entry; boot.inc identity-maps all of it with
# 2 MiB pages), reads it back, prints the number of bytes checked.
%include "runtime/boot.inc"

%define PATTERN 0xa5a5a5a55a5a5a5a

main:
    lea rsi, [rip + msg_start]
    call puts
    mov rax, qword ptr [rip + mem_size]
    call puthex
    call putnl
    mov r12, HEAP_BASE
    mov r13, qword ptr [rip + mem_size]
    movabs r14, PATTERN
    cmp r13, r12
    jbe mt_none
    mov rdi, r12
mt_write:
    mov rax, rdi
    xor rax, r14
    mov qword ptr [rdi], rax
    lea rax, [rdi + 8]
    xor rax, r14
    mov qword ptr [rdi + 8], rax
    add rdi, 16
    cmp rdi, r13
    jb mt_write
    mov rdi, r12
mt_read:
    mov rax, rdi
    xor rax, r14
    cmp qword ptr [rdi], rax
    jne mt_bad
    lea rax, [rdi + 8]
    xor rax, r14
    cmp qword ptr [rdi + 8], rax
    jne mt_bad8
    add rdi, 16
    cmp rdi, r13
    jb mt_read
    lea rsi, [rip + msg_checked]
    call puts
    mov rax, r13
    sub rax, r12
    call putdec
    lea rsi, [rip + msg_bytes]
    call puts
    jmp pass
mt_bad8:
    add rdi, 8
mt_bad:
    lea rsi, [rip + msg_bad]
    call puts
    mov rax, rdi
    call puthex
    call putnl
    lea rsi, [rip + msg_failed]
    jmp fail
mt_none:
    lea rsi, [rip + msg_small]
    jmp fail

msg_start:   .asciz "memtest: address-keyed pattern over RAM from 0x200000 to "
msg_checked: .asciz "bytes checked: "
msg_bytes:   .asciz "\n"
msg_bad:     .asciz "mismatch at "
msg_failed:  .asciz "memory pattern mismatch"
msg_small:   .asciz "guest memory is not larger than the runtime's 2 MiB"
