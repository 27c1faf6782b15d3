# hog.asm -- a memory hog: a working set as large as the guest's memory, walked without
# locality, for a host that overcommits machine memory and swaps pages to disk.
#
# Region: every page from HEAP_BASE to RDI at entry (at most MAX_PAGES pages).
# Pattern: the qword at guest address a holds a XOR K(g), where g is the page's generation
# (0 after the initial fill, else the pass that last rewrote it) and
#   K(g) = (HOG_KEY ^ (seed << 44)) ^ ((g * GEN_MUL) << 20)
# has its low 12 bits clear, so a page's qwords are (page ^ K(g)) + offset in page.
# The guest keeps g per page in a byte table at GEN_TABLE (the runtime's free area).
#
# Per-VM value (seed): the VMM passes a per-VM 64-bit value in RSI at entry (GUEST-ABI.md:
# RSI = 0 today; the host sets RSI = the VM's index + 1 for multi-VM runs); RSI = 0 is
# taken as 1. boot.inc clears RSI before `main` (and its first bytes must stay at
# 0x100000), so the value is caught on the way: RSI is intact until boot.inc's
# `call idt_init`, and the %define below (which renames the word in instructions, not
# labels) points that call at hog_entry_hook, which saves RSI and jumps to the real
# idt_init. (A `boot_rsi` saved by boot.inc itself would make this hook unnecessary.)
#
# 1. fill: every qword of every page, in address order (generation 0);
# 2. passes p = 1 .. PASSES: visit all pages in the order idx = (start_p + k * stride) mod
#    pages, stride ~ 0.618 * pages made coprime with the page count (each page once per
#    pass, consecutive visits far apart). At each page: check SAMPLES qwords (one per
#    SPACING qwords, at an offset that rotates with page and pass) against the page's
#    generation; then if idx % REWRITE_DIV == p % REWRITE_DIV rewrite the whole page
#    with generation p (the next pass checks it; the other pages stay clean);
# 3. a last pass (PASSES + 1) checks every page the same way and rewrites nothing.
# Prints the bytes verified and written. A mismatch prints the address, page, generation,
# expected and found values and the pass, and exits 2.

%define idt_init hog_entry_hook
%include "runtime/boot.inc"
%undef idt_init

# boot.inc's `call idt_init` lands here, paging still off, RSI still the VMM's value
hog_entry_hook:
    mov qword ptr [rip + vm_seed_raw], rsi
    jmp idt_init

%define PASSES       4
%define REWRITE_DIV  4
%define SAMPLES      16
%define SPACING      32
%define MAX_PAGES    262144
%define GEN_TABLE    0x20000
%define HOG_KEY      0x6b0c000000000000
%define GEN_MUL      0x61c88647
%define START_STEP   7919

main:
    mov rax, qword ptr [rip + vm_seed_raw]
    test rax, rax
    jnz hg_seed_ok
    mov eax, 1
hg_seed_ok:
    mov qword ptr [rip + vm_seed], rax
    shl rax, 44
    movabs rdx, HOG_KEY
    xor rax, rdx
    mov qword ptr [rip + base_key], rax
    # pages
    mov rax, qword ptr [rip + mem_size]
    cmp rax, HEAP_BASE + 4096
    jb hg_too_small
    sub rax, HEAP_BASE
    shr rax, 12
    cmp rax, MAX_PAGES
    jbe hg_npages_ok
    mov eax, MAX_PAGES
hg_npages_ok:
    mov qword ptr [rip + npages], rax
    mov r15, rax
    # stride: about 0.618 * pages, at least 1, then up to the next value coprime with pages
    imul rbx, r15, 40503
    shr rbx, 16
    test rbx, rbx
    jnz hg_stride_try
    mov ebx, 1
hg_stride_try:
    mov rax, r15
    mov rcx, rbx
hg_gcd:
    xor edx, edx
    div rcx
    mov rax, rcx
    mov rcx, rdx
    test rcx, rcx
    jnz hg_gcd
    cmp rax, 1
    je hg_stride_ok
    inc rbx
    jmp hg_stride_try
hg_stride_ok:
    cmp rbx, r15
    jb hg_stride_lt
    xor ebx, ebx
    cmp r15, 1
    je hg_stride_lt
    mov ebx, 1
hg_stride_lt:
    mov qword ptr [rip + stride], rbx

    lea rsi, [rip + msg_hdr1]
    call puts
    mov rax, r15
    shl rax, 12
    call putdec
    lea rsi, [rip + msg_hdr2]
    call puts
    mov rax, r15
    call putdec
    lea rsi, [rip + msg_hdr3]
    call puts
    mov rax, qword ptr [rip + stride]
    call putdec
    lea rsi, [rip + msg_hdr4]
    call puts
    mov rax, qword ptr [rip + vm_seed]
    call putdec
    lea rsi, [rip + msg_hdr5]
    call puts

    # ---- generation table: all 0
    mov edi, GEN_TABLE
    mov rcx, r15
    xor eax, eax
    rep stosb

    # ---- fill every page in address order, generation 0
    mov qword ptr [rip + cur_pass], 0
    xor r12d, r12d
hg_fill:
    mov rdi, r12
    shl rdi, 12
    add rdi, HEAP_BASE
    mov rax, qword ptr [rip + base_key]
    call fill_page
    inc r12
    cmp r12, r15
    jb hg_fill
    mov rax, r15
    shl rax, 12
    add qword ptr [rip + bytes_written], rax

    # ---- passes (the last one, PASSES + 1, only verifies)
    mov qword ptr [rip + cur_pass], 1
hg_pass:
    # start = pass * START_STEP mod pages
    mov rax, qword ptr [rip + cur_pass]
    imul rax, rax, START_STEP
    xor edx, edx
    div r15
    mov r12, rdx
    xor r13d, r13d
hg_visit:
    # rdi = page address, rax = K(generation of the page)
    mov ecx, GEN_TABLE
    movzx eax, byte ptr [rcx + r12]
    mov qword ptr [rip + cur_gen], rax
    imul rax, rax, GEN_MUL
    shl rax, 20
    xor rax, qword ptr [rip + base_key]
    mov rdi, r12
    shl rdi, 12
    add rdi, HEAP_BASE
    # rsi = offset (qwords) inside each SPACING-qword line: (pass * 7 + idx) % SPACING
    mov rsi, qword ptr [rip + cur_pass]
    imul rsi, rsi, 7
    add rsi, r12
    and esi, SPACING - 1
    call check_sampled
    # rewrite a quarter of the pages (not in the last pass)
    mov rax, qword ptr [rip + cur_pass]
    cmp rax, PASSES
    ja hg_next
    mov rdx, r12
    xor rdx, rax
    test edx, REWRITE_DIV - 1
    jnz hg_next
    mov ecx, GEN_TABLE
    mov byte ptr [rcx + r12], al
    imul rax, rax, GEN_MUL
    shl rax, 20
    xor rax, qword ptr [rip + base_key]
    call fill_page
    add qword ptr [rip + bytes_written], 4096
hg_next:
    add r12, qword ptr [rip + stride]
    cmp r12, r15
    jb hg_idx_ok
    sub r12, r15
hg_idx_ok:
    inc r13
    cmp r13, r15
    jb hg_visit
    imul rax, r15, SAMPLES * 8
    add qword ptr [rip + bytes_verified], rax
    mov rax, qword ptr [rip + cur_pass]
    inc rax
    mov qword ptr [rip + cur_pass], rax
    cmp rax, PASSES + 1
    jbe hg_pass

    lea rsi, [rip + msg_sum1]
    call puts
    mov rax, qword ptr [rip + bytes_verified]
    call putdec
    lea rsi, [rip + msg_sum2]
    call puts
    mov rax, r15
    call putdec
    lea rsi, [rip + msg_sum3]
    call puts
    mov eax, PASSES + 1
    call putdec
    lea rsi, [rip + msg_sum4]
    call puts
    mov rax, qword ptr [rip + bytes_written]
    call putdec
    lea rsi, [rip + msg_sum5]
    call puts
    jmp pass

hg_too_small:
    lea rsi, [rip + msg_small]
    jmp fail

# fill_page(rdi = page address, rax = K): qword at a = a ^ K = (page ^ K) + (a - page).
# Clobbers rax.
fill_page:
    push rdi
    push rcx
    xor rax, rdi
    mov ecx, 64
fp_loop:
%rep 8
    stosq
    add rax, 8
%endrep
    dec ecx
    jnz fp_loop
    pop rcx
    pop rdi
    ret

# check_sampled(rdi = page address, rax = K, rsi = offset 0..SPACING-1 in qwords):
# checks the qwords at offset + k * SPACING, k = 0 .. SAMPLES-1. Preserves every register
# but rax; a mismatch goes to page_bad.
check_sampled:
    push rdi
    push rax
    xor rax, rdi
    lea rdi, [rdi + rsi*8]
    lea rax, [rax + rsi*8]
%rep SAMPLES
    cmp qword ptr [rdi + %i * SPACING * 8], rax
    jne cs_bad
    add rax, SPACING * 8
%endrep
    pop rax
    pop rdi
    ret
cs_bad:
    pop rax
    pop rdi
    jmp page_bad

# page_bad(rdi = page address, rax = K): re-scan the page for the first wrong qword,
# report it, exit 2.
page_bad:
    mov rbx, rdi
    mov r14, rax
    xor ecx, ecx
pb_scan:
    lea rax, [rbx + rcx*8]
    xor rax, r14
    cmp qword ptr [rbx + rcx*8], rax
    jne pb_found
    inc ecx
    cmp ecx, 512
    jb pb_scan
    lea rsi, [rip + msg_vanished]
    call puts
    mov rax, rbx
    call puthex
    call putnl
    lea rsi, [rip + msg_vanished_fail]
    jmp fail
pb_found:
    mov rdx, rax
    lea rsi, [rip + msg_bad1]
    call puts
    lea rax, [rbx + rcx*8]
    call puthex
    lea rsi, [rip + msg_bad2]
    call puts
    mov rax, r12
    call putdec
    lea rsi, [rip + msg_bad3]
    call puts
    mov rax, qword ptr [rip + cur_gen]
    call putdec
    lea rsi, [rip + msg_bad4]
    call puts
    mov rax, rdx
    call puthex
    lea rsi, [rip + msg_bad5]
    call puts
    mov rax, qword ptr [rbx + rcx*8]
    call puthex
    lea rsi, [rip + msg_bad6]
    call puts
    mov rax, qword ptr [rip + cur_pass]
    call putdec
    call putnl
    lea rsi, [rip + msg_failed]
    mov edi, 2
    jmp fail_code

vm_seed_raw:    .quad 0
vm_seed:        .quad 0
base_key:       .quad 0
npages:         .quad 0
stride:         .quad 0
cur_pass:       .quad 0
cur_gen:        .quad 0
bytes_verified: .quad 0
bytes_written:  .quad 0

msg_hdr1:   .asciz "hog: "
msg_hdr2:   .asciz " bytes ("
msg_hdr3:   .asciz " pages) from 0x200000, qword = address ^ key(VM, generation); stride "
msg_hdr4:   .asciz ", seed "
msg_hdr5:   .asciz "\n"
msg_sum1:   .asciz "hog: "
msg_sum2:   .asciz " bytes verified ("
msg_sum3:   .asciz " pages x "
msg_sum4:   .asciz " passes, 16 qwords per page per pass), "
msg_sum5:   .asciz " bytes written\n"
msg_bad1:   .asciz "mismatch at "
msg_bad2:   .asciz " (page #"
msg_bad3:   .asciz ", generation "
msg_bad4:   .asciz "): expected "
msg_bad5:   .asciz " found "
msg_bad6:   .asciz ", pass "
msg_vanished:      .asciz "mismatch seen, then gone on re-read of page "
msg_vanished_fail: .asciz "page content changed between two reads"
msg_failed: .asciz "hog pattern check failed"
msg_small:  .asciz "guest memory too small (needs more than 2 MiB)"
