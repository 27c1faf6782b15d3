"""The 8254 programmable interval timer, clocked by the guest instruction count.

Guest time is counted in instructions (10 ns each, docs/GUEST-ABI.md), and the
PIT input clock is 1.193182 MHz, i.e. one tick per 838.1 ns ~ 84 instructions.
Rounding to a whole number of instructions per tick keeps every deadline an
exact integer, so runs are reproducible and IRQ periods are exactly
``divisor * 84`` instructions.

The counters are not stepped: each channel remembers the instruction count at
which its count was loaded, and its value and output are computed from the
elapsed ticks when asked (as QEMU does with nanoseconds).

Ports: 0x40-0x42 channel data, 0x43 control word (write only; reads 0 like QEMU).

Deliberate simplifications (documented so nobody is surprised):

* The BCD bit is stored and reported in the status byte, but counting is
  always binary.
* There are no GATE inputs: every channel counts as if GATE were high, so
  channel 2 counts even though port 0x61 (not part of this device) would gate
  it. Modes 1 and 5 (hardware triggered) therefore never see a trigger edge
  and never produce an IRQ edge.
* A new count takes effect at once (QEMU does the same). Real mode 2/3
  counters would finish the current period first.
* Writing a control word stops the channel until a new count is written
  (hardware behaviour for the output; QEMU keeps counting). Reads in between
  return the count held when the control word was written.
* The counter value for mode 3 decrements by two per tick and runs through
  the reload value twice per period, as the hardware and QEMU do; its IRQ
  edge still comes once per ``divisor`` ticks, like mode 2.
"""

from __future__ import annotations

from collections.abc import Callable

from hvmodel.devices.bus import split_read, split_write

INSNS_PER_PIT_TICK = 84
PIT_PORTS = range(0x40, 0x44)
PIT_CONTROL = 0x43

# Access modes (control word bits 5:4). 0 is the counter latch command.
RW_LATCH = 0
RW_LSB = 1
RW_MSB = 2
RW_WORD = 3


class _Channel:
    """One 16-bit counter; every method takes the current instruction count."""

    def __init__(self) -> None:
        self.mode = 0
        self.bcd = 0
        self.rw_mode = RW_WORD
        self.reload = 0x10000  # the count register; 0 written means 65536
        self.load_time = 0
        self.armed = False  # a count has been written since the last control word
        self.held = 0  # value read while not armed
        self.null_count = True
        # Read side: latched count (with the rw mode it is read in), latched
        # status, and the LSB/MSB flip-flop for RW_WORD.
        self.latched_count = 0
        self.count_latched = 0  # 0 = no latch, else the RW_* mode to read it in
        self.status = 0
        self.status_latched = False
        self.read_msb_next = False
        # Write side: the LSB waiting for its MSB in RW_WORD.
        self.write_msb_next = False
        self.write_lsb = 0

    def ticks(self, now: int) -> int:
        return max(0, now - self.load_time) // INSNS_PER_PIT_TICK

    def count(self, now: int) -> int:
        """The counter value (1..65536, or wrapped 16 bit in one-shot modes)."""
        if not self.armed:
            return self.held
        d = self.ticks(now)
        n = self.reload
        if self.mode == 2:
            return n - d % n
        if self.mode == 3:
            return n - (2 * d) % n
        # Modes 0, 1, 4, 5 count down once and keep wrapping past zero.
        return (n - d) & 0xFFFF

    def output(self, now: int) -> int:
        """The OUT pin (hardware polarity), for the read-back status byte."""
        if not self.armed:
            return 0 if self.mode == 0 else 1
        d = self.ticks(now)
        n = self.reload
        if self.mode == 0:
            return int(d >= n)
        if self.mode == 1:
            return 1  # never triggered: no GATE edge
        if self.mode == 2:
            return int(d % n != n - 1)  # low during the tick before reload
        if self.mode == 3:
            return int(d % n < (n + 1) // 2)
        return int(d != n)  # modes 4, 5: one low tick at terminal count

    def control(self, rw: int, mode: int, bcd: int, now: int) -> None:
        self.held = self.count(now) & 0xFFFF
        self.rw_mode = rw
        self.mode = mode
        self.bcd = bcd
        self.armed = False
        self.null_count = True
        self.read_msb_next = False
        self.write_msb_next = False

    def latch_count(self, now: int) -> None:
        # A second latch before the first is read is ignored (8254 datasheet).
        if not self.count_latched:
            self.latched_count = self.count(now) & 0xFFFF
            self.count_latched = self.rw_mode

    def latch_status(self, now: int) -> None:
        if not self.status_latched:
            self.status = (
                (self.output(now) << 7)
                | (int(self.null_count) << 6)
                | (self.rw_mode << 4)
                | (self.mode << 1)
                | self.bcd
            )
            self.status_latched = True

    def load(self, value: int, now: int) -> None:
        self.reload = value or 0x10000
        self.load_time = now
        self.armed = True
        self.null_count = False

    def write(self, value: int, now: int) -> bool:
        """Write one data byte. Returns True when it loaded a new count."""
        if self.rw_mode == RW_LSB:
            self.load(value, now)
        elif self.rw_mode == RW_MSB:
            self.load(value << 8, now)
        elif not self.write_msb_next:
            self.write_lsb = value
            self.write_msb_next = True
            return False
        else:
            self.write_msb_next = False
            self.load(self.write_lsb | (value << 8), now)
        return True

    def read(self, now: int) -> int:
        # Status first, then a latched count, then the live counter (8254 order).
        if self.status_latched:
            self.status_latched = False
            return self.status
        if self.count_latched:
            value = self.latched_count
            if self.count_latched == RW_LSB:
                self.count_latched = 0
                return value & 0xFF
            if self.count_latched == RW_MSB:
                self.count_latched = 0
                return value >> 8
            if not self.read_msb_next:
                self.read_msb_next = True
                return value & 0xFF
            self.read_msb_next = False
            self.count_latched = 0
            return value >> 8
        value = self.count(now) & 0xFFFF
        if self.rw_mode == RW_LSB:
            return value & 0xFF
        if self.rw_mode == RW_MSB:
            return value >> 8
        # Unlatched LSB/MSB reads sample the counter twice: a torn read is
        # possible, as on the hardware; that is what the latch is for.
        if not self.read_msb_next:
            self.read_msb_next = True
            return value & 0xFF
        self.read_msb_next = False
        return value >> 8


class Pit8254:
    """Intel 8254 PIT at ports 0x40-0x43; channel 0's output edges are IRQ 0.

    ``clock()`` returns the current guest instruction count; it is read on
    every port access. One PIT tick is ``INSNS_PER_PIT_TICK`` (84) instructions.

    Channel 0 IRQ edges (rising edges of OUT0, which the edge-triggered PIC
    latches) happen ``divisor * 84`` instructions after the count is loaded,
    then every ``divisor * 84`` more in modes 2 and 3; once in modes 0 and 4;
    never in modes 1 and 5. The platform drives them with two calls:

    * ``fire(now)`` returns how many edges happened up to and including
      ``now`` that it has not reported before (edges before a reprogramming
      are not lost). Raise IRQ 0 once if it is nonzero: the PIC's IRR holds
      one request, so missed ticks coalesce as on real hardware.
    * ``next_irq(now)`` returns the instruction count of the earliest edge
      ``fire`` has not reported yet, or None if none will come. Call
      ``fire(now)`` first: then the result is always ``> now``. Without that,
      it may be ``<= now`` (an edge is overdue), never silently skipped.
    """

    def __init__(self, clock: Callable[[], int]) -> None:
        self.clock = clock
        self.ports = PIT_PORTS
        self.channels = [_Channel() for _ in range(3)]
        # IRQ 0 bookkeeping. Edges of the current channel 0 programme at times
        # <= _cursor have been reported or carried; _carry holds edges of an
        # earlier programme not yet reported, the first of them at _carry_first.
        self._cursor = -1
        self._carry = 0
        self._carry_first: int | None = None

    # -- port interface -------------------------------------------------------

    def read(self, port: int, size: int) -> int:
        return split_read(self._read_byte, port, size)

    def write(self, port: int, size: int, value: int) -> None:
        split_write(self._write_byte, port, size, value)

    def _read_byte(self, port: int) -> int:
        if port == PIT_CONTROL:
            return 0  # the control register is write only; QEMU reads it as 0
        if port in PIT_PORTS:
            return self.channels[port - PIT_PORTS.start].read(self.clock())
        return 0xFF

    def _write_byte(self, port: int, value: int) -> None:
        now = self.clock()
        if port == PIT_CONTROL:
            self._control(value, now)
        elif port in PIT_PORTS:
            index = port - PIT_PORTS.start
            if index == 0:
                # The count is loaded only on the last byte; carry the old
                # programme's edges just before it starts the new one.
                ch = self.channels[0]
                completes = ch.rw_mode != RW_WORD or ch.write_msb_next
                if completes:
                    self._retire_channel0(now)
            self.channels[index].write(value, now)

    def _control(self, value: int, now: int) -> None:
        select = value >> 6
        if select == 3:
            # Read-back: bit 5 clear latches counts, bit 4 clear latches
            # status, bits 1-3 select channels 0-2.
            for i, ch in enumerate(self.channels):
                if value & (2 << i):
                    if not value & 0x20:
                        ch.latch_count(now)
                    if not value & 0x10:
                        ch.latch_status(now)
            return
        ch = self.channels[select]
        rw = (value >> 4) & 3
        if rw == RW_LATCH:
            ch.latch_count(now)
            return
        mode = (value >> 1) & 7
        if mode > 5:
            mode -= 4  # 110 and 111 are aliases of modes 2 and 3
        if select == 0:
            self._retire_channel0(now)
        ch.control(rw, mode, value & 1, now)

    # -- IRQ 0 ------------------------------------------------------------------

    def _period(self) -> int:
        return self.channels[0].reload * INSNS_PER_PIT_TICK

    def _edges(self, after: int, upto: int) -> int:
        """Channel 0 edges of the current programme in (after, upto]."""
        ch = self.channels[0]
        if not ch.armed or upto <= after:
            return 0
        period = self._period()
        base = ch.load_time
        if ch.mode in (2, 3):
            last = (upto - base) // period
            first = max(1, (after - base) // period + 1)
            return max(0, last - first + 1)
        if ch.mode in (0, 4):
            edge = base + period
            return int(after < edge <= upto)
        return 0

    def _first_edge_after(self, after: int) -> int | None:
        ch = self.channels[0]
        if not ch.armed:
            return None
        period = self._period()
        base = ch.load_time
        if ch.mode in (2, 3):
            k = max(1, (after - base) // period + 1)
            return base + k * period
        if ch.mode in (0, 4):
            edge = base + period
            return edge if edge > after else None
        return None

    def _retire_channel0(self, now: int) -> None:
        """Channel 0 is about to be reprogrammed at ``now``: keep its unreported edges."""
        n = self._edges(self._cursor, now)
        if n:
            if self._carry_first is None:
                self._carry_first = self._first_edge_after(self._cursor)
            self._carry += n
        self._cursor = max(self._cursor, now)

    def fire(self, now: int) -> int:
        """Number of IRQ 0 edges in guest time up to ``now`` not reported before."""
        n = self._carry + self._edges(self._cursor, now)
        self._carry = 0
        self._carry_first = None
        self._cursor = max(self._cursor, now)
        return n

    def next_irq(self, now: int) -> int | None:
        """Instruction count of the earliest IRQ 0 edge not yet reported by ``fire``.

        None if channel 0 has no count loaded, is in a mode without edges, or
        its one-shot (mode 0/4) edge was already reported. ``now`` is accepted
        for symmetry with ``fire``; the answer depends only on what ``fire``
        has reported, so an overdue edge (``<= now``) is returned, not skipped.
        """
        if self._carry:
            return self._carry_first
        return self._first_edge_after(self._cursor)

    # -- inspection -------------------------------------------------------------

    def count(self, channel: int, now: int | None = None) -> int:
        """Current 16-bit counter value of ``channel`` (no latch or flip-flop effects)."""
        return self.channels[channel].count(self.clock() if now is None else now) & 0xFFFF
