"""16550 UART: registers, output capture, receive queue, interrupts."""

from hvmodel.devices.uart import Uart16550

BASE = 0x3F8
THR = RBR = DLL = BASE
IER = DLM = BASE + 1
IIR = FCR = BASE + 2
LCR, MCR, LSR, MSR, SCR = BASE + 3, BASE + 4, BASE + 5, BASE + 6, BASE + 7


def out(u, port, value):
    u.write(port, 1, value)


def inb(u, port):
    return u.read(port, 1)


def test_ports_are_com1():
    assert list(Uart16550().ports) == list(range(0x3F8, 0x400))


def test_transmit_captured_and_echoed_per_byte():
    echoed = []
    u = Uart16550(echo=echoed.append)
    for b in b"hi\n":
        out(u, THR, b)
    assert u.output == bytearray(b"hi\n")
    assert echoed == [b"h", b"i", b"\n"]


def test_lsr_transmitter_always_empty():
    u = Uart16550()
    assert inb(u, LSR) & 0x60 == 0x60
    out(u, THR, 0x41)
    assert inb(u, LSR) == 0x60  # THRE | TEMT, no data ready


def test_lsr_data_ready_and_receive():
    u = Uart16550()
    u.feed(b"ok")
    assert inb(u, LSR) & 0x01
    assert inb(u, RBR) == ord("o")
    assert inb(u, RBR) == ord("k")
    assert inb(u, LSR) & 0x01 == 0


def test_dlab_divisor_round_trip():
    u = Uart16550()
    out(u, IER, 0x00)
    out(u, LCR, 0x83)  # DLAB on, 8N1
    out(u, DLL, 0x01)
    out(u, DLM, 0x02)
    assert inb(u, DLL) == 0x01
    assert inb(u, DLM) == 0x02
    out(u, LCR, 0x03)  # DLAB off: back to THR/IER
    assert u.divisor == 0x0201
    assert inb(u, IER) == 0x00
    assert inb(u, LCR) == 0x03


def test_dlab_write_does_not_transmit():
    u = Uart16550()
    out(u, LCR, 0x80)
    out(u, THR, 0x03)
    assert u.output == bytearray()


def test_scratch_register():
    u = Uart16550()
    out(u, SCR, 0xA5)
    assert inb(u, SCR) == 0xA5


def test_iir_idle_and_fifo_bits():
    u = Uart16550()
    assert inb(u, IIR) == 0x01
    out(u, FCR, 0x07)  # enable and clear FIFOs
    assert inb(u, IIR) == 0xC1


def test_msr_lines_asserted():
    assert inb(Uart16550(), MSR) == 0xB0  # DCD, DSR, CTS


def test_loopback_sends_to_receiver():
    u = Uart16550()
    out(u, MCR, 0x1F)  # loop + all outputs
    out(u, THR, 0x55)
    assert u.output == bytearray()
    assert inb(u, RBR) == 0x55
    assert inb(u, MSR) == 0xF0


def test_thre_interrupt_on_enable_and_each_byte():
    irqs = []
    u = Uart16550(irq=irqs.append)
    out(u, IER, 0x02)
    assert irqs == [4]  # THR is empty at once
    assert inb(u, IIR) == 0x02
    assert not u.interrupt_pending  # reading IIR cleared THRE
    out(u, THR, 0x41)
    out(u, THR, 0x42)
    assert irqs == [4, 4, 4]


def test_no_interrupt_without_ier():
    irqs = []
    u = Uart16550(irq=irqs.append)
    out(u, THR, 0x41)
    u.feed(b"x")
    assert irqs == []
    assert inb(u, IIR) == 0x01


def test_rx_interrupt_has_priority_over_thre():
    irqs = []
    u = Uart16550(irq=irqs.append)
    out(u, IER, 0x03)
    u.feed(b"x")
    assert inb(u, IIR) == 0x04
    inb(u, RBR)
    assert inb(u, IIR) == 0x02


def test_rx_interrupt_edge_per_burst():
    irqs = []
    u = Uart16550(irq=irqs.append)
    out(u, IER, 0x01)
    u.feed(b"ab")
    u.feed(b"c")  # level already high: no new edge
    assert irqs == [4]
    for _ in range(3):
        inb(u, RBR)
    u.feed(b"d")
    assert irqs == [4, 4]


def test_fcr_clears_receive_fifo():
    u = Uart16550()
    u.feed(b"junk")
    out(u, FCR, 0x03)
    assert inb(u, LSR) & 0x01 == 0


def test_wide_access_splits_into_registers():
    u = Uart16550()
    u.write(MCR, 2, 0x0B_03)  # MCR = 0x03 ... LSR write ignored
    assert inb(u, MCR) == 0x03
    assert u.read(LSR, 2) == 0xB0_60  # LSR, then MSR
