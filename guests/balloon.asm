# balloon.asm -- a guest with a balloon driver (runtime/balloon.inc): it starts the driver,
# then for SECONDS guest seconds polls the host's balloon target once a second from its
# main loop (the PIT at 100 Hz wakes it from hlt), inflating or deflating towards it,
# while it keeps verifying its own working set: WS_PAGES pages (taken from the allocator
# before the balloon takes anything) holding qword = address ^ WS_KEY, re-checked in full
# after every poll and one qword in each of SAMPLE_PAGES pages (every 8th page, a window
# that moves) at every tick. After a poll it also borrows up
# to REUSE_PAGES pages from the free list (pages the balloon gave back, if any), writes
# and checks a pattern in them and returns them: deflated pages must be usable.
# Before the first poll it fills min(SCRATCH_PAGES, half the free heap) pages and frees
# them again (a page cache it dropped): the balloon takes those first (the free list), so its LOCKs really free
# machine frames on the host.
# Each poll whose size or target changed prints a line; at the end it prints the
# largest balloon size reached and the final one, and exits 0. A working-set mismatch
# prints the address and exits 2.
#
# Without a balloon device (START does not answer SUCCESS_WITH_CAPABILITIES: e.g. a plain
# emulator whose unclaimed ports read 0) it says so, checks its working set once and
# exits 0 at once.
#
# The host sets the target (vm.balloon.target, pages); the reference MMU (`native`) has
# no balloon and answers target 0, so `hvmodel check` sees the same guest behaviour.

%include "runtime/boot.inc"
%include "runtime/pic_pit.inc"
%include "runtime/balloon.inc"

%define SECONDS      6
%define HZ           100
%define PIT_DIVISOR  11932
%define WS_PAGES     256
%define REUSE_PAGES  32
%define SCRATCH_PAGES 2048
%define SAMPLE_PAGES 32
%define WS_KEY       0x5ba1100a00000000
%define REUSE_KEY    0x0dd5eed000000000

main:
    lea rsi, [rip + msg_hdr]
    call puts
    # ---- the working set, before the balloon takes anything
    call frame_get
    mov qword ptr [rip + ws_base], rax
    mov r12, rax
    mov ebx, 1
m_ws_alloc:
    call frame_get
    inc ebx
    cmp ebx, WS_PAGES
    jb m_ws_alloc
    # bump-allocated and contiguous: ws_base .. ws_base + WS_PAGES * 4096
    mov rdi, r12
    mov ecx, WS_PAGES * 512
    movabs rdx, WS_KEY
m_ws_fill:
    mov rax, rdi
    xor rax, rdx
    stosq
    dec ecx
    jnz m_ws_fill
    # ---- a page cache: n = min(SCRATCH_PAGES, half the heap left) pages filled with a
    # marker, then all freed (the free list is empty here: frame_get bump-allocates
    # contiguous pages)
    mov rax, qword ptr [rip + mem_size]
    sub rax, qword ptr [rip + heap_next]
    shr rax, 13
    cmp rax, SCRATCH_PAGES
    jbe m_scratch_n
    mov eax, SCRATCH_PAGES
m_scratch_n:
    mov qword ptr [rip + scratch_pages], rax
    mov r12, rax
    test r12, r12
    jz m_driver
    call frame_get
    mov r15, rax
    xor ebx, ebx
m_scratch:
    mov qword ptr [rax], rbx
    mov qword ptr [rax + 4088], rbx
    inc rbx
    cmp rbx, r12
    jae m_scratch_free
    call frame_get
    jmp m_scratch
m_scratch_free:
    mov rdi, r15
    xor ebx, ebx
m_scratch_put:
    call frame_put
    add rdi, 4096
    inc rbx
    cmp rbx, r12
    jb m_scratch_put
m_driver:
    call balloon_start
    test eax, eax
    jnz m_nodevice
    # ---- timer: IRQ 0 at HZ
    mov edi, 0x20
    lea rsi, [rip + timer_handler]
    call set_handler
    call pic_init
    mov edi, PIT_DIVISOR
    call pit_init
    xor r13d, r13d                 # r13 = the next tick at which to poll
    xor r14d, r14d                 # r14 = polls done
m_loop:
    mov rax, qword ptr [rip + ticks]
    cmp rax, r13
    jb m_wait
    # ---- once a second: poll, report, verify everything, reuse free pages
    call balloon_poll
    call report
    call ws_check_all
    call reuse_free
    add r13, HZ
    inc r14
    cmp r14, SECONDS
    ja m_end
m_wait:
    # one qword per working-set page per tick, then sleep until the next interrupt
    call ws_check_sample
    sti
    hlt
    cli
    jmp m_loop

m_end:
    lea rsi, [rip + msg_end1]
    call puts
    mov rax, qword ptr [rip + balloon_peak]
    call putdec
    lea rsi, [rip + msg_end2]
    call puts
    mov rax, qword ptr [rip + balloon_size]
    call putdec
    lea rsi, [rip + msg_end3]
    call puts
    mov rax, qword ptr [rip + balloon_target]
    call putdec
    lea rsi, [rip + msg_end4]
    call puts
    mov rax, qword ptr [rip + balloon_refused]
    call putdec
    lea rsi, [rip + msg_end5]
    call puts
    mov rax, qword ptr [rip + reused]
    call putdec
    lea rsi, [rip + msg_end6]
    call puts
    jmp pass

m_nodevice:
    # no balloon back-door (a machine without the device): check the working set once
    mov rbx, rax
    lea rsi, [rip + msg_nodev]
    call puts
    mov rax, rbx
    call putdec
    lea rsi, [rip + msg_nodev2]
    call puts
    call ws_check_all
    jmp pass

# timer_handler(rdi = frame): count the tick, EOI.
timer_handler:
    inc qword ptr [rip + ticks]
    push rdi
    xor edi, edi
    call pic_eoi
    pop rdi
    ret

# report: a line when the balloon's size or target changed since the last report.
report:
    push rax
    push rsi
    mov rax, qword ptr [rip + balloon_size]
    cmp rax, qword ptr [rip + last_size]
    jne rp_print
    mov rax, qword ptr [rip + balloon_target]
    cmp rax, qword ptr [rip + last_target]
    je rp_out
rp_print:
    lea rsi, [rip + msg_t]
    call puts
    mov rax, r14
    call putdec
    lea rsi, [rip + msg_target]
    call puts
    mov rax, qword ptr [rip + balloon_target]
    mov qword ptr [rip + last_target], rax
    call putdec
    lea rsi, [rip + msg_size]
    call puts
    mov rax, qword ptr [rip + balloon_size]
    mov qword ptr [rip + last_size], rax
    call putdec
    lea rsi, [rip + msg_pages]
    call puts
rp_out:
    pop rsi
    pop rax
    ret

# ws_check_all: every qword of the working set.
ws_check_all:
    push rcx
    push rdx
    push rdi
    mov rdi, qword ptr [rip + ws_base]
    mov ecx, WS_PAGES * 512
    movabs rdx, WS_KEY
wca_loop:
    mov rax, rdi
    xor rax, rdx
    cmp qword ptr [rdi], rax
    jne ws_bad
    add rdi, 8
    dec ecx
    jnz wca_loop
    pop rdi
    pop rdx
    pop rcx
    ret

# ws_check_sample: one qword in each of SAMPLE_PAGES pages, a window of the working set
# that moves with the tick (the offset in the page moves too).
ws_check_sample:
    push rcx
    push rdx
    push rdi
    mov rdi, qword ptr [rip + ticks]
    mov rcx, rdi
    and edi, 511
    shl edi, 3
    and ecx, WS_PAGES / SAMPLE_PAGES - 1
    shl rcx, 12
    add rdi, rcx
    add rdi, qword ptr [rip + ws_base]
    mov ecx, SAMPLE_PAGES
    movabs rdx, WS_KEY
wcs_loop:
    mov rax, rdi
    xor rax, rdx
    cmp qword ptr [rdi], rax
    jne ws_bad
    add rdi, WS_PAGES / SAMPLE_PAGES * 4096
    dec ecx
    jnz wcs_loop
    pop rdi
    pop rdx
    pop rcx
    ret

ws_bad:
    mov rbx, rdi
    lea rsi, [rip + msg_bad1]
    call puts
    mov rax, rbx
    call puthex
    lea rsi, [rip + msg_bad2]
    call puts
    mov rax, qword ptr [rbx]
    call puthex
    call putnl
    lea rsi, [rip + msg_bad]
    mov edi, 2
    jmp fail_code

# reuse_free: borrow up to REUSE_PAGES pages from the free list, write address ^ REUSE_KEY
# over each, check them, give them back (in the same order).
reuse_free:
    push rbx
    push rcx
    push rdx
    push rdi
    push rsi
    mov rbx, qword ptr [rip + free_count]
    cmp rbx, REUSE_PAGES
    jbe rf_n
    mov ebx, REUSE_PAGES
rf_n:
    test rbx, rbx
    jz rf_out
    add qword ptr [rip + reused], rbx
    # the top rbx entries of the free list, read in place (frame_get would pop them)
    mov rsi, qword ptr [rip + free_count]
    sub rsi, rbx
    shl rsi, 2
    add rsi, qword ptr [rip + free_pages]
    movabs rdx, REUSE_KEY
    xor ecx, ecx
rf_fill:
    mov edi, dword ptr [rsi + rcx*4]
    shl rdi, 12
    push rcx
    mov ecx, 512
rf_fill_q:
    mov rax, rdi
    xor rax, rdx
    stosq
    dec ecx
    jnz rf_fill_q
    pop rcx
    inc rcx
    cmp rcx, rbx
    jb rf_fill
    xor ecx, ecx
rf_check:
    mov edi, dword ptr [rsi + rcx*4]
    shl rdi, 12
    push rcx
    mov ecx, 512
rf_check_q:
    mov rax, rdi
    xor rax, rdx
    cmp qword ptr [rdi], rax
    jne rf_bad
    add rdi, 8
    dec ecx
    jnz rf_check_q
    pop rcx
    inc rcx
    cmp rcx, rbx
    jb rf_check
rf_out:
    pop rsi
    pop rdi
    pop rdx
    pop rcx
    pop rbx
    ret
rf_bad:
    lea rsi, [rip + msg_reuse_bad]
    mov edi, 3
    jmp fail_code

ticks:       .quad 0
scratch_pages: .quad 0
ws_base:     .quad 0
last_size:   .quad 0
last_target: .quad 0
reused:      .quad 0

msg_hdr:     .asciz "balloon: driver on port 0x5670; 256 working-set pages checked, polls once a second for 6 s\n"
msg_nodev:   .asciz "balloon: no balloon back-door on port 0x5670, nothing to do (status "
msg_nodev2:  .asciz ")\n"
msg_t:       .asciz "balloon: t="
msg_target:  .asciz "s target "
msg_size:    .asciz " size "
msg_pages:   .asciz " pages\n"
msg_end1:    .asciz "balloon: peak "
msg_end2:    .asciz " pages, final "
msg_end3:    .asciz " pages (target "
msg_end4:    .asciz "), "
msg_end5:    .asciz " refused, "
msg_end6:    .asciz " free-page reuses; working set intact\n"
msg_bad1:    .asciz "balloon: working set mismatch at "
msg_bad2:    .asciz ": found "
msg_bad:     .asciz "working set corrupted"
msg_reuse_bad: .asciz "a page the balloon gave back did not keep what the guest wrote"
