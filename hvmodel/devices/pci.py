"""PCI configuration mechanism #1 (0xCF8 address, 0xCFC-0xCFF data) with no devices.

The address register latches what the guest writes (bits 31 enable, 23:16 bus,
15:11 device, 10:8 function, 7:2 register) and reads it back; every
configuration read answers all ones — vendor ID 0xFFFF, "no device here" — so a
guest's bus scan finds nothing; configuration writes go nowhere. Byte and word
accesses to the data ports read the matching bytes of all ones. Each
configuration access is counted.
"""

from __future__ import annotations

from hvmodel.devices.bus import SIZE_MASK

PCI_CONFIG_ADDRESS = 0xCF8
PCI_CONFIG_DATA = 0xCFC


class PciHostNoDevices:
    """A PCI host bridge whose configuration space is empty."""

    ports = (*range(PCI_CONFIG_ADDRESS, PCI_CONFIG_ADDRESS + 4), *range(PCI_CONFIG_DATA, PCI_CONFIG_DATA + 4))

    def __init__(self) -> None:
        self.address = 0
        self.config_reads = 0
        self.config_writes = 0

    def read(self, port: int, size: int) -> int:
        if port == PCI_CONFIG_ADDRESS and size == 4:
            return self.address
        if port >= PCI_CONFIG_DATA:
            self.config_reads += 1
        return SIZE_MASK[size]

    def write(self, port: int, size: int, value: int) -> None:
        if port == PCI_CONFIG_ADDRESS and size == 4:
            self.address = value & 0x80FFFFFC
        elif port >= PCI_CONFIG_DATA:
            self.config_writes += 1
