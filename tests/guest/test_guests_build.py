"""Every guests/*.asm builds and passes the capstone verification; the guests pass on the
native Unicorn harness (tests/guest/harness_native.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hvmodel.guest.asm import build_file

GUESTS = sorted((Path(__file__).resolve().parents[2] / "guests").glob("*.asm"))


def test_all_five_guests_exist():
    assert {p.stem for p in GUESTS} >= {"hello", "pagefault", "usermode", "faults", "memtest"}


@pytest.mark.parametrize("path", GUESTS, ids=lambda p: p.stem)
def test_guest_builds(path):
    img = build_file(path)
    assert img.entry == img.load_addr == 0x100000
    assert img.symbols["boot_start"] == 0x100000
    assert "main" in img.symbols
    assert len(img.code) < 0x100000  # the image must stay below HEAP_BASE (2 MiB)


@pytest.mark.parametrize("path", GUESTS, ids=lambda p: p.stem)
def test_guest_passes_on_native_harness(path):
    from harness_native import run_image

    mem = 8 << 20 if path.stem == "memtest" else 64 << 20
    r = run_image(build_file(path), mem_size=mem, max_insns=50_000_000)
    assert r.status == 0, f"{r.reason}\n{r.output}"
    assert "PASS" in r.output
