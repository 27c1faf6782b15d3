"""The three shadow-vs-nested trade-off guests (ctxsw, ptchurn, tlbthrash) build and pass
the capstone verification of the build step. Running them is done by other tests
(test_guests_build.py runs every guests/*.asm on the native harness)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hvmodel.guest.asm import build_file

GUEST_DIR = Path(__file__).resolve().parents[2] / "guests"
TRADEOFF = ["ctxsw", "ptchurn", "tlbthrash"]

# symbols each guest must define (its handlers / entry points)
SYMBOLS = {
    "ctxsw": ["timer_handler", "syscall_handler", "user_entry", "kernel_done",
              "user_code_start", "user_code_end", "pcbs", "proc_cr3"],
    "ptchurn": ["pf_handler", "fault_check", "fc_read_insn", "fc_write_insn", "frames"],
    "tlbthrash": ["tt_pass", "tt_last_pass", "tt_verify"],
}


@pytest.mark.parametrize("name", TRADEOFF)
def test_tradeoff_guest_builds(name):
    img = build_file(GUEST_DIR / f"{name}.asm")  # raises GuestBuildError if not verified
    assert img.entry == img.load_addr == 0x100000
    assert img.symbols["boot_start"] == 0x100000
    assert "main" in img.symbols
    assert len(img.code) < 0x100000  # the image must stay below HEAP_BASE (2 MiB)
    for sym in SYMBOLS[name]:
        assert sym in img.symbols, sym


def test_ctxsw_user_code_is_page_aligned():
    # ring-3 code gets PTE_U page by page: it must occupy whole pages of its own
    img = build_file(GUEST_DIR / "ctxsw.asm")
    start, end = img.symbols["user_code_start"], img.symbols["user_code_end"]
    assert start % 0x1000 == 0
    assert start < end <= img.end
    assert img.symbols["user_entry"] >= start and img.symbols["user_entry"] < end
