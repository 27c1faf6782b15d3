# hello.asm -- paging smoke test: maps a higher-half alias of a buffer, writes through
# each mapping and reads through the other, prints "hello from the guest".
%include "runtime/boot.inc"

%define ALIAS_BASE 0xffff800000000000

main:
    lea rsi, [rip + msg_hello]
    call puts
    # a fresh frame as the buffer, aliased at ALIAS_BASE + pa
    call alloc_frame
    mov r12, rax
    movabs r13, ALIAS_BASE
    add r13, r12
    mov edi, PML4_BASE
    mov rsi, r13
    mov rdx, r12
    mov ecx, PTE_P | PTE_W
    call map_page
    test rax, rax
    jnz hello_mapped
    lea rsi, [rip + msg_mapfail]
    jmp fail
hello_mapped:
    lea rsi, [rip + msg_alias]
    call puts
    mov rax, r13
    call puthex
    lea rsi, [rip + msg_arrow]
    call puts
    mov rax, r12
    call puthex
    call putnl
    # write through the identity mapping, read through the alias
    xor ecx, ecx
hello_w1:
    movabs rax, 0x1111000000000000
    or rax, rcx
    mov qword ptr [r12 + rcx*8], rax
    inc ecx
    cmp ecx, 512
    jb hello_w1
    xor ecx, ecx
hello_r1:
    movabs rax, 0x1111000000000000
    or rax, rcx
    cmp qword ptr [r13 + rcx*8], rax
    jne hello_bad1
    inc ecx
    cmp ecx, 512
    jb hello_r1
    lea rsi, [rip + msg_ok1]
    call puts
    # write through the alias, read through the identity mapping
    xor ecx, ecx
hello_w2:
    movabs rax, 0x2222000000000000
    or rax, rcx
    mov qword ptr [r13 + rcx*8], rax
    inc ecx
    cmp ecx, 512
    jb hello_w2
    xor ecx, ecx
hello_r2:
    movabs rax, 0x2222000000000000
    or rax, rcx
    cmp qword ptr [r12 + rcx*8], rax
    jne hello_bad2
    inc ecx
    cmp ecx, 512
    jb hello_r2
    lea rsi, [rip + msg_ok2]
    call puts
    # the alias really is a different virtual page: unmap it and check the identity view
    mov edi, PML4_BASE
    mov rsi, r13
    call unmap_page
    movabs rax, 0x2222000000000000
    cmp qword ptr [r12], rax
    jne hello_bad2
    jmp pass
hello_bad1:
    lea rsi, [rip + msg_bad1]
    jmp fail
hello_bad2:
    lea rsi, [rip + msg_bad2]
    jmp fail

msg_hello:   .asciz "hello from the guest\n"
msg_alias:   .asciz "alias "
msg_arrow:   .asciz " -> "
msg_ok1:     .asciz "identity write -> alias read: 512 qwords ok\n"
msg_ok2:     .asciz "alias write -> identity read: 512 qwords ok\n"
msg_mapfail: .asciz "map_page of the alias failed"
msg_bad1:    .asciz "alias read does not see the identity write"
msg_bad2:    .asciz "identity read does not see the alias write"
