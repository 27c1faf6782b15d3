# idle.asm -- an idle VM for the reclamation scenarios: the balloon guest
# (runtime/balloonvm.inc) for SECONDS guest seconds: it fills a page cache of 5120 pages (20 MiB)
# and drops it (free pages its balloon driver can hand to the host), then sleeps in hlt
# between timer ticks, touching only its 256-page working set (one qword of 32 pages per
# tick, all of it once a second) and polling the balloon target once a second. Exits 0
# with its working set intact.

%include "runtime/boot.inc"
%include "runtime/pic_pit.inc"
%include "runtime/balloon.inc"

%define SECONDS      12
%define SCRATCH_PAGES 5120
%define BUSY_PAGES   0
%define BUSY_RAMP    0
%define BUSY_START   0
%define BUSY_EVERY   1
%define BUSY_KEY     0
%define MSG_HDR      "idle: balloon driver on port 0x5670; 256 working-set pages checked, polls once a second for 12 s\n"

%include "runtime/balloonvm.inc"
