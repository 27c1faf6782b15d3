"""isa-debug-exit: the written value is the exit status."""

from hvmodel.devices.bus import IOBus
from hvmodel.devices.debugexit import DebugExit


def make():
    codes = []
    dev = DebugExit(codes.append)
    bus = IOBus()
    bus.attach(dev)
    return bus, dev, codes


def test_byte_write_reports_value_itself():
    bus, dev, codes = make()
    bus.write(0xF4, 1, 0x31)
    assert codes == [0x31]  # not (0x31 << 1) | 1 as QEMU would exit
    assert dev.status == 0x31


def test_wide_write_reports_full_value():
    bus, _, codes = make()
    bus.write(0xF4, 2, 0x1234)
    bus.write(0xF4, 4, 0xDEAD_BEEF)
    assert codes == [0x1234, 0xDEAD_BEEF]


def test_default_is_one_port_at_f4():
    _, dev, _ = make()
    assert list(dev.ports) == [0xF4]


def test_reads_all_ones():
    bus, _, codes = make()
    assert bus.read(0xF4, 1) == 0xFF
    assert bus.read(0xF4, 4) == 0xFFFF_FFFF
    assert codes == []
