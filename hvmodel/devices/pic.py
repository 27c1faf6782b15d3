"""The PC's cascaded pair of 8259A interrupt controllers.

Master at 0x20/0x21 (IRQ 0-7), slave at 0xa0/0xa1 (IRQ 8-15) wired to master
input 2. Both are edge triggered: ``raise_irq`` is a rising edge and latches
the IRR bit, which stays set (even while masked) until the CPU acknowledges it.

Programming model (8259A datasheet; the behaviour QEMU's i8259 implements):

* Command port, bit 4 set: ICW1. Starts initialisation and, as the datasheet
  says, clears IMR, ISR and the latched IRR (the edge detectors are reset),
  resets priority so IR0 is highest, and selects IRR for reads. Then the data
  port takes ICW2 (vector base, low 3 bits ignored), ICW3 unless ICW1 said
  single mode (stored, but the cascade is always the PC's master IR2), and
  ICW4 if ICW1 asked for it (bit 1 auto-EOI, bit 4 special fully nested mode;
  8086 mode is assumed, and LTIM level triggering in ICW1 is ignored).
* Data port outside initialisation: OCW1, the IMR (read back on reads).
* Command port, bits 4:3 = 00: OCW2. 0x20 non-specific EOI, 0x60|n specific
  EOI, plus the rotation commands (0xa0, 0xe0|n, 0xc0|n, 0x80/0x00).
* Command port, bits 4:3 = 01: OCW3. 0x0a/0x0b select IRR/ISR for command
  port reads, bit 2 is the poll command, 0x68/0x48 set/clear special mask mode.

State before initialisation: vector bases 0x08 and 0x70 (where a BIOS leaves
them) and IMR = 0xff on both chips. QEMU resets IMR to 0 and relies on its
BIOS to program the PIC; hvmodel has no BIOS, and every guest here initialises
the PIC itself, so until it does no IRQ is delivered to vectors it never chose
(vector 8 is #DF in long mode). Note that the guest's ICW1 then clears IMR, as
on the hardware, so a guest that wants IRQs masked after initialisation must
write OCW1 afterwards.
"""

from __future__ import annotations

from hvmodel.devices.bus import split_read, split_write

MASTER_PORTS = (0x20, 0x21)
SLAVE_PORTS = (0xA0, 0xA1)
CASCADE_IRQ = 2


def _priority(pri_base: int, mask: int) -> int:
    """Priority level (0 = highest) of the best bit set in ``mask``; 8 if none.

    ``pri_base`` is the IR line that currently has the highest priority
    (0 unless rotated); levels go round from it.
    """
    if not mask:
        return 8
    for level in range(8):
        if mask & (1 << ((level + pri_base) & 7)):
            return level
    return 8  # unreachable: mask is a nonzero byte


class Pic8259:
    """One 8259A. Used through ``Pic8259Pair``; exposed for inspection."""

    def __init__(self, vector_base: int, is_master: bool) -> None:
        self.is_master = is_master
        self.vector_base = vector_base
        self.irr = 0
        self.imr = 0xFF
        self.isr = 0
        self.pri_base = 0  # IR line with the highest priority
        self.icw3 = 1 << CASCADE_IRQ if is_master else CASCADE_IRQ
        self.init_step = 0  # 0 = operational, 2/3/4 = expecting that ICW
        self.single = False
        self.need_icw4 = False
        self.auto_eoi = False
        self.rotate_on_auto_eoi = False
        self.special_fully_nested = False
        self.special_mask = False
        self.read_isr = False
        self.poll = False

    def best_request(self, irr: int) -> int | None:
        """The IR line this chip would signal for request bits ``irr``, or None.

        A request is signalled if it is unmasked and of higher priority than
        everything in service. Special mask mode lets masked in-service levels
        stop blocking; special fully nested mode lets the master take a new
        request from the slave while an earlier slave interrupt is in service.
        """
        level = _priority(self.pri_base, irr & ~self.imr)
        if level == 8:
            return None
        in_service = self.isr
        if self.special_mask:
            in_service &= ~self.imr
        if self.special_fully_nested and self.is_master:
            in_service &= ~(1 << CASCADE_IRQ)
        if level < _priority(self.pri_base, in_service):
            return (level + self.pri_base) & 7
        return None

    def intack(self, irq: int) -> None:
        """Accept request ``irq`` (INTA or poll): IRR -> ISR, or auto-EOI."""
        bit = 1 << irq
        self.irr &= ~bit  # edge triggered: the latched edge is consumed
        if self.auto_eoi:
            if self.rotate_on_auto_eoi:
                self.pri_base = (irq + 1) & 7
        else:
            self.isr |= bit

    def write_command(self, value: int) -> None:
        if value & 0x10:
            self._icw1(value)
        elif value & 0x08:
            self._ocw3(value)
        else:
            self._ocw2(value)

    def write_data(self, value: int) -> None:
        step = self.init_step
        if step == 0:
            self.imr = value
        elif step == 2:
            self.vector_base = value & 0xF8
            self.init_step = 3 if not self.single else (4 if self.need_icw4 else 0)
        elif step == 3:
            self.icw3 = value
            self.init_step = 4 if self.need_icw4 else 0
        else:
            self.auto_eoi = bool(value & 0x02)
            self.special_fully_nested = bool(value & 0x10)
            self.init_step = 0

    def _icw1(self, value: int) -> None:
        self.irr = 0
        self.imr = 0
        self.isr = 0
        self.pri_base = 0
        self.special_mask = False
        self.read_isr = False
        self.poll = False
        self.rotate_on_auto_eoi = False
        # Without ICW4 its functions are all zero.
        self.auto_eoi = False
        self.special_fully_nested = False
        self.single = bool(value & 0x02)
        self.need_icw4 = bool(value & 0x01)
        self.init_step = 2

    def _ocw2(self, value: int) -> None:
        cmd = value >> 5
        if cmd in (1, 5):  # non-specific EOI (5: and rotate)
            level = _priority(self.pri_base, self.isr)
            if level == 8:
                return
            irq = (level + self.pri_base) & 7
            self.isr &= ~(1 << irq)
            if cmd == 5:
                self.pri_base = (irq + 1) & 7
        elif cmd in (3, 7):  # specific EOI (7: and rotate)
            irq = value & 7
            self.isr &= ~(1 << irq)
            if cmd == 7:
                self.pri_base = (irq + 1) & 7
        elif cmd == 6:  # set priority: IR n becomes the lowest
            self.pri_base = (value + 1) & 7
        elif cmd == 4:
            self.rotate_on_auto_eoi = True
        elif cmd == 0:
            self.rotate_on_auto_eoi = False
        # cmd 2 is a no-op.

    def _ocw3(self, value: int) -> None:
        if value & 0x04:
            self.poll = True
        if value & 0x02:
            self.read_isr = bool(value & 0x01)
        if value & 0x40:
            self.special_mask = bool(value & 0x20)


class Pic8259Pair:
    """Master and slave 8259A at 0x20/0x21 and 0xa0/0xa1, slave on master IR2.

    ``raise_irq(n)`` is an edge on IRQ n (0-15 except 2, the cascade input).
    ``pending()`` is the vector the CPU would get if it took an interrupt now
    (the INTR line is asserted iff it is not None); ``ack()`` performs the
    INTA cycle and returns the vector. With nothing to deliver, ``ack()``
    returns the spurious vector, master base + 7, as the hardware does when
    a request vanishes before INTA; a slave with nothing left would give
    slave base + 7, but here requests cannot vanish between ``pending()``
    and ``ack()``.

    The cascade line is the slave's INT output, computed on demand rather than
    latched into the master's IRR, so masking or EOIing on the slave takes
    effect on the master immediately.
    """

    def __init__(self) -> None:
        self.master = Pic8259(0x08, is_master=True)
        self.slave = Pic8259(0x70, is_master=False)
        self.ports = MASTER_PORTS + SLAVE_PORTS

    # -- device side ------------------------------------------------------------

    def raise_irq(self, irq: int) -> None:
        """A rising edge on IRQ ``irq`` (0-15): latch it in the IRR."""
        if not 0 <= irq <= 15 or irq == CASCADE_IRQ:
            raise ValueError(f"IRQ {irq} is not a PC interrupt input (2 is the cascade)")
        if irq < 8:
            self.master.irr |= 1 << irq
        else:
            self.slave.irr |= 1 << (irq - 8)

    def _master_irr(self) -> int:
        slave_int = self.slave.best_request(self.slave.irr) is not None
        return self.master.irr | (1 << CASCADE_IRQ if slave_int else 0)

    # -- CPU side -----------------------------------------------------------------

    def pending(self) -> int | None:
        """Vector the CPU would receive now, without acknowledging; None if INTR is low."""
        irq = self.master.best_request(self._master_irr())
        if irq is None:
            return None
        if irq == CASCADE_IRQ:
            sirq = self.slave.best_request(self.slave.irr)
            assert sirq is not None  # the cascade bit is set only if so
            return self.slave.vector_base + sirq
        return self.master.vector_base + irq

    def ack(self) -> int:
        """The INTA cycle: move the best request to the ISR and return its vector."""
        irq = self.master.best_request(self._master_irr())
        if irq is None:
            return self.master.vector_base + 7
        if irq != CASCADE_IRQ:
            self.master.intack(irq)
            return self.master.vector_base + irq
        sirq = self.slave.best_request(self.slave.irr)
        self.master.intack(CASCADE_IRQ)
        if sirq is None:
            return self.slave.vector_base + 7
        self.slave.intack(sirq)
        return self.slave.vector_base + sirq

    # -- port interface -------------------------------------------------------------

    def read(self, port: int, size: int) -> int:
        return split_read(self._read_byte, port, size)

    def write(self, port: int, size: int, value: int) -> None:
        split_write(self._write_byte, port, size, value)

    def _chip(self, port: int) -> Pic8259 | None:
        if port in MASTER_PORTS:
            return self.master
        if port in SLAVE_PORTS:
            return self.slave
        return None

    def _read_byte(self, port: int) -> int:
        chip = self._chip(port)
        if chip is None:
            return 0xFF
        if chip.poll:
            # Poll command: this read is the acknowledge. 0x80|n, or 0 if none.
            chip.poll = False
            irr = self._master_irr() if chip.is_master else chip.irr
            irq = chip.best_request(irr)
            if irq is None:
                return 0
            chip.intack(irq)
            return 0x80 | irq
        if port & 1:
            return chip.imr
        if chip.read_isr:
            return chip.isr
        return self._master_irr() if chip.is_master else chip.irr

    def _write_byte(self, port: int, value: int) -> None:
        chip = self._chip(port)
        if chip is None:
            return
        if port & 1:
            chip.write_data(value)
        else:
            chip.write_command(value)
