# dedup.asm -- a guest for transparent page sharing (copy-on-write) and swapping: it fills
# all memory above the runtime's area (HEAP_BASE .. RDI at entry, at most MAX_PAGES pages)
# with three kinds of pages, then re-verifies them round after round while writing to a
# few, spinning between rounds so the host's page scanner has time to share pages.
#
# Page kinds: the region is cut into groups of GROUP (100) pages; in each group the first
# ZERO_PCT pages are zero pages, the next IDENT_PCT identical pages, the rest unique:
#   zero       all qwords 0. Zero pages with an even zero-index are written with zeros at
#              fill time (explicitly zeroed), odd ones are never written (left zero), only
#              read. Each round also rewrites ZERO_WRITES zero pages with zeros.
#   identical  identical-page index j (counted over the identical pages only):
#              qword i = IDENT_TAG + j * 512 + i. Derived from j alone, so page j is the
#              same in every VM that runs this guest (sharable across VMs).
#   unique     unique-page index u, generation g (0 at fill, the round that last wrote it):
#              qword i = ((seed << 41) ^ UNIQ_TAG) + (g << 25) + (u << 9) + i.
#              Different in every VM (seed), and changed by the rounds (g); the guest keeps
#              g per unique page in a dword table at GEN_TABLE (the runtime's free area).
#
# Per-VM value (seed): the VMM passes a per-VM 64-bit value in RSI at entry. GUEST-ABI.md
# says RSI = 0 today; the host sets RSI = the VM's index + 1 for multi-VM runs. RSI = 0 is
# taken as 1. boot.inc clears RSI before it jumps to `main` (and its first bytes must stay
# at 0x100000), so the value is caught on the way: RSI is intact until boot.inc's
# `call idt_init`, and the %define below (which renames the word in instructions, not
# labels) points that call at dedup_entry_hook, which saves RSI and jumps on to the real
# idt_init. (A `boot_rsi` saved by boot.inc itself would make this hook unnecessary.)
#
# Each round r = 1 .. rounds:
#   1. verify every page: SAMPLES qwords per page, one per SPACING qwords, at an offset
#      inside each SPACING-qword line that rotates with the round (r * SAMPLE_STEP), so
#      every qword of a stable page is read within SPACING rounds;
#   2. write: rewrite IDENT_WRITES identical pages with their own content (a write that
#      breaks sharing but keeps the content), ZERO_WRITES zero pages with zeros, and give
#      UNIQUE_WRITES unique pages generation r (new content the next round expects);
#   3. spin SPIN_ITERS iterations of register-only ALU work (4 instructions each).
# After the last round every qword of every page is checked. A mismatch prints the page,
# its kind and index, the qword address, expected and found values and the phase, and
# exits 2 (zero page), 3 (identical page) or 4 (unique page); other failures exit 1.
#
# Rounds adapt to the memory size: rounds = (INSN_BUDGET - pages * EST_FIXED_PER_PAGE) /
# (pages * EST_ROUND_PER_PAGE + EST_ROUND_FIXED), clamped to MIN_ROUNDS .. ROUNDS
# (ROUNDS at 32 MiB and below; about 45 M instructions at 32 MiB, under 50 M at 64 MiB).

%define idt_init dedup_entry_hook
%include "runtime/boot.inc"
%undef idt_init

# boot.inc's `call idt_init` lands here, paging still off, RSI still the VMM's value
dedup_entry_hook:
    mov qword ptr [rip + vm_seed_raw], rsi
    jmp idt_init

%define ZERO_PCT           25
%define IDENT_PCT          50
%define UNIQUE_PCT         25
%define GROUP              100
%define ROUNDS             40
%define MIN_ROUNDS         4
%define INSN_BUDGET        46000000
%define EST_FIXED_PER_PAGE 2450
%define EST_ROUND_PER_PAGE 71
%define EST_ROUND_FIXED    230000
%define IDENT_WRITES       16
%define ZERO_WRITES        4
%define UNIQUE_WRITES      8
%define WRITE_STRIDE       7919
%define SPIN_ITERS         50000
%define SAMPLES            8
%define SPACING            64
%define SAMPLE_STEP        23
%define MAX_PAGES          262144
%define GEN_TABLE          0x20000
%define IDENT_TAG          0x1de7000000000000
%define UNIQ_TAG           0x0a5e000000000000

main:
    # ---- seed, region, page counts, rounds
    mov rax, qword ptr [rip + vm_seed_raw]
    test rax, rax
    jnz dd_seed_ok
    mov eax, 1
dd_seed_ok:
    mov qword ptr [rip + vm_seed], rax
    shl rax, 41
    movabs rdx, UNIQ_TAG
    xor rax, rdx
    mov qword ptr [rip + uniq_hi], rax
    mov rax, qword ptr [rip + mem_size]
    cmp rax, HEAP_BASE + GROUP * 4096
    jb dd_too_small
    sub rax, HEAP_BASE
    shr rax, 12
    cmp rax, MAX_PAGES
    jbe dd_npages_ok
    mov eax, MAX_PAGES
dd_npages_ok:
    mov qword ptr [rip + npages], rax
    # q = pages / GROUP, r = pages % GROUP
    xor edx, edx
    mov ecx, GROUP
    div rcx
    mov r8, rax
    mov r9, rdx
    # zero pages: q * ZERO_PCT + min(r, ZERO_PCT)
    imul rax, r8, ZERO_PCT
    mov rcx, r9
    cmp rcx, ZERO_PCT
    jbe dd_nz_ok
    mov ecx, ZERO_PCT
dd_nz_ok:
    add rax, rcx
    mov qword ptr [rip + nzero], rax
    # identical pages: q * IDENT_PCT + clamp(r - ZERO_PCT, 0, IDENT_PCT)
    imul rax, r8, IDENT_PCT
    mov rcx, r9
    sub rcx, ZERO_PCT
    jbe dd_ni_done
    cmp rcx, IDENT_PCT
    jbe dd_ni_add
    mov ecx, IDENT_PCT
dd_ni_add:
    add rax, rcx
dd_ni_done:
    mov qword ptr [rip + nident], rax
    # unique pages: the rest
    mov rax, qword ptr [rip + npages]
    sub rax, qword ptr [rip + nzero]
    sub rax, qword ptr [rip + nident]
    mov qword ptr [rip + nuniq], rax
    # rounds from the instruction budget
    mov rcx, qword ptr [rip + npages]
    imul rax, rcx, EST_FIXED_PER_PAGE
    mov edx, INSN_BUDGET
    cmp rax, rdx
    jae dd_rounds_min
    sub rdx, rax
    mov rax, rdx
    imul rcx, rcx, EST_ROUND_PER_PAGE
    add rcx, EST_ROUND_FIXED
    xor edx, edx
    div rcx
    cmp rax, ROUNDS
    jbe dd_rounds_le_max
    mov eax, ROUNDS
dd_rounds_le_max:
    cmp rax, MIN_ROUNDS
    jae dd_rounds_set
dd_rounds_min:
    mov eax, MIN_ROUNDS
dd_rounds_set:
    mov qword ptr [rip + rounds], rax

    # ---- header
    lea rsi, [rip + msg_hdr1]
    call puts
    mov rax, qword ptr [rip + npages]
    call putdec
    lea rsi, [rip + msg_hdr2]
    call puts
    mov rax, qword ptr [rip + nzero]
    call putdec
    lea rsi, [rip + msg_zero]
    call puts
    mov rax, qword ptr [rip + nident]
    call putdec
    lea rsi, [rip + msg_ident]
    call puts
    mov rax, qword ptr [rip + nuniq]
    call putdec
    lea rsi, [rip + msg_uniq]
    call puts
    mov rax, qword ptr [rip + vm_seed]
    call putdec
    lea rsi, [rip + msg_hdr3]
    call puts
    mov rax, qword ptr [rip + rounds]
    call putdec
    lea rsi, [rip + msg_hdr4]
    call puts

    # ---- generation table: every unique page starts at generation 0
    mov edi, GEN_TABLE
    mov rcx, qword ptr [rip + nuniq]
    xor eax, eax
    rep stosd

    # ---- fill
    xor r12d, r12d
dd_fill_loop:
    mov rdi, r12
    call classify
    test eax, eax
    jnz dd_fill_write
    test dl, 1
    jnz dd_fill_next
dd_fill_write:
    call expect
    mov rdi, r12
    shl rdi, 12
    add rdi, HEAP_BASE
    call fill_page
dd_fill_next:
    inc r12
    cmp r12, qword ptr [rip + npages]
    jb dd_fill_loop

    # ---- rounds
    lea rax, [rip + phase_round]
    mov qword ptr [rip + phase], rax
    mov qword ptr [rip + cur_round], 1
dd_round:
    # 1. sampled verification of every page; rsi = offset inside each SPACING-qword line
    mov rsi, qword ptr [rip + cur_round]
    imul rsi, rsi, SAMPLE_STEP
    and esi, SPACING - 1
    xor r12d, r12d
dd_verify_loop:
    mov rdi, r12
    call classify
    mov qword ptr [rip + cur_kind], rax
    mov qword ptr [rip + cur_idx], rdx
    call expect
    mov rdi, r12
    shl rdi, 12
    add rdi, HEAP_BASE
    call check_sampled
    inc r12
    cmp r12, qword ptr [rip + npages]
    jb dd_verify_loop
    mov rax, qword ptr [rip + npages]
    imul rax, rax, SAMPLES
    add qword ptr [rip + qwords_checked], rax

    # 2a. identical pages rewritten with their own content
    xor r13d, r13d
dd_wr_ident:
    mov rax, qword ptr [rip + cur_round]
    dec rax
    imul rax, rax, IDENT_WRITES
    add rax, r13
    imul rax, rax, WRITE_STRIDE
    xor edx, edx
    div qword ptr [rip + nident]
    mov r14, rdx
    mov rax, rdx
    mov ecx, IDENT_PCT
    mov r8d, ZERO_PCT
    call page_of
    mov rdi, rax
    mov rdx, r14
    mov eax, 1
    call expect
    call fill_page
    inc qword ptr [rip + ident_writes]
    inc r13
    cmp r13, IDENT_WRITES
    jb dd_wr_ident

    # 2b. zero pages rewritten with zeros
    xor r13d, r13d
dd_wr_zero:
    mov rax, qword ptr [rip + cur_round]
    dec rax
    imul rax, rax, ZERO_WRITES
    add rax, r13
    imul rax, rax, WRITE_STRIDE
    xor edx, edx
    div qword ptr [rip + nzero]
    mov r14, rdx
    mov rax, rdx
    mov ecx, ZERO_PCT
    xor r8d, r8d
    call page_of
    mov rdi, rax
    mov rdx, r14
    xor eax, eax
    call expect
    call fill_page
    inc qword ptr [rip + zero_writes]
    inc r13
    cmp r13, ZERO_WRITES
    jb dd_wr_zero

    # 2c. unique pages get generation = this round (new content)
    xor r13d, r13d
dd_wr_uniq:
    mov rax, qword ptr [rip + cur_round]
    dec rax
    imul rax, rax, UNIQUE_WRITES
    add rax, r13
    imul rax, rax, WRITE_STRIDE
    xor edx, edx
    div qword ptr [rip + nuniq]
    mov r14, rdx
    mov rax, qword ptr [rip + cur_round]
    mov ecx, GEN_TABLE
    mov dword ptr [rcx + r14*4], eax
    mov rax, r14
    mov ecx, UNIQUE_PCT
    mov r8d, ZERO_PCT + IDENT_PCT
    call page_of
    mov rdi, rax
    mov rdx, r14
    mov eax, 2
    call expect
    call fill_page
    inc qword ptr [rip + uniq_writes]
    inc r13
    cmp r13, UNIQUE_WRITES
    jb dd_wr_uniq

    # 3. spin: register-only ALU work, no memory traffic
    mov rax, qword ptr [rip + cur_round]
    mov ecx, SPIN_ITERS
dd_spin:
    imul rax, rax, 0x5bd1e995
    xor rax, rcx
    dec ecx
    jnz dd_spin

    mov rax, qword ptr [rip + cur_round]
    inc rax
    mov qword ptr [rip + cur_round], rax
    cmp rax, qword ptr [rip + rounds]
    jbe dd_round

    # ---- final: every qword of every page
    dec qword ptr [rip + cur_round]
    lea rax, [rip + phase_final]
    mov qword ptr [rip + phase], rax
    xor r12d, r12d
dd_final_loop:
    mov rdi, r12
    call classify
    mov qword ptr [rip + cur_kind], rax
    mov qword ptr [rip + cur_idx], rdx
    call expect
    mov rdi, r12
    shl rdi, 12
    add rdi, HEAP_BASE
    call check_full
    inc r12
    cmp r12, qword ptr [rip + npages]
    jb dd_final_loop
    mov rax, qword ptr [rip + npages]
    shl rax, 9
    add qword ptr [rip + qwords_checked], rax

    # ---- summary
    lea rsi, [rip + msg_sum1]
    call puts
    mov rax, qword ptr [rip + rounds]
    call putdec
    lea rsi, [rip + msg_sum2]
    call puts
    mov rax, qword ptr [rip + qwords_checked]
    call putdec
    lea rsi, [rip + msg_sum3]
    call puts
    mov rax, qword ptr [rip + ident_writes]
    call putdec
    lea rsi, [rip + msg_sum4]
    call puts
    mov rax, qword ptr [rip + zero_writes]
    call putdec
    lea rsi, [rip + msg_sum5]
    call puts
    mov rax, qword ptr [rip + uniq_writes]
    call putdec
    lea rsi, [rip + msg_sum6]
    call puts
    jmp pass

dd_too_small:
    lea rsi, [rip + msg_small]
    jmp fail

# classify(rdi = page number p): RAX = kind (0 zero, 1 identical, 2 unique),
# RDX = the page's index among the pages of its kind. Preserves the rest.
classify:
    push rcx
    mov rax, rdi
    xor edx, edx
    mov ecx, GROUP
    div rcx
    cmp rdx, ZERO_PCT
    jae cl_not_zero
    imul rax, rax, ZERO_PCT
    add rdx, rax
    xor eax, eax
    pop rcx
    ret
cl_not_zero:
    cmp rdx, ZERO_PCT + IDENT_PCT
    jae cl_unique
    sub rdx, ZERO_PCT
    imul rax, rax, IDENT_PCT
    add rdx, rax
    mov eax, 1
    pop rcx
    ret
cl_unique:
    sub rdx, ZERO_PCT + IDENT_PCT
    imul rax, rax, UNIQUE_PCT
    add rdx, rax
    mov eax, 2
    pop rcx
    ret

# page_of(rax = index among its kind, rcx = pages of the kind per group, r8 = the kind's
# first position in a group): RAX = HEAP_BASE + page number * 4096. Clobbers rdx.
page_of:
    xor edx, edx
    div rcx
    imul rax, rax, GROUP
    add rax, rdx
    add rax, r8
    shl rax, 12
    add rax, HEAP_BASE
    ret

# expect(rax = kind, rdx = index): the page's expected content is qword i = RAX + i * RDX
# (RDX = 0 for zero pages, 1 otherwise). Preserves the rest.
expect:
    cmp eax, 1
    jb ex_zero
    je ex_ident
    push rcx
    mov ecx, GEN_TABLE
    mov eax, dword ptr [rcx + rdx*4]
    shl rax, 25
    shl rdx, 9
    add rdx, rax
    mov rax, qword ptr [rip + uniq_hi]
    add rax, rdx
    mov edx, 1
    pop rcx
    ret
ex_zero:
    xor eax, eax
    xor edx, edx
    ret
ex_ident:
    shl rdx, 9
    movabs rax, IDENT_TAG
    add rax, rdx
    mov edx, 1
    ret

# fill_page(rdi = page address, rax = base, rdx = step 0/1): qword i = base + i * step.
# Clobbers rax.
fill_page:
    push rdi
    push rcx
    mov ecx, 512
    test rdx, rdx
    jnz fp_seq
    rep stosq
    jmp fp_done
fp_seq:
    mov ecx, 64
fp_loop:
%rep 8
    stosq
    inc rax
%endrep
    dec ecx
    jnz fp_loop
fp_done:
    pop rcx
    pop rdi
    ret

# check_sampled(rdi = page address, rax = base, rdx = step, rsi = offset 0..SPACING-1):
# checks qwords offset + k * SPACING, k = 0 .. SAMPLES-1. Preserves every register; a
# mismatch goes to page_bad.
check_sampled:
    push rdi
    push rax
    push rdx
    lea rdi, [rdi + rsi*8]
    test rdx, rdx
    jz cs_go
    add rax, rsi
    mov edx, SPACING
cs_go:
%rep SAMPLES
    cmp qword ptr [rdi + %i * SPACING * 8], rax
    jne cs_bad
    add rax, rdx
%endrep
    pop rdx
    pop rax
    pop rdi
    ret
cs_bad:
    pop rdx
    pop rax
    pop rdi
    jmp page_bad

# check_full(rdi = page address, rax = base, rdx = step): every qword of the page.
# Preserves every register; a mismatch goes to page_bad.
check_full:
    push rdi
    push rcx
    push rax
    test rdx, rdx
    jnz cf_seq
    mov ecx, 512
    repe scasq
    jne cf_bad
    jmp cf_ok
cf_seq:
    mov ecx, 64
cf_loop:
%rep 8
    cmp qword ptr [rdi + %i * 8], rax
    jne cf_bad
    inc rax
%endrep
    add rdi, 64
    dec ecx
    jnz cf_loop
cf_ok:
    pop rax
    pop rcx
    pop rdi
    ret
cf_bad:
    pop rax
    pop rcx
    pop rdi
    jmp page_bad

# page_bad(rdi = page address, rax = base, rdx = step): a check found a wrong qword.
# Re-scans the page for the first wrong qword, reports it and exits 2/3/4 by kind.
page_bad:
    mov r12, rdi
    mov r13, rax
    mov r14, rdx
    xor ecx, ecx
pb_scan:
    mov rax, rcx
    imul rax, r14
    add rax, r13
    cmp qword ptr [r12 + rcx*8], rax
    jne pb_found
    inc ecx
    cmp ecx, 512
    jb pb_scan
    lea rsi, [rip + msg_vanished]
    call puts
    mov rax, r12
    call puthex
    call putnl
    lea rsi, [rip + msg_vanished_fail]
    jmp fail
pb_found:
    mov r15, rax
    lea rsi, [rip + msg_bad_kind]
    call puts
    mov rax, qword ptr [rip + cur_kind]
    lea rsi, [rip + msg_kind_zero]
    cmp eax, 1
    jb pb_kind
    lea rsi, [rip + msg_kind_ident]
    je pb_kind
    lea rsi, [rip + msg_kind_uniq]
pb_kind:
    call puts
    lea rsi, [rip + msg_bad_idx]
    call puts
    mov rax, qword ptr [rip + cur_idx]
    call putdec
    lea rsi, [rip + msg_bad_page]
    call puts
    mov rax, r12
    call puthex
    lea rsi, [rip + msg_bad_at]
    call puts
    lea rax, [r12 + rcx*8]
    call puthex
    lea rsi, [rip + msg_bad_exp]
    call puts
    mov rax, r15
    call puthex
    lea rsi, [rip + msg_bad_got]
    call puts
    mov rax, qword ptr [r12 + rcx*8]
    call puthex
    lea rsi, [rip + msg_bad_phase]
    call puts
    mov rsi, qword ptr [rip + phase]
    call puts
    mov rax, qword ptr [rip + cur_round]
    call putdec
    lea rsi, [rip + msg_bad_end]
    call puts
    mov rax, qword ptr [rip + cur_kind]
    lea rsi, [rip + msg_fail_zero]
    mov edi, 2
    cmp eax, 1
    jb pb_exit
    lea rsi, [rip + msg_fail_ident]
    mov edi, 3
    je pb_exit
    lea rsi, [rip + msg_fail_uniq]
    mov edi, 4
pb_exit:
    jmp fail_code

vm_seed_raw:    .quad 0
vm_seed:        .quad 0
uniq_hi:        .quad 0
npages:         .quad 0
nzero:          .quad 0
nident:         .quad 0
nuniq:          .quad 0
rounds:         .quad 0
cur_round:      .quad 0
cur_kind:       .quad 0
cur_idx:        .quad 0
phase:          .quad 0
qwords_checked: .quad 0
ident_writes:   .quad 0
zero_writes:    .quad 0
uniq_writes:    .quad 0

msg_hdr1:       .asciz "dedup: "
msg_hdr2:       .asciz " pages from 0x200000: "
msg_zero:       .asciz " zero, "
msg_ident:      .asciz " identical (same in every VM), "
msg_uniq:       .asciz " unique (per-VM seed "
msg_hdr3:       .asciz "); "
msg_hdr4:       .asciz " rounds of verify / write / spin\n"
msg_sum1:       .asciz "dedup: "
msg_sum2:       .asciz " rounds ok, final full check ok: "
msg_sum3:       .asciz " qwords verified; rewrote "
msg_sum4:       .asciz " identical pages (same content), "
msg_sum5:       .asciz " zero pages (zeros), modified "
msg_sum6:       .asciz " unique pages\n"
msg_bad_kind:   .asciz "mismatch: "
msg_kind_zero:  .asciz "zero"
msg_kind_ident: .asciz "identical"
msg_kind_uniq:  .asciz "unique"
msg_bad_idx:    .asciz " page #"
msg_bad_page:   .asciz " at "
msg_bad_at:     .asciz ", qword "
msg_bad_exp:    .asciz " expected "
msg_bad_got:    .asciz " found "
msg_bad_phase:  .asciz " ("
msg_bad_end:    .asciz ")\n"
phase_round:    .asciz "sampled check in round "
phase_final:    .asciz "final full check after round "
msg_vanished:   .asciz "mismatch seen, then gone on re-read of page "
msg_vanished_fail: .asciz "page content changed between two reads"
msg_fail_zero:  .asciz "zero page check failed"
msg_fail_ident: .asciz "identical page check failed"
msg_fail_uniq:  .asciz "unique page check failed"
msg_small:      .asciz "guest memory too small (needs 2 MiB + 100 pages)"
