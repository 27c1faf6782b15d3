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
%define SCRATCH_PAGES 2048
%define BUSY_PAGES   0
%define BUSY_RAMP    0
%define BUSY_START   0
%define BUSY_EVERY   1
%define BUSY_KEY     0
%define MSG_HDR      "balloon: driver on port 0x5670; 256 working-set pages checked, polls once a second for 6 s\n"

%include "runtime/balloonvm.inc"
