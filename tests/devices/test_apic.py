"""Local APIC registers and its timer in instruction time."""

from hvmodel.devices.apic import APIC_VERSION, LocalApic


def make():
    t = [0]
    return LocalApic(lambda: t[0]), t


def test_id_version_svr_reset_values():
    a, _ = make()
    assert a.read(0x20, 4) == 0 and a.read(0x30, 4) == APIC_VERSION
    assert a.read(0xF0, 4) == 0xFF and a.read(0x320, 4) == 1 << 16   # LVT timer masked
    assert a.read(0x31, 4) == 0 and a.bad_accesses == 1                # misaligned


def test_one_shot_timer_counts_down_in_instructions_and_fires_once():
    a, t = make()
    a.write(0xF0, 4, 0x1FF)
    a.write(0x3E0, 4, 0x0)          # divide by 2
    a.write(0x320, 4, 0x41)         # one-shot, vector 0x41
    a.write(0x380, 4, 100)
    t[0] = 50
    assert a.read(0x390, 4) == 75
    assert a.next_irq(t[0]) == 200
    a.fire(199)
    assert a.pending() is None
    t[0] = 200
    a.fire(200)
    assert a.pending() == 0x41 and a.read(0x390, 4) == 0
    assert a.ack() == 0x41 and a.pending() is None
    assert a.read(0x120, 4) == 1 << 1          # ISR bit 0x41
    a.write(0xB0, 4, 0)                                # EOI
    assert a.read(0x120, 4) == 0
    a.fire(10_000)
    assert a.next_irq(10_000) is None and a.timer_irqs == 1


def test_periodic_timer_and_priority():
    a, t = make()
    a.write(0xF0, 4, 0x100)
    a.write(0x3E0, 4, 0xB)          # divide by 1
    a.write(0x320, 4, 0x20030)      # periodic, vector 0x30
    a.write(0x380, 4, 10)
    assert [a.next_irq(0)] == [10]
    t[0] = 25
    a.fire(25)
    assert a.next_irq(25) == 30 and a.read(0x390, 4) == 10 - 25 % 10
    a.write(0x80, 4, 0x30)          # TPR class 3 blocks vector 0x30
    assert a.pending() is None
    a.write(0x80, 4, 0)
    assert a.ack() == 0x30


def test_masked_or_disabled_timer_requests_nothing():
    a, t = make()
    a.write(0x320, 4, 0x40)         # enabling the LVT while the APIC is disabled keeps it masked
    assert a.read(0x320, 4) & (1 << 16)
    a.write(0x380, 4, 5)
    a.fire(100)
    assert a.pending() is None
