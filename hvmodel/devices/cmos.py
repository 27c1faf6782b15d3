"""The MC146818 CMOS RTC and NVRAM at ports 0x70 (index) / 0x71 (data).

The clock runs in guest time (10 ns per instruction, docs/GUEST-ABI.md) from a
fixed epoch, 2000-01-01 00:00:00, so every run reads the same dates: a wall
clock would make runs irreproducible. Registers 0x00-0x09 read the time in BCD
or binary and in 24- or 12-hour form as status register B says (reset: BCD,
24-hour, as SeaBIOS leaves it); writes to them are kept and shift the clock.
Status A reads the 32.768 kHz divider (0x26) with UIP clear; C reads and clears
its flags (no RTC interrupts are generated); D reports valid RAM (0x80).
Bit 7 of an index write is the NMI mask (stored, no NMIs exist).

The NVRAM holds what a PC BIOS leaves for an OS: base memory 640 KiB (0x15/0x16),
extended memory in KiB (0x17/0x18 and 0x30/0x31, at most 0xFFFF), memory above
16 MiB in 64 KiB units (0x34/0x35), and the century (0x32).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable

from hvmodel.devices.bus import split_read, split_write

CMOS_INDEX = 0x70
CMOS_DATA = 0x71
INSNS_PER_SECOND = 100_000_000     # 10 ns per instruction
EPOCH = datetime.datetime(2000, 1, 1)

SEC, MIN, HOUR, WEEKDAY, DAY, MONTH, YEAR = 0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09
STATUS_A, STATUS_B, STATUS_C, STATUS_D = 0x0A, 0x0B, 0x0C, 0x0D
CENTURY = 0x32
B_24H = 0x02
B_BINARY = 0x04


def _bcd(v: int) -> int:
    return ((v // 10) << 4) | (v % 10)


def _unbcd(v: int) -> int:
    return (v >> 4) * 10 + (v & 0xF)


class Cmos:
    """CMOS RTC + 128 bytes of NVRAM, clocked by ``clock()`` (guest instructions)."""

    ports = (CMOS_INDEX, CMOS_DATA)

    def __init__(self, clock: Callable[[], int], ram_size: int = 0) -> None:
        self.clock = clock
        self.index = 0
        self.nmi_masked = False
        self.nvram = bytearray(128)
        self.nvram[STATUS_A] = 0x26
        self.nvram[STATUS_B] = B_24H
        self.nvram[STATUS_D] = 0x80
        self.nvram[0x15:0x17] = (640).to_bytes(2, "little")
        ext = min(0xFFFF, max(0, ram_size - (1 << 20)) >> 10)
        self.nvram[0x17:0x19] = ext.to_bytes(2, "little")
        self.nvram[0x30:0x32] = ext.to_bytes(2, "little")
        above16 = min(0xFFFF, max(0, ram_size - (16 << 20)) >> 16)
        self.nvram[0x34:0x36] = above16.to_bytes(2, "little")
        self.offset = datetime.timedelta(0)   # what guest writes to the clock moved it by

    def now(self) -> datetime.datetime:
        """The RTC's current date and time."""
        return EPOCH + self.offset + datetime.timedelta(seconds=self.clock() // INSNS_PER_SECOND)

    def _enc(self, v: int) -> int:
        return v if self.nvram[STATUS_B] & B_BINARY else _bcd(v)

    def _dec(self, v: int) -> int:
        return v if self.nvram[STATUS_B] & B_BINARY else _unbcd(v)

    def _time_reg(self, reg: int) -> int:
        t = self.now()
        if reg == SEC:
            return self._enc(t.second)
        if reg == MIN:
            return self._enc(t.minute)
        if reg == HOUR:
            if self.nvram[STATUS_B] & B_24H:
                return self._enc(t.hour)
            h12 = t.hour % 12 or 12
            return self._enc(h12) | (0x80 if t.hour >= 12 else 0)
        if reg == WEEKDAY:
            return self._enc(t.isoweekday() % 7 + 1)   # 1 = Sunday
        if reg == DAY:
            return self._enc(t.day)
        if reg == MONTH:
            return self._enc(t.month)
        if reg == YEAR:
            return self._enc(t.year % 100)
        return self._enc(t.year // 100)               # CENTURY

    def _read_byte(self, port: int) -> int:
        if port == CMOS_INDEX:
            return 0xFF
        reg = self.index
        if reg in (SEC, MIN, HOUR, WEEKDAY, DAY, MONTH, YEAR, CENTURY):
            return self._time_reg(reg)
        if reg == STATUS_C:
            v = self.nvram[STATUS_C]
            self.nvram[STATUS_C] = 0
            return v
        return self.nvram[reg]

    def _write_byte(self, port: int, value: int) -> None:
        if port == CMOS_INDEX:
            self.index = value & 0x7F
            self.nmi_masked = bool(value & 0x80)
            return
        reg = self.index
        if reg in (SEC, MIN, HOUR, DAY, MONTH, YEAR):
            t = self.now()
            fields = {"second": t.second, "minute": t.minute, "hour": t.hour, "day": t.day,
                      "month": t.month, "year": t.year}
            name = {SEC: "second", MIN: "minute", HOUR: "hour", DAY: "day", MONTH: "month", YEAR: "year"}[reg]
            if reg == HOUR and not self.nvram[STATUS_B] & B_24H:
                v = self._dec(value & 0x7F) % 12 + (12 if value & 0x80 else 0)
            elif reg == YEAR:
                v = t.year // 100 * 100 + self._dec(value)
            else:
                v = self._dec(value)
            fields[name] = v
            try:
                self.offset += datetime.datetime(**fields) - t
            except ValueError:
                pass  # an impossible date is ignored (the hardware would keep garbage)
        elif reg in (STATUS_C, STATUS_D, WEEKDAY, CENTURY):
            pass  # read-only here
        elif reg == STATUS_A:
            self.nvram[STATUS_A] = value & 0x7F   # UIP is read-only
        else:
            self.nvram[reg] = value

    def read(self, port: int, size: int) -> int:
        return split_read(lambda p: self._read_byte(p) if p in self.ports else 0xFF, port, size)

    def write(self, port: int, size: int, value: int) -> None:
        split_write(lambda p, v: self._write_byte(p, v) if p in self.ports else None, port, size, value)
