"""8259A pair: initialisation, masking, priority, EOI, cascade, spurious."""

import pytest

from hvmodel.devices.pic import Pic8259Pair


def init(pic, base1=0x20, base2=0x28, icw4=0x01):
    """The Linux/OSDev initialisation sequence."""
    pic.write(0x20, 1, 0x11)  # ICW1: init, ICW4 needed
    pic.write(0xA0, 1, 0x11)
    pic.write(0x21, 1, base1)  # ICW2: vector offset
    pic.write(0xA1, 1, base2)
    pic.write(0x21, 1, 0x04)  # ICW3: slave on IR2
    pic.write(0xA1, 1, 0x02)  # ICW3: cascade identity 2
    pic.write(0x21, 1, icw4)  # ICW4: 8086 mode
    pic.write(0xA1, 1, icw4)


def eoi(pic, slave=False):
    if slave:
        pic.write(0xA0, 1, 0x20)
    pic.write(0x20, 1, 0x20)


def test_masked_before_init():
    pic = Pic8259Pair()
    assert pic.read(0x21, 1) == 0xFF
    assert pic.read(0xA1, 1) == 0xFF
    pic.raise_irq(0)
    assert pic.pending() is None


def test_icw_sequence_sets_vector_offset():
    pic = Pic8259Pair()
    init(pic)
    pic.raise_irq(0)
    assert pic.pending() == 0x20
    assert pic.ack() == 0x20


def test_icw1_clears_imr_and_irr():
    pic = Pic8259Pair()
    pic.raise_irq(1)
    init(pic)
    assert pic.read(0x21, 1) == 0x00
    assert pic.pending() is None  # the edge latched before ICW1 is gone


def test_vector_base_low_bits_ignored():
    pic = Pic8259Pair()
    init(pic, base1=0x27)
    pic.raise_irq(3)
    assert pic.ack() == 0x23


def test_imr_masks_and_keeps_request():
    pic = Pic8259Pair()
    init(pic)
    pic.write(0x21, 1, 0x01)
    assert pic.read(0x21, 1) == 0x01
    pic.raise_irq(0)
    assert pic.pending() is None
    pic.write(0x21, 1, 0x00)
    assert pic.pending() == 0x20


def test_lower_irq_number_wins():
    pic = Pic8259Pair()
    init(pic)
    pic.raise_irq(4)
    pic.raise_irq(1)
    assert pic.ack() == 0x21


def test_in_service_blocks_equal_and_lower_priority():
    pic = Pic8259Pair()
    init(pic)
    pic.raise_irq(3)
    assert pic.ack() == 0x23
    pic.raise_irq(3)
    pic.raise_irq(5)
    assert pic.pending() is None
    pic.raise_irq(1)  # higher priority nests
    assert pic.ack() == 0x21


def test_nonspecific_eoi_clears_highest_in_service():
    pic = Pic8259Pair()
    init(pic)
    pic.raise_irq(3)
    pic.ack()
    pic.raise_irq(1)
    pic.ack()
    pic.write(0x20, 1, 0x0B)  # OCW3: read ISR
    assert pic.read(0x20, 1) == 0b1010
    eoi(pic)
    assert pic.read(0x20, 1) == 0b1000
    eoi(pic)
    assert pic.read(0x20, 1) == 0


def test_specific_eoi():
    pic = Pic8259Pair()
    init(pic)
    pic.raise_irq(3)
    pic.ack()
    pic.raise_irq(1)
    pic.ack()
    pic.write(0x20, 1, 0x63)  # specific EOI for IR3
    pic.write(0x20, 1, 0x0B)
    assert pic.read(0x20, 1) == 0b0010


def test_eoi_unblocks_next_request():
    pic = Pic8259Pair()
    init(pic)
    pic.raise_irq(0)
    pic.ack()
    pic.raise_irq(0)
    assert pic.pending() is None
    eoi(pic)
    assert pic.pending() == 0x20


def test_ocw3_reads_irr():
    pic = Pic8259Pair()
    init(pic)
    pic.write(0x21, 1, 0xFF)
    pic.raise_irq(5)
    pic.write(0x20, 1, 0x0A)
    assert pic.read(0x20, 1) == 0x20


def test_slave_cascade_delivers_offset2():
    pic = Pic8259Pair()
    init(pic)
    pic.raise_irq(12)
    assert pic.pending() == 0x2C
    assert pic.ack() == 0x2C
    pic.write(0xA0, 1, 0x0B)
    pic.write(0x20, 1, 0x0B)
    assert pic.read(0xA0, 1) == 0x10  # slave IR4 in service
    assert pic.read(0x20, 1) == 0x04  # and master IR2


def test_slave_needs_eoi_on_both_chips():
    pic = Pic8259Pair()
    init(pic)
    pic.raise_irq(8)
    pic.ack()
    pic.raise_irq(8)
    pic.write(0xA0, 1, 0x20)
    assert pic.pending() is None  # master IR2 still in service
    pic.write(0x20, 1, 0x20)
    assert pic.pending() == 0x28


def test_cascade_priority_between_master_lines():
    pic = Pic8259Pair()
    init(pic)
    pic.raise_irq(3)
    pic.raise_irq(15)
    pic.raise_irq(1)
    assert pic.ack() == 0x21
    eoi(pic)
    assert pic.ack() == 0x2F
    eoi(pic, slave=True)
    assert pic.ack() == 0x23


def test_masking_cascade_input_hides_slave():
    pic = Pic8259Pair()
    init(pic)
    pic.write(0x21, 1, 0x04)
    pic.raise_irq(9)
    assert pic.pending() is None


def test_spurious_vectors():
    pic = Pic8259Pair()
    init(pic)
    assert pic.ack() == 0x27
    pic.write(0x20, 1, 0x0B)
    assert pic.read(0x20, 1) == 0  # spurious sets no ISR bit


def test_auto_eoi():
    pic = Pic8259Pair()
    init(pic, icw4=0x03)
    pic.raise_irq(0)
    assert pic.ack() == 0x20
    pic.raise_irq(0)
    assert pic.pending() == 0x20  # nothing in service to block it


def test_poll_command_acknowledges():
    pic = Pic8259Pair()
    init(pic)
    pic.raise_irq(6)
    pic.write(0x20, 1, 0x0C)  # OCW3 poll
    assert pic.read(0x20, 1) == 0x86
    assert pic.pending() is None


def test_irq2_is_the_cascade():
    with pytest.raises(ValueError):
        Pic8259Pair().raise_irq(2)
