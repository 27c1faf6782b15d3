"""QEMU's isa-debug-exit: a write-only port that ends the VM with a status."""

from __future__ import annotations

from collections.abc import Callable

from hvmodel.devices.bus import SIZE_MASK


class DebugExit:
    """isa-debug-exit at ``iobase`` (0xf4), ``iosize`` ports (1, as in QEMU tests).

    A write of ``v`` calls ``on_exit(v & mask)`` where ``mask`` is all ones for
    the access size (so ``out 0xf4, al`` reports AL). QEMU would terminate with
    status ``(v << 1) | 1`` so that no guest can fake a clean exit; hvmodel
    reports ``v`` itself because the guest's status is what tests compare.
    The last status written is kept in ``status``. Reads return all ones.

    ``on_exit`` may raise (e.g. to stop emulation); the exception propagates
    out of the ``OUT``. ``status`` is set before it is called.
    """

    def __init__(self, on_exit: Callable[[int], None], iobase: int = 0xF4, iosize: int = 1) -> None:
        self.on_exit = on_exit
        self.ports = range(iobase, iobase + iosize)
        self.status: int | None = None

    def read(self, port: int, size: int) -> int:
        return SIZE_MASK.get(size, 0xFF)

    def write(self, port: int, size: int, value: int) -> None:
        self.status = value & SIZE_MASK.get(size, 0xFF)
        self.on_exit(self.status)
