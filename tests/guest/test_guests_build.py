"""Every guests/*.asm builds and passes the capstone verification; the guests pass on the
native Unicorn harness (tests/guest/harness_native.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hvmodel.guest.asm import build_file

GUEST_DIR = Path(__file__).resolve().parents[2] / "guests"
GUESTS = sorted(GUEST_DIR.glob("*.asm"))

# Symbols some guests must define (handlers, entry points, routines other tests use).
SYMBOLS = {
    "dedup": ["classify", "expect", "page_of", "fill_page", "check_sampled", "check_full",
              "page_bad", "vm_seed_raw"],
    "hog": ["fill_page", "check_sampled", "page_bad", "vm_seed_raw"],
    "ctxsw": ["timer_handler", "syscall_handler", "user_entry", "kernel_done",
              "user_code_start", "user_code_end", "pcbs", "proc_cr3"],
    "ptchurn": ["pf_handler", "fault_check", "fc_read_insn", "fc_write_insn", "frames"],
    "tlbthrash": ["tt_pass", "tt_last_pass", "tt_verify"],
}


def test_all_five_guests_exist():
    assert {p.stem for p in GUESTS} >= {"hello", "pagefault", "usermode", "faults", "memtest"}
    assert set(SYMBOLS) <= {p.stem for p in GUESTS}   # no symbol list for a guest that is gone


@pytest.mark.parametrize("path", GUESTS, ids=lambda p: p.stem)
def test_guest_builds(path):
    img = build_file(path)
    assert img.entry == img.load_addr == 0x100000
    assert img.symbols["boot_start"] == 0x100000
    assert "main" in img.symbols
    assert len(img.code) < 0x100000  # the image must stay below HEAP_BASE (2 MiB)
    for sym in SYMBOLS.get(path.stem, ()):
        assert sym in img.symbols, sym


@pytest.mark.parametrize("path", GUESTS, ids=lambda p: p.stem)
def test_guest_passes_on_native_harness(path):
    from harness_native import run_image

    mem = 8 << 20 if path.stem == "memtest" else 64 << 20
    r = run_image(build_file(path), mem_size=mem, max_insns=50_000_000)
    assert r.status == 0, f"{r.reason}\n{r.output}"
    assert "PASS" in r.output


def test_ctxsw_user_code_is_page_aligned():
    # ring-3 code gets PTE_U page by page: it must occupy whole pages of its own
    img = build_file(GUEST_DIR / "ctxsw.asm")
    start, end = img.symbols["user_code_start"], img.symbols["user_code_end"]
    assert start % 0x1000 == 0
    assert start < end <= img.end
    assert img.symbols["user_entry"] >= start and img.symbols["user_entry"] < end
