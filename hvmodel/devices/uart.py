"""A 16550A UART (COM1) with an infinitely fast transmitter.

Register map (offset from the base, DLAB = LCR bit 7):

====== ================ ==================
offset read             write
====== ================ ==================
0      RBR (DLAB: DLL)  THR (DLAB: DLL)
1      IER (DLAB: DLM)  IER (DLAB: DLM)
2      IIR              FCR
3      LCR              LCR
4      MCR              MCR
5      LSR              (ignored)
6      MSR              (ignored)
7      SCR              SCR
====== ================ ==================

What is modelled, and what deliberately is not:

* Transmit completes at once, so LSR.THRE and LSR.TEMT are always set and a
  polling guest never waits. Line speed (the divisor) and format (LCR) are
  stored for read-back only.
* Receive data comes from ``feed()`` into an unbounded queue: the host side
  never overruns, so LSR.OE and the other error bits stay clear. With the
  FIFO on, the RX-data interrupt is raised as soon as any byte is queued (as
  if the trigger level or character timeout had already passed).
* Interrupt sources: RX data available (IER bit 0) and THR empty (IER bit 1).
  Line-status and modem-status interrupts never occur (no errors, and the
  modem lines never change). As in QEMU, MCR.OUT2 does not gate the line,
  so a guest that forgets OUT2 still gets IRQ 4.
* MCR loopback (bit 4) is modelled because UART probes use it: transmitted
  bytes go to the receive queue instead of ``output``, and MSR reflects the
  MCR outputs. Outside loopback, MSR shows DCD, DSR and CTS asserted (a
  terminal is always attached).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from hvmodel.devices.bus import split_read, split_write

COM1_BASE = 0x3F8
COM1_IRQ = 4

# Register offsets.
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDI = 0x01  # received data available
IER_THRI = 0x02  # transmitter holding register empty

IIR_NO_INT = 0x01
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_FIFO_ON = 0xC0

FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02

LCR_DLAB = 0x80

MCR_LOOP = 0x10

LSR_DR = 0x01
LSR_THRE = 0x20
LSR_TEMT = 0x40

MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80


class Uart16550:
    """16550A UART at ``base`` (COM1: 0x3f8, 8 ports), raising ``irq_line`` (4).

    Transmitted bytes are appended to ``output`` and passed to ``echo`` one
    byte at a time (``echo(b"x")`` per ``OUT`` to THR), so a console sees
    output exactly as the guest produced it, and a crash mid-line loses nothing.

    Interrupts: the 16550's INTR pin is a *level* (high while any enabled
    source is pending). The PIC here is edge triggered, so ``irq(irq_line)``
    is called on each low-to-high transition of that level; the current level
    is ``interrupt_pending``. Because the transmitter empties instantly, every
    THR write with IER.THRI set produces a fresh edge (the write clears the
    THRE interrupt, the byte leaves, THRE is pending again), as a real UART
    would one character time later. Enabling IER.THRI also raises it at once
    (the THR is already empty), as on the 16550A. Reading IIR while it reports
    THRE clears that source, as does writing THR.
    """

    def __init__(
        self,
        base: int = COM1_BASE,
        irq: Callable[[int], None] | None = None,
        echo: Callable[[bytes], None] | None = None,
        irq_line: int = COM1_IRQ,
    ) -> None:
        self.base = base
        self.ports = range(base, base + 8)
        self.irq = irq
        self.echo = echo
        self.irq_line = irq_line
        self.output = bytearray()
        self._rx: deque[int] = deque()
        self._last_rx = 0
        self.ier = 0
        self.lcr = 0x03  # 8N1: the usual power-on format; only read back
        self.mcr = 0
        self.scr = 0
        self.fcr = 0
        # 115200 / 12 = 9600 baud, what PC firmware leaves; only read back.
        self.divisor = 12
        self._thr_ipending = False
        self._level = False

    # -- host side ------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Queue ``data`` as if received on the line."""
        self._rx.extend(data)
        self._update_irq()

    @property
    def interrupt_pending(self) -> bool:
        """Level of the INTR output: an enabled interrupt source is pending."""
        return self._iir_source() != IIR_NO_INT

    # -- guest side -----------------------------------------------------------

    def read(self, port: int, size: int) -> int:
        return split_read(self._read_byte, port, size)

    def write(self, port: int, size: int, value: int) -> None:
        split_write(self._write_byte, port, size, value)

    def _read_byte(self, port: int) -> int:
        off = port - self.base
        dlab = self.lcr & LCR_DLAB
        if off == RBR:
            if dlab:
                return self.divisor & 0xFF
            if self._rx:
                self._last_rx = self._rx.popleft()
                self._update_irq()
            # An empty RBR still holds the last byte received, as the hardware does.
            return self._last_rx
        if off == IER:
            return (self.divisor >> 8) & 0xFF if dlab else self.ier
        if off == IIR:
            source = self._iir_source()
            if source == IIR_THRI:
                # Reading IIR is one of the two ways to clear a THRE interrupt.
                self._thr_ipending = False
                self._update_irq()
            return source | (IIR_FIFO_ON if self.fcr & FCR_ENABLE else 0)
        if off == LCR:
            return self.lcr
        if off == MCR:
            return self.mcr
        if off == LSR:
            return LSR_THRE | LSR_TEMT | (LSR_DR if self._rx else 0)
        if off == MSR:
            return self._msr()
        if off == SCR:
            return self.scr
        return 0xFF  # part of a wide access that ran past the last register

    def _write_byte(self, port: int, value: int) -> None:
        off = port - self.base
        dlab = self.lcr & LCR_DLAB
        if off == THR:
            if dlab:
                self.divisor = (self.divisor & 0xFF00) | value
            else:
                self._transmit(value)
        elif off == IER:
            if dlab:
                self.divisor = (self.divisor & 0x00FF) | (value << 8)
            else:
                old = self.ier
                self.ier = value & 0x0F
                if self.ier & IER_THRI and not old & IER_THRI:
                    self._thr_ipending = True  # THR is always empty
                elif not self.ier & IER_THRI:
                    self._thr_ipending = False
                self._update_irq()
        elif off == FCR:
            self.fcr = value & 0xC9  # enable, DMA mode, trigger level
            if value & FCR_CLEAR_RX:
                self._rx.clear()
            self._update_irq()
        elif off == LCR:
            self.lcr = value
        elif off == MCR:
            self.mcr = value & 0x1F
        elif off == SCR:
            self.scr = value
        # LSR and MSR writes are ignored (factory test use only).

    def _transmit(self, byte: int) -> None:
        self._thr_ipending = False
        self._update_irq()  # the level drops, so the next THRE is a new edge
        if self.mcr & MCR_LOOP:
            self._rx.append(byte)
        else:
            self.output.append(byte)
            if self.echo is not None:
                self.echo(bytes((byte,)))
        # Sent in zero time: THR is empty again.
        if self.ier & IER_THRI:
            self._thr_ipending = True
        self._update_irq()

    def _msr(self) -> int:
        if self.mcr & MCR_LOOP:
            # Loopback wires RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD.
            m = self.mcr
            return (
                (MSR_CTS if m & 0x02 else 0)
                | (MSR_DSR if m & 0x01 else 0)
                | (MSR_RI if m & 0x04 else 0)
                | (MSR_DCD if m & 0x08 else 0)
            )
        return MSR_DCD | MSR_DSR | MSR_CTS

    def _iir_source(self) -> int:
        # Priority: RX data above THR empty (line/modem status never happen).
        if self._rx and self.ier & IER_RDI:
            return IIR_RDI
        if self._thr_ipending and self.ier & IER_THRI:
            return IIR_THRI
        return IIR_NO_INT

    def _update_irq(self) -> None:
        level = self._iir_source() != IIR_NO_INT
        if level and not self._level and self.irq is not None:
            self.irq(self.irq_line)
        self._level = level
