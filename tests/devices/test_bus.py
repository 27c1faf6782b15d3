"""IOBus dispatch, open-bus reads and the unknown-port counters."""

import pytest

from hvmodel.devices.bus import IOBus, PortDevice


class Recorder:
    def __init__(self, ports):
        self.ports = ports
        self.writes = []

    def read(self, port, size):
        return 0x1234_5678_9A  # wider than any access: the bus must mask it

    def write(self, port, size, value):
        self.writes.append((port, size, value))


def test_recorder_is_a_port_device():
    assert isinstance(Recorder((1,)), PortDevice)


def test_dispatch_by_port():
    bus = IOBus()
    a, b = Recorder((0x10, 0x11)), Recorder(range(0x20, 0x24))
    bus.attach(a)
    bus.attach(b)
    bus.write(0x11, 1, 0x5A)
    bus.write(0x23, 2, 0xBEEF)
    assert a.writes == [(0x11, 1, 0x5A)]
    assert b.writes == [(0x23, 2, 0xBEEF)]
    assert bus.device_at(0x22) is b


def test_read_masked_to_size():
    bus = IOBus()
    bus.attach(Recorder((0x10,)))
    assert bus.read(0x10, 1) == 0x9A
    assert bus.read(0x10, 2) == 0x789A
    assert bus.read(0x10, 4) == 0x3456_789A


def test_write_value_masked_to_size():
    bus = IOBus()
    dev = Recorder((0x10,))
    bus.attach(dev)
    bus.write(0x10, 1, 0x1FF)
    assert dev.writes == [(0x10, 1, 0xFF)]


@pytest.mark.parametrize("size,ones", [(1, 0xFF), (2, 0xFFFF), (4, 0xFFFF_FFFF)])
def test_unknown_read_is_all_ones(size, ones):
    bus = IOBus()
    assert bus.read(0x1234, size) == ones


def test_unknown_accesses_counted_per_port():
    bus = IOBus()
    bus.read(0x70, 1)
    bus.read(0x70, 1)
    bus.read(0x71, 2)
    bus.write(0x70, 1, 0x8F)
    assert bus.unknown_reads == {0x70: 2, 0x71: 1}
    assert bus.unknown_reads.total() == 3
    assert bus.unknown_writes == {0x70: 1}


def test_port80_writes_counted_separately():
    bus = IOBus()
    bus.write(0x80, 1, 0x42)
    bus.write(0x80, 1, 0x43)
    assert bus.port80_writes == 2
    assert not bus.unknown_writes


def test_attached_device_owns_port80():
    bus = IOBus()
    dev = Recorder((0x80,))
    bus.attach(dev)
    bus.write(0x80, 1, 7)
    assert dev.writes == [(0x80, 1, 7)]
    assert bus.port80_writes == 0


def test_overlap_rejected_and_bus_unchanged():
    bus = IOBus()
    bus.attach(Recorder((0x10, 0x11)))
    late = Recorder((0x12, 0x11))
    with pytest.raises(ValueError):
        bus.attach(late)
    assert bus.device_at(0x12) is None


def test_bad_size_rejected():
    bus = IOBus()
    with pytest.raises(ValueError):
        bus.read(0x10, 3)
