"""CMOS RTC in guest time: BCD/binary, 12/24 h, NVRAM memory sizes."""

from hvmodel.devices.bus import IOBus
from hvmodel.devices.cmos import INSNS_PER_SECOND, Cmos


def make(ram=64 << 20):
    t = [0]
    bus = IOBus()
    dev = Cmos(lambda: t[0], ram)
    bus.attach(dev)
    return bus, dev, t


def reg(bus, r):
    bus.write(0x70, 1, r)
    return bus.read(0x71, 1)


def test_clock_advances_with_guest_time_from_2000():
    bus, _, t = make()
    assert (reg(bus, 0x09), reg(bus, 0x08), reg(bus, 0x07), reg(bus, 0x32)) == (0x00, 0x01, 0x01, 0x20)
    assert reg(bus, 0x00) == 0
    t[0] = 75 * INSNS_PER_SECOND + 5          # 1 min 15 s of guest time
    assert (reg(bus, 0x02), reg(bus, 0x00)) == (0x01, 0x15)     # BCD
    t[0] = 13 * 3600 * INSNS_PER_SECOND
    assert reg(bus, 0x04) == 0x13


def test_binary_and_12_hour_modes():
    bus, _, t = make()
    t[0] = (13 * 3600 + 42) * INSNS_PER_SECOND
    bus.write(0x70, 1, 0x0B)
    bus.write(0x71, 1, 0x04)                  # binary, 12-hour
    assert reg(bus, 0x00) == 42
    assert reg(bus, 0x04) == 0x80 | 1         # 1 PM


def test_setting_the_time_moves_the_clock():
    bus, dev, t = make()
    bus.write(0x70, 1, 0x09)
    bus.write(0x71, 1, 0x26)                  # year 2026 (BCD)
    assert reg(bus, 0x09) == 0x26 and dev.now().year == 2026
    t[0] = 61 * INSNS_PER_SECOND
    assert reg(bus, 0x02) == 0x01


def test_status_registers_and_nvram():
    bus, _, _ = make(64 << 20)
    assert reg(bus, 0x0A) & 0x80 == 0 and reg(bus, 0x0B) == 0x02 and reg(bus, 0x0D) == 0x80
    assert reg(bus, 0x15) | reg(bus, 0x16) << 8 == 640
    assert reg(bus, 0x17) | reg(bus, 0x18) << 8 == 63 * 1024
    assert reg(bus, 0x34) | reg(bus, 0x35) << 8 == (48 << 20) >> 16
    bus.write(0x70, 1, 0x40)
    bus.write(0x71, 1, 0x5A)
    assert reg(bus, 0x40) == 0x5A
    bus.write(0x70, 1, 0x80 | 0x40)           # NMI mask bit is not part of the index
    assert bus.read(0x71, 1) == 0x5A
