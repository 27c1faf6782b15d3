# edges.asm -- paging and delivery corners the other guests do not reach, each checked by
# the guest itself:
#  1. INVLPG of one address of a 2 MiB page drops the whole large translation (the PDE
#     is pointed at another 2 MiB region; a piece other than the one invalidated must
#     show the new region);
#  2. A/D "aging", many rounds: A and D cleared in a 2 MiB leaf, a 4 KiB leaf and the
#     tables above, INVLPG, then a read must set A (not D) and, a while later, a write D,
#     every round, and later a read then a write of the same page (spread over the run, as
#     a kernel's page aging is; in between, a VMM may share or reclaim the pages);
#  3. a 1 GiB page: a read at an offset above 2 MiB reaches that offset;
#  4. NX in a non-leaf PDE (EFER.NXE = 1): a fetch below it is a #PF with I/D set, and
#     fetches again once NX is cleared;
#  5. delivery: #BP through an IST-1 interrupt gate runs on the IST1 stack with IF = 0;
#     int 0x81 through a trap gate keeps IF = 1 and the current stack;
#  6. a page table changed often (a shadow MMU lets it go out of sync): an entry changed
#     then, and again across an address-space switch and back, must be seen after
#     INVLPG or the switch.
%include "runtime/boot.inc"

%define WIN       0x40000000          # PDPT[1]: a PD of our own (RAM is identity-mapped below 1 GiB)
%define WIN4K     0x40200000          # PD[1] of it: a PT of our own
%define CODEVA    0x40600000          # PD[3] of it: a PT for the NX test
%define HUGE      0x80000000          # PDPT[2]: a 1 GiB page at physical 0
%define REG1      0x400000            # two 2 MiB regions of RAM with different contents
%define REG2      0x600000
%define ROUNDS    40
%define SPIN      6000
%define PDE_A     0x20
%define PDE_D     0x40
%define NOT_AD    -0x61               # ~(A | D), sign-extended by the instruction
%define NOT_A     -0x21               # ~A

main:
    lea rsi, [rip + msg_start]
    call puts
    # ---- our tables: PDPT[1] -> PD, PD[1] -> PT (4 KiB pages), PD[3] -> PT (NX test)
    call alloc_frame
    mov r12, rax                       # r12 = the window's PD
    mov edi, PDPT_BASE
    lea rax, [r12 + PTE_P + PTE_W]
    mov qword ptr [rdi + 8], rax
    call alloc_frame
    mov r13, rax                       # r13 = the 4 KiB PT
    lea rax, [r13 + PTE_P + PTE_W]
    mov qword ptr [r12 + 8], rax
    call alloc_frame
    mov r14, rax                       # r14 = the data frame behind WIN4K
    lea rax, [r14 + PTE_P + PTE_W]
    mov qword ptr [r13], rax
    # ---- the two regions: the first qword of pages 0, 1, 5 of each
    mov edi, REG1
    movabs rax, 0x1111000000000000
    call mark_region
    mov edi, REG2
    movabs rax, 0x2222000000000000
    call mark_region

    # ---- 1. INVLPG of a large page ------------------------------------------------
    xor r15d, r15d
big_round:
    mov rax, REG1 | PTE_P | PTE_W | PTE_PS
    mov qword ptr [r12], rax
    mov rax, cr3
    mov cr3, rax
    mov rdi, WIN
    movabs rdx, 0x1111000000000001
    cmp qword ptr [rdi + 0x1000], rdx  # piece 1, then piece 5: both cached from REG1
    jne bad_large
    movabs rdx, 0x1111000000000005
    cmp qword ptr [rdi + 0x5000], rdx
    jne bad_large
    mov rax, REG2 | PTE_P | PTE_W | PTE_PS
    mov qword ptr [r12], rax
    invlpg [rdi]                       # piece 0 only: the whole 2 MiB translation must go
    movabs rdx, 0x2222000000000005
    cmp qword ptr [rdi + 0x5000], rdx
    jne bad_invlpg
    movabs rdx, 0x2222000000000001
    cmp qword ptr [rdi + 0x1000], rdx
    jne bad_invlpg
    inc r15
    cmp r15, 4
    jb big_round

    # ---- 2. A/D aging ---------------------------------------------------------------
    xor r15d, r15d
age_round:
    # clear A and D in the 2 MiB leaf, the 4 KiB leaf and the PD entry above the PT
    and qword ptr [r12], NOT_AD
    and qword ptr [r13], NOT_AD
    and qword ptr [r12 + 8], NOT_A
    mov rdi, WIN
    invlpg [rdi]
    mov rsi, WIN4K
    invlpg [rsi]
    mov rax, qword ptr [rdi + 0x3008]  # read: A, not D
    mov rax, qword ptr [rsi + 8]
    mov rax, qword ptr [r12]
    test rax, PDE_A
    jz bad_a
    test rax, PDE_D
    jnz bad_d_early
    mov rax, qword ptr [r13]
    test rax, PDE_A
    jz bad_a
    test rax, PDE_D
    jnz bad_d_early
    test qword ptr [r12 + 8], PDE_A
    jz bad_a
    mov ecx, SPIN                      # spread the rounds over the run; the VMM may share
age_spin:                              # or reclaim the table pages meanwhile
    dec ecx
    jnz age_spin
    mov qword ptr [rdi + 0x3008], r15  # write: D
    mov qword ptr [rsi + 8], r15
    test qword ptr [r12], PDE_D
    jz bad_d
    test qword ptr [r13], PDE_D
    jz bad_d
    cmp qword ptr [r14 + 8], r15       # the 4 KiB page's frame holds what was written
    jne bad_data
    mov ecx, SPIN                      # a while with dirty leaves: the VMM may share the pages
age_spin2:
    dec ecx
    jnz age_spin2
    mov rax, qword ptr [rdi + 0x3008]  # read, then write: a write to a page shared meanwhile
    cmp rax, r15                       # must get its own copy
    jne bad_data
    lea rax, [r15 + 1]
    mov qword ptr [rdi + 0x3008], rax
    cmp qword ptr [rdi + 0x3008], rax
    jne bad_data
    inc r15
    cmp r15, ROUNDS
    jb age_round

    # ---- 3. a 1 GiB page ---------------------------------------------------------------
    mov edi, PDPT_BASE
    mov qword ptr [rdi + 16], PTE_P | PTE_W | PTE_PS
    mov rax, cr3
    mov cr3, rax
    mov rdi, HUGE + REG2 + 0x5000
    movabs rdx, 0x2222000000000005
    cmp qword ptr [rdi], rdx
    jne bad_huge

    # ---- 4. NX in a non-leaf PDE -----------------------------------------------------------
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x800                      # EFER.NXE
    wrmsr
    call alloc_frame
    mov rbx, rax                       # the PT under PD[3]
    call alloc_frame
    mov byte ptr [rax], 0xc3           # a page holding `ret`
    or rax, PTE_P | PTE_W
    mov qword ptr [rbx], rax
    lea rax, [rbx + PTE_P + PTE_W]
    bts rax, 63                        # NX in the PDE, not in the PTE
    mov qword ptr [r12 + 24], rax
    mov rax, cr3
    mov cr3, rax
    mov edi, 14
    lea rsi, [rip + pf_handler]
    call set_handler
    lea rax, [rip + nx_resume]
    mov qword ptr [rip + pf_resume], rax
    mov rax, CODEVA
    call rax
    lea rsi, [rip + msg_no_nx]
    jmp fail
nx_resume:
    cmp qword ptr [rip + pf_err], 0x11 # present, instruction fetch
    jne bad_nx
    mov rax, CODEVA
    cmp qword ptr [rip + pf_cr2], rax
    jne bad_nx
    btr qword ptr [r12 + 24], 63
    mov rax, CODEVA
    invlpg [rax]
    call rax                           # now it runs
    # ---- 5. IST and gate types ---------------------------------------------------------------
    mov edi, 3
    mov esi, GATE_INT
    xor edx, edx
    mov ecx, 1                         # IST 1
    call set_gate_attr
    mov edi, 3
    lea rsi, [rip + bp_handler]
    call set_handler
    mov edi, 0x81
    mov esi, GATE_TRAP
    xor edx, edx
    xor ecx, ecx
    call set_gate_attr
    mov edi, 0x81
    lea rsi, [rip + trap_handler]
    call set_handler
    sti                                # nothing is programmed to interrupt
    int3
    int 0x81
    cli
    cmp qword ptr [rip + bp_seen], 1
    jne bad_ist
    cmp qword ptr [rip + trap_seen], 1
    jne bad_trap

    # ---- 6. a busy page table ------------------------------------------------------------------
    call alloc_frame
    mov rbx, rax                       # rbx = frame A, rbp = frame B: tagged first qwords
    mov qword ptr [rbx], 0xa
    call alloc_frame
    mov rbp, rax
    mov qword ptr [rbp], 0xb
    call alloc_frame                   # a second address space: the same PML4[0]
    mov r8, rax
    mov edi, PML4_BASE
    mov rax, qword ptr [rdi]
    mov qword ptr [r8], rax
    xor r15d, r15d
busy_round:
    mov rsi, WIN4K
    mov rax, qword ptr [rsi + 8]       # PTE[0]'s translation in use
    lea rax, [rbx + PTE_P + PTE_W]     # PTE[2] written three times: out of sync, for a shadow MMU
    mov qword ptr [r13 + 16], rax
    invlpg [rsi + 0x2000]
    cmp qword ptr [rsi + 0x2000], 0xa
    jne bad_busy
    lea rax, [rbp + PTE_P + PTE_W]
    mov qword ptr [r13 + 16], rax
    invlpg [rsi + 0x2000]
    cmp qword ptr [rsi + 0x2000], 0xb
    jne bad_busy
    lea rax, [rbx + PTE_P + PTE_W]
    mov qword ptr [r13 + 16], rax
    invlpg [rsi + 0x2000]
    cmp qword ptr [rsi + 0x2000], 0xa
    jne bad_busy
    lea rax, [rbp + PTE_P + PTE_W]     # PTE[0] -> B now: INVLPG must show it
    mov qword ptr [r13], rax
    invlpg [rsi]
    cmp qword ptr [rsi], 0xb
    jne bad_busy
    mov cr3, r8                        # away and back: the table is brought back in sync
    mov rax, PML4_BASE
    mov cr3, rax
    cmp qword ptr [rsi], 0xb
    jne bad_busy
    lea rax, [r14 + PTE_P + PTE_W]     # PTE[0] back to its own frame
    mov qword ptr [r13], rax
    invlpg [rsi]
    cmp qword ptr [rsi + 8], ROUNDS - 1
    jne bad_busy
    inc r15
    cmp r15, 8
    jb busy_round
    lea rsi, [rip + msg_ok]
    call puts
    jmp pass

# mark_region(rdi = region, rax = tag): page k's first qword = tag | k, k = 0, 1, 5
mark_region:
    mov qword ptr [rdi], rax
    lea rdx, [rax + 1]
    mov qword ptr [rdi + 0x1000], rdx
    lea rdx, [rax + 5]
    mov qword ptr [rdi + 0x5000], rdx
    ret

pf_handler:
    mov rax, qword ptr [rdi + F_ERR]
    mov qword ptr [rip + pf_err], rax
    mov rax, cr2
    mov qword ptr [rip + pf_cr2], rax
    mov rax, qword ptr [rip + pf_resume]
    mov qword ptr [rdi + F_RIP], rax
    add qword ptr [rdi + F_RSP], 8     # drop the return address the faulting call pushed
    ret

bp_handler:
    mov rax, rsp
    cmp rax, IST1_TOP
    jae bp_bad
    cmp rax, IST1_TOP - 0x8000
    jb bp_bad
    pushfq
    pop rax
    test eax, 0x200
    jnz bp_bad
    mov qword ptr [rip + bp_seen], 1
bp_bad:
    ret

trap_handler:
    mov rax, rsp
    cmp rax, KSTACK_TOP
    jae trap_bad
    cmp rax, KSTACK_TOP - 0x80000
    jb trap_bad
    pushfq
    pop rax
    test eax, 0x200
    jz trap_bad
    mov qword ptr [rip + trap_seen], 1
trap_bad:
    ret

bad_large:
    lea rsi, [rip + msg_large]
    jmp fail
bad_invlpg:
    lea rsi, [rip + msg_invlpg]
    jmp fail
bad_a:
    lea rsi, [rip + msg_a]
    jmp fail
bad_d_early:
    lea rsi, [rip + msg_d_early]
    jmp fail
bad_d:
    lea rsi, [rip + msg_d]
    jmp fail
bad_data:
    lea rsi, [rip + msg_data]
    jmp fail
bad_huge:
    lea rsi, [rip + msg_huge]
    jmp fail
bad_nx:
    lea rsi, [rip + msg_nx]
    jmp fail
bad_ist:
    lea rsi, [rip + msg_ist]
    jmp fail
bad_trap:
    lea rsi, [rip + msg_trap]
    jmp fail
bad_busy:
    lea rsi, [rip + msg_busy]
    jmp fail

pf_err:     .quad 0
pf_cr2:     .quad 0
pf_resume:  .quad 0
bp_seen:    .quad 0
trap_seen:  .quad 0

msg_start:   .asciz "edges: large-page INVLPG, A/D aging, a 1 GiB page, NX in a PDE, IST and gate types\n"
msg_ok:      .asciz "edges: all checks passed\n"
msg_large:   .asciz "a 2 MiB page does not show its region"
msg_invlpg:  .asciz "INVLPG of one address left other pieces of the old 2 MiB page"
msg_a:       .asciz "a read did not set the Accessed bit"
msg_d_early: .asciz "a read set the Dirty bit"
msg_d:       .asciz "a write did not set the Dirty bit"
msg_data:    .asciz "a write through a 4 KiB page did not reach its frame"
msg_huge:    .asciz "a 1 GiB page does not reach its offset"
msg_no_nx:   .asciz "a fetch below an NX PDE did not fault"
msg_nx:      .asciz "the NX #PF has the wrong error code or CR2"
msg_ist:     .asciz "#BP through an IST-1 interrupt gate: wrong stack or IF set"
msg_trap:    .asciz "int 0x81 through a trap gate: wrong stack or IF cleared"
msg_busy:    .asciz "a changed entry of a busy page table was not seen"
