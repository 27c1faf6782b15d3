"""The Bochs/QEMU shutdown port 0x8900: writing the bytes of "Shutdown" powers off.

Bochs (and QEMU's PC before 2.x) watch this port: each byte that continues the
string advances a match, any other byte restarts it, and the final ``n`` turns
the machine off — status 0 here, as a clean power-off.
"""

from __future__ import annotations

from collections.abc import Callable

SHUTDOWN_PORT = 0x8900
MAGIC = b"Shutdown"


class BochsShutdown:
    """Port 0x8900: calls ``on_shutdown()`` when "Shutdown" has been written."""

    ports = (SHUTDOWN_PORT,)

    def __init__(self, on_shutdown: Callable[[], None]) -> None:
        self.on_shutdown = on_shutdown
        self.matched = 0

    def read(self, port: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, port: int, size: int, value: int) -> None:
        for i in range(size):  # a wide write delivers its bytes in order
            byte = (value >> (8 * i)) & 0xFF
            if byte == MAGIC[self.matched]:
                self.matched += 1
                if self.matched == len(MAGIC):
                    self.matched = 0
                    self.on_shutdown()
            else:
                self.matched = 1 if byte == MAGIC[0] else 0
