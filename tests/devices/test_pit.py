"""8254 PIT driven by a fake instruction counter."""

from hypothesis import given
from hypothesis import strategies as st

from hvmodel.devices.pit import INSNS_PER_PIT_TICK, Pit8254

T = INSNS_PER_PIT_TICK


class Clock:
    def __init__(self):
        self.now = 0

    def __call__(self):
        return self.now


def make():
    clock = Clock()
    return clock, Pit8254(clock)


def program(pit, channel, mode, divisor):
    pit.write(0x43, 1, (channel << 6) | 0x30 | (mode << 1))  # lobyte/hibyte
    pit.write(0x40 + channel, 1, divisor & 0xFF)
    pit.write(0x40 + channel, 1, (divisor >> 8) & 0xFF)


def read16(pit, channel):
    lo = pit.read(0x40 + channel, 1)
    hi = pit.read(0x40 + channel, 1)
    return lo | hi << 8


def latch(pit, channel):
    pit.write(0x43, 1, channel << 6)  # access mode 00: counter latch


def test_tick_is_84_instructions():
    # 10 ns per instruction, 1.193182 MHz input: 838.1 ns per tick.
    assert T == round(1e9 / 1_193_182 / 10) == 84


def test_counter_advances_with_clock():
    clock, pit = make()
    program(pit, 0, 2, 1000)
    assert read16(pit, 0) == 1000
    clock.now = 10 * T + 5
    assert read16(pit, 0) == 990
    clock.now = 1000 * T + 3 * T
    assert read16(pit, 0) == 997  # mode 2 reloads


def test_latch_freezes_value():
    clock, pit = make()
    program(pit, 0, 2, 1000)
    clock.now = 100 * T
    latch(pit, 0)
    clock.now = 300 * T
    assert read16(pit, 0) == 900
    assert read16(pit, 0) == 700  # latch consumed: live again


def test_second_latch_ignored_until_read():
    clock, pit = make()
    program(pit, 2, 2, 1000)
    latch(pit, 2)
    clock.now = 50 * T
    latch(pit, 2)
    assert read16(pit, 2) == 1000


def test_readback_status_then_count():
    clock, pit = make()
    program(pit, 1, 2, 500)
    clock.now = 20 * T
    pit.write(0x43, 1, 0xC0 | 0x04)  # read-back count and status of channel 1
    clock.now = 90 * T
    status = pit.read(0x41, 1)
    assert status & 0x3F == 0x34  # lobyte/hibyte, mode 2, binary
    assert status & 0x40 == 0  # count loaded: null count clear
    assert status & 0x80  # OUT high in mode 2
    assert read16(pit, 1) == 480


def test_readback_status_only_null_count():
    _, pit = make()
    pit.write(0x43, 1, 0x34)
    pit.write(0x43, 1, 0xE2)  # status only (count bit 5 set = don't latch), ch 0
    assert pit.read(0x40, 1) == 0x80 | 0x40 | 0x34  # OUT high (mode 2), null count


def test_lobyte_only_access():
    clock, pit = make()
    pit.write(0x43, 1, 0x10 | (2 << 1))  # ch 0, lobyte only, mode 2
    pit.write(0x40, 1, 200)
    clock.now = 5 * T
    assert pit.read(0x40, 1) == 195
    assert pit.read(0x40, 1) == 195


def test_hibyte_only_access():
    _, pit = make()
    pit.write(0x43, 1, 0x20 | (2 << 1))
    pit.write(0x40, 1, 0x12)
    assert pit.channels[0].reload == 0x1200
    assert pit.read(0x40, 1) == 0x12


def test_mode2_next_irq_period():
    clock, pit = make()
    clock.now = 1000
    program(pit, 0, 2, 100)
    assert pit.next_irq(1000) == 1000 + 100 * T
    assert pit.fire(1000 + 100 * T) == 1
    assert pit.next_irq(1000 + 100 * T) == 1000 + 200 * T


def test_mode3_irq_period_equals_divisor():
    clock, pit = make()
    program(pit, 0, 3, 11932)
    assert pit.next_irq(0) == 1_002_288
    assert pit.fire(3 * 1_002_288) == 3


def test_mode3_counts_down_by_two():
    clock, pit = make()
    program(pit, 0, 3, 1000)
    clock.now = 10 * T
    assert read16(pit, 0) == 980


def test_missed_ticks_reported_together():
    _, pit = make()
    program(pit, 0, 2, 10)
    assert pit.fire(10 * T - 1) == 0
    assert pit.fire(55 * T) == 5
    assert pit.fire(55 * T) == 0


def test_mode0_fires_once():
    clock, pit = make()
    program(pit, 0, 0, 50)
    assert pit.next_irq(0) == 50 * T
    assert pit.fire(1000 * T) == 1
    assert pit.next_irq(1000 * T) is None
    assert pit.fire(100_000 * T) == 0


def test_mode0_counter_wraps_after_terminal_count():
    clock, pit = make()
    program(pit, 0, 0, 5)
    clock.now = 7 * T
    assert read16(pit, 0) == 0xFFFE


def test_reload_zero_is_65536():
    clock, pit = make()
    program(pit, 0, 2, 0)
    assert pit.next_irq(0) == 65536 * T
    clock.now = T
    assert read16(pit, 0) == 65535


def test_unprogrammed_channel0_no_irq():
    _, pit = make()
    assert pit.next_irq(0) is None
    assert pit.fire(10**9) == 0


def test_control_word_stops_channel0():
    clock, pit = make()
    program(pit, 0, 2, 10)
    clock.now = 5 * T
    pit.write(0x43, 1, 0x34)
    assert pit.next_irq(5 * T) is None
    assert pit.fire(100 * T) == 0


def test_reprogramming_keeps_unreported_edges():
    clock, pit = make()
    program(pit, 0, 2, 10)
    clock.now = 25 * T  # two edges happened, not yet fired
    program(pit, 0, 2, 1000)
    assert pit.next_irq(25 * T) == 10 * T  # overdue
    assert pit.fire(25 * T) == 2
    assert pit.next_irq(25 * T) == 25 * T + 1000 * T


def test_channel2_counts_but_drives_no_irq():
    clock, pit = make()
    program(pit, 2, 2, 100)
    clock.now = 30 * T
    assert read16(pit, 2) == 70
    assert pit.next_irq(30 * T) is None


def test_word_access_writes_two_ports():
    # out 0x40, ax reaches 0x40 then 0x41 (two byte registers).
    _, pit = make()
    pit.write(0x43, 1, 0x74)  # ch 1 lobyte/hibyte mode 2
    pit.write(0x40, 2, 0x0034)  # ch 0 gets 0x34, ch 1 its low byte 0x00
    assert pit.channels[1].write_msb_next


@given(
    divisor=st.integers(min_value=1, max_value=0xFFFF),
    start=st.integers(min_value=0, max_value=10**9),
    elapsed=st.integers(min_value=0, max_value=10**10),
)
def test_mode2_readback_and_fire_match_arithmetic(divisor, start, elapsed):
    clock, pit = make()
    clock.now = start
    program(pit, 0, 2, divisor)
    clock.now = start + elapsed
    latch(pit, 0)
    count = read16(pit, 0)
    ticks = elapsed // T
    assert 1 <= count <= divisor
    assert count == divisor - ticks % divisor
    assert pit.fire(clock.now) == ticks // divisor


@given(
    divisor=st.integers(min_value=1, max_value=0x10000),
    steps=st.lists(st.integers(min_value=0, max_value=3_000_000), max_size=20),
)
def test_fire_in_steps_sums_to_total(divisor, steps):
    _, pit = make()
    program(pit, 0, 2, divisor)
    now, total = 0, 0
    for step in steps:
        now += step
        overdue = total < now // (divisor * T)
        nxt = pit.next_irq(now)
        assert nxt is not None
        assert (nxt <= now) == overdue
        total += pit.fire(now)
    assert total == now // (divisor * T)
    assert pit.next_irq(now) == (now // (divisor * T) + 1) * divisor * T
