"""fw_cfg: selector at 0x510, byte-wide data at 0x511, QEMU's key numbers."""

from hvmodel.devices.bus import IOBus
from hvmodel.devices.fwcfg import FwCfg


def read_item(bus: IOBus, key: int, n: int) -> bytes:
    bus.write(0x510, 2, key)
    return bytes(bus.read(0x511, 1) for _ in range(n))


def make(ram=64 << 20):
    bus = IOBus()
    dev = FwCfg(ram, uuid=bytes(range(16)))
    bus.attach(dev)
    return bus, dev


def test_signature_ram_cpus():
    bus, _ = make(96 << 20)
    assert read_item(bus, 0x00, 4) == b"QEMU"
    assert int.from_bytes(read_item(bus, 0x03, 8), "little") == 96 << 20
    assert int.from_bytes(read_item(bus, 0x05, 2), "little") == 1
    assert int.from_bytes(read_item(bus, 0x0F, 2), "little") == 1
    assert int.from_bytes(read_item(bus, 0x01, 4), "little") == 1   # no DMA interface
    assert read_item(bus, 0x02, 16) == bytes(range(16))


def test_reading_past_the_end_or_an_unknown_key_reads_zero_and_select_rewinds():
    bus, dev = make()
    assert read_item(bus, 0x00, 6) == b"QEMU\0\0"
    assert read_item(bus, 0x1234, 3) == b"\0\0\0"
    assert read_item(bus, 0x00, 2) == b"QE"
    assert dev.selects == 3


def test_wide_data_reads_take_successive_bytes():
    bus, _ = make()
    bus.write(0x510, 2, 0)
    assert bus.read(0x511, 4) == int.from_bytes(b"QEMU", "little")


def test_kernel_items_as_qemu_multiboot_passes_them():
    bus, dev = make()
    dev.add_kernel(0x100000, 0x100020, b"\x90" * 10, 0x9500, b"\x4f\x02" + bytes(86))
    assert int.from_bytes(read_item(bus, 0x07, 4), "little") == 0x100000
    assert int.from_bytes(read_item(bus, 0x08, 4), "little") == 10
    assert int.from_bytes(read_item(bus, 0x10, 4), "little") == 0x100020
    assert read_item(bus, 0x11, 10) == b"\x90" * 10
    assert int.from_bytes(read_item(bus, 0x0A, 4), "little") == 0x9500
    assert read_item(bus, 0x12, 2) == b"\x4f\x02"
