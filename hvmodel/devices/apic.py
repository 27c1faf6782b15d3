"""The local APIC (xAPIC, memory-mapped at 0xFEE00000) of the VM's one vCPU.

What toy kernels use, modelled; the rest reads as the hardware's reset values:

* ID (0x20) = 0, version (0x30) = 0x00050014 (an integrated APIC, 6 LVT entries),
  TPR / PPR, LDR / DFR, the spurious-interrupt vector register (0xF0, reset 0xFF,
  bit 8 = software enable), ISR / TMR / IRR (0x100-0x270), ESR, ICR (a write
  is accepted and ignored: there is no other CPU to interrupt), the LVT entries
  (reset masked), EOI (0xB0: retires the highest in-service vector).
* The timer in instruction time: the APIC bus clock is 100 MHz — one tick per
  guest instruction (10 ns, docs/GUEST-ABI.md) before the divide configuration
  (0x3E0: 1-128). One-shot and periodic modes; the current count (0x390) is
  computed from the clock, so it advances with guest time and every run agrees.
  TSC-deadline mode is not offered (CPUID does not advertise it).
* Interrupt delivery: a timer expiry sets the IRR bit of the LVT timer's vector
  when unmasked and the APIC is software-enabled; the highest requested vector
  is delivered when its priority class exceeds PPR (TPR and the highest
  in-service class), moving it to ISR until EOI.

Register accesses must be 32-bit and aligned, as on hardware; others read 0 and
are ignored on write (counted in ``bad_accesses``).
"""

from __future__ import annotations

from collections.abc import Callable

APIC_BASE = 0xFEE00000
APIC_SIZE = 0x1000
APIC_VERSION = 0x00050014

REG_ID = 0x20
REG_VERSION = 0x30
REG_TPR = 0x80
REG_APR = 0x90
REG_PPR = 0xA0
REG_EOI = 0xB0
REG_RRD = 0xC0
REG_LDR = 0xD0
REG_DFR = 0xE0
REG_SVR = 0xF0
REG_ISR = 0x100
REG_TMR = 0x180
REG_IRR = 0x200
REG_ESR = 0x280
REG_LVT_CMCI = 0x2F0
REG_ICR_LO = 0x300
REG_ICR_HI = 0x310
REG_LVT_TIMER = 0x320
REG_LVT_THERMAL = 0x330
REG_LVT_PERF = 0x340
REG_LVT_LINT0 = 0x350
REG_LVT_LINT1 = 0x360
REG_LVT_ERROR = 0x370
REG_TIMER_INIT = 0x380
REG_TIMER_CURRENT = 0x390
REG_TIMER_DIVIDE = 0x3E0

LVT_MASKED = 1 << 16
TIMER_PERIODIC = 1 << 17
SVR_ENABLE = 1 << 8
LVT_REGS = (REG_LVT_CMCI, REG_LVT_TIMER, REG_LVT_THERMAL, REG_LVT_PERF, REG_LVT_LINT0, REG_LVT_LINT1,
            REG_LVT_ERROR)


def _divisor(dcr: int) -> int:
    """Divide configuration register (bits 0, 1, 3) -> 2, 4, ..., 128, 1."""
    code = (dcr & 3) | ((dcr >> 1) & 4)
    return 1 if code == 7 else 2 << code


class LocalApic:
    """One xAPIC, clocked by ``clock()`` (guest instructions)."""

    def __init__(self, clock: Callable[[], int]) -> None:
        self.clock = clock
        self.tpr = 0
        self.ldr = 0
        self.dfr = 0xFFFFFFFF
        self.svr = 0xFF
        self.esr = 0
        self.icr = [0, 0]
        self.lvt = {r: LVT_MASKED for r in LVT_REGS}
        self.irr = 0          # 256-bit sets as ints
        self.isr = 0
        self.tmr = 0
        self.divide = 0
        self.initial = 0
        self.start = 0        # instruction count when the timer was armed
        self._fired = 0       # expiries already turned into requests
        self.eois = 0
        self.timer_irqs = 0
        self.bad_accesses = 0
        self.icr_writes = 0

    # -- the timer ------------------------------------------------------------------

    def _period(self) -> int:
        """Instructions from arming to expiry (one period)."""
        return self.initial * _divisor(self.divide)

    def _periodic(self) -> bool:
        return bool(self.lvt[REG_LVT_TIMER] & TIMER_PERIODIC)

    def current_count(self, now: int | None = None) -> int:
        """The current-count register at guest time ``now``."""
        if not self.initial:
            return 0
        now = self.clock() if now is None else now
        ticks = (now - self.start) // _divisor(self.divide)
        if self._periodic():
            return self.initial - ticks % self.initial
        return max(0, self.initial - ticks)

    def _expiries(self, now: int) -> int:
        if not self.initial:
            return 0
        n = (now - self.start) // self._period()
        return n if self._periodic() else min(n, 1)

    def next_irq(self, now: int) -> int | None:
        """Instruction count of the next timer expiry not yet reported by :meth:`fire`."""
        if not self.initial or (not self._periodic() and self._fired):
            return None
        return self.start + (self._fired + 1) * self._period()

    def fire(self, now: int) -> None:
        """Turn timer expiries up to ``now`` into an interrupt request."""
        n = self._expiries(now)
        if n > self._fired:
            self._fired = n
            lvt = self.lvt[REG_LVT_TIMER]
            if not lvt & LVT_MASKED and self.svr & SVR_ENABLE:
                vec = lvt & 0xFF
                if vec >= 16:
                    self.irr |= 1 << vec
                    self.timer_irqs += 1

    # -- interrupt delivery ------------------------------------------------------------

    def _ppr(self) -> int:
        isrv = self.isr.bit_length() - 1 if self.isr else 0
        return self.tpr & 0xFF if (self.tpr >> 4) >= (isrv >> 4) else isrv & 0xF0

    def pending(self) -> int | None:
        """The vector the APIC would deliver now, or None."""
        if not self.irr:
            return None
        vec = self.irr.bit_length() - 1
        if (vec >> 4) <= (self._ppr() >> 4):
            return None
        return vec

    def ack(self) -> int:
        """INTA: the pending vector moves from IRR to ISR."""
        vec = self.pending()
        if vec is None:
            raise RuntimeError("APIC acknowledge without a pending interrupt")
        self.irr &= ~(1 << vec)
        self.isr |= 1 << vec
        return vec

    # -- MMIO ----------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        """A load from the APIC page at ``offset``."""
        if size != 4 or offset & 0xF:
            self.bad_accesses += 1
            return 0
        if REG_ISR <= offset < REG_IRR + 0x80:
            base, bits = ((REG_ISR, self.isr) if offset < REG_TMR else (REG_TMR, self.tmr)
                          if offset < REG_IRR else (REG_IRR, self.irr))
            return (bits >> (32 * ((offset - base) >> 4))) & 0xFFFFFFFF
        if offset in self.lvt:
            return self.lvt[offset]
        return {
            REG_ID: 0,
            REG_VERSION: APIC_VERSION,
            REG_TPR: self.tpr,
            REG_PPR: self._ppr(),
            REG_LDR: self.ldr,
            REG_DFR: self.dfr,
            REG_SVR: self.svr,
            REG_ESR: self.esr,
            REG_ICR_LO: self.icr[0],
            REG_ICR_HI: self.icr[1],
            REG_TIMER_INIT: self.initial,
            REG_TIMER_CURRENT: self.current_count(),
            REG_TIMER_DIVIDE: self.divide,
        }.get(offset, 0)

    def write(self, offset: int, size: int, value: int) -> None:
        """A store to the APIC page at ``offset``."""
        if size != 4 or offset & 0xF:
            self.bad_accesses += 1
            return
        value &= 0xFFFFFFFF
        if offset == REG_EOI:
            if self.isr:
                self.isr &= ~(1 << (self.isr.bit_length() - 1))
            self.eois += 1
        elif offset == REG_TPR:
            self.tpr = value & 0xFF
        elif offset == REG_LDR:
            self.ldr = value & 0xFF000000
        elif offset == REG_DFR:
            self.dfr = value | 0x0FFFFFFF
        elif offset == REG_SVR:
            self.svr = value & 0x13FF
            if not value & SVR_ENABLE:  # software disable masks every LVT entry
                for r in self.lvt:
                    self.lvt[r] |= LVT_MASKED
        elif offset == REG_ESR:
            self.esr = 0
        elif offset == REG_ICR_LO:
            self.icr[0] = value & ~(1 << 12)  # delivery status: always idle
            self.icr_writes += 1
        elif offset == REG_ICR_HI:
            self.icr[1] = value & 0xFF000000
        elif offset in self.lvt:
            if not self.svr & SVR_ENABLE:
                value |= LVT_MASKED
            if offset == REG_LVT_TIMER:
                # Re-arm against the new mode from now, keeping the current count.
                now = self.clock()
                remaining = self.current_count(now)
                self.lvt[offset] = value & 0x300FF
                if self.initial and remaining:
                    self._rearm(now, remaining)
            else:
                self.lvt[offset] = value & 0x1F7FF
        elif offset == REG_TIMER_INIT:
            self.initial = value
            self._rearm(self.clock(), value)
        elif offset == REG_TIMER_DIVIDE:
            now = self.clock()
            remaining = self.current_count(now)
            self.divide = value & 0xB
            if self.initial and remaining:
                self._rearm(now, remaining)

    def _rearm(self, now: int, remaining: int) -> None:
        # Place `start` so that the count at `now` is `remaining` and expiries
        # counted from `start` line up with the real ones.
        self.start = now - (self.initial - remaining) * _divisor(self.divide)
        self._fired = 0

    def counters(self) -> dict[str, int]:
        return {"apic_timer_irqs": self.timer_irqs, "apic_eois": self.eois}
