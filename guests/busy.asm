# busy.asm -- a busy VM for the reclamation scenarios: the balloon guest's driver and
# working set (runtime/balloonvm.inc), plus a busy set that grows by BUSY_RAMP pages every
# tick (100 Hz) from tick BUSY_START (2 guest seconds in: a quiet start, so the host's
# sampling sees who is idle) to BUSY_PAGES (20 MiB of a 32 MiB VM, in 1.6 s) and is kept active: every
# BUSY_EVERY ticks each of its pages has one qword checked and written back, and at the
# end every qword of it is checked (qword = address ^ BUSY_KEY). It runs for
# SECONDS guest seconds and exits 0 with its memory intact, or prints the first bad
# address and exits 2. With memory plentiful its balloon stays empty; the host takes
# from it only if it holds more than its target.

%include "runtime/boot.inc"
%include "runtime/pic_pit.inc"
%include "runtime/balloon.inc"

%define SECONDS      12
%define SCRATCH_PAGES 2048
%define BUSY_PAGES   5120
%define BUSY_START   200
%define BUSY_RAMP    32
%define BUSY_EVERY   10
%define BUSY_KEY     0x0b5b5b5b00000000
%define MSG_HDR      "busy: balloon driver on port 0x5670; 256 working-set pages and a busy set growing to 5120 pages from t=2s, checked for 12 s\n"

%include "runtime/balloonvm.inc"
