"""The x86 I/O port space: 64K byte-addressed ports and the devices behind them.

``IN``/``OUT`` exits land here, so dispatch is one dict lookup. An access of
``size`` bytes (1, 2 or 4) is handed whole to the device owning its *first*
port; devices made of byte registers (UART, PIT, PIC) split it themselves with
``split_read``/``split_write``, which is what an ISA bus does to a wide access
(and what QEMU's memory API does for regions with a 1-byte max access size).

Nothing decodes an unclaimed port, so reads float high and writes vanish, as on
a PC. They are counted so a test or ``hvmodel run`` can report a guest poking
hardware we do not model. Port 0x80 is the POST-code port that BIOSes and Linux
(``outb_p``) write as an I/O delay; it is too common to be news, so its writes
get their own counter.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

PORT_POST = 0x80

# All ones for each access size: what an undriven ISA data bus reads as.
SIZE_MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF}


@runtime_checkable
class PortDevice(Protocol):
    """A device that claims some I/O ports.

    ``ports`` lists every port the device decodes (a tuple or a ``range``).
    ``read``/``write`` get the port actually accessed and the access size in
    bytes; ``read`` returns a value that the bus masks to ``size``.
    """

    # A read-only property so that a plain ``self.ports = range(...)`` or a
    # tuple attribute satisfies the protocol for type checkers.
    @property
    def ports(self) -> Sequence[int]: ...

    def read(self, port: int, size: int) -> int: ...

    def write(self, port: int, size: int, value: int) -> None: ...


def split_read(read_byte: Callable[[int], int], port: int, size: int) -> int:
    """Read ``size`` consecutive byte ports starting at ``port``, little endian.

    ``read_byte`` must return 0xff for ports its device does not decode, so a
    wide access running off the end of a device reads open bus for those bytes.
    """
    value = 0
    for i in range(size):
        value |= (read_byte(port + i) & 0xFF) << (8 * i)
    return value


def split_write(write_byte: Callable[[int, int], None], port: int, size: int, value: int) -> None:
    """Write ``value`` to ``size`` consecutive byte ports, low byte first."""
    for i in range(size):
        write_byte(port + i, (value >> (8 * i)) & 0xFF)


def _check(port: int, size: int) -> None:
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"I/O port {port:#x} out of range")
    if size not in SIZE_MASK:
        raise ValueError(f"I/O access size {size} is not 1, 2 or 4")


class IOBus:
    """The I/O port address space, dispatching accesses to attached devices.

    Attributes:
        unknown_reads: ``Counter`` port -> number of reads nobody decoded
            (``unknown_reads.total()`` is the overall count).
        unknown_writes: the same for writes (port 0x80 excluded).
        port80_writes: writes to the POST-code port 0x80 when no device claims it.
    """

    def __init__(self) -> None:
        self._map: dict[int, PortDevice] = {}
        self.devices: list[PortDevice] = []
        self.unknown_reads: Counter[int] = Counter()
        self.unknown_writes: Counter[int] = Counter()
        self.port80_writes = 0

    def attach(self, dev: PortDevice) -> None:
        """Claim ``dev.ports`` for ``dev``; overlapping another device is a ValueError."""
        ports = list(dev.ports)
        for port in ports:
            if not 0 <= port <= 0xFFFF:
                raise ValueError(f"{type(dev).__name__}: port {port:#x} out of range")
            other = self._map.get(port)
            if other is not None:
                raise ValueError(
                    f"{type(dev).__name__}: port {port:#x} already claimed by {type(other).__name__}"
                )
        # Check everything before claiming anything, so a failed attach leaves
        # the bus unchanged.
        for port in ports:
            self._map[port] = dev
        self.devices.append(dev)

    def device_at(self, port: int) -> PortDevice | None:
        """The device decoding ``port``, or None."""
        return self._map.get(port)

    def read(self, port: int, size: int) -> int:
        """An ``IN`` of ``size`` bytes from ``port``."""
        _check(port, size)
        mask = SIZE_MASK[size]
        dev = self._map.get(port)
        if dev is None:
            self.unknown_reads[port] += 1
            return mask
        return dev.read(port, size) & mask

    def write(self, port: int, size: int, value: int) -> None:
        """An ``OUT`` of ``size`` bytes of ``value`` to ``port``."""
        _check(port, size)
        dev = self._map.get(port)
        if dev is None:
            if port == PORT_POST:
                self.port80_writes += 1
            else:
                self.unknown_writes[port] += 1
            return
        dev.write(port, size, value & SIZE_MASK[size])
