"""Swap files and hypervisor swapping: real files, checksums, errors that name the page."""

from __future__ import annotations

import os

import pytest

from hvmodel.machine.pool import PAGE_SHIFT, PAGE_SIZE, MachinePool
from hvmodel.machine.swap import SwapDevice, SwapError
from hvmodel.mmu.p2m import P2M, GuestMemoryError, P2MState


def test_slot_round_trip_and_checksum(tmp_path):
    dev = SwapDevice(tmp_path / "a.vswp", 8)
    page = bytes(range(256)) * 16
    slot = dev.write(page)
    assert dev.read(slot) == page
    assert dev.used == 1 and dev.writes == 1 and dev.reads == 1
    assert os.path.getsize(tmp_path / "a.vswp") == 8 * PAGE_SIZE


def test_a_changed_slot_fails_its_checksum(tmp_path):
    dev = SwapDevice(tmp_path / "a.vswp", 8)
    slot = dev.write(b"\x11" * PAGE_SIZE)
    with open(tmp_path / "a.vswp", "r+b") as f:
        f.seek(slot * PAGE_SIZE + 100)
        f.write(b"\x12")
    with pytest.raises(SwapError, match=f"slot {slot} fails its checksum"):
        dev.read(slot)


def test_full_swap_file_is_an_error(tmp_path):
    dev = SwapDevice(tmp_path / "a.vswp", 1)
    dev.write(bytes(PAGE_SIZE))
    with pytest.raises(SwapError, match="full"):
        dev.write(bytes(PAGE_SIZE))


def test_no_room_on_disk_refuses_the_file(tmp_path):
    with pytest.raises(SwapError, match="swap file"):
        SwapDevice(tmp_path / "huge.vswp", 1 << 40)
    assert not (tmp_path / "huge.vswp").exists()


def test_close_deletes_the_file(tmp_path):
    dev = SwapDevice(tmp_path / "a.vswp", 2)
    dev.close()
    assert not (tmp_path / "a.vswp").exists()


@pytest.fixture
def p2m(tmp_path):
    pool = MachinePool(1 << 20)
    p = P2M(pool, 64, owner=1)
    p.swap = SwapDevice(tmp_path / "vm.vswp", 64)
    return p


def test_swap_out_frees_the_frame_and_swap_in_restores_the_bytes(p2m):
    frame, _ = p2m.resolve(5, True)
    data = os.urandom(PAGE_SIZE)
    p2m.pool.write(frame << PAGE_SHIFT, data)
    free = p2m.pool.free_frames
    zapped = []
    p2m.listeners.append(zapped.append)
    p2m.swap_out(5)
    assert p2m.state[5] == P2MState.SWAPPED and p2m.pool.free_frames == free + 1
    assert zapped == [5]                       # cached translations must go
    assert p2m.read_gpa(5 << PAGE_SHIFT, PAGE_SIZE) == data   # no side effect
    frame2, writable = p2m.resolve(5, False)
    assert writable and p2m.state[5] == P2MState.PRIVATE
    assert p2m.pool.read(frame2 << PAGE_SHIFT, PAGE_SIZE) == data
    assert p2m.swap.used == 0 and p2m.swap_ins == 1 and p2m.swap_outs == 1


def test_corrupted_slot_stops_with_the_page_named_and_never_returns_bad_data(p2m):
    frame, _ = p2m.resolve(9, True)
    p2m.pool.write(frame << PAGE_SHIFT, b"\x5a" * PAGE_SIZE)
    p2m.swap_out(9)
    slot = int(p2m.value[9])
    os.pwrite(p2m.swap.fd, b"\x00", slot * PAGE_SIZE + 7)
    with pytest.raises(GuestMemoryError, match=r"guest page 0x9 .*checksum") as e:
        p2m.resolve(9, False)
    assert e.value.host_failure
    assert p2m.state[9] == P2MState.SWAPPED   # nothing half-done: the page stays swapped
